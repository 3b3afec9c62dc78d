// The AVX2 + FMA + F16C kernels: 8 f32 lanes, 16 registers.
#include <immintrin.h>

#include <cstring>

#include "kernels/kernels_internal.h"

#define SPARSA_KERNELS_ISA avx2
#include "kernels/attention_impl.h"
#include "kernels/linear_impl.h"

namespace sparsa::kernels::avx2 {
namespace {

struct Vec {
  using Reg = __m256;
  static constexpr int kLanes = 8;

  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float a) { return _mm256_set1_ps(a); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg load_partial(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static void store(float* p, Reg a) { _mm256_storeu_ps(p, a); }
  static void store_partial(float* p, Reg a, int n) { _mm256_maskstore_ps(p, mask(n), a); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm256_div_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  static float reduce_add(Reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float reduce_max(Reg a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }

  // As the AVX-512 exp (Cephes expf), with 2^n built in the exponent field: x is clamped so that
  // n stays within the normal range.
  static Reg exp(Reg x) {
    x = _mm256_max_ps(_mm256_min_ps(x, set1(88.3f)), set1(-87.3f));
    const Reg n = _mm256_round_ps(_mm256_mul_ps(x, set1(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    Reg r = _mm256_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    Reg p = set1(1.9875691500e-4f);
    p = fmadd(p, r, set1(1.3981999507e-3f));
    p = fmadd(p, r, set1(8.3334519073e-3f));
    p = fmadd(p, r, set1(4.1665795894e-2f));
    p = fmadd(p, r, set1(1.6666665459e-1f));
    p = fmadd(p, r, set1(5.0000001201e-1f));
    p = fmadd(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, set1(1.0f)));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }

  template <DType D>
  static Reg load_w(const detail::WeightElem<D>* p) {
    if constexpr (D == DType::F32) {
      return _mm256_loadu_ps(p);
    } else if constexpr (D == DType::BF16) {
      const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    } else if constexpr (D == DType::I8) {
      return _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    } else {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
  }
  template <DType D>
  static Reg load_w_partial(const detail::WeightElem<D>* p, int n) {
    if constexpr (D == DType::F32) {
      return load_partial(p, n);
    } else {
      alignas(16) detail::WeightElem<D> tmp[8] = {};
      std::memcpy(tmp, p, static_cast<size_t>(n) * sizeof(tmp[0]));
      return load_w<D>(tmp);
    }
  }

  static void transpose(Reg* r) {
    Reg t[8], s[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
      r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
    }
  }
};

}  // namespace

// Decode: 4 rows × 2 tokens. GEMM: 6 tokens × 16 outputs (12 accumulators).
LinearKernels linear_kernels(DType dtype) {
  return detail::make_linear_kernels<Vec, 8, 4, 2, 6, 2, 4, 12, 16>(dtype);
}

// Scores: 6 rows × 16 keys; outputs: 6 rows × 16 head dims.
void attention(const AttentionShape& s, const float* q, int64_t ldq, const void* k, const void* v,
               int64_t ldkv, float* out, int64_t ldo, ThreadPool& pool) {
  detail::attention<Vec, 6, 2, 6, 2>(s, q, ldq, k, v, ldkv, out, ldo, pool);
}

float stream_sum(const float* p, int64_t n) { return detail::stream_sum<Vec>(p, n); }

void silu_mul(float* gate, const float* up, int64_t n) { detail::silu_mul<Vec>(gate, up, n); }
void exp_shifted(const float* x, float shift, float* y, int64_t n) {
  detail::exp_shifted<Vec>(x, shift, y, n);
}

}  // namespace sparsa::kernels::avx2
