// SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization
// for Large Language Models"): activations of LLMs have a few input channels with values 10–100×
// larger than the rest, which ruin per-token int8 quantization; since x Wᵀ = (x/s)(W·s)ᵀ, dividing
// channel j of the input by s_j = max|X_j|^α / max|W_j|^(1−α) and multiplying column j of every
// consuming weight by s_j balances the two ranges. The 1/s folds into the preceding RMSNorm, so
// inference pays nothing. Cost: one pass over the weights, O(Σ rows·cols) time and O(cols) memory;
// the W8A8 evaluation helpers cost one GEMM, O(n_tokens·rows·cols).
#include "sparsa/compress/smoothquant.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "sparsa/core/error.h"

namespace sparsa::compress {

namespace {

void check_scales(std::span<const float> s, int64_t cols, const char* what) {
  SPARSA_CHECK(static_cast<int64_t>(s.size()) == cols, "{}: {} scales for {} input channels", what,
               s.size(), cols);
  for (float v : s)
    SPARSA_CHECK(std::isfinite(v) && v > 0.0f, "{}: scale {} is not a positive finite number", what,
                 v);
}

}  // namespace

std::vector<float> activation_absmax(const Matrix& x) {
  std::vector<float> m(static_cast<size_t>(x.cols), 0.0f);
  for (int64_t t = 0; t < x.rows; ++t) {
    const float* xt = x.row(t);
    for (int64_t j = 0; j < x.cols; ++j) m[j] = std::max(m[j], std::abs(xt[j]));
  }
  return m;
}

std::vector<float> activation_absmax(const InputStats& stats) {
  SPARSA_CHECK(stats.tokens() > 0, "activation_absmax: no calibration tokens were seen");
  std::vector<float> m(static_cast<size_t>(stats.cols()));
  for (size_t j = 0; j < m.size(); ++j)
    m[j] = std::max(std::abs(stats.col_min()[j]), std::abs(stats.col_max()[j]));
  return m;
}

std::vector<float> smoothquant_scales(std::span<Matrix* const> layers,
                                      std::span<const float> act_absmax, float alpha) {
  SPARSA_CHECK(!layers.empty(), "smoothquant_scales: no layers given");
  SPARSA_CHECK(alpha >= 0.0f && alpha <= 1.0f, "smoothquant_scales: alpha {} is outside [0, 1]",
               alpha);
  const int64_t cols = layers[0]->cols;
  SPARSA_CHECK(static_cast<int64_t>(act_absmax.size()) == cols,
               "smoothquant_scales: {} activation maxima for layers of {} input channels",
               act_absmax.size(), cols);
  std::vector<float> wmax(static_cast<size_t>(cols), 0.0f);  // [cols]
  for (const Matrix* w : layers) {
    SPARSA_CHECK(w->cols == cols,
                 "smoothquant_scales: layers sharing an input disagree on its width ({} vs {})",
                 w->cols, cols);
    for (int64_t r = 0; r < w->rows; ++r) {
      const float* wr = w->row(r);
      for (int64_t j = 0; j < cols; ++j) wmax[j] = std::max(wmax[j], std::abs(wr[j]));
    }
  }
  std::vector<float> s(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j) {
    const double a = std::max(1e-5, static_cast<double>(act_absmax[j]));
    const double w = std::max(1e-5, static_cast<double>(wmax[j]));
    s[j] = static_cast<float>(std::max(1e-5, std::pow(a, alpha) / std::pow(w, 1.0 - alpha)));
  }
  return s;
}

void scale_input_channels(std::span<Matrix* const> layers, std::span<const float> s) {
  for (Matrix* w : layers) {
    check_scales(s, w->cols, "scale_input_channels");
    for (int64_t r = 0; r < w->rows; ++r) {
      float* wr = w->row(r);
      for (int64_t j = 0; j < w->cols; ++j) wr[j] *= s[j];
    }
  }
}

void divide_by_scales(std::span<float> v, std::span<const float> s) {
  check_scales(s, static_cast<int64_t>(v.size()), "divide_by_scales");
  for (size_t j = 0; j < v.size(); ++j) v[j] /= s[j];
}

void divide_rows_by_scales(Matrix& previous, std::span<const float> s) {
  check_scales(s, previous.rows, "divide_rows_by_scales");
  for (int64_t r = 0; r < previous.rows; ++r) {
    float* wr = previous.row(r);
    for (int64_t j = 0; j < previous.cols; ++j) wr[j] /= s[r];
  }
}

void divide_columns_by_scales(Matrix& x, std::span<const float> s) {
  check_scales(s, x.cols, "divide_columns_by_scales");
  for (int64_t t = 0; t < x.rows; ++t) {
    float* xt = x.row(t);
    for (int64_t j = 0; j < x.cols; ++j) xt[j] /= s[j];
  }
}

Int8Weight quantize_weight_int8(const Matrix& w) {
  Int8Weight q{w.rows, w.cols, std::vector<int8_t>(w.data.size()),
               std::vector<float>(static_cast<size_t>(w.rows))};
  for (int64_t r = 0; r < w.rows; ++r) {
    const float* wr = w.row(r);
    float m = 0.0f;
    for (int64_t j = 0; j < w.cols; ++j) m = std::max(m, std::abs(wr[j]));
    SPARSA_CHECK(std::isfinite(m), "quantize_weight_int8: row {} has a non-finite weight", r);
    const float scale = m > 0.0f ? m / 127.0f : 1.0f;
    q.scales[r] = scale;
    int8_t* qr = q.q.data() + r * w.cols;
    for (int64_t j = 0; j < w.cols; ++j)
      qr[j] = static_cast<int8_t>(std::clamp(std::nearbyint(wr[j] / scale), -127.0f, 127.0f));
  }
  return q;
}

Matrix dequantize(const Int8Weight& w) {
  Matrix m(w.rows, w.cols);
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t j = 0; j < w.cols; ++j)
      m.at(r, j) = static_cast<float>(w.q[r * w.cols + j]) * w.scales[r];
  return m;
}

void fake_quantize_activations_int8(Matrix& x) {
  for (int64_t t = 0; t < x.rows; ++t) {
    float* xt = x.row(t);
    float m = 0.0f;
    for (int64_t j = 0; j < x.cols; ++j) m = std::max(m, std::abs(xt[j]));
    if (m == 0.0f) continue;
    const float scale = m / 127.0f;
    for (int64_t j = 0; j < x.cols; ++j)
      xt[j] = std::clamp(std::nearbyint(xt[j] / scale), -127.0f, 127.0f) * scale;
  }
}

double w8a8_output_error(const Matrix& w, const Matrix& x) {
  SPARSA_CHECK(w.cols == x.cols, "w8a8_output_error: inputs have {} columns, the weight {}", x.cols,
               w.cols);
  const int64_t n = x.rows, rows = w.rows, cols = w.cols;
  if (n == 0 || rows == 0) return 0.0;
  Matrix wq = dequantize(quantize_weight_int8(w));
  Matrix xq = x;
  fake_quantize_activations_int8(xq);
  std::vector<float> y(static_cast<size_t>(n * rows)), yq(y.size());  // [n, rows]
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(rows),
              static_cast<int>(cols), 1.0f, x.data.data(), static_cast<int>(cols), w.data.data(),
              static_cast<int>(cols), 0.0f, y.data(), static_cast<int>(rows));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(rows),
              static_cast<int>(cols), 1.0f, xq.data.data(), static_cast<int>(cols), wq.data.data(),
              static_cast<int>(cols), 0.0f, yq.data(), static_cast<int>(rows));
  double e = 0.0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double d = static_cast<double>(y[i]) - yq[i];
    e += d * d;
  }
  return e / static_cast<double>(y.size());
}

}  // namespace sparsa::compress
