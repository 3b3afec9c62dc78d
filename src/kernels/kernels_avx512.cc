// The AVX-512 (F, BW, DQ, VL) kernels: 16 f32 lanes, 32 registers.
// GCC 12's _mm512_undefined_* read themselves (`__m512 __Y = __Y;`), which -Wall reports where
// they are inlined (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "kernels/kernels_internal.h"

#define SPARSA_KERNELS_ISA avx512
#include "kernels/attention_impl.h"
#include "kernels/linear_impl.h"

namespace sparsa::kernels::avx512 {
namespace {

struct Vec {
  using Reg = __m512;
  static constexpr int kLanes = 16;

  static __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float a) { return _mm512_set1_ps(a); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store(float* p, Reg a) { _mm512_storeu_ps(p, a); }
  static void store_partial(float* p, Reg a, int n) { _mm512_mask_storeu_ps(p, mask(n), a); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm512_div_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  static float reduce_add(Reg a) { return _mm512_reduce_add_ps(a); }
  static float reduce_max(Reg a) { return _mm512_reduce_max_ps(a); }

  // exp(x) = 2^n · e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by the Cephes expf
  // polynomial (about 1 ulp); scalef applies 2^n without overflow into the exponent field.
  static Reg exp(Reg x) {
    x = _mm512_max_ps(_mm512_min_ps(x, set1(88.7f)), set1(-104.0f));
    const Reg n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    Reg r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    Reg p = set1(1.9875691500e-4f);
    p = fmadd(p, r, set1(1.3981999507e-3f));
    p = fmadd(p, r, set1(8.3334519073e-3f));
    p = fmadd(p, r, set1(4.1665795894e-2f));
    p = fmadd(p, r, set1(1.6666665459e-1f));
    p = fmadd(p, r, set1(5.0000001201e-1f));
    p = fmadd(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, set1(1.0f)));
    return _mm512_scalef_ps(p, n);
  }

  template <DType D>
  static Reg load_w(const detail::WeightElem<D>* p) {
    if constexpr (D == DType::F32) {
      return _mm512_loadu_ps(p);
    } else if constexpr (D == DType::BF16) {
      const __m512i h =
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    } else if constexpr (D == DType::I8) {
      return _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    } else {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  }
  template <DType D>
  static Reg load_w_partial(const detail::WeightElem<D>* p, int n) {
    if constexpr (D == DType::F32) {
      return load_partial(p, n);
    } else if constexpr (D == DType::BF16) {
      const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask(n), p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    } else if constexpr (D == DType::I8) {
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask(n), p)));
    } else {
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p));
    }
  }

  // Lane i of the result = the sum of r[i]'s lanes: pairs summed within 128-bit lanes, then
  // quads, then across lanes (45 operations for 16 vectors, against 64 for a transpose).
  static Reg sum_lanes(const Reg* r) {
    Reg a[8], b[4];
    for (int i = 0; i < 8; ++i)  // a[i]: (r[2i], r[2i+1]) interleaved, partial sums
      a[i] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]),
                           _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
    for (int i = 0; i < 4; ++i)  // b[i]: each 128-bit lane holds r[4i .. 4i+3]'s lane sums
      b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                           _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
    const Reg c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88),
                                 _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
    const Reg c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88),
                                 _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
  }

  // In-place 16 × 16 transpose: pairs, quads within 128-bit lanes, then lanes across registers.
  static void transpose(Reg* r) {
    Reg t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      const Reg u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
      const Reg u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
      const Reg u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
      const Reg u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
      t[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
      t[8 + c] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
      t[4 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88);
      t[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }
};

}  // namespace

// Decode: 8 rows × 1 token or 4 rows × 4 tokens. GEMM: 6 tokens × 64 outputs (24 accumulators).
LinearKernels linear_kernels(DType dtype) {
  return detail::make_linear_kernels<Vec, 8, 4, 4, 6, 4, 8, 24, 32>(dtype);
}

// Scores: 12 rows × 32 keys; outputs: 6 rows × 64 head dims.
void attention(const AttentionShape& s, const float* q, int64_t ldq, const void* k, const void* v,
               int64_t ldkv, float* out, int64_t ldo, ThreadPool& pool) {
  detail::attention<Vec, 12, 2, 6, 4>(s, q, ldq, k, v, ldkv, out, ldo, pool);
}

float stream_sum(const float* p, int64_t n) { return detail::stream_sum<Vec>(p, n); }

void silu_mul(float* gate, const float* up, int64_t n) { detail::silu_mul<Vec>(gate, up, n); }
void exp_shifted(const float* x, float shift, float* y, int64_t n) {
  detail::exp_shifted<Vec>(x, shift, y, n);
}

}  // namespace sparsa::kernels::avx512
