// SmoothQuant (Xiao et al. 2022): migrate the difficulty of quantizing activations with outlier
// channels into the weights, by an exact per-input-channel rescaling x/s · (W·s)ᵀ = x · Wᵀ; plus
// the W8A8 fake-quantization used to evaluate it.
//
//   std::vector<Matrix*> qkv = {&wq, &wk, &wv};               // layers sharing one input x
//   std::vector<float> s = smoothquant_scales(qkv, activation_absmax(stats), 0.5f);
//   scale_input_channels(qkv, s);                              // W[:, j] *= s[j]
//   divide_by_scales(attn_norm_weight, s);                     // the producer of x: x[j] /= s[j]
//   Int8Weight q = quantize_weight_int8(wq);                   // per-output-channel int8
//
// The scale helpers here are shared with AWQ (awq.h), which migrates scales the same way.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "sparsa/compress/matrix.h"

namespace sparsa::compress {

/// max_t |x_tj| per column of x [n_tokens, cols].
std::vector<float> activation_absmax(const Matrix& x);
/// max(|col_min|, |col_max|) per column of the gathered statistics.
std::vector<float> activation_absmax(const InputStats& stats);

/// s_j = max|X_j|^α / max|W_j|^(1−α), max|W_j| taken over the columns j of every layer (all
/// [rows_i, cols] with the same cols), both maxima and s clamped below at 1e-5 as the reference
/// (mit-han-lab/smoothquant smooth.py) does. α in [0, 1]: 0 leaves the activations alone up to the
/// weight normalisation, 1 moves all of their range into the weights. Returns s [cols].
std::vector<float> smoothquant_scales(std::span<Matrix* const> layers,
                                      std::span<const float> act_absmax, float alpha = 0.5f);

/// W[:, j] *= s[j] for every layer; s [cols]. The caller must divide the input by s (see below)
/// so that the layers' outputs stay the same.
void scale_input_channels(std::span<Matrix* const> layers, std::span<const float> s);
/// v[j] /= s[j]: folds 1/s into an RMSNorm weight (or bias) [cols] producing the input.
void divide_by_scales(std::span<float> v, std::span<const float> s);
/// W[j, :] /= s[j]: folds 1/s into the previous linear layer [cols, *] producing the input
/// (v_proj before o_proj, up_proj before down_proj).
void divide_rows_by_scales(Matrix& previous, std::span<const float> s);
/// X[:, j] /= s[j] for inputs x [n_tokens, cols], to evaluate a smoothed layer.
void divide_columns_by_scales(Matrix& x, std::span<const float> s);

/// Per-output-channel symmetric int8: W[r, c] ≈ q[r, c] · scales[r], q in [-127, 127].
struct Int8Weight {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<int8_t> q;      // [rows, cols]
  std::vector<float> scales;  // [rows], max|W[r, :]| / 127
};
Int8Weight quantize_weight_int8(const Matrix& w);
Matrix dequantize(const Int8Weight& w);

/// Per-token dynamic symmetric int8 fake-quantization of x [n_tokens, cols] in place: each row is
/// rounded to the grid max|x_t| / 127, as a W8A8 kernel quantizes its input on the fly.
void fake_quantize_activations_int8(Matrix& x);

/// Mean squared difference between x Wᵀ and its W8A8 approximation fq(x) fq(W)ᵀ, over the
/// [n_tokens, rows] outputs; x [n_tokens, cols], w [rows, cols].
double w8a8_output_error(const Matrix& w, const Matrix& x);

}  // namespace sparsa::compress
