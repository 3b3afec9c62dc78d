// Private to src/kernels: the kernels compiled once per ISA (kernels_<isa>.cc) and the tables
// through which linear.cc, attention.cc and bandwidth.cc pick them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sparsa/core/dtype.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::formats {
struct PackedView;
}

namespace sparsa::kernels {

/// Up to this many tokens, linear() streams W once through the decode kernel; above, a GEMM.
inline constexpr int64_t kDecodeMaxTokens = 8;

/// Rows [r0, r1) of y = x Wᵀ for a few tokens; each row of W is read once from memory.
using DecodeFn = void (*)(const DenseWeight& w, const float* x, int64_t ldx, int64_t n_tokens,
                          float* y, int64_t ldy, int64_t r0, int64_t r1);
/// Packs rows [n0, n0 + n) × columns [k0, k0 + kc) of W, in f32, as dst[kc][nr] (the GEMM's
/// B micro-panel); rows n .. nr-1 are zero.
using PackBFn = void (*)(const DenseWeight& w, int64_t n0, int n, int64_t k0, int kc, float* dst);
/// c[i * ldc + j] (+)= sum_k a[k * mr + i] * b[k * nr + j] for i < m <= mr, j < n <= nr.
using MicroFn = void (*)(int m, int n, int64_t kc, const float* a, const float* b, float* c,
                         int64_t ldc, bool accumulate);

/// The linear kernels of one (weight dtype, ISA); decode == nullptr when the pair is unsupported.
struct LinearKernels {
  DecodeFn decode = nullptr;
  PackBFn pack_b = nullptr;
  MicroFn micro = nullptr;
  int mr = 0;  // tokens per micro-tile
  int nr = 0;  // output features per micro-tile
};

using AttentionFn = void (*)(const AttentionShape& s, const float* q, int64_t ldq, const float* k,
                             const float* v, int64_t ldkv, float* out, int64_t ldo,
                             ThreadPool& pool);
/// Sums n floats with wide loads (the bandwidth probe's read loop).
using StreamSumFn = float (*)(const float* p, int64_t n);

#define SPARSA_DECLARE_ISA_KERNELS(ns)                                                     \
  namespace ns {                                                                           \
  LinearKernels linear_kernels(DType dtype);                                               \
  void attention(const AttentionShape& s, const float* q, int64_t ldq, const float* k,     \
                 const float* v, int64_t ldkv, float* out, int64_t ldo, ThreadPool& pool); \
  float stream_sum(const float* p, int64_t n);                                             \
  }
SPARSA_DECLARE_ISA_KERNELS(generic)
SPARSA_DECLARE_ISA_KERNELS(avx2)
SPARSA_DECLARE_ISA_KERNELS(avx512)
#undef SPARSA_DECLARE_ISA_KERNELS

/// Rows [r0, r1) of y = x Wᵀ for a packed weight and n_tokens <= kDecodeMaxTokens tokens.
using FormatDecodeFn = void (*)(const formats::PackedView& w, const float* x, int64_t ldx,
                                int64_t n_tokens, float* y, int64_t ldy, int64_t r0, int64_t r1);
/// out[(r - r0) * cols + c] = W[r, c] in f32 for rows [r0, r1) (prefill's dequantized panels).
using FormatDequantFn = void (*)(const formats::PackedView& w, int64_t r0, int64_t r1,
                                 float* out);
/// The packed-weight kernels of one (format, ISA): formats_<isa>.cc map a format to these.
struct FormatKernels {
  FormatDecodeFn decode = nullptr;
  FormatDequantFn dequant = nullptr;
};
namespace generic {
FormatKernels format_kernels(const formats::PackedView& w);
}
namespace avx2 {
FormatKernels format_kernels(const formats::PackedView& w);
}
/// AVX-512 F/BW/DQ/VL plus VBMI and VBMI2 (byte expand): Ice Lake, Zen 4 and later.
namespace avx512vbmi2 {
FormatKernels format_kernels(const formats::PackedView& w);
}

/// Scratch buffers that live as long as their thread, one per slot, 64-byte aligned. A call
/// returns at least n floats and invalidates the slot's previous pointer when it has to grow.
enum class Scratch {
  kPackA,
  kPackB,
  kScores,
  kKeys,
  kQueries,
  kDequantW,   // packed_linear: a panel of packed weights dequantized for the prefill GEMM
  kPermutedX,  // packed_linear: the input gathered into an act-order weight's column order
  kCount
};
float* thread_scratch(Scratch slot, size_t n_floats);

}  // namespace sparsa::kernels
