// Linear layers y = x Wᵀ over packed (compressed) weights: sparsa/formats/packed_weight.h.
// The kernel of each (format, ISA) is picked at run time; every path is tested against the
// scalar PackedWeight::dequantize_to.
//
//   formats::PackedWeight w = formats::pack_quantized(q);
//   kernels::linear(w, x, cols, n_tokens, y, rows, pool);   // y: [n_tokens, rows]
//
// Decode (n_tokens <= 8) streams the packed weight once, rows split across threads in chunks of
// 16 rows. Its input is read in one of two ways (DecodeInput):
//   Int8  each token's input is quantized once per call, per 128 stored columns (the two
//         64-column blocks of a weight pair): s = max|x| / 127, q = round-to-nearest-even(x / s)
//         in [-127, 127] (llama.cpp's Q8 blocks, 128 wide). The integer codes multiply q with
//         int8 dot products (AVX-512 VNNI), summed in integers over the 128 columns and scaled
//         once; palettes use their tables as 16-bit integers (PackedView::lut_q). The error is
//         that of rounding x: |Δy| <= Σ_k |W[r, k]| · s_block(k) / 2.
//   F32   the weights are expanded to f32 in registers and multiply x as it is (the reference;
//         formats and CPUs without an int8 kernel always run it).
// Prefill dequantizes panels of rows to f32 and runs the dense blocked GEMM on them (f32 input).
// Dense weights (formats::pack_dense) run the dense kernels of sparsa/kernels/linear.h exactly.
#pragma once

#include <cstdint>
#include <string_view>

#include "sparsa/core/cpu.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/formats/packed_weight.h"

namespace sparsa::kernels {

/// y[t * ldy + r] = sum_k x[t * ldx + k] * W[r, k]  for t < n_tokens, r < w.rows().
void linear(const formats::PackedWeight& w, const float* x, int64_t ldx, int64_t n_tokens,
            float* y, int64_t ldy, ThreadPool& pool);

/// The same with an explicit ISA (tests, benchmarks). Isa::Avx512 needs VBMI2 for its packed
/// kernels; on AVX-512 CPUs without it (Skylake-X) the AVX2 packed kernels run. The int8-input
/// decode kernels need VNNI and VBMI as well.
void linear_isa(Isa isa, const formats::PackedWeight& w, const float* x, int64_t ldx,
                int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool);

/// How decode reads its input (see the top of this file).
enum class DecodeInput { Int8, F32 };
/// The input coding of linear(), linear_many() and linear_isa() without one: Int8, unless
/// SPARSA_DECODE_INPUT=f32 is set (read once) or set_decode_input() changed it.
DecodeInput decode_input();
void set_decode_input(DecodeInput input);
/// Parses "int8" or "f32"; throws sparsa::Error on anything else.
DecodeInput parse_decode_input(std::string_view name);
/// Whether decoding w on isa with DecodeInput::Int8 quantizes the input (an int8 kernel exists
/// for this format and CPU); otherwise the f32 kernels run.
bool decode_quantizes_input(const formats::PackedWeight& w, Isa isa);

/// linear_isa() with an explicit decode input coding.
void linear_isa(Isa isa, DecodeInput input, const formats::PackedWeight& w, const float* x,
                int64_t ldx, int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool);

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
