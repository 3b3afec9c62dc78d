#include "sparsa/train/dkm.h"

#include <algorithm>
#include <cmath>

#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"
#include "train/dkm_soft.h"

namespace sparsa::train {

DkmTensor dkm_init(const float* w, int64_t rows, int64_t cols, int bits, int64_t group_rows) {
  SPARSA_CHECK(bits >= 1 && bits <= 8 && rows > 0 && cols > 0,
               "dkm: cannot cluster a {}x{} weight into {}-bit palettes", rows, cols, bits);
  compress::Matrix m(rows, cols);
  std::copy(w, w + rows * cols, m.data.begin());
  const compress::Palette p = compress::palettize(
      m, compress::PaletteOptions{.bits = bits, .group_rows = group_rows > 0 ? group_rows : 0});
  DkmTensor t;
  t.bits = bits;
  t.rows = rows;
  t.cols = cols;
  t.group_rows = p.group_rows;
  t.centroids = p.lut;
  return t;
}

double dkm_tau(const DkmTensor& t, int64_t g, const DkmOptions& o) {
  const float* c = t.centroids.data() + g * t.k();
  const auto [lo, hi] = std::minmax_element(c, c + t.k());
  const double gap = t.k() > 1 ? (static_cast<double>(*hi) - *lo) / static_cast<double>(t.k() - 1) : 1.0;
  return std::max(o.temperature * gap * gap, 1e-12);
}

void dkm_update_centroids(DkmTensor& t, const float* w, const DkmOptions& o) {
  const int64_t k = t.k();
  std::vector<double> a(static_cast<size_t>(k)), num(a.size()), den(a.size());
  for (int64_t g = 0; g < t.n_groups(); ++g) {
    // The unique-value table: the distinct bf16 values of the group and how many weights each.
    const int64_t r0 = g * t.group_rows, r1 = std::min(t.rows, r0 + t.group_rows);
    const compress::UniqueTable table =
        compress::unique_bf16_table(w + r0 * t.cols, r1 - r0, t.cols);
    float* c = t.centroids.data() + g * k;
    for (int64_t it = 0; it < o.iterations; ++it) {
      const double tau = dkm_tau(t, g, o);
      std::fill(num.begin(), num.end(), 0.0);
      std::fill(den.begin(), den.end(), 0.0);
      for (size_t i = 0; i < table.values.size(); ++i) {
        const double v = table.values[i], n = table.weights[i];
        double out = 0;
        dkm_soft_assign(v, c, static_cast<int>(k), tau, a.data(), &out, nullptr);
        for (int64_t j = 0; j < k; ++j) {
          num[static_cast<size_t>(j)] += n * a[static_cast<size_t>(j)] * v;
          den[static_cast<size_t>(j)] += n * a[static_cast<size_t>(j)];
        }
      }
      for (int64_t j = 0; j < k; ++j)  // an empty cluster keeps its centroid
        if (den[static_cast<size_t>(j)] > 1e-30)
          c[j] = static_cast<float>(num[static_cast<size_t>(j)] / den[static_cast<size_t>(j)]);
    }
  }
}

void dkm_soft_weights(const DkmTensor& t, const float* w, const DkmOptions& o, float* out,
                      float* deriv) {
  const int64_t k = t.k();
  std::vector<double> a(static_cast<size_t>(k));
  for (int64_t g = 0; g < t.n_groups(); ++g) {
    const double tau = dkm_tau(t, g, o);
    const float* c = t.centroids.data() + g * k;
    const int64_t r0 = g * t.group_rows, r1 = std::min(t.rows, r0 + t.group_rows);
    for (int64_t i = r0 * t.cols; i < r1 * t.cols; ++i) {
      double x = 0, d = 0;
      dkm_soft_assign(bf16_to_f32(f32_to_bf16(w[i])), c, static_cast<int>(k), tau, a.data(), &x,
                      &d);
      out[i] = static_cast<float>(x);
      if (deriv != nullptr) deriv[i] = static_cast<float>(d);
    }
  }
}

compress::Palette dkm_palette(const DkmTensor& t, const float* w) {
  const int64_t k = t.k();
  compress::Palette p;
  p.bits = t.bits;
  p.group_rows = t.group_rows;
  p.lut = t.centroids;
  p.indices.resize(static_cast<size_t>(t.rows * t.cols));
  for (int64_t g = 0; g < t.n_groups(); ++g) {
    float* c = p.lut.data() + g * k;
    std::sort(c, c + k);
    const int64_t r0 = g * t.group_rows, r1 = std::min(t.rows, r0 + t.group_rows);
    for (int64_t i = r0 * t.cols; i < r1 * t.cols; ++i) {
      int64_t best = 0;
      for (int64_t j = 1; j < k; ++j)
        if (std::abs(w[i] - c[j]) < std::abs(w[i] - c[best])) best = j;
      p.indices[static_cast<size_t>(i)] = static_cast<uint8_t>(best);
    }
  }
  return p;
}

}  // namespace sparsa::train
