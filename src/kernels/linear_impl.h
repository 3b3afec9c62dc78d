// The linear kernels written once over a vector type V, compiled into each kernels_<isa>.cc
// inside namespace sparsa::kernels::<isa> (SPARSA_KERNELS_ISA, defined by that file before the
// include), so that no function compiled for one ISA can reach another ISA's path through the
// linker's merging of inline functions and template instantiations.
//
// V provides: Reg, kLanes, zero, set1, load, load_partial(p, n), store, store_partial(p, v, n),
// fmadd(a, b, c) = a * b + c, add, mul, max, reduce_add, reduce_max, exp, transpose(Reg[kLanes]),
// and load_w<D> / load_w_partial<D> that widen kLanes weights of dtype D to f32 (D = I8 only for
// the int8 KV cache's codes, read by attention_impl.h).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/kernels_internal.h"
#include "sparsa/core/dtype.h"

#ifndef SPARSA_KERNELS_ISA
#error "define SPARSA_KERNELS_ISA (generic, avx2 or avx512) before including linear_impl.h"
#endif

namespace sparsa::kernels::SPARSA_KERNELS_ISA::detail {

template <DType D>
using WeightElem = std::conditional_t<D == DType::F32, float,
                                      std::conditional_t<D == DType::I8, int8_t, uint16_t>>;

// IEEE half to float without a call or a table: move exponent and mantissa into place and
// rebias; infinities and NaNs get the rest of the bias, subnormals are renormalized by a float
// subtraction (F. Giesen, "half_to_float_fast5").
inline float half_bits_to_f32(uint16_t h) {
  constexpr uint32_t kShiftedExp = 0x7c00u << 13;
  uint32_t bits = (h & 0x7fffu) << 13;
  const uint32_t exp = bits & kShiftedExp;
  bits += (127 - 15) << 23;
  float f;
  if (exp == kShiftedExp) {
    bits += (128 - 16) << 23;
  } else if (exp == 0) {
    bits += 1 << 23;
    std::memcpy(&f, &bits, sizeof f);
    f -= 6.103515625e-05f;  // 2^-14
    std::memcpy(&bits, &f, sizeof f);
  }
  bits |= static_cast<uint32_t>(h & 0x8000u) << 16;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float bf16_bits_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <DType D>
inline float weight_to_f32(WeightElem<D> w) {
  if constexpr (D == DType::F32) {
    return w;
  } else if constexpr (D == DType::BF16) {
    return bf16_bits_to_f32(w);
  } else if constexpr (D == DType::I8) {
    return static_cast<float>(w);
  } else {
    return half_bits_to_f32(w);
  }
}

// y[t * ldy + r] = x_t · W_r for a tile of R rows × T tokens, U accumulators per dot product.
// With `next` set, each step also prefetches as many bytes of `next` as it reads of w (for a
// tile of rows stored one after another: the next tile's rows, in order).
template <class V, DType D, int R, int T, int U>
inline void decode_tile(const WeightElem<D>* w, int64_t ldw, int64_t cols, const float* x,
                        int64_t ldx, float* y, int64_t ldy, const void* next = nullptr) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  constexpr int kStepBytes = R * U * L * static_cast<int>(sizeof(WeightElem<D>));
  Reg acc[U][R][T];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[u][r][t] = V::zero();
  int64_t k = 0;
  const char* pf = static_cast<const char*>(next);
  for (; k + U * L <= cols; k += U * L) {
    if (pf) {
      for (int b = 0; b < kStepBytes; b += 64) __builtin_prefetch(pf + b);
      pf += kStepBytes;
    }
    for (int u = 0; u < U; ++u) {
      Reg xv[T];
      for (int t = 0; t < T; ++t) xv[t] = V::load(x + t * ldx + k + u * L);
      for (int r = 0; r < R; ++r) {
        const Reg wv = V::template load_w<D>(w + r * ldw + k + u * L);
        for (int t = 0; t < T; ++t) acc[u][r][t] = V::fmadd(wv, xv[t], acc[u][r][t]);
      }
    }
  }
  for (; k < cols; k += L) {
    const int n = static_cast<int>(cols - k < L ? cols - k : L);
    Reg xv[T];
    for (int t = 0; t < T; ++t) xv[t] = V::load_partial(x + t * ldx + k, n);
    for (int r = 0; r < R; ++r) {
      const Reg wv = V::template load_w_partial<D>(w + r * ldw + k, n);
      for (int t = 0; t < T; ++t) acc[0][r][t] = V::fmadd(wv, xv[t], acc[0][r][t]);
    }
  }
  if constexpr (U == 1 && R * T == L && requires(const Reg* v) { V::sum_lanes(v); }) {
    // A tile of exactly kLanes sums: one shuffle tree reduces them all at once, far fewer
    // operations than kLanes separate horizontal sums (which matter next to short rows).
    Reg by_token[L];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) by_token[t * R + r] = acc[0][r][t];
    alignas(64) float sums[L];
    V::store(sums, V::sum_lanes(by_token));
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) y[t * ldy + r] = sums[t * R + r];
  } else {
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) {
        Reg sum = acc[0][r][t];
        for (int u = 1; u < U; ++u) sum = V::add(sum, acc[u][r][t]);
        y[t * ldy + r] = V::reduce_add(sum);
      }
  }
}

// The same for nt <= T tokens; a single row of a single token has four sums in flight.
template <class V, DType D, int R, int T>
inline void decode_tokens(int64_t nt, const WeightElem<D>* w, int64_t ldw, int64_t cols,
                          const float* x, int64_t ldx, float* y, int64_t ldy,
                          const void* next = nullptr) {
  if constexpr (T > 1) {
    if (nt < T) return decode_tokens<V, D, R, T - 1>(nt, w, ldw, cols, x, ldx, y, ldy, next);
  }
  decode_tile<V, D, R, T, R == 1 && T == 1 ? 4 : 1>(w, ldw, cols, x, ldx, y, ldy, next);
}

// Up to this many columns (x: 16 KB, half of L1), a single token reads W row by row: one
// sequential stream per thread, which DRAM serves fastest. Longer rows take R1 rows at a time, so
// that each x chunk loaded serves R1 rows.
inline constexpr int64_t kSequentialMaxCols = 4096;

// Rows [r0, r1): one token as above; several in tiles of R rows, every token group of up to T
// tokens while those rows are in cache.
template <class V, DType D, int R1, int R, int T>
void decode_rows(const DenseWeight& w, const float* x, int64_t ldx, int64_t n_tokens, float* y,
                 int64_t ldy, int64_t r0, int64_t r1) {
  const auto* base = static_cast<const WeightElem<D>*>(w.data);
  const int64_t cols = w.cols;
  int64_t r = r0;
  if (n_tokens == 1 && cols > kSequentialMaxCols) {
    for (; r + R1 <= r1; r += R1)
      decode_tile<V, D, R1, 1, 1>(base + r * cols, cols, cols, x, ldx, y + r, ldy);
  } else if (n_tokens == 1) {
    for (; r < r1; ++r) decode_tile<V, D, 1, 1, 4>(base + r * cols, cols, cols, x, ldx, y + r, ldy);
  }
  // Several tokens: rows are short next to the work on them, so the hardware prefetchers fall
  // behind and the loads wait on memory; the first token group of each tile prefetches the next
  // tile (its R rows follow this tile's in memory).
  for (; r + R <= r1; r += R)
    for (int64_t t = 0; t < n_tokens; t += T)
      decode_tokens<V, D, R, T>(n_tokens - t, base + r * cols, cols, cols, x + t * ldx, ldx,
                                y + t * ldy + r, ldy,
                                t == 0 && r + 2 * R <= r1 ? base + (r + R) * cols : nullptr);
  for (; r < r1; ++r)
    for (int64_t t = 0; t < n_tokens; t += T)
      decode_tokens<V, D, 1, T>(n_tokens - t, base + r * cols, cols, cols, x + t * ldx, ldx,
                                y + t * ldy + r, ldy);
}

// The panel layout (DenseWeight::panels): rows in panels of kPanelRows; panel q holds rows
// 16q .. 16q + 15 as [cols][kPanelRows] (the 16 weights of column k side by side), the last
// panel padded with zero rows. A tile of T tokens × NP panels keeps T · NP · 16 output sums in
// registers; each step loads the NP · 16 weights of one column (one stream per panel) and
// broadcasts one input value per token, so no sum needs a horizontal reduction and the multiply
// count per load is T (the row-major tile also spends loads on x and a reduction per sum).
// Several tokens take T times longer per weight than one, and the hardware prefetchers, which
// follow the NP panel streams of each thread, then run too little ahead of them: the tile asks for
// each panel's line kPanelPrefetchCols columns ahead itself (1 KB of bf16). Small model, 8
// tokens, 512 x 512 from memory: 111-165 -> 153-192 GFLOP/s on 2 threads.
inline constexpr int64_t kPanelPrefetchCols = 32;
template <class V, DType D, int T, int NP>
inline void panel_tile(const WeightElem<D>* w, int64_t cols, const float* x, int64_t ldx,
                       float* y, int64_t ldy, int valid) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  constexpr int VP = kPanelRows / L;  // vectors per panel column
  constexpr int NV = NP * VP;
  const int64_t stride = cols * kPanelRows;
  Reg acc[T][NV];
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < NV; ++v) acc[t][v] = V::zero();
  for (int64_t k = 0; k < cols; ++k) {
    Reg wv[NV];
    if constexpr (T > 1) {
      // Once per cache line of a panel: a line holds 64 / (16 · element size) columns.
      constexpr int64_t kLineCols = 64 / (kPanelRows * static_cast<int64_t>(sizeof(WeightElem<D>)));
      if (kLineCols <= 1 || (k & (kLineCols - 1)) == 0)
        for (int p = 0; p < NP; ++p)
          __builtin_prefetch(w + p * stride + (k + kPanelPrefetchCols) * kPanelRows);
    }
    for (int p = 0; p < NP; ++p)
      for (int u = 0; u < VP; ++u)
        wv[p * VP + u] = V::template load_w<D>(w + p * stride + k * kPanelRows + u * L);
    for (int t = 0; t < T; ++t) {
      const Reg xb = V::set1(x[t * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[t][v] = V::fmadd(wv[v], xb, acc[t][v]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < NV; ++v) {
      const int n = valid - v * L;
      if (n >= L) {
        V::store(y + t * ldy + v * L, acc[t][v]);
      } else if (n > 0) {
        V::store_partial(y + t * ldy + v * L, acc[t][v], n);
      }
    }
}

// Rows [r0, r1) (r0 a multiple of kPanelRows) for exactly T tokens: NP panels at a time, then
// one at a time for the rest.
template <class V, DType D, int T, int NP>
void panel_rows(const DenseWeight& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                int64_t r0, int64_t r1) {
  const auto* base = static_cast<const WeightElem<D>*>(w.data);
  const int64_t cols = w.cols;
  int64_t r = r0;
  for (; r + NP * kPanelRows <= r1; r += NP * kPanelRows)
    panel_tile<V, D, T, NP>(base + r * cols, cols, x, ldx, y + r, ldy, NP * kPanelRows);
  for (; r < r1; r += kPanelRows) {
    const int valid = static_cast<int>(r1 - r < kPanelRows ? r1 - r : kPanelRows);
    panel_tile<V, D, T, 1>(base + r * cols, cols, x, ldx, y + r, ldy, valid);
  }
}

// Vectors of sums per token in a panel tile of T tokens: at most ACC sums in all, the sums, one
// weight register per vector and the broadcast within REGS registers, and at most 8 (as many
// concurrent streams as panels).
constexpr int panel_vectors(int t, int acc, int regs) {
  const int by_acc = acc / t, by_regs = (regs - 1) / (t + 1);
  const int nv = by_acc < by_regs ? by_acc : by_regs;
  return nv < 8 ? nv : 8;
}

// Decode over panels: tokens in groups of up to TG, each group one pass over the rows.
template <class V, DType D, int TG, int ACC, int REGS, int T = TG>
void panel_tokens(int64_t nt, const DenseWeight& w, const float* x, int64_t ldx, float* y,
                  int64_t ldy, int64_t r0, int64_t r1) {
  if constexpr (T > 1) {
    if (nt < T) return panel_tokens<V, D, TG, ACC, REGS, T - 1>(nt, w, x, ldx, y, ldy, r0, r1);
  }
  constexpr int VP = kPanelRows / V::kLanes;
  constexpr int NP = panel_vectors(T, ACC, REGS) / VP > 0 ? panel_vectors(T, ACC, REGS) / VP : 1;
  panel_rows<V, D, T, NP>(w, x, ldx, y, ldy, r0, r1);
}

template <class V, DType D, int TG, int ACC, int REGS>
void decode_panels(const DenseWeight& w, const float* x, int64_t ldx, int64_t n_tokens, float* y,
                   int64_t ldy, int64_t r0, int64_t r1) {
  for (int64_t t = 0; t < n_tokens; t += TG)
    panel_tokens<V, D, TG, ACC, REGS>(n_tokens - t < TG ? n_tokens - t : TG, w, x + t * ldx, ldx,
                                      y + t * ldy, ldy, r0, r1);
}

// The GEMM's B micro-panel from the panel layout: dst[k][j] = W[n0 + j, k0 + k] for j < n, zero
// for n <= j < NR. Whole panels are copied as they lie; micro-panels narrower than a panel
// (the generic path) element by element.
template <class V, DType D, int NR>
void pack_b_panels(const DenseWeight& w, int64_t n0, int n, int64_t k0, int kc, float* dst) {
  constexpr int L = V::kLanes;
  const auto* base = static_cast<const WeightElem<D>*>(w.data);
  const int64_t cols = w.cols;
  if (NR % kPanelRows != 0 || n0 % kPanelRows != 0) {
    for (int k = 0; k < kc; ++k)
      for (int j = 0; j < NR; ++j)
        dst[k * NR + j] = j < n ? weight_to_f32<D>(base[weight_index(w, n0 + j, k0 + k)]) : 0.0f;
    return;
  }
  static_assert(kPanelRows % L == 0);
  for (int q = 0; q < NR; q += kPanelRows) {
    if (q >= n) {
      for (int k = 0; k < kc; ++k)
        for (int i = 0; i < kPanelRows; ++i) dst[k * NR + q + i] = 0.0f;
      continue;
    }
    // Rows past n in this panel are the zero padding or rows another call packs; both are
    // multiplied into columns of C that the micro-kernel does not store.
    const WeightElem<D>* src = base + (n0 + q) * cols + k0 * kPanelRows;
    for (int k = 0; k < kc; ++k)
      for (int u = 0; u < kPanelRows; u += L)
        V::store(dst + k * NR + q + u, V::template load_w<D>(src + k * kPanelRows + u));
  }
}

// dst[k][j] = W[n0 + j, k0 + k] for j < NR: kLanes × kLanes blocks transposed in registers.
template <class V, DType D, int NR>
void pack_b(const DenseWeight& w, int64_t n0, int n, int64_t k0, int kc, float* dst) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  const auto* base = static_cast<const WeightElem<D>*>(w.data);
  const int64_t cols = w.cols;
  for (int jb = 0; jb < NR; jb += L) {
    const int rows = n - jb < 0 ? 0 : (n - jb < L ? n - jb : L);
    if (rows == 0) {
      for (int k = 0; k < kc; ++k)
        for (int i = 0; i < L; ++i) dst[k * NR + jb + i] = 0.0f;
      continue;
    }
    const WeightElem<D>* src = base + (n0 + jb) * cols + k0;
    int k = 0;
    if (rows == L) {
      for (; k + L <= kc; k += L) {
        Reg r[L];
        for (int i = 0; i < L; ++i) r[i] = V::template load_w<D>(src + i * cols + k);
        V::transpose(r);
        for (int i = 0; i < L; ++i) V::store(dst + (k + i) * NR + jb, r[i]);
      }
    }
    for (; k < kc; ++k)
      for (int i = 0; i < L; ++i)
        dst[k * NR + jb + i] = i < rows ? weight_to_f32<D>(src[i * cols + k]) : 0.0f;
  }
}

// The register-blocked micro-kernel: an M × (NV · kLanes) tile of C, one broadcast of A and NV
// loads of B per k.
template <class V, int MR, int NV, int M>
void micro_tile(int n, int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                bool accumulate) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  constexpr int NR = NV * L;
  Reg acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
  for (int64_t k = 0; k < kc; ++k) {
    Reg bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + k * NR + v * L);
    for (int i = 0; i < M; ++i) {
      const Reg av = V::set1(a[k * MR + i]);
      for (int v = 0; v < NV; ++v) acc[i][v] = V::fmadd(av, bv[v], acc[i][v]);
    }
  }
  if (n == NR) {
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < NV; ++v) {
        float* p = c + i * ldc + v * L;
        V::store(p, accumulate ? V::add(acc[i][v], V::load(p)) : acc[i][v]);
      }
    return;
  }
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NV && v * L < n; ++v) {
      float* p = c + i * ldc + v * L;
      const int w = n - v * L < L ? n - v * L : L;
      V::store_partial(p, accumulate ? V::add(acc[i][v], V::load_partial(p, w)) : acc[i][v], w);
    }
}

template <class V, int MR, int NV, int M = MR>
void micro(int m, int n, int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
           bool accumulate) {
  if constexpr (M > 1) {
    if (m < M) return micro<V, MR, NV, M - 1>(m, n, kc, a, b, c, ldc, accumulate);
  }
  micro_tile<V, MR, NV, M>(n, kc, a, b, c, ldc, accumulate);
}

// The table entry of one ISA: decode tiles of DR1 rows × 1 token (long rows) or DR rows × DT
// tokens, GEMM micro-tiles of MR tokens × NV vectors of output features.
// Panel-layout decode: tokens in groups of up to PT, tiles of at most PACC sums, PREGS vector
// registers.
template <class V, int DR1, int DR, int DT, int MR, int NV, int PT, int PACC, int PREGS>
LinearKernels make_linear_kernels(DType dtype) {
  LinearKernels k;
  k.micro = &micro<V, MR, NV>;
  k.mr = MR;
  k.nr = NV * V::kLanes;
  switch (dtype) {
    case DType::F32:
      k.decode = &decode_rows<V, DType::F32, DR1, DR, DT>;
      k.pack_b = &pack_b<V, DType::F32, NV * V::kLanes>;
      k.decode_panels = &decode_panels<V, DType::F32, PT, PACC, PREGS>;
      k.pack_b_panels = &pack_b_panels<V, DType::F32, NV * V::kLanes>;
      break;
    case DType::F16:
      k.decode = &decode_rows<V, DType::F16, DR1, DR, DT>;
      k.pack_b = &pack_b<V, DType::F16, NV * V::kLanes>;
      k.decode_panels = &decode_panels<V, DType::F16, PT, PACC, PREGS>;
      k.pack_b_panels = &pack_b_panels<V, DType::F16, NV * V::kLanes>;
      break;
    case DType::BF16:
      k.decode = &decode_rows<V, DType::BF16, DR1, DR, DT>;
      k.pack_b = &pack_b<V, DType::BF16, NV * V::kLanes>;
      k.decode_panels = &decode_panels<V, DType::BF16, PT, PACC, PREGS>;
      k.pack_b_panels = &pack_b_panels<V, DType::BF16, NV * V::kLanes>;
      break;
    default:
      return LinearKernels{};
  }
  return k;
}

// gate[i] = silu(gate[i]) · up[i], silu(g) = g / (1 + exp(-g)) (the SwiGLU of Llama's MLP).
template <class V>
void silu_mul(float* gate, const float* up, int64_t n) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  const Reg one = V::set1(1.0f);
  auto f = [&](Reg g, Reg u) {
    return V::mul(V::div(g, V::add(one, V::exp(V::sub(V::zero(), g)))), u);
  };
  int64_t i = 0;
  for (; i + L <= n; i += L) V::store(gate + i, f(V::load(gate + i), V::load(up + i)));
  if (i < n) {
    const int w = static_cast<int>(n - i);
    V::store_partial(gate + i, f(V::load_partial(gate + i, w), V::load_partial(up + i, w)), w);
  }
}

// y[i] = exp(x[i] - shift).
template <class V>
void exp_shifted(const float* x, float shift, float* y, int64_t n) {
  constexpr int L = V::kLanes;
  const auto s = V::set1(shift);
  int64_t i = 0;
  for (; i + L <= n; i += L) V::store(y + i, V::exp(V::sub(V::load(x + i), s)));
  if (i < n) {
    const int w = static_cast<int>(n - i);
    V::store_partial(y + i, V::exp(V::sub(V::load_partial(x + i, w), s)), w);
  }
}

// Eight independent sums, so that the loop is bound by the loads.
template <class V>
float stream_sum(const float* p, int64_t n) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  Reg acc[8];
  for (auto& a : acc) a = V::zero();
  int64_t i = 0;
  for (; i + 8 * L <= n; i += 8 * L)
    for (int u = 0; u < 8; ++u) acc[u] = V::add(acc[u], V::load(p + i + u * L));
  for (; i < n; i += L) {
    const int w = n - i < L ? static_cast<int>(n - i) : L;
    acc[0] = V::add(acc[0], V::load_partial(p + i, w));
  }
  for (int u = 1; u < 8; ++u) acc[0] = V::add(acc[0], acc[u]);
  return V::reduce_add(acc[0]);
}

}  // namespace sparsa::kernels::SPARSA_KERNELS_ISA::detail
