// AWQ, activation-aware weight quantization (Lin et al. 2023; reference mit-han-lab/llm-awq
// auto_scale.py, auto_clip.py): before a weight-only quantization, scale up the input channels
// that carry large activations and clip the weight range per group, both chosen to minimise the
// error of the quantized layers' outputs on calibration inputs.
//
//   std::vector<Matrix*> gate_up = {&w_gate, &w_up};     // layers sharing the input x
//   AwqOptions opts;                                      // 4 bits, groups of 128 columns
//   AwqResult r = awq_scale_and_clip(gate_up, x, opts);   // x [n_tokens, cols]
//   divide_by_scales(post_attention_norm_weight, r.scales);  // (smoothquant.h) keep x Wᵀ exact
//   // then quantize w_gate, w_up with RTN or GPTQ at the same bits and group size.
//
// The layers are left in f32, scaled (W[:, j] · s_j) and clipped, not quantized. The quantizer
// simulated in the searches is the asymmetric min-max grid of the GPTQ reference (the one
// rtn_quantize uses): per group xmin = min(w, 0), xmax = max(w, 0),
// scale = (xmax − xmin) / (2^b − 1), zero = round(−xmin / scale).
// As in llm-awq, a caller may skip the clipping for q_proj and k_proj (whose errors the softmax
// amplifies) with `clip = false`.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "sparsa/compress/matrix.h"
#include "sparsa/compress/smoothquant.h"

namespace sparsa::compress {

struct AwqOptions {
  int bits = 4;                // 2..8
  int64_t group_size = 128;    // input columns per quantization group; 0: per channel (row)
  bool symmetric = false;      // the GPTQ reference's symmetric grid instead of min-max
  int n_grid = 20;             // α ∈ {0, 1/n_grid, …, (n_grid − 1)/n_grid}
  int64_t scale_tokens = 512;  // tokens of x (evenly strided) on which the scale search scores α
  bool clip = true;
  int clip_grid = 20;         // shrink ratios 1 − i/clip_grid for i = 0 … max_shrink·clip_grid
  float max_shrink = 0.5f;    // so the ratios span [1 − max_shrink, 1]
  int64_t clip_tokens = 512;  // tokens of x on which the clipping search scores each ratio
};

/// What the scale search found. Errors are mean squared differences between the layers' outputs
/// x Wᵀ and the quantized (x/s) Q(W·s)ᵀ, over the [scale_tokens, Σ rows] outputs.
struct AwqScaleSearch {
  std::vector<float> scales;  // [cols], s = mean|x|^α / sqrt(max · min) (clamped at 1e-4)
  float alpha = 0.0f;
  double error_rtn = 0.0;      // α = 0, s = 1: plain round to nearest
  double error_scaled = 0.0;   // at the best α
  std::vector<double> errors;  // [n_grid], one per α
};

struct AwqResult {
  std::vector<float> scales;  // [cols]: W[:, j] was multiplied by scales[j]
  float alpha = 0.0f;
  double error_rtn = 0.0;                    // before AWQ
  double error_scaled = 0.0;                 // with the scales
  double error_final = 0.0;                  // with the scales and the clipping
  std::vector<std::vector<float>> clip_max;  // per layer [rows, n_groups]: |w| kept below this
};

/// Searches the per-input-channel scales of layers sharing the input x [n_tokens, cols]; does not
/// change the layers. mean|x| is taken over all of x, the error over `scale_tokens` of them.
AwqScaleSearch awq_search_scales(std::span<Matrix* const> layers, const Matrix& x,
                                 const AwqOptions& opts);

/// Searches, for each row and group of w [rows, cols], the ratio r of max|w| that minimises the
/// error of that group's partial outputs Σ_j x_tj (w_j − Q(clamp(w_j, ±r·max|w|))) over
/// `clip_tokens` of x [n_tokens, cols] (already divided by the scales, if any); clamps w in place
/// and returns the chosen bounds [rows, n_groups].
std::vector<float> awq_search_clip(Matrix& w, const Matrix& x, const AwqOptions& opts);

/// The whole of AWQ for one group of layers: search scales, apply them (scale_input_channels),
/// search and apply the clipping of each layer on x/s, and measure the errors.
AwqResult awq_scale_and_clip(std::span<Matrix* const> layers, const Matrix& x,
                             const AwqOptions& opts);

}  // namespace sparsa::compress
