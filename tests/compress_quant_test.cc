// RTN and GPTQ against scalar references written from the GPTQ reference code (quant.py,
// gptq.py fasterquant), a case computed by hand, and the layer-wise error they exist to reduce:
// ‖WX − ŴX‖² = N/2 · Σ_r δ_r H δ_rᵀ on correlated calibration inputs (H far from diagonal).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "sparsa/compress/matrix.h"
#include "sparsa/compress/quantize.h"
#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"
#include "sparsa/core/thread_pool.h"

namespace sparsa::compress {
namespace {

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

// H = 2/N XᵀX in f64, [cols, cols].
std::vector<double> hessian_of(const Matrix& x) {
  const int64_t c = x.cols;
  std::vector<double> h(static_cast<size_t>(c * c), 0.0);
  for (int64_t t = 0; t < x.rows; ++t) {
    const float* xt = x.row(t);
    for (int64_t i = 0; i < c; ++i) {
      const double xi = xt[i];
      double* hi = h.data() + i * c;
      for (int64_t j = i; j < c; ++j) hi[j] += xi * xt[j];
    }
  }
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = i; j < c; ++j) {
      h[i * c + j] *= 2.0 / static_cast<double>(x.rows);
      h[j * c + i] = h[i * c + j];
    }
  return h;
}

// Σ_r δ_r H δ_rᵀ with δ = W − Ŵ: the layer-wise error ‖WX − ŴX‖² up to the factor N/2.
double layer_error(const Matrix& w, const Matrix& wq, const std::vector<double>& h) {
  const int64_t c = w.cols;
  double e = 0.0;
  std::vector<double> d(static_cast<size_t>(c));
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t j = 0; j < c; ++j) d[j] = static_cast<double>(w.at(r, j)) - wq.at(r, j);
    for (int64_t i = 0; i < c; ++i) {
      double s = 0.0;
      for (int64_t j = 0; j < c; ++j) s += h[i * c + j] * d[j];
      e += d[i] * s;
    }
  }
  return e;
}

// quant.py, written out for one group: find_params (perchannel, mse = False) then quantize.
struct ScalarGrid {
  float scale, zero;
};
ScalarGrid scalar_grid(const float* w, int64_t n, int bits, bool sym) {
  const float maxq = static_cast<float>((1 << bits) - 1);
  float xmin = 0.0f, xmax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] < xmin) xmin = w[i];
    if (w[i] > xmax) xmax = w[i];
  }
  if (sym) {
    xmax = std::max(std::fabs(xmin), xmax);
    if (xmin < 0) xmin = -xmax;
  }
  if (xmin == 0 && xmax == 0) xmin = -1, xmax = 1;
  // The scale as f16 stores it (0.1 → 0.0999756), at least f16's smallest subnormal.
  const float scale = std::max(f16_to_f32(f32_to_f16((xmax - xmin) / maxq)), 0x1p-24f);
  return {scale, sym ? (maxq + 1) / 2 : std::nearbyint(-xmin / scale)};
}
float scalar_quantize(float w, ScalarGrid g, int bits) {
  const float maxq = static_cast<float>((1 << bits) - 1);
  const float q = std::min(std::max(std::nearbyint(w / g.scale) + g.zero, 0.0f), maxq);
  return g.scale * (q - g.zero);
}

Matrix rtn_scalar(const Matrix& w, int bits, bool sym, int64_t group) {
  Matrix q = w;
  const int64_t g = group > 0 ? group : w.cols;
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t c0 = 0; c0 < w.cols; c0 += g) {
      const ScalarGrid grid = scalar_grid(w.row(r) + c0, g, bits, sym);
      for (int64_t j = c0; j < c0 + g; ++j) q.at(r, j) = scalar_quantize(w.at(r, j), grid, bits);
    }
  return q;
}

// GPTQ without lazy batches, in f64: every column's error updates all later columns at once;
// group grids are found at each group's first column from the current weights. Equal to
// fasterquant whenever groups start on block boundaries (group_size a multiple of block_size).
Matrix gptq_scalar(const Matrix& w0, std::vector<double> h, int bits, bool sym, int64_t group) {
  const int64_t rows = w0.rows, cols = w0.cols;
  Matrix w = w0;
  std::vector<ScalarGrid> grid(static_cast<size_t>(rows));
  if (group == 0)
    for (int64_t r = 0; r < rows; ++r) grid[r] = scalar_grid(w.row(r), cols, bits, sym);
  inverse_hessian_factor(h, cols, 0.01);  // checked against its definition below
  std::vector<double> wd(w.data.begin(), w.data.end());
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      double* wr = wd.data() + r * cols;
      if (group > 0 && c % group == 0) {
        std::vector<float> tmp(wr + c, wr + c + group);
        grid[r] = scalar_grid(tmp.data(), group, bits, sym);
      }
      const float q = scalar_quantize(static_cast<float>(wr[c]), grid[r], bits);
      const double e = (wr[c] - q) / h[c * cols + c];
      for (int64_t j = c + 1; j < cols; ++j) wr[j] -= e * h[c * cols + j];
      wr[c] = q;
    }
  for (size_t i = 0; i < wd.size(); ++i) w.data[i] = static_cast<float>(wd[i]);
  return w;
}

void expect_codes_reproduce(const QuantResult& q, const Matrix& w) {
  ASSERT_EQ(q.codes.size(), w.data.size());
  const int maxq = (1 << q.bits) - 1;
  for (uint8_t c : q.codes) ASSERT_LE(c, maxq);
  for (int32_t z : q.zeros) ASSERT_TRUE(z >= 0 && z <= maxq) << z;
  Matrix back;
  dequantize(q, back);
  ASSERT_EQ(back.rows, w.rows);
  ASSERT_EQ(back.cols, w.cols);
  for (size_t i = 0; i < w.data.size(); ++i)
    ASSERT_EQ(back.data[i], w.data[i]) << "entry " << i;  // bit for bit
}

struct Problem {
  Matrix w;
  std::vector<double> h;
};
const Problem& problem() {
  static const Problem p = [] {
    Problem p;
    p.w = random_weight(64, 256, 1);
    p.h = hessian_of(correlated_inputs(1024, 256, 2));
    return p;
  }();
  return p;
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

TEST(Rtn, MatchesScalarGridBitForBit) {
  const Matrix& w0 = problem().w;
  for (int bits : {2, 3, 4, 8})
    for (bool sym : {false, true})
      for (int64_t group : {int64_t{0}, int64_t{64}, int64_t{128}}) {
        SCOPED_TRACE(::testing::Message() << bits << " bits sym " << sym << " group " << group);
        Matrix w = w0;
        const QuantResult q = rtn_quantize(w, {bits, sym, group, false});
        const Matrix ref = rtn_scalar(w0, bits, sym, group);
        for (size_t i = 0; i < w.data.size(); ++i) ASSERT_EQ(w.data[i], ref.data[i]) << i;
        EXPECT_EQ(q.n_groups(), group > 0 ? 256 / group : 1);
        expect_codes_reproduce(q, w);
      }
}

TEST(Rtn, GridEdgeCases) {
  // An all-zero row gets the grid [-1, 1] and stays zero; an all-positive row, symmetric, keeps
  // the reference's xmin = 0 with the zero point at (maxq + 1) / 2.
  Matrix w(2, 4);
  w.data = {0, 0, 0, 0, 0.1f, 0.2f, 0.3f, 0.4f};
  QuantResult q = rtn_quantize(w, {4, true, 0, false});
  EXPECT_EQ(q.zeros[0], 8);
  EXPECT_EQ(q.scales[0], f16_to_f32(f32_to_f16(2.0f / 15.0f)));  // scales are f16 values
  for (int j = 0; j < 4; ++j) EXPECT_EQ(w.at(0, j), 0.0f);
  EXPECT_EQ(q.scales[1], f16_to_f32(f32_to_f16(0.4f / 15.0f)));
  EXPECT_EQ(q.zeros[1], 8);
  // Half-way cases round to even, as torch.round: 0.5 → 0, 1.5 → 2, 2.5 → 2 (scale 1, zero 0).
  Matrix h(1, 4);
  h.data = {0.5f, 1.5f, 2.5f, 3.0f};
  q = rtn_quantize(h, {2, false, 0, false});
  EXPECT_EQ(q.codes, (std::vector<uint8_t>{0, 2, 2, 3}));
}

TEST(Rtn, MaskKeepsPrunedWeightsZero) {
  Matrix w = problem().w;
  Mask keep(w.data.size());
  for (size_t i = 0; i < keep.size(); ++i) keep[i] = (i * 7) % 3 != 0;
  const QuantResult q = rtn_quantize(w, {4, false, 128, false}, &keep);
  for (size_t i = 0; i < keep.size(); ++i)
    if (!keep[i]) {
      ASSERT_EQ(w.data[i], 0.0f);
      ASSERT_EQ(q.codes[i], q.zeros[(i / 256) * 2 + (i % 256) / 128]);
    }
  expect_codes_reproduce(q, w);
}

TEST(HessianFactor, IsTheUpperCholeskyFactorOfTheDampedInverse) {
  const std::vector<double>& h0 = problem().h;
  const int64_t n = 256;
  std::vector<double> u = h0;
  inverse_hessian_factor(u, n, 0.01);
  double mean = 0;
  for (int64_t i = 0; i < n; ++i) mean += h0[i * n + i] / n;
  // U upper with a positive diagonal and Uᵀ U (H + damp) = I determine U uniquely.
  double worst = 0.0;
  std::vector<double> uh(static_cast<size_t>(n * n), 0.0);  // U (H + damp I)
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_GT(u[i * n + i], 0.0);
    for (int64_t j = 0; j < i; ++j) ASSERT_EQ(u[i * n + j], 0.0);
    for (int64_t k = i; k < n; ++k)
      for (int64_t j = 0; j < n; ++j)
        uh[i * n + j] += u[i * n + k] * (h0[k * n + j] + (k == j ? 0.01 * mean : 0.0));
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k <= i; ++k) s += u[k * n + i] * uh[k * n + j];
      worst = std::max(worst, std::abs(s - (i == j ? 1.0 : 0.0)));
    }
  EXPECT_LT(worst, 1e-9);
}

TEST(Gptq, HandComputedTwoColumns) {
  // W = [0.24, −0.06], 2 bits, per channel: xmin = −0.06, xmax = 0.24, scale = 0.1 as f16,
  // s = 0.0999756, zero = round(0.6) = 1. Column 0: round(2.4) + 1 = 3 → s · (3 − 1) = 0.199951,
  // error 0.040049. H = [[1, 0.9], [0.9, 1]] + 0.01 · I: the OBS update of column 1 is
  // −(w0 − q0) · [H⁻¹]01 / [H⁻¹]00 = (w0 − q0) · H01 / H11 = 0.040049 · 0.9 / 1.01 = 0.035687,
  // so w1 = −0.024313 → round(−0.24) + 1 = 1 → 0 (RTN would give round(−0.6) + 1 = 0 → −s).
  Matrix w(1, 2);
  w.data = {0.24f, -0.06f};
  const QuantResult q = gptq_quantize(w, {1.0, 0.9, 0.9, 1.0}, {2, false, 0, false});
  EXPECT_EQ(q.scales[0], 0.0999755859375f);  // 0.1 rounded to f16: 1638 / 16384
  EXPECT_EQ(q.zeros[0], 1);
  EXPECT_EQ(q.codes, (std::vector<uint8_t>{3, 1}));
  EXPECT_EQ(w.at(0, 0), 2 * 0.0999755859375f);
  EXPECT_EQ(w.at(0, 1), 0.0f);
  Matrix rtn(1, 2);
  rtn.data = {0.24f, -0.06f};
  EXPECT_EQ(rtn_quantize(rtn, {2, false, 0, false}).codes, (std::vector<uint8_t>{3, 0}));
}

TEST(Gptq, BeatsRtnOnCorrelatedInputs) {
  const Problem& p = problem();
  ThreadPool pool(2);
  for (int bits : {3, 4})
    for (int64_t group : {int64_t{0}, int64_t{128}})
      for (bool act_order : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << bits << " bits, group " << group << ", act_order " << act_order);
        const QuantSpec spec{bits, false, group, act_order};
        Matrix wr = p.w, wg = p.w;
        rtn_quantize(wr, spec);
        const QuantResult q = gptq_quantize(wg, p.h, spec, {}, nullptr, &pool);
        const double e_rtn = layer_error(p.w, wr, p.h), e_gptq = layer_error(p.w, wg, p.h);
        EXPECT_LT(e_gptq, 0.8 * e_rtn) << "gptq " << e_gptq << " rtn " << e_rtn;
        expect_codes_reproduce(q, wg);
        // Every group holds group_size columns (act_order permutes which ones).
        std::vector<int> per_group(static_cast<size_t>(q.n_groups()), 0);
        for (int32_t g : q.g_idx) ++per_group[g];
        for (int c : per_group) EXPECT_EQ(c, group > 0 ? group : 256);
      }
}

TEST(Gptq, MatchesUnbatchedScalarReference) {
  // Lazy batches of 32 or 128 columns, with or without the pool, against the plain column loop.
  const Problem& p = problem();
  ThreadPool pool(2);
  for (int64_t group : {int64_t{0}, int64_t{128}})
    for (int64_t block : {int64_t{32}, int64_t{128}}) {
      SCOPED_TRACE(::testing::Message() << "group " << group << " block " << block);
      const Matrix ref = gptq_scalar(p.w, p.h, 4, false, group);
      Matrix w = p.w;
      gptq_quantize(w, p.h, {4, false, group, false}, {block, 0.01}, nullptr,
                    block == 32 ? &pool : nullptr);
      int64_t differ = 0;
      // f32 against f64 arithmetic: grids may differ in the last bits (1e-9 here), and a code may
      // flip (a step of one scale, 1e-3) where a value sits on a rounding boundary.
      for (size_t i = 0; i < w.data.size(); ++i)
        differ += std::abs(w.data[i] - ref.data[i]) > 1e-6f;
      EXPECT_LT(differ, static_cast<int64_t>(w.data.size() / 200)) << differ << " differ";
      const double e = layer_error(p.w, w, p.h), e_ref = layer_error(p.w, ref, p.h);
      EXPECT_NEAR(e, e_ref, 0.01 * e_ref);
    }
}

TEST(Gptq, ActOrderGroupsFollowDecreasingHessianDiagonal) {
  const Problem& p = problem();
  Matrix w = p.w;
  const QuantResult q = gptq_quantize(w, p.h, {4, false, 64, true});
  // Group 0 holds the 64 columns of largest H_jj, group 3 the 64 smallest.
  std::vector<double> diag(256);
  for (int j = 0; j < 256; ++j) diag[j] = p.h[j * 256 + j];
  std::vector<double> sorted = diag;
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  for (int j = 0; j < 256; ++j) {
    const auto rank = std::find(sorted.begin(), sorted.end(), diag[j]) - sorted.begin();
    EXPECT_EQ(q.g_idx[j], rank / 64) << "column " << j;
  }
  expect_codes_reproduce(q, w);
}

TEST(Gptq, MaskedWeightsStayExactlyZero) {
  const Problem& p = problem();
  Mask keep(p.w.data.size());
  std::mt19937 rng(5);
  for (auto& k : keep) k = rng() % 2;
  for (int64_t group : {int64_t{0}, int64_t{128}})
    for (bool act_order : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "group " << group << " act_order " << act_order);
      Matrix w = p.w, wr = p.w;
      const QuantResult q = gptq_quantize(w, p.h, {4, false, group, act_order}, {}, &keep);
      for (size_t i = 0; i < keep.size(); ++i)
        if (!keep[i]) {
          ASSERT_EQ(w.data[i], 0.0f) << i;
          const int64_t r = static_cast<int64_t>(i) / 256, c = static_cast<int64_t>(i) % 256;
          ASSERT_EQ(q.codes[i], q.zeros[r * q.n_groups() + q.g_idx[c]]);
        }
      expect_codes_reproduce(q, w);
      rtn_quantize(wr, {4, false, group, false}, &keep);
      EXPECT_LT(layer_error(p.w, w, p.h), layer_error(p.w, wr, p.h));
    }
}

TEST(Gptq, DeadInputColumnsAreZeroed) {
  Matrix x = correlated_inputs(256, 64, 3);
  for (int64_t t = 0; t < x.rows; ++t) x.at(t, 10) = 0.0f;  // input 10 is always zero
  Matrix w = random_weight(8, 64, 4);
  const QuantResult q = gptq_quantize(w, hessian_of(x), {4, false, 32, true});
  for (int64_t r = 0; r < w.rows; ++r) EXPECT_EQ(w.at(r, 10), 0.0f);
  expect_codes_reproduce(q, w);
}

TEST(Gptq, RejectsBadSpecs) {
  const Problem& p = problem();
  Matrix w = p.w;
  expect_error([&] { gptq_quantize(w, p.h, {1, false, 0, false}); }, "bits = 1 is outside 2..8");
  expect_error([&] { gptq_quantize(w, p.h, {9, false, 0, false}); }, "bits = 9 is outside 2..8");
  expect_error(
      [&] {
        gptq_quantize(w, p.h, {4, false, 100, false});
      },
      "group_size 100 does not divide the 256 input columns");
  expect_error([&] { gptq_quantize(w, p.h, {4, false, -1, false}); }, "group_size = -1");
  expect_error(
      [&] {
        gptq_quantize(w, std::vector<double>(100), {4, false, 0, false});
      },
      "the Hessian has 100 entries, expected 256x256");
  expect_error([&] { gptq_quantize(w, p.h, {4, false, 0, false}, {0, 0.01}); }, "block_size = 0");
  expect_error([&] { gptq_quantize(w, p.h, {4, false, 0, false}, {128, -1.0}); }, "damp");
  Mask short_mask(10, 1);
  expect_error(
      [&] {
        gptq_quantize(w, p.h, {4, false, 0, false}, {}, &short_mask);
      },
      "the mask has 10 entries");
  // Indefinite: eigenvalues 3 and −1, and damping 0.01 · mean(diag) = 0.01 does not help.
  Matrix w2(1, 2);
  expect_error(
      [&] {
        gptq_quantize(w2, {1.0, 2.0, 2.0, 1.0}, {4, false, 0, false});
      },
      "gptq_quantize: the Hessian is not positive definite");
  expect_error(
      [&] {
        rtn_quantize(w, {4, false, 3, false});
      },
      "rtn_quantize: group_size 3 does not divide");
  for (float v : w.data) ASSERT_TRUE(std::isfinite(v));
}

}  // namespace
}  // namespace sparsa::compress
