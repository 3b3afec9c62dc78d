// The baseline kernels in plain C++: a 4-lane "vector" of floats whose loops the compiler turns
// into SSE2 instructions, run through the same tiled algorithms as the SIMD paths.
#include <cmath>
#include <cstring>

#include "kernels/kernels_internal.h"

#define SPARSA_KERNELS_ISA generic
#include "kernels/attention_impl.h"
#include "kernels/linear_impl.h"

namespace sparsa::kernels::generic {
namespace {

struct Vec {
  static constexpr int kLanes = 4;
  struct alignas(16) Reg {
    float v[kLanes];
  };

  static Reg zero() { return Reg{}; }
  static Reg set1(float a) { return Reg{{a, a, a, a}}; }
  static Reg load(const float* p) {
    Reg r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static Reg load_partial(const float* p, int n) {
    Reg r{};
    std::memcpy(r.v, p, static_cast<size_t>(n) * sizeof(float));
    return r;
  }
  static void store(float* p, Reg a) { std::memcpy(p, a.v, sizeof a.v); }
  static void store_partial(float* p, Reg a, int n) {
    std::memcpy(p, a.v, static_cast<size_t>(n) * sizeof(float));
  }
  static Reg fmadd(Reg a, Reg b, Reg c) {
    for (int i = 0; i < kLanes; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static Reg add(Reg a, Reg b) {
    for (int i = 0; i < kLanes; ++i) a.v[i] += b.v[i];
    return a;
  }
  static Reg sub(Reg a, Reg b) {
    for (int i = 0; i < kLanes; ++i) a.v[i] -= b.v[i];
    return a;
  }
  static Reg mul(Reg a, Reg b) {
    for (int i = 0; i < kLanes; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static Reg div(Reg a, Reg b) {
    for (int i = 0; i < kLanes; ++i) a.v[i] /= b.v[i];
    return a;
  }
  static Reg max(Reg a, Reg b) {
    for (int i = 0; i < kLanes; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  static float reduce_add(Reg a) { return (a.v[0] + a.v[2]) + (a.v[1] + a.v[3]); }
  static float reduce_max(Reg a) {
    const float x = a.v[0] > a.v[1] ? a.v[0] : a.v[1];
    const float y = a.v[2] > a.v[3] ? a.v[2] : a.v[3];
    return x > y ? x : y;
  }
  static Reg exp(Reg a) {
    for (int i = 0; i < kLanes; ++i) a.v[i] = std::exp(a.v[i]);
    return a;
  }

  template <DType D>
  static Reg load_w(const detail::WeightElem<D>* p) {
    Reg r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = detail::weight_to_f32<D>(p[i]);
    return r;
  }
  template <DType D>
  static Reg load_w_partial(const detail::WeightElem<D>* p, int n) {
    Reg r{};
    for (int i = 0; i < n; ++i) r.v[i] = detail::weight_to_f32<D>(p[i]);
    return r;
  }

  static void transpose(Reg* r) {
    for (int i = 0; i < kLanes; ++i)
      for (int j = i + 1; j < kLanes; ++j) {
        const float t = r[i].v[j];
        r[i].v[j] = r[j].v[i];
        r[j].v[i] = t;
      }
  }
};

}  // namespace

// Decode: 4 rows × 2 tokens. GEMM: 4 tokens × 8 outputs.
LinearKernels linear_kernels(DType dtype) {
  return detail::make_linear_kernels<Vec, 4, 4, 2, 4, 2, 4, 16, 64>(dtype);
}

void attention(const AttentionShape& s, const float* q, int64_t ldq, const void* k, const void* v,
               int64_t ldkv, float* out, int64_t ldo, ThreadPool& pool) {
  detail::attention<Vec, 4, 2, 4, 2>(s, q, ldq, k, v, ldkv, out, ldo, pool);
}

float stream_sum(const float* p, int64_t n) { return detail::stream_sum<Vec>(p, n); }

void silu_mul(float* gate, const float* up, int64_t n) { detail::silu_mul<Vec>(gate, up, n); }
void exp_shifted(const float* x, float shift, float* y, int64_t n) {
  detail::exp_shifted<Vec>(x, shift, y, n);
}

}  // namespace sparsa::kernels::generic
