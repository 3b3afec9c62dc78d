// Causal GQA attention written once over a vector type V and compiled into each kernels_<isa>.cc
// in namespace sparsa::kernels::<isa> (see linear_impl.h).
//
// A task is one kv head and a block of queries: its rows are (query, head) pairs of the heads
// sharing that kv head, so each key and value row is read once for all of them. Per task:
//   S = Q Kᵀ · scale   register-tiled SR rows × SV vectors of keys, over Kᵀ packed per key block
//   P = softmax(S)     row by row over the causal prefix, unnormalized; 1/sum kept aside
//   O = P V / sum      register-tiled OR rows × OV vectors of head dims, V read in place
// Scores of a row over all its keys fit in the thread's scratch (rows × keys floats).
//
// The cache holds f32, bf16 or int8 codes (E = float, uint16_t or int8_t); bf16 and int8 rows are
// widened to f32 as they are loaded, and all arithmetic is f32. An int8 cache's scales (one per
// key and kv head, for keys and values apart) stay out of the dot products: S is computed over
// the key codes and each score multiplied by its key's scale before the softmax, and each
// softmax weight is multiplied by its value's scale before the P·V product over the value codes
// (the row's normalizing sum is of the weights before that multiplication).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels/kernels_internal.h"
#include "kernels/linear_impl.h"
#include "sparsa/core/thread_pool.h"

#ifndef SPARSA_KERNELS_ISA
#error "define SPARSA_KERNELS_ISA (generic, avx2 or avx512) before including attention_impl.h"
#endif

namespace sparsa::kernels::SPARSA_KERNELS_ISA::detail {

// Keys per packed Kᵀ block: [head_dim][kKeyBlock] stays in L1/L2 while every row tile uses it.
inline constexpr int kKeyBlock = 256;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The cache's element type as a DType: float F32, uint16_t BF16, int8_t I8 (codes).
template <class E>
inline constexpr DType kKvType = std::is_same_v<E, float>    ? DType::F32
                                 : std::is_same_v<E, int8_t> ? DType::I8
                                                             : DType::BF16;

// One cache element, or kLanes of them, as f32.
template <class E>
inline float kv_at(const E* p) {
  return weight_to_f32<kKvType<E>>(*p);
}
template <class V, class E>
inline typename V::Reg kv_load(const E* p) {
  return V::template load_w<kKvType<E>>(p);
}
template <class V, class E>
inline typename V::Reg kv_load_partial(const E* p, int n) {
  return V::template load_w_partial<kKvType<E>>(p, n);
}

// kt[dd * ldkt + j] = k[j * ldk + dd] for dd < d, j < n; columns n .. n_pad - 1 are zero.
template <class V, class E>
void pack_keys_t(const E* k, int64_t ldk, int n, int n_pad, int d, float* kt, int64_t ldkt) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  int j = 0;
  for (; j + L <= n; j += L) {
    int dd = 0;
    for (; dd + L <= d; dd += L) {
      Reg r[L];
      for (int i = 0; i < L; ++i) r[i] = kv_load<V>(k + (j + i) * ldk + dd);
      V::transpose(r);
      for (int i = 0; i < L; ++i) V::store(kt + (dd + i) * ldkt + j, r[i]);
    }
    for (; dd < d; ++dd)
      for (int i = 0; i < L; ++i) kt[dd * ldkt + j + i] = kv_at(k + (j + i) * ldk + dd);
  }
  for (int dd = 0; dd < d; ++dd)
    for (int jj = j; jj < n_pad; ++jj) kt[dd * ldkt + jj] = jj < n ? kv_at(k + jj * ldk + dd) : 0.0f;
}

// s[i * lds + j] = scale · sum_dd qp[dd * SR + i] · kt[dd * ldkt + j], i < M, j < SV · kLanes.
template <class V, int SR, int SV, int M>
void score_tile(int d, const float* qp, const float* kt, int64_t ldkt, float* s, int64_t lds,
                float scale) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  Reg acc[M][SV];
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < SV; ++v) acc[i][v] = V::zero();
  for (int dd = 0; dd < d; ++dd) {
    Reg kv[SV];
    for (int v = 0; v < SV; ++v) kv[v] = V::load(kt + dd * ldkt + v * L);
    for (int i = 0; i < M; ++i) {
      const Reg qv = V::set1(qp[dd * SR + i]);
      for (int v = 0; v < SV; ++v) acc[i][v] = V::fmadd(qv, kv[v], acc[i][v]);
    }
  }
  const Reg sc = V::set1(scale);
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < SV; ++v) V::store(s + i * lds + v * L, V::mul(acc[i][v], sc));
}

template <class V, int SR, int SV, int M = SR>
void score_rows(int m, int d, const float* qp, const float* kt, int64_t ldkt, float* s, int64_t lds,
                float scale) {
  if constexpr (M > 1) {
    if (m < M) return score_rows<V, SR, SV, M - 1>(m, d, qp, kt, ldkt, s, lds, scale);
  }
  score_tile<V, SR, SV, M>(d, qp, kt, ldkt, s, lds, scale);
}

// out[i][dc + c] = inv[i] · sum_j p[i * ldp + j] · v[j * ldv + c] for i < M, c < width, where
// width is NV vectors, the last one `tail` lanes wide when Partial.
template <class V, int M, int NV, bool Partial, class E>
void pv_tile(int64_t n_keys, const float* p, int64_t ldp, const E* v, int64_t ldv, int tail,
             float* const* out, int64_t dc, const float* inv) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  Reg acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int u = 0; u < NV; ++u) acc[i][u] = V::zero();
  for (int64_t j = 0; j < n_keys; ++j) {
    Reg vv[NV];
    for (int u = 0; u < NV; ++u)
      vv[u] = Partial && u == NV - 1 ? kv_load_partial<V>(v + j * ldv + u * L, tail)
                                     : kv_load<V>(v + j * ldv + u * L);
    for (int i = 0; i < M; ++i) {
      const Reg pv = V::set1(p[i * ldp + j]);
      for (int u = 0; u < NV; ++u) acc[i][u] = V::fmadd(pv, vv[u], acc[i][u]);
    }
  }
  for (int i = 0; i < M; ++i) {
    const Reg s = V::set1(inv[i]);
    for (int u = 0; u < NV; ++u) {
      float* o = out[i] + dc + u * L;
      if (Partial && u == NV - 1) {
        V::store_partial(o, V::mul(acc[i][u], s), tail);
      } else {
        V::store(o, V::mul(acc[i][u], s));
      }
    }
  }
}

template <class V, int M, int NV, class E>
void pv_width(int width, int64_t n_keys, const float* p, int64_t ldp, const E* v, int64_t ldv,
              float* const* out, int64_t dc, const float* inv) {
  constexpr int L = V::kLanes;
  if constexpr (NV > 1) {
    if (width <= (NV - 1) * L)
      return pv_width<V, M, NV - 1>(width, n_keys, p, ldp, v, ldv, out, dc, inv);
  }
  if (width == NV * L) {
    pv_tile<V, M, NV, false>(n_keys, p, ldp, v, ldv, L, out, dc, inv);
  } else {
    pv_tile<V, M, NV, true>(n_keys, p, ldp, v, ldv, width - (NV - 1) * L, out, dc, inv);
  }
}

template <class V, int OV, int M, class E>
void pv_rows(int m, int width, int64_t n_keys, const float* p, int64_t ldp, const E* v,
             int64_t ldv, float* const* out, int64_t dc, const float* inv) {
  if constexpr (M > 1) {
    if (m < M) return pv_rows<V, OV, M - 1>(m, width, n_keys, p, ldp, v, ldv, out, dc, inv);
  }
  pv_width<V, M, OV>(width, n_keys, p, ldp, v, ldv, out, dc, inv);
}

// s[0, len) becomes exp(s - max s); returns 1 / sum. Scaled (an int8 cache): the scores are of
// the key codes, so s_j is first multiplied by its key's scale ks[j]; the weights leave as
// exp(s_j - max) · vs[j], ready for a P·V over the value codes, and 1 / sum is of the unscaled
// weights.
template <class V, bool Scaled>
float softmax_row(float* s, int64_t len, const float* ks, const float* vs) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  const int64_t full = len / L * L;
  float mx = -std::numeric_limits<float>::infinity();
  if (full > 0) {
    Reg m = V::set1(mx);
    for (int64_t j = 0; j < full; j += L) {
      Reg x = V::load(s + j);
      if constexpr (Scaled) {
        x = V::mul(x, V::load(ks + j));
        V::store(s + j, x);
      }
      m = V::max(m, x);
    }
    mx = V::reduce_max(m);
  }
  for (int64_t j = full; j < len; ++j) {
    if constexpr (Scaled) s[j] *= ks[j];
    mx = s[j] > mx ? s[j] : mx;
  }
  const Reg mv = V::set1(mx);
  Reg sum = V::zero();
  for (int64_t j = 0; j < full; j += L) {
    const Reg e = V::exp(V::sub(V::load(s + j), mv));
    sum = V::add(sum, e);
    if constexpr (Scaled) {
      V::store(s + j, V::mul(e, V::load(vs + j)));
    } else {
      V::store(s + j, e);
    }
  }
  float total = V::reduce_add(sum);
  for (int64_t j = full; j < len; ++j) {
    const float e = std::exp(s[j] - mx);
    total += e;
    if constexpr (Scaled) {
      s[j] = e * vs[j];
    } else {
      s[j] = e;
    }
  }
  return 1.0f / total;
}

// A decode step (one query per head): s[r * lds + j] = scale · q_r · k_j for j < nk, each key
// row read in place (no packed Kᵀ); L keys at a time, their L dot-product vectors summed into
// one vector by V::sum_lanes. Needs V::sum_lanes and d a multiple of kLanes.
template <class V, class E>
void decode_scores(int rows, int d, const float* const* qr, const E* k, int64_t ldk,
                   int64_t nk, float* s, int64_t lds, float scale) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  const Reg sc = V::set1(scale);
  for (int64_t j = 0; j < nk; j += L) {
    const int nj = nk - j < L ? static_cast<int>(nk - j) : L;
    // The last block's missing keys repeat its last key (their scores are not stored), so that
    // every loop below has a fixed trip count and the sums stay in registers.
    const E* kr[L];
    for (int i = 0; i < L; ++i) kr[i] = k + (j + (i < nj ? i : nj - 1)) * ldk;
    if (j + 3 * L <= nk) {
      const char* pf = reinterpret_cast<const char*>(k + (j + 2 * L) * ldk);
      for (int i = 0; i < L; ++i)
        for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(E)); b += 64)
          __builtin_prefetch(pf + i * ldk * static_cast<int64_t>(sizeof(E)) + b);
    }
    for (int r = 0; r < rows; ++r) {
      Reg acc[L];
      for (int i = 0; i < L; ++i) acc[i] = V::zero();
      for (int dd = 0; dd < d; dd += L) {
        const Reg qv = V::load(qr[r] + dd);
        for (int i = 0; i < L; ++i) acc[i] = V::fmadd(qv, kv_load<V>(kr[i] + dd), acc[i]);
      }
      const Reg sum = V::mul(V::sum_lanes(acc), sc);
      if (nj == L) {
        V::store(s + r * lds + j, sum);
      } else {
        V::store_partial(s + r * lds + j, sum, nj);
      }
    }
  }
}

template <class V, int SR, int SV, int OR, int OV, class E>
void attention_task(const AttentionShape& s, int hk, int64_t i0, int64_t i1, const float* q,
                    int64_t ldq, const E* k, const E* v, int64_t ldkv, float* out,
                    int64_t ldo) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  constexpr int NRS = SV * L;
  static_assert(kKeyBlock % NRS == 0);
  const int g = s.n_heads / s.n_kv_heads;
  const int d = s.head_dim;
  const int rows = static_cast<int>(i1 - i0) * g;
  const int tiles = (rows + SR - 1) / SR;
  const int64_t nk = s.pos0 + i1;
  const int64_t lds = round_up(nk, NRS);
  auto row_len = [&](int r) { return s.pos0 + i0 + r / g + 1; };
  auto row_offset = [&](int r, int64_t ld) { return (i0 + r / g) * ld + (hk * g + r % g) * d; };

  float* sc = thread_scratch(Scratch::kScores, static_cast<size_t>(rows * lds + rows));
  float* inv = sc + rows * lds;  // [rows]
  // Scores: a decode step (one query position) takes each key row in place; otherwise the
  // queries and key blocks are packed for the register-tiled score kernel.
  bool direct = false;
  if constexpr (requires(Reg* r) { V::sum_lanes(r); }) {
    direct = i1 - i0 == 1 && d % L == 0 && rows <= SR;
    if (direct) {
      const float* qr[SR];
      for (int r = 0; r < rows; ++r) qr[r] = q + row_offset(r, ldq);
      decode_scores<V>(rows, d, qr, k + hk * d, ldkv, nk, sc, lds, s.scale);
    }
  }
  if (!direct) {
    float* qp = thread_scratch(Scratch::kQueries, static_cast<size_t>(tiles) * SR * d);
    float* kt = thread_scratch(Scratch::kKeys, static_cast<size_t>(d) * kKeyBlock);
    for (int t = 0; t < tiles; ++t)  // qp: [tiles][d][SR]
      for (int i = 0; i < SR; ++i) {
        const int r = t * SR + i;
        float* dst = qp + static_cast<int64_t>(t) * d * SR + i;
        if (r < rows) {
          const float* src = q + row_offset(r, ldq);
          for (int dd = 0; dd < d; ++dd) dst[dd * SR] = src[dd];
        } else {
          for (int dd = 0; dd < d; ++dd) dst[dd * SR] = 0.0f;
        }
      }
    for (int64_t kb = 0; kb < nk; kb += kKeyBlock) {
      const int nkb = static_cast<int>(nk - kb < kKeyBlock ? nk - kb : kKeyBlock);
      pack_keys_t<V>(k + kb * ldkv + hk * d, ldkv, nkb, static_cast<int>(round_up(nkb, NRS)), d,
                     kt, kKeyBlock);
      for (int t = 0; t < tiles; ++t) {
        const int m = rows - t * SR < SR ? rows - t * SR : SR;
        const int64_t len = row_len(t * SR + m - 1);
        const int64_t end = len < kb + nkb ? len : kb + nkb;
        for (int64_t jb = kb; jb < end; jb += NRS)
          score_rows<V, SR, SV>(m, d, qp + static_cast<int64_t>(t) * d * SR, kt + (jb - kb),
                                kKeyBlock, sc + t * SR * lds + jb, lds, s.scale);
      }
    }
  }

  // An int8 cache's scales of this kv head over keys 0 .. nk - 1 (contiguous: stored head by
  // head); the other caches have none.
  constexpr bool kScaled = std::is_same_v<E, int8_t>;
  const float* ks = kScaled ? s.k_scales + hk * s.ld_scales : nullptr;
  const float* vs = kScaled ? s.v_scales + hk * s.ld_scales : nullptr;
  for (int r = 0; r < rows; ++r) {
    float* row = sc + r * lds;
    const int64_t len = row_len(r);
    inv[r] = softmax_row<V, kScaled>(row, len, ks, vs);
    if (nk > len) std::memset(row + len, 0, static_cast<size_t>(nk - len) * sizeof(float));
  }

  for (int r0 = 0; r0 < rows; r0 += OR) {
    const int m = rows - r0 < OR ? rows - r0 : OR;
    float* outs[OR];
    for (int i = 0; i < m; ++i) outs[i] = out + row_offset(r0 + i, ldo);
    const int64_t n_keys = row_len(r0 + m - 1);
    for (int dc = 0; dc < d; dc += OV * L) {
      const int width = d - dc < OV * L ? d - dc : OV * L;
      pv_rows<V, OV, OR>(m, width, n_keys, sc + r0 * lds, lds, v + hk * d + dc, ldkv, outs, dc,
                         inv + r0);
    }
  }
}

template <class V, int SR, int SV, int OR, int OV, class E>
void attention_typed(const AttentionShape& s, const float* q, int64_t ldq, const E* k, const E* v,
                     int64_t ldkv, float* out, int64_t ldo, ThreadPool& pool) {
  const int g = s.n_heads / s.n_kv_heads;
  // About four row tiles per task; the latest queries (the most keys) are handed out first.
  const int64_t bq_max = (4 * SR + g - 1) / g;
  const int64_t bq = s.n_q < bq_max ? s.n_q : bq_max;
  const int64_t n_blocks = (s.n_q + bq - 1) / bq;
  pool.run(n_blocks * s.n_kv_heads, [&](int64_t task) {
    const int64_t b = n_blocks - 1 - task / s.n_kv_heads;
    const int hk = static_cast<int>(task % s.n_kv_heads);
    const int64_t i1 = (b + 1) * bq < s.n_q ? (b + 1) * bq : s.n_q;
    attention_task<V, SR, SV, OR, OV>(s, hk, b * bq, i1, q, ldq, k, v, ldkv, out, ldo);
  });
}

// k and v point to f32, bf16 or int8 elements as s.kv_dtype says.
template <class V, int SR, int SV, int OR, int OV>
void attention(const AttentionShape& s, const float* q, int64_t ldq, const void* k, const void* v,
               int64_t ldkv, float* out, int64_t ldo, ThreadPool& pool) {
  if (s.kv_dtype == DType::BF16) {
    attention_typed<V, SR, SV, OR, OV>(s, q, ldq, static_cast<const uint16_t*>(k),
                                       static_cast<const uint16_t*>(v), ldkv, out, ldo, pool);
  } else if (s.kv_dtype == DType::I8) {
    attention_typed<V, SR, SV, OR, OV>(s, q, ldq, static_cast<const int8_t*>(k),
                                       static_cast<const int8_t*>(v), ldkv, out, ldo, pool);
  } else {
    attention_typed<V, SR, SV, OR, OV>(s, q, ldq, static_cast<const float*>(k),
                                       static_cast<const float*>(v), ldkv, out, ldo, pool);
  }
}

}  // namespace sparsa::kernels::SPARSA_KERNELS_ISA::detail
