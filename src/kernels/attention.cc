// attention(), silu_mul() and exp_shifted(): argument checks and the per-ISA dispatch; the kernels are in
// attention_impl.h and linear_impl.h.
#include "kernels/kernels_internal.h"
#include "sparsa/core/error.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::kernels {

void attention_isa(Isa isa, const AttentionShape& s, const float* q, int64_t ldq, const void* k,
                   const void* v, int64_t ldkv, float* out, int64_t ldo, ThreadPool& pool) {
  SPARSA_CHECK(static_cast<int>(isa) <= static_cast<int>(detect_isa()),
               "attention: this CPU cannot run the {} kernels", isa_name(isa));
  SPARSA_CHECK(s.n_q >= 0 && s.pos0 >= 0, "attention: n_q = {} and pos0 = {} must be >= 0", s.n_q,
               s.pos0);
  SPARSA_CHECK(s.n_heads > 0 && s.n_kv_heads > 0 && s.n_heads % s.n_kv_heads == 0,
               "attention: {} query heads cannot be grouped over {} kv heads", s.n_heads,
               s.n_kv_heads);
  SPARSA_CHECK(s.head_dim > 0, "attention: head_dim = {} must be positive", s.head_dim);
  SPARSA_CHECK(s.kv_dtype == DType::F32 || s.kv_dtype == DType::BF16 || s.kv_dtype == DType::I8,
               "attention: a KV cache of {} is not supported (expected F32, BF16 or I8)",
               dtype_name(s.kv_dtype));
  if (s.n_q == 0) return;
  SPARSA_CHECK(q != nullptr && k != nullptr && v != nullptr && out != nullptr,
               "attention: a query, key, value or output pointer is null");
  if (s.kv_dtype == DType::I8) {
    SPARSA_CHECK(s.k_scales != nullptr && s.v_scales != nullptr,
                 "attention: an I8 KV cache needs its key and value scales (k_scales {}, "
                 "v_scales {})",
                 s.k_scales == nullptr ? "null" : "given",
                 s.v_scales == nullptr ? "null" : "given");
    SPARSA_CHECK(s.ld_scales >= s.pos0 + s.n_q,
                 "attention: the scale row stride ld_scales = {} is less than the {} keys",
                 s.ld_scales, s.pos0 + s.n_q);
  }
  const int64_t qw = int64_t{s.n_heads} * s.head_dim;
  const int64_t kvw = int64_t{s.n_kv_heads} * s.head_dim;
  SPARSA_CHECK(ldq >= qw && ldo >= qw,
               "attention: row strides ldq = {} and ldo = {} must be at least n_heads * head_dim "
               "= {}",
               ldq, ldo, qw);
  SPARSA_CHECK(ldkv >= kvw, "attention: kv row stride {} is less than n_kv_heads * head_dim = {}",
               ldkv, kvw);
  switch (isa) {
    case Isa::Avx512:
      avx512::attention(s, q, ldq, k, v, ldkv, out, ldo, pool);
      break;
    case Isa::Avx2:
      avx2::attention(s, q, ldq, k, v, ldkv, out, ldo, pool);
      break;
    case Isa::Generic:
      generic::attention(s, q, ldq, k, v, ldkv, out, ldo, pool);
      break;
  }
}

void attention(const AttentionShape& s, const float* q, int64_t ldq, const void* k, const void* v,
               int64_t ldkv, float* out, int64_t ldo, ThreadPool& pool) {
  attention_isa(active_isa(), s, q, ldq, k, v, ldkv, out, ldo, pool);
}

void silu_mul_isa(Isa isa, float* gate, const float* up, int64_t n) {
  SPARSA_CHECK(static_cast<int>(isa) <= static_cast<int>(detect_isa()),
               "silu_mul: this CPU cannot run the {} kernels", isa_name(isa));
  SPARSA_CHECK(n >= 0, "silu_mul: n = {} must be >= 0", n);
  switch (isa) {
    case Isa::Avx512:
      return avx512::silu_mul(gate, up, n);
    case Isa::Avx2:
      return avx2::silu_mul(gate, up, n);
    case Isa::Generic:
      return generic::silu_mul(gate, up, n);
  }
}

void silu_mul(float* gate, const float* up, int64_t n) { silu_mul_isa(active_isa(), gate, up, n); }

void exp_shifted_isa(Isa isa, const float* x, float shift, float* y, int64_t n) {
  SPARSA_CHECK(static_cast<int>(isa) <= static_cast<int>(detect_isa()),
               "exp_shifted: this CPU cannot run the {} kernels", isa_name(isa));
  SPARSA_CHECK(n >= 0, "exp_shifted: n = {} must be >= 0", n);
  switch (isa) {
    case Isa::Avx512:
      return avx512::exp_shifted(x, shift, y, n);
    case Isa::Avx2:
      return avx2::exp_shifted(x, shift, y, n);
    case Isa::Generic:
      return generic::exp_shifted(x, shift, y, n);
  }
}

void exp_shifted(const float* x, float shift, float* y, int64_t n) {
  exp_shifted_isa(active_isa(), x, shift, y, n);
}

}  // namespace sparsa::kernels
