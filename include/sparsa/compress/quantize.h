// Weight-only integer quantization on the min-max grid of the GPTQ reference (IST-DASLab/gptq
// quant.py): round to nearest (RTN) and GPTQ (Frantar et al. 2022), plus the Hessian preparation
// that GPTQ and SparseGPT (prune.h) share.
//
//   using namespace sparsa::compress;
//   QuantSpec spec{.bits = 4, .symmetric = false, .group_size = 128};
//   QuantResult q = gptq_quantize(w, stats.hessian(pool), spec, {}, nullptr, &pool);
//   // w now holds the dequantized weights; q.codes / q.scales / q.zeros / q.g_idx store them:
//   Matrix back;
//   dequantize(q, back);  // bit-for-bit equal to w
//
// The grid, per output row and group of input columns (quant.py, Quantizer.find_params with
// perchannel, mse = False), all in f32:
//   xmin = min(min w, 0), xmax = max(max w, 0)
//   symmetric: xmax = max(|xmin|, xmax), and xmin = −xmax where xmin < 0
//   xmin = xmax = 0: xmin = −1, xmax = +1
//   scale = (xmax − xmin) / maxq, maxq = 2^bits − 1, rounded to f16 (what checkpoints store
//           and the packed kernels read; at least 2^-24, f16's smallest subnormal)
//   zero = round(−xmin / scale), or (maxq + 1) / 2 when symmetric
//   code = clamp(round(w / scale) + zero, 0, maxq), value = scale · (code − zero)
// round is half to even, as torch.round. Zero is always on the grid (code = zero), so pruned
// weights quantize to exactly 0.
//
// With a sparsity mask `keep` ([rows, cols], 0 = pruned; empty or null = dense), pruned weights
// are zero before and after: they are set to 0, their codes are the zero point, and GPTQ
// propagates the error of forcing them to 0 like any other rounding error (sparsity, then
// quantization keeping the mask). Group grids are found over the kept weights (and 0).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "sparsa/compress/matrix.h"
#include "sparsa/core/thread_pool.h"

namespace sparsa::compress {

struct QuantSpec {
  int bits = 4;  // 2..8
  bool symmetric = false;
  int64_t group_size = 128;  // input columns per scale, dividing cols; 0: one per output row
  bool act_order = false;    // GPTQ only: columns in order of decreasing H_jj (RTN ignores it)
};

/// Integer codes and the grid that maps them back: W[r, c] = scales[r, g] · (codes[r, c] −
/// zeros[r, g]) with g = g_idx[c].
struct QuantResult {
  int bits = 0;
  int64_t group_size = 0;  // 0: one group per output row
  bool symmetric = false;
  std::vector<float> scales;   // [rows, n_groups]
  std::vector<int32_t> zeros;  // [rows, n_groups]
  std::vector<int32_t> g_idx;  // [cols], group of each input column (not monotone with act_order)
  std::vector<uint8_t> codes;  // [rows, cols], 0 .. 2^bits − 1

  int64_t cols() const { return static_cast<int64_t>(g_idx.size()); }
  int64_t rows() const { return g_idx.empty() ? 0 : static_cast<int64_t>(codes.size()) / cols(); }
  int64_t n_groups() const {
    return rows() == 0 ? 0 : static_cast<int64_t>(scales.size()) / rows();
  }
};

struct GptqOptions {
  int64_t block_size = 128;  // columns per lazy batch update
  double damp = 0.01;        // H += damp · mean(diag H) · I
};

/// One row's grid over one group.
struct QuantGrid {
  float scale = 1.0f;
  float zero = 0.0f;
};

/// The grid of n values w (those with keep[i] == 0 count as 0; keep may be null).
QuantGrid find_quant_grid(const float* w, int64_t n, int bits, bool symmetric,
                          const uint8_t* keep = nullptr);

/// The code of w on grid g, as a float in [0, maxq].
inline float quant_code(float w, const QuantGrid& g, float maxq) {
  const float q = std::nearbyint(w / g.scale) + g.zero;
  return q < 0.0f ? 0.0f : (q > maxq ? maxq : q);
}
inline float dequant_code(float code, const QuantGrid& g) { return g.scale * (code - g.zero); }

/// Throws sparsa::Error unless bits is in 2..8 and group_size is 0 or a positive divisor of cols;
/// `fn` names the caller in the message.
void check_quant_spec(const QuantSpec& spec, int64_t cols, const char* fn);

/// Round to nearest on the grid above; w [rows, cols] is replaced by its dequantized values.
QuantResult rtn_quantize(Matrix& w, const QuantSpec& spec, const Mask* keep = nullptr);

/// GPTQ, as IST-DASLab/gptq gptq.py fasterquant (static_groups = False): columns are quantized
/// one at a time and the rounding error of each is spread over the columns not yet quantized,
/// through the upper Cholesky factor of H⁻¹, in lazy batches of block_size columns. `hessian`
/// [cols, cols] is H = 2/N XᵀX (InputStats::hessian); it is consumed. w is replaced by its
/// dequantized values. Throws sparsa::Error when H + damping is not positive definite (call
/// again with a larger damp). pool (optional) spreads the per-row work; BLAS uses its own threads.
QuantResult gptq_quantize(Matrix& w, std::vector<double> hessian, const QuantSpec& spec,
                          const GptqOptions& opts = {}, const Mask* keep = nullptr,
                          ThreadPool* pool = nullptr);

/// W [rows, cols] from the codes and grids; `out` is resized.
void dequantize(const QuantResult& q, Matrix& out);

/// The Hessian preparation shared by GPTQ and SparseGPT, in the reference's order.
/// 1. Dead inputs (H_jj == 0: the input was always zero) get H_jj = 1; returns dead [cols].
std::vector<uint8_t> fix_dead_columns(std::vector<double>& hessian, int64_t cols);
/// 2. H ← U, the upper Cholesky factor of (H + damp · mean(diag H) · I)⁻¹ (H⁻¹ = UᵀU, lower
/// triangle zeroed); `hessian` is [cols, cols] row-major and symmetric. Throws sparsa::Error when
/// the damped H is not positive definite.
void inverse_hessian_factor(std::vector<double>& hessian, int64_t cols, double damp);

}  // namespace sparsa::compress
