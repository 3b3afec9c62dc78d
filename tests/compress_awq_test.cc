// AWQ and SmoothQuant against independent scalar references: the min-max RTN of the GPTQ reference,
// output errors summed in f64 by plain loops.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "sparsa/compress/awq.h"
#include "sparsa/compress/smoothquant.h"
#include "sparsa/core/error.h"

namespace sparsa::compress {
namespace {

Matrix random_weight(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 0.02f);
  Matrix w(rows, cols);
  for (float& v : w.data) v = n(rng);
  return w;
}

// Activations with per-channel spread and a few outlier channels 30–60× larger, as in LLMs.
Matrix outlier_inputs(int64_t tokens, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> scale(static_cast<size_t>(cols));
  for (float& s : scale) s = std::exp(0.5f * n(rng));
  int k = 0;
  for (int64_t j = 3; j < cols; j += cols / 6)
    scale[j] *= 30.0f + 10.0f * static_cast<float>(k++ % 4);
  Matrix x(tokens, cols);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < cols; ++j) x.at(t, j) = scale[j] * n(rng);
  return x;
}

// GPTQ reference quant.py, asymmetric: per row and group of g columns.
Matrix rtn_reference(const Matrix& w, int bits, int64_t g) {
  Matrix q = w;
  const float maxq = static_cast<float>((1 << bits) - 1);
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t c0 = 0; c0 < w.cols; c0 += g) {
      float lo = 0.0f, hi = 0.0f;
      for (int64_t j = c0; j < c0 + g; ++j) {
        lo = std::min(lo, w.at(r, j));
        hi = std::max(hi, w.at(r, j));
      }
      if (lo == 0.0f && hi == 0.0f) lo = -1.0f, hi = 1.0f;
      const float scale = (hi - lo) / maxq;
      const float zero = std::nearbyint(-lo / scale);
      for (int64_t j = c0; j < c0 + g; ++j) {
        const float v = std::clamp(std::nearbyint(w.at(r, j) / scale) + zero, 0.0f, maxq);
        q.at(r, j) = scale * (v - zero);
      }
    }
  return q;
}

// y [tokens, rows] = x wᵀ in f64.
std::vector<double> matmul_t(const Matrix& x, const Matrix& w) {
  std::vector<double> y(static_cast<size_t>(x.rows * w.rows));
  for (int64_t t = 0; t < x.rows; ++t)
    for (int64_t r = 0; r < w.rows; ++r) {
      double s = 0.0;
      for (int64_t j = 0; j < x.cols; ++j) s += static_cast<double>(x.at(t, j)) * w.at(r, j);
      y[t * w.rows + r] = s;
    }
  return y;
}

double mse(const std::vector<double>& a, const std::vector<double>& b) {
  double e = 0.0;
  for (size_t i = 0; i < a.size(); ++i) e += (a[i] - b[i]) * (a[i] - b[i]);
  return e / static_cast<double>(a.size());
}

struct AwqCase {
  int bits;
  int64_t group_size;
};

class AwqVsRtn : public ::testing::TestWithParam<AwqCase> {};

TEST_P(AwqVsRtn, LowerOutputErrorThanRtn) {
  const AwqCase c = GetParam();
  const int64_t cols = 256;
  Matrix gate = random_weight(96, cols, 1), up = random_weight(64, cols, 2);
  const Matrix x = outlier_inputs(384, cols, 3);
  const Matrix gate0 = gate, up0 = up;

  AwqOptions opts;
  opts.bits = c.bits;
  opts.group_size = c.group_size;
  std::vector<Matrix*> layers = {&gate, &up};
  const AwqResult res = awq_scale_and_clip(layers, x, opts);
  ASSERT_EQ(res.scales.size(), static_cast<size_t>(cols));
  ASSERT_EQ(res.clip_max.size(), 2u);

  Matrix xs = x;
  divide_columns_by_scales(xs, res.scales);
  const int64_t g = c.group_size > 0 ? c.group_size : cols;
  double rtn = 0.0, awq = 0.0;
  for (auto [w0, w] : {std::pair{&gate0, &gate}, std::pair{&up0, &up}}) {
    const std::vector<double> y = matmul_t(x, *w0);
    rtn += mse(y, matmul_t(x, rtn_reference(*w0, c.bits, g))) * static_cast<double>(w0->rows);
    awq += mse(y, matmul_t(xs, rtn_reference(*w, c.bits, g))) * static_cast<double>(w0->rows);
  }
  rtn /= 160.0;
  awq /= 160.0;
  EXPECT_NEAR(res.error_rtn, rtn, 1e-3 * rtn);
  EXPECT_NEAR(res.error_final, awq, 1e-3 * awq);
  EXPECT_LE(res.error_scaled, res.error_rtn);
  EXPECT_GT(res.alpha, 0.0f);
  EXPECT_LT(awq, 0.8 * rtn) << "bits " << c.bits << " group " << c.group_size;
}

INSTANTIATE_TEST_SUITE_P(Grids, AwqVsRtn,
                         ::testing::Values(AwqCase{4, 128}, AwqCase{3, 128}, AwqCase{4, 0},
                                           AwqCase{3, 64}));

TEST(Awq, ScaleSearchGridAndNormalisation) {
  Matrix w = random_weight(32, 128, 4);
  const Matrix w0 = w;
  const Matrix x = outlier_inputs(200, 128, 5);
  AwqOptions opts;
  opts.n_grid = 10;
  std::vector<Matrix*> layers = {&w};
  const AwqScaleSearch s = awq_search_scales(layers, x, opts);
  EXPECT_EQ(w.data, w0.data);  // the search leaves the layer alone
  ASSERT_EQ(s.errors.size(), 10u);
  EXPECT_EQ(s.error_rtn, s.errors[0]);
  EXPECT_EQ(s.error_scaled, *std::min_element(s.errors.begin(), s.errors.end()));
  const auto [lo, hi] = std::minmax_element(s.scales.begin(), s.scales.end());
  EXPECT_NEAR(static_cast<double>(*lo) * *hi, 1.0, 1e-5);
  // s ∝ mean|x|^α: the outlier channels get the largest scales.
  EXPECT_EQ((hi - s.scales.begin() - 3) % (128 / 6), 0);
}

TEST(Awq, ClipSearchBoundsAndClampsInPlace) {
  Matrix w = random_weight(48, 256, 6);
  const Matrix w0 = w;
  const Matrix x = outlier_inputs(300, 256, 7);
  AwqOptions opts;
  opts.bits = 3;
  const std::vector<float> bound = awq_search_clip(w, x, opts);
  ASSERT_EQ(bound.size(), 48u * 2u);
  int clipped = 0;
  for (int64_t r = 0; r < 48; ++r)
    for (int64_t gi = 0; gi < 2; ++gi) {
      float amax = 0.0f;
      for (int64_t j = gi * 128; j < (gi + 1) * 128; ++j)
        amax = std::max(amax, std::abs(w0.at(r, j)));
      const float b = bound[r * 2 + gi];
      EXPECT_LE(b, amax);
      EXPECT_GE(b, 0.5f * amax * (1.0f - 1e-6f));
      clipped += b < amax;
      for (int64_t j = gi * 128; j < (gi + 1) * 128; ++j)
        EXPECT_EQ(w.at(r, j), std::clamp(w0.at(r, j), -b, b));
    }
  EXPECT_GT(clipped, 0);
  const std::vector<double> y = matmul_t(x, w0);
  EXPECT_LT(mse(y, matmul_t(x, rtn_reference(w, 3, 128))),
            mse(y, matmul_t(x, rtn_reference(w0, 3, 128))));
}

TEST(Awq, RejectsBadArguments) {
  Matrix w = random_weight(8, 128, 8);
  const Matrix x = outlier_inputs(16, 128, 9);
  std::vector<Matrix*> layers = {&w};
  auto expect_error = [&](AwqOptions o, const std::string& needle) {
    try {
      awq_scale_and_clip(layers, x, o);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  AwqOptions o;
  o.bits = 1;
  expect_error(o, "bits = 1 is outside 2..8");
  o.bits = 9;
  expect_error(o, "bits = 9 is outside 2..8");
  o = {};
  o.group_size = 100;
  expect_error(o, "group_size 100 does not divide the 128 input columns");
  o.group_size = -1;
  expect_error(o, "group_size = -1 is negative");
  o = {};
  o.max_shrink = 1.0f;
  expect_error(o, "max_shrink");
  Matrix narrow = random_weight(8, 64, 10);
  std::vector<Matrix*> mixed = {&w, &narrow};
  EXPECT_THROW(awq_search_scales(mixed, x, {}), Error);
  EXPECT_THROW(awq_search_scales(std::span<Matrix* const>{}, x, {}), Error);
  EXPECT_THROW(awq_search_clip(narrow, x, {}), Error);
}

TEST(SmoothQuant, ScalesFollowTheFormula) {
  Matrix a(2, 3), b(1, 3);
  a.data = {1.0f, -2.0f, 0.5f, -4.0f, 1.0f, 0.25f};
  b.data = {0.5f, 8.0f, -1.0f};
  const std::vector<float> xmax = {16.0f, 2.0f, 9.0f};
  std::vector<Matrix*> layers = {&a, &b};
  const std::vector<float> s = smoothquant_scales(layers, xmax, 0.5f);
  // max|W_j| over both layers: 4, 8, 1.
  EXPECT_FLOAT_EQ(s[0], 4.0f / 2.0f);
  EXPECT_FLOAT_EQ(s[1], std::sqrt(2.0f) / std::sqrt(8.0f));
  EXPECT_FLOAT_EQ(s[2], 3.0f);
  const std::vector<float> s1 = smoothquant_scales(layers, xmax, 1.0f);
  EXPECT_FLOAT_EQ(s1[0], 16.0f);
  const std::vector<float> s0 = smoothquant_scales(layers, xmax, 0.0f);
  EXPECT_FLOAT_EQ(s0[1], 1.0f / 8.0f);
}

TEST(SmoothQuant, SmoothingKeepsOutputsExact) {
  const int64_t cols = 96, d = 40;
  const Matrix z = outlier_inputs(64, d, 11);           // input of a previous layer
  Matrix prev = random_weight(cols, d, 12);             // [cols, d], produces x
  std::vector<float> gamma(static_cast<size_t>(cols));  // an RMSNorm weight producing x too
  for (int64_t j = 0; j < cols; ++j) gamma[j] = 0.5f + 0.01f * static_cast<float>(j);
  Matrix x(z.rows, cols);
  const std::vector<double> xd = matmul_t(z, prev);
  for (size_t i = 0; i < x.data.size(); ++i) x.data[i] = static_cast<float>(xd[i]) * 100.0f;
  Matrix q = random_weight(32, cols, 13), k = random_weight(16, cols, 14);
  const std::vector<double> yq = matmul_t(x, q), yk = matmul_t(x, k);

  std::vector<Matrix*> layers = {&q, &k};
  const std::vector<float> s = smoothquant_scales(layers, activation_absmax(x), 0.5f);
  scale_input_channels(layers, s);
  Matrix xs = x;
  divide_columns_by_scales(xs, s);
  auto close = [](const std::vector<double>& a, const std::vector<double>& b) {
    double e = 0.0, n = 0.0;
    for (size_t i = 0; i < a.size(); ++i) e += (a[i] - b[i]) * (a[i] - b[i]), n += a[i] * a[i];
    return std::sqrt(e / n);
  };
  EXPECT_LT(close(yq, matmul_t(xs, q)), 1e-6);
  EXPECT_LT(close(yk, matmul_t(xs, k)), 1e-6);

  // Folding 1/s into the producers gives the same x/s.
  std::vector<float> g2 = gamma;
  divide_by_scales(g2, s);
  for (int64_t j = 0; j < cols; ++j) EXPECT_FLOAT_EQ(g2[j] * s[j], gamma[j]);
  divide_rows_by_scales(prev, s);
  const std::vector<double> xd2 = matmul_t(z, prev);
  for (int64_t t = 0; t < x.rows; ++t)
    for (int64_t j = 0; j < cols; ++j)
      EXPECT_NEAR(xd2[t * cols + j] * 100.0, xs.at(t, j), 1e-4 * (std::abs(xs.at(t, j)) + 1e-3));
}

TEST(SmoothQuant, ReducesW8A8ErrorWithOutliers) {
  const int64_t cols = 256;
  Matrix w = random_weight(128, cols, 15);
  const Matrix x = outlier_inputs(128, cols, 16);
  const double plain = w8a8_output_error(w, x);
  std::vector<Matrix*> layers = {&w};
  const std::vector<float> s = smoothquant_scales(layers, activation_absmax(x), 0.5f);
  scale_input_channels(layers, s);
  Matrix xs = x;
  divide_columns_by_scales(xs, s);
  const double smoothed = w8a8_output_error(w, xs);
  EXPECT_LT(smoothed, 0.5 * plain) << plain << " vs " << smoothed;
}

TEST(SmoothQuant, Int8WeightAndActivationGrids) {
  Matrix w = random_weight(16, 64, 17);
  w.at(3, 5) = 0.5f;
  for (int64_t j = 0; j < 64; ++j) w.at(7, j) = 0.0f;
  const Int8Weight q = quantize_weight_int8(w);
  ASSERT_EQ(q.scales.size(), 16u);
  EXPECT_FLOAT_EQ(q.scales[3], 0.5f / 127.0f);
  EXPECT_EQ(q.q[3 * 64 + 5], 127);
  const Matrix d = dequantize(q);
  for (int64_t r = 0; r < 16; ++r)
    for (int64_t j = 0; j < 64; ++j)
      EXPECT_LE(std::abs(d.at(r, j) - w.at(r, j)), 0.5f * q.scales[r] * (1.0f + 1e-5f));
  for (int64_t j = 0; j < 64; ++j) EXPECT_EQ(d.at(7, j), 0.0f);

  Matrix x = outlier_inputs(8, 64, 18);
  const Matrix x0 = x;
  fake_quantize_activations_int8(x);
  for (int64_t t = 0; t < 8; ++t) {
    float m = 0.0f;
    for (int64_t j = 0; j < 64; ++j) m = std::max(m, std::abs(x0.at(t, j)));
    const float step = m / 127.0f;
    for (int64_t j = 0; j < 64; ++j) {
      EXPECT_LE(std::abs(x.at(t, j) - x0.at(t, j)), 0.5f * step * (1.0f + 1e-5f));
      EXPECT_NEAR(x.at(t, j) / step, std::nearbyint(x.at(t, j) / step), 1e-3);
    }
  }
}

TEST(SmoothQuant, RejectsBadArguments) {
  Matrix a = random_weight(4, 8, 19), b = random_weight(4, 6, 20);
  std::vector<Matrix*> layers = {&a};
  const std::vector<float> xmax(8, 1.0f);
  try {
    smoothquant_scales(layers, xmax, 1.5f);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("alpha 1.5 is outside [0, 1]"), std::string::npos);
  }
  EXPECT_THROW(smoothquant_scales(layers, std::vector<float>(5, 1.0f), 0.5f), Error);
  std::vector<Matrix*> mixed = {&a, &b};
  EXPECT_THROW(smoothquant_scales(mixed, xmax, 0.5f), Error);
  EXPECT_THROW(scale_input_channels(mixed, xmax), Error);
  std::vector<float> bad = xmax;
  bad[2] = 0.0f;
  EXPECT_THROW(scale_input_channels(layers, bad), Error);
  EXPECT_THROW(w8a8_output_error(a, b), Error);
}

}  // namespace
}  // namespace sparsa::compress
