// Linear layers y = x Wᵀ over weight matrices stored row-major as [out_features, in_features].
// The kernel for each (weight dtype, ISA) is picked at run time (see sparsa/core/cpu.h); every
// fast path is tested against the scalar reference in kernels/reference.
//
//   sparsa::kernels::DenseWeight w{sparsa::DType::BF16, rows, cols, ptr};
//   sparsa::kernels::linear(w, x, cols, n_tokens, y, rows, pool);   // y: [n_tokens, rows]
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "sparsa/core/cpu.h"
#include "sparsa/core/dtype.h"
#include "sparsa/core/thread_pool.h"

namespace sparsa::kernels {

/// Rows per panel of the panel layout.
inline constexpr int64_t kPanelRows = 16;

/// A dense weight matrix [rows, cols] of F32, F16 or BF16, not owned: row-major, or with
/// `panels` in the panel layout that the multi-token decode streams fastest: rows in panels of
/// kPanelRows, panel q = rows [16q, 16q + 16) stored as [cols][16] (column k's 16 weights side by
/// side), the last panel padded with zero rows (panel_elements() in all).
struct DenseWeight {
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* data = nullptr;
  bool panels = false;
};

/// Elements a [rows, cols] weight takes in the panel layout.
inline int64_t panel_elements(int64_t rows, int64_t cols) {
  return (rows + kPanelRows - 1) / kPanelRows * kPanelRows * cols;
}
/// Copies a row-major [rows, cols] matrix of `elem_bytes`-byte elements into the panel layout
/// (dst: panel_elements(rows, cols) elements; the padding rows are zero).
void to_panels(const void* src, int64_t rows, int64_t cols, size_t elem_bytes, void* dst);
/// Element (r, c) of a weight in either layout, as an index into its data.
inline int64_t weight_index(const DenseWeight& w, int64_t r, int64_t c) {
  if (!w.panels) return r * w.cols + c;
  return (r / kPanelRows) * kPanelRows * w.cols + c * kPanelRows + r % kPanelRows;
}

/// y[t * ldy + r] = sum_k x[t * ldx + k] * W[r, k]  for t < n_tokens, r < rows.
/// Accumulates in f32. Decode (few tokens) streams W once; prefill uses a blocked GEMM.
void linear(const DenseWeight& w, const float* x, int64_t ldx, int64_t n_tokens, float* y,
            int64_t ldy, ThreadPool& pool);

/// The same with an explicit ISA (tests, benchmarks).
void linear_isa(Isa isa, const DenseWeight& w, const float* x, int64_t ldx, int64_t n_tokens,
                float* y, int64_t ldy, ThreadPool& pool);

/// One output of linear_many(): y = x Wᵀ with its own weight and output buffer.
struct LinearOutput {
  DenseWeight weight;
  float* y = nullptr;
  int64_t ldy = 0;
};

/// Several linear layers that read the same input (q/k/v, gate/up): the same results as calling
/// linear() for each, but decode runs them in one parallel region, so the threads meet once.
void linear_many(const LinearOutput* outs, int count, const float* x, int64_t ldx,
                 int64_t n_tokens, ThreadPool& pool);

/// Causal grouped-query attention for `n_q` new queries at positions pos0 .. pos0 + n_q - 1,
/// attending to cache rows 0 .. pos (inclusive) of their own position.
///   q:   [n_q, n_heads * head_dim], row stride ldq
///   k,v: [>= pos0 + n_q, n_kv_heads * head_dim], row stride ldkv in elements (the KV cache),
///        of kv_dtype: F32, BF16 (widened to f32 as read), or I8 (codes; see below). The
///        arithmetic is f32 in every case.
///   out: [n_q, n_heads * head_dim], row stride ldo
/// Query head h reads kv head h / (n_heads / n_kv_heads). scores = q·k * scale, softmax in f32.
///
/// An I8 cache holds symmetric codes with one f32 scale per (token, kv head) row of head_dim
/// values, for keys and values apart: key j of kv head h is k_scales[h * ld_scales + j] times
/// its codes (likewise v_scales). The scales are stored head by head so that one head's scales
/// over the keys are contiguous; attention multiplies each score by its key's scale and each
/// softmax weight by its value's scale, outside the dot products.
struct AttentionShape {
  int64_t n_q = 0;
  int64_t pos0 = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  float scale = 1.0f;
  DType kv_dtype = DType::F32;
  const float* k_scales = nullptr;  // I8 only: [n_kv_heads, >= pos0 + n_q], row stride ld_scales
  const float* v_scales = nullptr;
  int64_t ld_scales = 0;
};
void attention(const AttentionShape& s, const float* q, int64_t ldq, const void* k, const void* v,
               int64_t ldkv, float* out, int64_t ldo, ThreadPool& pool);
void attention_isa(Isa isa, const AttentionShape& s, const float* q, int64_t ldq, const void* k,
                   const void* v, int64_t ldkv, float* out, int64_t ldo, ThreadPool& pool);

/// gate[i] = silu(gate[i]) · up[i] for i < n, silu(g) = g / (1 + exp(-g)): Llama's SwiGLU.
/// The vector paths compute exp with a polynomial of about 1 ulp; the generic one calls std::exp.
void silu_mul(float* gate, const float* up, int64_t n);
void silu_mul_isa(Isa isa, float* gate, const float* up, int64_t n);

/// y[i] = exp(x[i] - shift) for i < n, the difference taken in f32 (x and y may be the same
/// array): the sampler's softmax weights. The vector paths use silu_mul's polynomial exp; below
/// e^-87 (about the smallest normal float) a result is only guaranteed to be at most 1.7e-38.
void exp_shifted(const float* x, float shift, float* y, int64_t n);
void exp_shifted_isa(Isa isa, const float* x, float shift, float* y, int64_t n);

/// Measured memory read bandwidth in bytes/s: streams a `bytes`-sized buffer (much larger than
/// the caches) `reps` times with all threads of `pool`, and returns the best repetition.
double measure_read_bandwidth(ThreadPool& pool, size_t bytes = size_t{1} << 30, int reps = 5);

/// The same probe, kept allocated so that samples can be interleaved with other work (a shared
/// machine's bandwidth moves from second to second): each sample() streams the whole buffer
/// once with every thread of the pool and returns bytes/s.
class BandwidthProbe {
 public:
  BandwidthProbe(ThreadPool& pool, size_t bytes);
  ~BandwidthProbe();
  BandwidthProbe(const BandwidthProbe&) = delete;
  BandwidthProbe& operator=(const BandwidthProbe&) = delete;
  double sample();
  size_t bytes() const;

 private:
  struct Buffer;
  ThreadPool& pool_;
  std::unique_ptr<Buffer> buf_;
};

}  // namespace sparsa::kernels

namespace sparsa::kernels::reference {
/// Scalar oracles: plain loops, double accumulation.
void linear(const DenseWeight& w, const float* x, int64_t ldx, int64_t n_tokens, float* y,
            int64_t ldy);
void attention(const AttentionShape& s, const float* q, int64_t ldq, const void* k, const void* v,
               int64_t ldkv, float* out, int64_t ldo);
}  // namespace sparsa::kernels::reference
