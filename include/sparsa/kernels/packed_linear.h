// Linear layers y = x Wᵀ over packed (compressed) weights: sparsa/formats/packed_weight.h.
// The kernel of each (format, ISA) is picked at run time; every path is tested against the
// scalar PackedWeight::dequantize_to. Activations stay f32 throughout: the weights are expanded
// to f32 in registers (through 16-entry tables for codes of 2..4 bits), never the inputs rounded.
//
//   formats::PackedWeight w = formats::pack_quantized(q);
//   kernels::linear(w, x, cols, n_tokens, y, rows, pool);   // y: [n_tokens, rows]
//
// Decode (n_tokens <= 8) streams the packed weight once, rows split across threads in chunks of
// 16 rows. Prefill dequantizes panels of rows to f32 and runs the dense blocked GEMM on them.
// Dense weights (formats::pack_dense) run the dense kernels of sparsa/kernels/linear.h exactly.
#pragma once

#include <cstdint>

#include "sparsa/core/cpu.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/formats/packed_weight.h"

namespace sparsa::kernels {

/// y[t * ldy + r] = sum_k x[t * ldx + k] * W[r, k]  for t < n_tokens, r < w.rows().
void linear(const formats::PackedWeight& w, const float* x, int64_t ldx, int64_t n_tokens,
            float* y, int64_t ldy, ThreadPool& pool);

/// The same with an explicit ISA (tests, benchmarks). Isa::Avx512 needs VBMI2 for its packed
/// kernels; on AVX-512 CPUs without it (Skylake-X) the AVX2 packed kernels run.
void linear_isa(Isa isa, const formats::PackedWeight& w, const float* x, int64_t ldx,
                int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool);

/// One output of linear_many(): y = x Wᵀ with its own weight and output buffer.
struct PackedLinearOutput {
  const formats::PackedWeight* weight = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
};

/// Several linear layers reading the same input (q/k/v, gate/up): the results of one linear()
/// call each, but decode runs them all in one parallel region.
void linear_many(const PackedLinearOutput* outs, int count, const float* x, int64_t ldx,
                 int64_t n_tokens, ThreadPool& pool);

}  // namespace sparsa::kernels
