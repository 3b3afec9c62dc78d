// The AVX2 + FMA packed-weight kernels: blocks decoded in scalar code (formats_impl.h), products
// summed 8 lanes at a time.
#include <immintrin.h>

#include "kernels/kernels_internal.h"

#define SPARSA_KERNELS_ISA avx2
#include "kernels/formats_impl.h"

namespace sparsa::kernels::avx2 {
namespace {

struct Vec {
  using Reg = __m256;
  static constexpr int kLanes = 8;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg load_partial(const float* p, int n) {
    const __m256i m =
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(p, m);
  }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float reduce_add(Reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};

}  // namespace

FormatKernels format_kernels(const formats::PackedView&) {
  return {&fmt::decode_rows<Vec>, &fmt::dequant_rows};
}

}  // namespace sparsa::kernels::avx2
