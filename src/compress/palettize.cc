// K-means palettization: each group of output channels keeps a table of 2^bits values and every
// weight becomes the index of its nearest entry. The 1-D k-means is fitted on the group's table of
// distinct bf16 values weighted by their multiplicity (eDKM, Cho et al. 2023, "eDKM: An Efficient
// and Accurate Train-time Weight Clustering for Large Language Models", uniquification), or by the
// summed Hessian diagonal of their columns (the sensitivity weighting of SqueezeLLM, Kim et al.
// 2023): at most 65,536 entries, so the fit costs O(iterations · 65,536) whatever the group's size.
// k-means++ seeding (Arthur & Vassilvitskii 2007), then Lloyd iterations, whose assignment step is
// one merge of the sorted table with the sorted centroids. Time: O(rows · cols · log k) for the
// table and the final indices plus the fits; memory: the [rows, cols] indices and a 65,536-entry
// scratch table.
#include "sparsa/compress/palettize.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"

namespace sparsa::compress {

namespace {

constexpr int64_t kBf16Values = 65536;

// The table of rows [r0, r1) of the row-major [*, cols] data w; slot [65536] is scratch holding
// -1 on entry and on return.
UniqueTable unique_table(const float* w, int64_t cols, int64_t r0, int64_t r1,
                         std::span<const double> imp, std::vector<int32_t>& slot) {
  UniqueTable raw;
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const uint16_t b = f32_to_bf16(wr[c]);
      SPARSA_CHECK((b & 0x7f80u) != 0x7f80u, "palettize: weight ({}, {}) = {} is not finite", r, c,
                   wr[c]);
      int32_t& s = slot[b];
      if (s < 0) {
        s = static_cast<int32_t>(raw.bits.size());
        raw.bits.push_back(b);
        raw.weights.push_back(0.0);
      }
      raw.weights[s] += imp.empty() ? 1.0 : imp[c];
    }
  }
  const size_t n = raw.bits.size();
  std::vector<float> v(n);  // [n]
  for (size_t i = 0; i < n; ++i) v[i] = bf16_to_f32(raw.bits[i]);
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return v[a] != v[b] ? v[a] < v[b] : raw.bits[a] < raw.bits[b];
  });
  UniqueTable t;
  t.bits.resize(n);
  t.values.resize(n);
  t.weights.resize(n);
  for (size_t i = 0; i < n; ++i) {
    t.bits[i] = raw.bits[order[i]];
    t.values[i] = v[order[i]];
    t.weights[i] = raw.weights[order[i]];
    slot[t.bits[i]] = -1;
  }
  return t;
}

double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

// The first index whose cumulative weight exceeds u · total, skipping zero weights.
size_t sample(std::span<const double> w, double total, double u) {
  const double target = u * total;
  double cum = 0.0;
  size_t last = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] <= 0.0) continue;
    cum += w[i];
    last = i;
    if (cum > target) return i;
  }
  return last;
}

void assign(std::span<const float> values, const std::vector<double>& cent, std::vector<int>& a,
            bool* changed) {
  const int k = static_cast<int>(cent.size());
  int c = 0;
  *changed = false;
  for (size_t i = 0; i < values.size(); ++i) {
    const double v = values[i];
    while (c < k - 1 && v > 0.5 * (cent[c] + cent[c + 1])) ++c;
    if (a[i] != c) {
      a[i] = c;
      *changed = true;
    }
  }
}

}  // namespace

UniqueTable unique_bf16_table(const Matrix& w, int64_t row_begin, int64_t row_end,
                              std::span<const double> col_importance) {
  SPARSA_CHECK(row_begin >= 0 && row_begin <= row_end && row_end <= w.rows,
               "unique_bf16_table: rows [{}, {}) are outside the matrix's {} rows", row_begin,
               row_end, w.rows);
  SPARSA_CHECK(col_importance.empty() || static_cast<int64_t>(col_importance.size()) == w.cols,
               "unique_bf16_table: {} column importances for {} columns", col_importance.size(),
               w.cols);
  std::vector<int32_t> slot(kBf16Values, -1);
  return unique_table(w.data.data(), w.cols, row_begin, row_end, col_importance, slot);
}

UniqueTable unique_bf16_table(const float* w, int64_t rows, int64_t cols) {
  SPARSA_CHECK(rows >= 0 && cols >= 0, "unique_bf16_table: a {}x{} shape", rows, cols);
  std::vector<int32_t> slot(kBf16Values, -1);
  return unique_table(w, cols, 0, rows, {}, slot);
}

std::vector<double> kmeans_plus_plus(std::span<const float> values, std::span<const double> weights,
                                     int k, uint64_t seed) {
  SPARSA_CHECK(k >= 1, "kmeans_plus_plus: k = {} must be positive", k);
  SPARSA_CHECK(values.size() == weights.size() && !values.empty(),
               "kmeans_plus_plus: {} values and {} weights", values.size(), weights.size());
  double total = 0.0;
  for (double w : weights) {
    SPARSA_CHECK(std::isfinite(w) && w >= 0.0, "kmeans_plus_plus: weight {} is not >= 0", w);
    total += w;
  }
  SPARSA_CHECK(total > 0.0, "kmeans_plus_plus: all weights are zero");
  std::mt19937_64 rng(seed);
  std::vector<double> cent;
  cent.reserve(static_cast<size_t>(k));
  cent.push_back(values[sample(weights, total, uniform01(rng))]);
  const size_t n = values.size();
  std::vector<double> d2(n), score(n);  // [n]
  for (size_t i = 0; i < n; ++i) {
    const double d = values[i] - cent[0];
    d2[i] = d * d;
  }
  while (static_cast<int>(cent.size()) < k) {
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) {
      score[i] = weights[i] * d2[i];
      sum += score[i];
    }
    if (!(sum > 0.0)) {
      cent.resize(static_cast<size_t>(k), cent.back());
      break;
    }
    const double c = values[sample(score, sum, uniform01(rng))];
    cent.push_back(c);
    for (size_t i = 0; i < n; ++i) {
      const double d = values[i] - c;
      d2[i] = std::min(d2[i], d * d);
    }
  }
  std::sort(cent.begin(), cent.end());
  return cent;
}

KMeans1d kmeans_lloyd(std::span<const float> values, std::span<const double> weights,
                      std::vector<double> centroids, int max_iters) {
  SPARSA_CHECK(values.size() == weights.size(), "kmeans_lloyd: {} values and {} weights",
               values.size(), weights.size());
  SPARSA_CHECK(!centroids.empty(), "kmeans_lloyd: no initial centroids");
  SPARSA_CHECK(max_iters >= 0, "kmeans_lloyd: max_iters = {} is negative", max_iters);
  SPARSA_CHECK(std::is_sorted(values.begin(), values.end()), "kmeans_lloyd: values not ascending");
  const size_t k = centroids.size();
  KMeans1d km;
  km.centroids = std::move(centroids);
  std::sort(km.centroids.begin(), km.centroids.end());
  km.assignment.assign(values.size(), -1);
  std::vector<double> sw(k), swv(k);  // [k]
  bool changed = true;
  for (int it = 0; it < max_iters; ++it) {
    assign(values, km.centroids, km.assignment, &changed);
    if (!changed) {
      km.converged = true;
      break;
    }
    std::fill(sw.begin(), sw.end(), 0.0);
    std::fill(swv.begin(), swv.end(), 0.0);
    for (size_t i = 0; i < values.size(); ++i) {
      sw[km.assignment[i]] += weights[i];
      swv[km.assignment[i]] += weights[i] * values[i];
    }
    for (size_t c = 0; c < k; ++c)
      if (sw[c] > 0.0) km.centroids[c] = swv[c] / sw[c];
    // An empty cluster keeps its centroid, which may now be out of order.
    std::sort(km.centroids.begin(), km.centroids.end());
    ++km.iterations;
  }
  if (!km.converged) assign(values, km.centroids, km.assignment, &changed);
  for (size_t i = 0; i < values.size(); ++i) {
    const double d = values[i] - km.centroids[km.assignment[i]];
    km.objective += weights[i] * d * d;
  }
  return km;
}

Palette palettize(Matrix& w, const PaletteOptions& opts, std::span<const double> col_importance) {
  SPARSA_CHECK(opts.bits >= 2 && opts.bits <= 8, "palettize: bits = {} is outside 2..8", opts.bits);
  SPARSA_CHECK(w.rows > 0 && w.cols > 0, "palettize: the matrix is empty ({} x {})", w.rows,
               w.cols);
  SPARSA_CHECK(opts.group_rows >= 0 && (opts.group_rows == 0 || w.rows % opts.group_rows == 0),
               "palettize: group_rows {} does not divide the {} rows", opts.group_rows, w.rows);
  SPARSA_CHECK(opts.max_iters >= 0, "palettize: max_iters = {} is negative", opts.max_iters);
  SPARSA_CHECK(col_importance.empty() || static_cast<int64_t>(col_importance.size()) == w.cols,
               "palettize: {} column importances for {} columns", col_importance.size(), w.cols);
  for (double v : col_importance)
    SPARSA_CHECK(std::isfinite(v) && v >= 0.0,
                 "palettize: column importance {} is not a finite non-negative number", v);
  const int k = 1 << opts.bits;
  const int64_t g = opts.group_rows > 0 ? opts.group_rows : w.rows, n_groups = w.rows / g;
  Palette p;
  p.bits = opts.bits;
  p.group_rows = g;
  p.lut.resize(static_cast<size_t>(n_groups * k));
  p.indices.resize(w.data.size());
  p.objective.resize(static_cast<size_t>(n_groups));
  p.iterations.resize(static_cast<size_t>(n_groups));
  std::vector<int32_t> slot(kBf16Values, -1);
  std::vector<double> mid(static_cast<size_t>(k - 1));  // [k − 1], midpoints of the table
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    UniqueTable t =
        unique_table(w.data.data(), w.cols, gi * g, (gi + 1) * g, col_importance, slot);
    const double total = std::accumulate(t.weights.begin(), t.weights.end(), 0.0);
    // Rows whose columns all have zero importance: any table is as good, fit the plain counts.
    if (!(total > 0.0))
      t = unique_table(w.data.data(), w.cols, gi * g, (gi + 1) * g, {}, slot);
    KMeans1d km = kmeans_lloyd(t.values, t.weights,
                               kmeans_plus_plus(t.values, t.weights, k, opts.seed), opts.max_iters);
    float* lut = p.lut.data() + gi * k;
    for (int c = 0; c < k; ++c) lut[c] = static_cast<float>(km.centroids[c]);
    std::sort(lut, lut + k);
    for (int c = 0; c + 1 < k; ++c) mid[c] = 0.5 * (static_cast<double>(lut[c]) + lut[c + 1]);
    p.objective[gi] = km.objective;
    p.iterations[gi] = km.iterations;
    for (int64_t r = gi * g; r < (gi + 1) * g; ++r) {
      float* wr = w.row(r);
      uint8_t* ir = p.indices.data() + r * w.cols;
      for (int64_t c = 0; c < w.cols; ++c) {
        const auto idx =
            std::lower_bound(mid.begin(), mid.end(), static_cast<double>(wr[c])) - mid.begin();
        ir[c] = static_cast<uint8_t>(idx);
        wr[c] = lut[idx];
      }
    }
  }
  return p;
}

}  // namespace sparsa::compress
