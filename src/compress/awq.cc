// AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
// Acceleration"; reference mit-han-lab/llm-awq auto_scale.py and auto_clip.py). The weights that
// multiply large activations matter most; scaling input channel j of the weights up by s_j (and the
// input down by s_j) shrinks their relative rounding error. s = mean|x|^α, normalised, with α
// picked on a grid of 20 by the quantized outputs' squared error on calibration tokens; then, per
// output row and quantization group, max|w| is shrunk by the ratio in [0.5, 1] that minimises that
// group's partial-output error. Time: the scale search costs n_grid GEMMs
// [T, cols]·[cols, Σ rows] (T = scale_tokens) plus as many fake quantizations; the clipping costs,
// per ratio, one GEMM [rows, G]·[G, min(G, T)] per group: O(ratios · rows · cols · min(G, T)).
// Memory: one copy of the largest layer, the [T, cols] token subsamples and [T, rows] outputs.
#include "sparsa/compress/awq.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "sparsa/core/error.h"

namespace sparsa::compress {

namespace {

int64_t group_width(const AwqOptions& o, int64_t cols) {
  return o.group_size > 0 ? o.group_size : cols;
}

void check_options(const AwqOptions& o, int64_t cols, const char* fn) {
  SPARSA_CHECK(o.bits >= 2 && o.bits <= 8, "{}: bits = {} is outside 2..8", fn, o.bits);
  SPARSA_CHECK(o.group_size >= 0, "{}: group_size = {} is negative (0 means per channel)", fn,
               o.group_size);
  SPARSA_CHECK(o.group_size == 0 || cols % o.group_size == 0,
               "{}: group_size {} does not divide the {} input columns", fn, o.group_size, cols);
  SPARSA_CHECK(o.n_grid >= 1, "{}: n_grid = {} must be at least 1", fn, o.n_grid);
  SPARSA_CHECK(o.clip_grid >= 1, "{}: clip_grid = {} must be at least 1", fn, o.clip_grid);
  SPARSA_CHECK(o.max_shrink >= 0.0f && o.max_shrink < 1.0f, "{}: max_shrink = {} is outside [0, 1)",
               fn, o.max_shrink);
  SPARSA_CHECK(o.scale_tokens >= 1 && o.clip_tokens >= 1,
               "{}: scale_tokens and clip_tokens must be positive", fn);
}

void check_layers(std::span<Matrix* const> layers, const Matrix& x, const char* fn) {
  SPARSA_CHECK(!layers.empty(), "{}: no layers given", fn);
  for (const Matrix* w : layers) {
    SPARSA_CHECK(w != nullptr && w->rows > 0 && w->cols > 0, "{}: an empty layer was given", fn);
    SPARSA_CHECK(w->cols == x.cols, "{}: a layer has {} input columns but x has {}", fn, w->cols,
                 x.cols);
  }
  SPARSA_CHECK(x.rows > 0, "{}: no calibration tokens in x", fn);
}

// Round half to even, as torch.round, for |v| < 2^22 (quantization levels): adding and removing
// 1.5 · 2^23 leaves no fraction bits, and unlike std::nearbyint it vectorizes on baseline x86-64.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

// The asymmetric min-max grid of the GPTQ reference (quant.py, Quantizer.find_params), applied to
// n values in place: w ← scale · (clamp(round(w / scale) + zero, 0, maxq) − zero).
void fake_quantize_group(float* w, int64_t n, float maxq, bool symmetric) {
  float xmin = 0.0f, xmax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    xmin = std::min(xmin, w[i]);
    xmax = std::max(xmax, w[i]);
  }
  if (symmetric) {
    xmax = std::max(-xmin, xmax);
    if (xmin < 0.0f) xmin = -xmax;
  }
  if (xmin == 0.0f && xmax == 0.0f) {
    xmin = -1.0f;
    xmax = 1.0f;
  }
  const float scale = (xmax - xmin) / maxq;
  const float zero = symmetric ? (maxq + 1.0f) / 2.0f : round_even(-xmin / scale);
  for (int64_t i = 0; i < n; ++i) {
    const float q = std::clamp(round_even(w[i] / scale) + zero, 0.0f, maxq);
    w[i] = scale * (q - zero);
  }
}

// Rows [n, cols] of x at evenly strided positions, all of x when n >= x.rows.
Matrix subsample(const Matrix& x, int64_t n) {
  if (n >= x.rows) return x;
  Matrix s(n, x.cols);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = i * x.rows / n;
    std::copy_n(x.row(t), x.cols, s.row(i));
  }
  return s;
}

// Σ over [T, rows] of (x deltaᵀ)², x [T, cols], delta [rows, cols]; out is scratch.
double output_sq_error(const Matrix& x, const std::vector<float>& delta, int64_t rows,
                       std::vector<float>& out) {
  const int64_t t = x.rows, cols = x.cols;
  out.resize(static_cast<size_t>(t * rows));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(t), static_cast<int>(rows),
              static_cast<int>(cols), 1.0f, x.data.data(), static_cast<int>(cols), delta.data(),
              static_cast<int>(cols), 0.0f, out.data(), static_cast<int>(rows));
  double e = 0.0;
  for (float v : out) e += static_cast<double>(v) * v;
  return e;
}

}  // namespace

AwqScaleSearch awq_search_scales(std::span<Matrix* const> layers, const Matrix& x,
                                 const AwqOptions& opts) {
  constexpr const char* kFn = "awq_search_scales";
  check_layers(layers, x, kFn);
  const int64_t cols = x.cols;
  check_options(opts, cols, kFn);
  const int64_t g = group_width(opts, cols);
  const float maxq = static_cast<float>((1 << opts.bits) - 1);

  std::vector<double> act(static_cast<size_t>(cols), 0.0);  // [cols], mean |x| over all tokens
  for (int64_t t = 0; t < x.rows; ++t) {
    const float* xt = x.row(t);
    for (int64_t j = 0; j < cols; ++j) act[j] += std::abs(xt[j]);
  }
  for (double& a : act) a /= static_cast<double>(x.rows);
  const Matrix xs = subsample(x, opts.scale_tokens);  // [T, cols]
  int64_t total_rows = 0;
  for (const Matrix* w : layers) total_rows += w->rows;
  const double n_out = static_cast<double>(xs.rows) * static_cast<double>(total_rows);

  AwqScaleSearch best;
  best.errors.resize(static_cast<size_t>(opts.n_grid));
  double best_err = std::numeric_limits<double>::infinity();
  std::vector<float> s(static_cast<size_t>(cols));  // [cols]
  std::vector<float> delta, tmp(static_cast<size_t>(g)), out;
  for (int i = 0; i < opts.n_grid; ++i) {
    const double alpha = static_cast<double>(i) / opts.n_grid;
    double smax = 0.0, smin = std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < cols; ++j) {
      const double v = std::max(std::pow(act[j], alpha), 1e-4);
      s[j] = static_cast<float>(v);
      smax = std::max(smax, v);
      smin = std::min(smin, v);
    }
    const double norm = std::sqrt(smax * smin);
    for (float& v : s) v = static_cast<float>(v / norm);

    double err = 0.0;
    for (const Matrix* w : layers) {
      delta.resize(w->data.size());  // [rows, cols], W − Q(W·s)/s
      for (int64_t r = 0; r < w->rows; ++r) {
        const float* wr = w->row(r);
        float* dr = delta.data() + r * cols;
        for (int64_t c0 = 0; c0 < cols; c0 += g) {
          for (int64_t j = 0; j < g; ++j) tmp[j] = wr[c0 + j] * s[c0 + j];
          fake_quantize_group(tmp.data(), g, maxq, opts.symmetric);
          for (int64_t j = 0; j < g; ++j) dr[c0 + j] = wr[c0 + j] - tmp[j] / s[c0 + j];
        }
      }
      err += output_sq_error(xs, delta, w->rows, out);
    }
    err /= n_out;
    best.errors[i] = err;
    if (err < best_err) {
      best_err = err;
      best.alpha = static_cast<float>(alpha);
      best.scales = s;
    }
  }
  best.error_rtn = best.errors[0];
  best.error_scaled = best_err;
  return best;
}

std::vector<float> awq_search_clip(Matrix& w, const Matrix& x, const AwqOptions& opts) {
  constexpr const char* kFn = "awq_search_clip";
  Matrix* const one[] = {&w};
  check_layers(one, x, kFn);
  const int64_t rows = w.rows, cols = w.cols;
  check_options(opts, cols, kFn);
  const int64_t g = group_width(opts, cols), n_groups = cols / g;
  const float maxq = static_cast<float>((1 << opts.bits) - 1);
  const int n_ratios = static_cast<int>(std::floor(opts.max_shrink * opts.clip_grid + 1e-6)) + 1;

  const Matrix xc = subsample(x, opts.clip_tokens);  // [T, cols]
  const int64_t t = xc.rows;
  // Σ_t (x_t,g · δ)² = δᵀ (X_gᵀ X_g) δ: when the group is narrower than the token count, score
  // through the group's [G, G] Gram matrix instead of the [T] outputs.
  const bool use_gram = g <= t;
  const int64_t m = use_gram ? g : t;
  std::vector<float> gram;  // [G, G], X_gᵀ X_g / T, for the group at hand

  std::vector<float> bound(static_cast<size_t>(rows * n_groups));  // [rows, n_groups]
  std::vector<float> wg(static_cast<size_t>(rows * g));            // [rows, G]
  std::vector<float> delta(wg.size());                             // [rows, G]
  std::vector<float> prod(static_cast<size_t>(rows * m));          // [rows, m]
  std::vector<float> amax(static_cast<size_t>(rows));              // [rows]
  std::vector<double> best_err(static_cast<size_t>(rows));         // [rows]
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const int64_t c0 = gi * g;
    const float* xg = xc.data.data() + c0;  // [T, G] with row stride cols
    if (use_gram) {
      gram.resize(static_cast<size_t>(g * g));
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(g), static_cast<int>(g),
                  static_cast<int>(t), 1.0f / static_cast<float>(t), xg, static_cast<int>(cols), xg,
                  static_cast<int>(cols), 0.0f, gram.data(), static_cast<int>(g));
    }
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(w.row(r) + c0, g, wg.data() + r * g);
      float a = 0.0f;
      for (int64_t j = 0; j < g; ++j) a = std::max(a, std::abs(wg[r * g + j]));
      amax[r] = a;
      bound[r * n_groups + gi] = a;
      best_err[r] = std::numeric_limits<double>::infinity();
    }
    for (int i = 0; i < n_ratios; ++i) {
      const float ratio = 1.0f - static_cast<float>(i) / static_cast<float>(opts.clip_grid);
      for (int64_t r = 0; r < rows; ++r) {
        const float hi = amax[r] * ratio;
        const float* src = wg.data() + r * g;
        float* d = delta.data() + r * g;
        for (int64_t j = 0; j < g; ++j) d[j] = std::clamp(src[j], -hi, hi);
        fake_quantize_group(d, g, maxq, opts.symmetric);
        for (int64_t j = 0; j < g; ++j) d[j] = src[j] - d[j];
      }
      if (use_gram) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows),
                    static_cast<int>(g), static_cast<int>(g), 1.0f, delta.data(),
                    static_cast<int>(g), gram.data(), static_cast<int>(g), 0.0f, prod.data(),
                    static_cast<int>(g));
      } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
                    static_cast<int>(t), static_cast<int>(g), 1.0f, delta.data(),
                    static_cast<int>(g), xg, static_cast<int>(cols), 0.0f, prod.data(),
                    static_cast<int>(t));
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* p = prod.data() + r * m;
        double e = 0.0;
        if (use_gram) {
          const float* d = delta.data() + r * g;
          for (int64_t j = 0; j < g; ++j) e += static_cast<double>(p[j]) * d[j];
        } else {
          for (int64_t j = 0; j < t; ++j) e += static_cast<double>(p[j]) * p[j];
          e /= static_cast<double>(t);
        }
        if (e < best_err[r]) {
          best_err[r] = e;
          bound[r * n_groups + gi] = amax[r] * ratio;
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float hi = bound[r * n_groups + gi];
      float* wr = w.row(r) + c0;
      for (int64_t j = 0; j < g; ++j) wr[j] = std::clamp(wr[j], -hi, hi);
    }
  }
  return bound;
}

AwqResult awq_scale_and_clip(std::span<Matrix* const> layers, const Matrix& x,
                             const AwqOptions& opts) {
  constexpr const char* kFn = "awq_scale_and_clip";
  check_layers(layers, x, kFn);
  check_options(opts, x.cols, kFn);
  AwqScaleSearch search = awq_search_scales(layers, x, opts);
  AwqResult res;
  res.scales = std::move(search.scales);
  res.alpha = search.alpha;
  res.error_rtn = search.error_rtn;
  res.error_scaled = search.error_scaled;
  res.error_final = search.error_scaled;
  scale_input_channels(layers, res.scales);
  if (!opts.clip) return res;

  const int64_t cols = x.cols, g = group_width(opts, cols);
  const float maxq = static_cast<float>((1 << opts.bits) - 1);
  Matrix xc = subsample(x, opts.clip_tokens);  // [Tc, cols], divided by s below
  divide_columns_by_scales(xc, res.scales);
  const Matrix xs = subsample(x, opts.scale_tokens);  // [T, cols]
  int64_t total_rows = 0;
  double err = 0.0;
  std::vector<float> delta, out;
  for (Matrix* w : layers) {
    const Matrix before = *w;  // W·s, unclipped
    res.clip_max.push_back(awq_search_clip(*w, xc, opts));
    // x Wᵀ − (x/s) Q(W·s clipped)ᵀ = x (W·s − Q(·))ᵀ/s column-wise.
    delta = w->data;
    for (int64_t r = 0; r < w->rows; ++r) {
      float* dr = delta.data() + r * cols;
      const float* br = before.row(r);
      for (int64_t c0 = 0; c0 < cols; c0 += g)
        fake_quantize_group(dr + c0, g, maxq, opts.symmetric);
      for (int64_t j = 0; j < cols; ++j) dr[j] = (br[j] - dr[j]) / res.scales[j];
    }
    err += output_sq_error(xs, delta, w->rows, out);
    total_rows += w->rows;
  }
  res.error_final = err / (static_cast<double>(xs.rows) * static_cast<double>(total_rows));
  return res;
}

}  // namespace sparsa::compress
