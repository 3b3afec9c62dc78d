// Magnitude, Wanda, SparseGPT and OWL: exact sparsity and N:M structure, the layer-wise error
// ‖WX − ŴX‖² = N/2 · Σ_r δ_r H δ_rᵀ on correlated calibration inputs (SparseGPT and Wanda below
// magnitude), SparseGPT against an unbatched scalar reference, joint quantization, and OWL's
// layer sparsities.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "sparsa/compress/matrix.h"
#include "sparsa/compress/prune.h"
#include "sparsa/compress/quantize.h"
#include "sparsa/core/error.h"
#include "sparsa/core/thread_pool.h"

namespace sparsa::compress {
namespace {

constexpr int64_t kRows = 64, kCols = 256;

Matrix random_weight(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 0.02f);
  Matrix w(rows, cols);
  for (float& v : w.data) v = n(rng);
  return w;
}

// X = Z · A [tokens, cols] with a dense random mixing A (so H is far from diagonal), per-column
// scales spread over e^±1 and a few outlier columns, as LLM activations.
Matrix correlated_inputs(int64_t tokens, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  Matrix a(cols, cols);
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < cols; ++j)
      a.at(i, j) = (i == j ? 0.5f : 0.0f) + n(rng) / std::sqrt(static_cast<float>(cols));
  std::vector<float> scale(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j)
    scale[j] = std::exp(0.7f * n(rng)) * (j % 37 == 5 ? 8.0f : 1.0f);
  Matrix z(tokens, cols), x(tokens, cols);
  for (float& v : z.data) v = n(rng);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t k = 0; k < cols; ++k) {
      const float zk = z.at(t, k);
      for (int64_t j = 0; j < cols; ++j) x.at(t, j) += zk * a.at(k, j);
    }
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < cols; ++j) x.at(t, j) *= scale[j];
  return x;
}

struct Problem {
  Matrix w;
  Matrix x;
  std::vector<double> h;   // [cols, cols], 2/N XᵀX
  std::vector<double> sq;  // [cols], Σ_t x_tj²
};
const Problem& problem() {
  static const Problem p = [] {
    Problem p;
    p.w = random_weight(kRows, kCols, 11);
    p.x = correlated_inputs(1024, kCols, 12);
    ThreadPool pool(2);
    InputStats stats(kCols);
    stats.accumulate(p.x.data.data(), p.x.rows, p.x.cols, pool);
    p.h = stats.hessian(pool);
    p.sq = stats.sq_norms();
    return p;
  }();
  return p;
}

// ‖WX − ŴX‖² computed from the inputs themselves, in f64.
double output_error(const Matrix& w, const Matrix& wp, const Matrix& x) {
  double e = 0.0;
  std::vector<double> d(static_cast<size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t j = 0; j < w.cols; ++j) d[j] = static_cast<double>(w.at(r, j)) - wp.at(r, j);
    for (int64_t t = 0; t < x.rows; ++t) {
      double s = 0.0;
      for (int64_t j = 0; j < w.cols; ++j) s += d[j] * x.at(t, j);
      e += s * s;
    }
  }
  return e;
}

int64_t pruned(const Mask& keep) { return std::count(keep.begin(), keep.end(), uint8_t{0}); }

void expect_mask_applied(const Matrix& w, const Mask& keep) {
  ASSERT_EQ(keep.size(), w.data.size());
  for (size_t i = 0; i < keep.size(); ++i)
    if (!keep[i]) {
      ASSERT_EQ(w.data[i], 0.0f) << "pruned entry " << i << " is not zero";
    }
}

void expect_nm(const Mask& keep, int64_t rows, int64_t cols, int n, int m) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c0 = 0; c0 < cols; c0 += m) {
      int zeros = 0;
      for (int j = 0; j < m; ++j) zeros += keep[r * cols + c0 + j] == 0;
      ASSERT_EQ(zeros, n) << "row " << r << " columns " << c0 << ".." << c0 + m - 1;
    }
}

template <typename F>
void expect_error(F&& f, const std::string& part) {
  try {
    f();
    ADD_FAILURE() << "no error thrown; expected one containing '" << part << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

// SparseGPT without lazy batches, in f64: per block, the mask of the block's w²/U_jj² (all rows)
// at the block's start; then every column's error updates all later columns at once.
Matrix sparsegpt_scalar(const Matrix& w0, std::vector<double> h, double sparsity, int64_t bs) {
  const int64_t rows = w0.rows, cols = w0.cols;
  inverse_hessian_factor(h, cols, 0.01);
  std::vector<double> w(w0.data.begin(), w0.data.end());
  std::vector<uint8_t> keep(w.size(), 1);
  for (int64_t i1 = 0; i1 < cols; i1 += bs) {
    std::vector<std::pair<double, int64_t>> s;  // (score, r * bs + j)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < bs; ++j) {
        const double v = w[r * cols + i1 + j], d = h[(i1 + j) * cols + i1 + j];
        s.push_back({v * v / (d * d), r * bs + j});
      }
    std::sort(s.begin(), s.end());
    for (int64_t k = 0; k < static_cast<int64_t>(sparsity * rows * bs); ++k)
      keep[(s[k].second / bs) * cols + i1 + s[k].second % bs] = 0;
    for (int64_t c = i1; c < i1 + bs; ++c)
      for (int64_t r = 0; r < rows; ++r) {
        double* wr = w.data() + r * cols;
        const double q = keep[r * cols + c] ? wr[c] : 0.0;
        const double e = (wr[c] - q) / h[c * cols + c];
        for (int64_t j = c + 1; j < cols; ++j) wr[j] -= e * h[c * cols + j];
        wr[c] = q;
      }
  }
  Matrix out(rows, cols);
  for (size_t i = 0; i < w.size(); ++i) out.data[i] = static_cast<float>(w[i]);
  return out;
}

TEST(MagnitudePrune, ExactSparsityBelowOneThreshold) {
  for (double s : {0.0, 0.5, 0.7, 0.57}) {
    Matrix w = problem().w;
    const Mask keep = magnitude_prune(w, {s});
    EXPECT_EQ(pruned(keep), static_cast<int64_t>(std::floor(s * kRows * kCols + 1e-9))) << s;
    expect_mask_applied(w, keep);
    float max_pruned = 0.0f, min_kept = 1e30f;
    for (size_t i = 0; i < keep.size(); ++i) {
      const float a = std::abs(problem().w.data[i]);
      if (keep[i])
        min_kept = std::min(min_kept, a);
      else
        max_pruned = std::max(max_pruned, a);
    }
    EXPECT_LE(max_pruned, min_kept);
  }
}

TEST(MagnitudePrune, TiesGoToTheLowerIndex) {
  Matrix w(1, 6);
  w.data = {0.1f, -0.1f, 0.1f, 0.3f, -0.2f, 0.1f};
  const Mask keep = magnitude_prune(w, {0.5});
  EXPECT_EQ(keep, (Mask{0, 0, 0, 1, 1, 1}));
}

TEST(WandaPrune, ExactPerRowSparsityByActivationScore) {
  const Problem& p = problem();
  Matrix w = p.w;
  const Mask keep = wanda_prune(w, p.sq, {0.5});
  expect_mask_applied(w, keep);
  for (int64_t r = 0; r < kRows; ++r) {
    int64_t zeros = 0;
    double max_pruned = 0.0, min_kept = 1e30;
    for (int64_t j = 0; j < kCols; ++j) {
      const double score = std::abs(p.w.at(r, j)) * std::sqrt(p.sq[j]);
      if (keep[r * kCols + j]) {
        min_kept = std::min(min_kept, score);
      } else {
        ++zeros;
        max_pruned = std::max(max_pruned, score);
      }
    }
    ASSERT_EQ(zeros, kCols / 2) << "row " << r;
    ASSERT_LE(max_pruned, min_kept * (1 + 1e-6)) << "row " << r;
  }
}

TEST(Pruners, ExactNmStructure) {
  const Problem& p = problem();
  for (auto [n, m] : {std::pair{2, 4}, {1, 4}, {4, 8}}) {
    SCOPED_TRACE(::testing::Message() << n << ":" << m);
    const SparsityPattern nm{0.0, n, m};
    Matrix a = p.w, b = p.w, c = p.w;
    const Mask ka = magnitude_prune(a, nm);
    const Mask kb = wanda_prune(b, p.sq, nm);
    const Mask kc = sparsegpt_prune(c, p.h, nm);
    for (const auto& [w, keep] : {std::pair{&a, &ka}, {&b, &kb}, {&c, &kc}}) {
      expect_nm(*keep, kRows, kCols, n, m);
      expect_mask_applied(*w, *keep);
    }
  }
}

TEST(SparseGpt, ExactUnstructuredSparsityPerBlock) {
  const Problem& p = problem();
  ThreadPool pool(2);
  for (double s : {0.5, 0.7}) {
    Matrix w = p.w;
    const Mask keep = sparsegpt_prune(w, p.h, {s}, {}, nullptr, &pool);
    expect_mask_applied(w, keep);
    // Two blocks of 128 columns, each pruned at floor(s · 64 · 128).
    for (int64_t i1 : {0, 128}) {
      int64_t zeros = 0;
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t j = i1; j < i1 + 128; ++j) zeros += keep[r * kCols + j] == 0;
      EXPECT_EQ(zeros, static_cast<int64_t>(std::floor(s * kRows * 128 + 1e-9))) << s;
    }
  }
}

TEST(Pruners, SparseGptAndWandaBeatMagnitude) {
  const Problem& p = problem();
  ThreadPool pool(2);
  for (const SparsityPattern pat :
       {SparsityPattern{0.5}, SparsityPattern{0.0, 2, 4}, SparsityPattern{0.7}}) {
    SCOPED_TRACE(::testing::Message() << pat.sparsity << " " << pat.n << ":" << pat.m);
    Matrix mag = p.w, wanda = p.w, sgpt = p.w;
    magnitude_prune(mag, pat);
    wanda_prune(wanda, p.sq, pat);
    sparsegpt_prune(sgpt, p.h, pat, {}, nullptr, &pool);
    const double e_mag = output_error(p.w, mag, p.x), e_wanda = output_error(p.w, wanda, p.x),
                 e_sgpt = output_error(p.w, sgpt, p.x);
    EXPECT_LT(e_wanda, e_mag) << "wanda " << e_wanda << " magnitude " << e_mag;
    EXPECT_LT(e_sgpt, 0.9 * e_wanda) << "sparsegpt " << e_sgpt << " wanda " << e_wanda;
  }
}

TEST(SparseGpt, MatchesUnbatchedScalarReference) {
  const Problem& p = problem();
  const Matrix ref = sparsegpt_scalar(p.w, p.h, 0.5, 128);
  for (int64_t block : {int64_t{128}}) {
    Matrix w = p.w;
    const Mask keep = sparsegpt_prune(w, p.h, {0.5}, {block, 0.01});
    int64_t mask_differs = 0;
    for (size_t i = 0; i < keep.size(); ++i) mask_differs += (keep[i] != 0) != (ref.data[i] != 0);
    EXPECT_LT(mask_differs, static_cast<int64_t>(keep.size() / 500)) << mask_differs;
    double worst = 0.0;
    for (size_t i = 0; i < keep.size(); ++i)
      worst = std::max(worst, std::abs(static_cast<double>(w.data[i]) - ref.data[i]));
    EXPECT_LT(worst, 1e-3);  // weights ~0.02; a differing choice moves its row by ~1e-3
    const double e = output_error(p.w, w, p.x), e_ref = output_error(p.w, ref, p.x);
    EXPECT_NEAR(e, e_ref, 0.01 * e_ref);
  }
}

TEST(SparseGpt, JointQuantizationKeepsTheGrid) {
  const Problem& p = problem();
  ThreadPool pool(2);
  for (int bits : {3, 4})
    for (int64_t group : {int64_t{0}, int64_t{128}})
      for (const SparsityPattern pat : {SparsityPattern{0.5}, SparsityPattern{0.0, 2, 4}}) {
        SCOPED_TRACE(::testing::Message()
                     << bits << " bits group " << group << " " << pat.n << ":" << pat.m);
        SparseGptOptions o;
        o.quant = QuantSpec{bits, false, group, false};
        Matrix w = p.w;
        QuantResult q;
        const Mask keep = sparsegpt_prune(w, p.h, pat, o, &q, &pool);
        expect_mask_applied(w, keep);
        const int64_t g = group > 0 ? group : kCols;
        for (int64_t r = 0; r < kRows; ++r)
          for (int64_t c0 = 0; c0 < kCols; c0 += g) {
            std::set<float> values(w.row(r) + c0, w.row(r) + c0 + g);
            ASSERT_LE(values.size(), size_t{1} << bits) << "row " << r << " group " << c0 / g;
          }
        const int maxq = (1 << bits) - 1;
        for (uint8_t c : q.codes) ASSERT_LE(c, maxq);
        Matrix back;
        dequantize(q, back);
        for (size_t i = 0; i < w.data.size(); ++i) ASSERT_EQ(back.data[i], w.data[i]) << i;
        for (size_t i = 0; i < keep.size(); ++i)
          if (!keep[i]) {
            ASSERT_EQ(q.codes[i], q.zeros[(i / kCols) * q.n_groups() + q.g_idx[i % kCols]]);
          }
        if (pat.m == 0) {
          EXPECT_EQ(pruned(keep), kRows * kCols / 2);
        }
      }
}

TEST(Owl, OutlierRatioCountsScoresAboveMTimesTheMean) {
  // Scores |w|·‖x‖ with ‖x‖ = 1: ten of 1, two of 20: mean = 50/12, 5 × mean = 20.8 → none;
  // m = 4: 16.7 → two outliers.
  Matrix w(2, 6);
  w.data = {1, 1, 1, 1, 1, 20, -1, 1, -20, 1, 1, 1};
  const std::vector<double> sq(6, 1.0);
  EXPECT_DOUBLE_EQ(outlier_ratio(w, sq, 5.0), 0.0);
  EXPECT_DOUBLE_EQ(outlier_ratio(w, sq, 4.0), 2.0 / 12.0);
  // Layer-wise, the two matrices share one mean.
  Matrix small(1, 6);
  small.data = {1, 1, 1, 1, 1, 1};
  const Matrix* ws[] = {&w, &small};
  const std::vector<double>* ns[] = {&sq, &sq};
  EXPECT_DOUBLE_EQ(layer_outlier_ratio(ws, ns, 4.0), 2.0 / 18.0);
}

TEST(Owl, SparsitiesAverageToTargetAndOrderByOutlierRatio) {
  const std::vector<double> ratios = {0.01, 0.05, 0.02, 0.08, 0.03, 0.04};
  for (double target : {0.5, 0.7}) {
    const std::vector<double> s = owl_layer_sparsities(ratios, target, 0.08);
    ASSERT_EQ(s.size(), ratios.size());
    EXPECT_NEAR(std::accumulate(s.begin(), s.end(), 0.0) / s.size(), target, 1e-12);
    const auto [lo, hi] = std::minmax_element(s.begin(), s.end());
    EXPECT_NEAR(*hi - *lo, 2 * 0.08, 1e-12);
    for (size_t i = 0; i < s.size(); ++i)
      for (size_t j = 0; j < s.size(); ++j)
        if (ratios[i] > ratios[j]) {
          EXPECT_LT(s[i], s[j]) << "more outliers, less pruning";
        }
  }
  EXPECT_EQ(owl_layer_sparsities({0.1, 0.1, 0.1}, 0.5), (std::vector<double>{0.5, 0.5, 0.5}));
  // From matrices: with Gaussian weights and equal input norms, scores beyond 5 × mean are rare
  // (6e-5); scaling one input column of weights by 40 makes its 64 scores outliers.
  const std::vector<double> ones(kCols, 1.0);
  Matrix plain = problem().w, spiky = problem().w;
  for (int64_t r = 0; r < kRows; ++r) spiky.at(r, 3) *= 40.0f;
  EXPECT_GT(outlier_ratio(spiky, ones), 0.9 * kRows / (kRows * kCols));
  const std::vector<double> s =
      owl_layer_sparsities({outlier_ratio(plain, ones), outlier_ratio(spiky, ones)}, 0.5);
  EXPECT_GT(s[0], s[1]);
}

TEST(Pruners, RejectBadSpecs) {
  const Problem& p = problem();
  Matrix w = p.w;
  expect_error([&] { magnitude_prune(w, {1.0}); }, "magnitude_prune: sparsity 1 is outside [0, 1)");
  expect_error([&] { wanda_prune(w, p.sq, {-0.1}); }, "sparsity -0.1 is outside [0, 1)");
  expect_error([&] { sparsegpt_prune(w, p.h, {0.0, 4, 4}); }, "4:4 needs 0 < n < m");
  expect_error([&] { magnitude_prune(w, {0.0, 5, 4}); }, "5:4 needs 0 < n < m");
  expect_error([&] { magnitude_prune(w, {0.0, 2, 0}); }, "n = 2 without m");
  expect_error([&] { wanda_prune(w, p.sq, {0.0, 2, 3}); }, "m = 3 does not divide the 256");
  expect_error([&] { wanda_prune(w, std::vector<double>(10), {0.5}); },
               "10 squared column norms given for 256 input columns");
  expect_error([&] { sparsegpt_prune(w, std::vector<double>(10), {0.5}); },
               "sparsegpt_prune: the Hessian has 10 entries, expected 256x256");
  expect_error(
      [&] {
        sparsegpt_prune(w, p.h, {0.0, 2, 8}, {12, 0.01});
      },
      "block_size 12 is not a multiple of m = 8");
  SparseGptOptions o;
  o.quant = QuantSpec{4, false, 128, true};
  expect_error([&] { sparsegpt_prune(w, p.h, {0.5}, o); }, "act_order is not supported");
  o.quant = QuantSpec{1, false, 128, false};
  expect_error([&] { sparsegpt_prune(w, p.h, {0.5}, o); }, "bits = 1 is outside 2..8");
  Matrix w2(1, 2);
  expect_error(
      [&] {
        sparsegpt_prune(w2, {1.0, 2.0, 2.0, 1.0}, {0.5});
      },
      "sparsegpt_prune: the Hessian is not positive definite");
  expect_error([&] { owl_layer_sparsities({}, 0.5); }, "no layer outlier ratios");
  expect_error([&] { owl_layer_sparsities({0.1, 0.2}, 1.0); }, "target sparsity 1 is outside");
  expect_error([&] { owl_layer_sparsities({0.1, 0.2}, 0.95, 0.1); }, "lower lambda");
  for (float v : w.data) ASSERT_TRUE(std::isfinite(v));
}

}  // namespace
}  // namespace sparsa::compress
