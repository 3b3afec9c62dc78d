// The int8-activation decode kernels (AVX-512 F/BW/DQ/VL + VBMI, VBMI2, VNNI): the input is
// quantized once per call to int8 with one scale per 64 stored columns (quantize_input), and the
// weight codes, as unsigned bytes, multiply it with vpdpbusd (u8 × s8, four products summed into
// each 32-bit lane), as llama.cpp's Q8 dot products do. Every weight byte is unpacked with a few
// shifts and ands, never widened to f32, so that the loop keeps up with memory.
//
//   Int codes      y = Σ_g scale_g · (Σ_{b ∈ g} s_b · Σ code·q  −  zero_g · Σ_{b ∈ g} s_b · Σ q):
//                  the zero point is subtracted once per group through the input's block sums.
//   Palettes       tables of <= 16 entries are held as unsigned bytes with a zero point
//                  (PackedView::lut_u8), looked up with vpshufb, and sum like Int codes; larger
//                  ones as 16-bit integers Q_j ≈ lut_j / qscale split into two byte planes
//                  (PackedView::lut_q), looked up with vpermb; Σ Q·q = 256 · Σ hi·q + Σ lo·q −
//                  32768 · Σ q, hi = (Q >> 8) + 128 unsigned.
//   Bitmask        the block's kept codes (nibbles: an and, or a shift and an and, per block of
//                  a pair) move to their columns with vpexpandb; pruned columns take the zero
//                  point (Int codes, 8-bit tables) or Q = 0 (16-bit tables).
// The input is quantized per 128 columns, the two 64-column blocks of a pair (2p, 2p + 1), so
// both blocks' integer dot products are summed in the same lanes and converted to f32 once, with
// the pair's input scale s_p (and, for Int codes, the group's scale where the pair lies in one
// group): 128 u8 × s8 products summed in 16 lanes cannot overflow 32 bits, nor can a palette's
// 256 · Σ hi·q + Σ lo·q.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/kernels_internal.h"
#include "sparsa/formats/packed_weight.h"

namespace sparsa::kernels::avx512vnni {
namespace {

using formats::Codec;
using formats::kBlockCols;
using formats::PackedView;
using formats::Positions;

inline __mmask16 mask16(int64_t n) {
  return _cvtu32_mask16(n >= 16 ? 0xffffu : static_cast<uint32_t>((1u << n) - 1u));
}

// Reads the codes of one row block after block, in order, as 64 unsigned bytes in column order.
// SB: stored bits per code of Positions::All (2, 3, 4, 8), or of the compact kept values of
// Bitmask (4: nibbles, 8: bytes). Pruned columns of a Bitmask row take `fill`; `keep` is the
// block's mask.
template <int SB, bool kSparse>
class CodeReader {
 public:
  CodeReader(const PackedView& p, int64_t r)
      : cur_(kSparse ? nullptr : p.codes + r * p.row_bytes),
        kept_(kSparse ? p.codes + p.row_offsets[r] : p.codes, p.n_blocks,
              kSparse ? static_cast<int64_t>(p.row_offsets[r + 1] - p.row_offsets[r]) : 0) {}

  __m512i block(int64_t b, __m512i fill, __mmask64& keep) {
    if constexpr (!kSparse) {
      keep = _cvtu64_mask64(~uint64_t{0});
      const uint8_t* blk = cur_ + b * 8 * SB;
      if constexpr (SB == 8) {
        return _mm512_loadu_si512(blk);
      } else if constexpr (SB == 4) {  // byte i = code[i] | code[i + 32] << 4
        __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
        v = _mm512_mask_srli_epi16(v, _cvtu32_mask32(0xffff0000u), v, 4);
        return _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
      } else {  // byte i = lo[i] | lo[i+16] << 2 | lo[i+32] << 4 | lo[i+48] << 6; bit plane
        // Lane L (bytes 16 L .. 16 L + 15) takes bits 2 L, 2 L + 1 of each byte: vpmultishiftqb
        // picks, for byte j of a qword, the 8 bits at offset 8 j + 2 L.
        __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
        v = _mm512_multishift_epi64_epi8(
            _mm512_set_epi64(0x3e362e261e160e06, 0x3e362e261e160e06, 0x3c342c241c140c04,
                             0x3c342c241c140c04, 0x3a322a221a120a02, 0x3a322a221a120a02,
                             0x3830282018100800, 0x3830282018100800),
            v);
        v = _mm512_and_si512(v, _mm512_set1_epi8(3));
        if constexpr (SB == 3)  // bit 2 of code i is bit i of the plane
          v = _mm512_mask_add_epi8(v, _cvtu64_mask64(load_u64(blk + 16)), v, _mm512_set1_epi8(4));
        return v;
      }
    } else {
      keep = _cvtu64_mask64(kept_.mask(b));
      return _mm512_mask_expand_epi8(fill, keep, kept_.next(b));
    }
  }

 private:
  const uint8_t* cur_;
  KeptCodes<kSparse ? SB : 8> kept_;  // Bitmask rows only
};

inline __m512 pair_scale(const QuantizedInput& x, int t, int64_t q) {
  return _mm512_set1_ps(x.scale[t * x.n_pairs + q]);
}
inline __m512i input_block(const QuantizedInput& x, int t, int64_t b) {
  return _mm512_load_si512(x.q + t * x.ldq + b * kBlockCols);
}

// A row's f16 group scales widened to f32 once, before its loop over pairs: the loops then read
// each scale as a broadcast from memory, as they would an f32 scale, where a conversion per pair
// would add three instructions to loops that are bound by their instruction count.
constexpr int64_t kMaxRowGroups = 1024;  // rows of more groups take the f32-input kernels
struct RowScales {
  alignas(64) float f[kMaxRowGroups];
  const float* widen(const uint16_t* h, int64_t n) {
    for (int64_t g = 0; g < n; g += 16) {
      const __mmask16 k = mask16(n - g);
      _mm512_mask_storeu_ps(f + g, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, h + g)));
    }
    return f;
  }
};

// y[t, r] = Σ lanes (acc + acc2) − Σ_g scale_g · zero_g · group_sum[t][g].
// ws: the row's scales as widened by RowScales.
inline void finish_int_row(const PackedView& p, const QuantizedInput& x, int64_t r,
                           const float* ws, int n_tokens, const __m512* acc, const __m512* acc2,
                           float* y, int64_t ldy) {
  const int64_t ng = p.n_groups;
  const uint8_t* zs = p.zeros + r * ng;
  for (int t = 0; t < n_tokens; ++t) {
    __m512 corr = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g += 16) {
      const __mmask16 k = mask16(ng - g);
      const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, zs + g)));
      corr = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, ws + g), z),
                             _mm512_maskz_loadu_ps(k, x.group_sum + t * ng + g), corr);
    }
    y[t * ldy + r] =
        _mm512_reduce_add_ps(_mm512_sub_ps(_mm512_add_ps(acc[t], acc2[t]), corr));
  }
}

// Runs step(q, acc) over the pairs q of a row, alternating two sets of sums for one token so
// that the FMA latency stays hidden (a second set costs registers the 8-token tile lacks).
template <int T, class F>
inline void over_pairs(int64_t np, __m512 (&acc)[T], __m512 (&acc2)[T], F&& step) {
  int64_t q = 0;
  if constexpr (T == 1) {
    for (; q + 1 < np; q += 2) {
      step(q, acc);
      step(q + 1, acc2);
    }
  }
  for (; q < np; ++q) step(q, acc);
}

// Group-quantized codes: rows [r0, r1) × T tokens. kPairGroups (one group per row, or groups of
// an even number of blocks): a pair's two integer dot products are summed, then scaled once by
// s_p · scale_g. Otherwise (groups of an odd number of blocks) each block is scaled by its own
// group. The zero points are subtracted once per row through the group sums.
template <int SB, bool kSparse, int T, bool kPairGroups>
void int_rows(const PackedView& p, const QuantizedInput& x, float* y, int64_t ldy, int64_t r0,
              int64_t r1) {
  const int64_t nb = p.n_blocks, ng = p.n_groups, np = (nb + 1) / 2;
  const int64_t bpg = ng == 1 ? nb : p.group_size / kBlockCols;
  const __m512i zero = _mm512_setzero_si512();
  RowScales scales;
  for (int64_t r = r0; r < r1; ++r) {
    CodeReader<SB, kSparse> rd(p, r);
    const float* ws = scales.widen(p.scales + r * ng, ng);
    const uint8_t* zs = p.zeros + r * ng;
    __m512 acc[T], acc2[T];
    for (int t = 0; t < T; ++t) acc[t] = acc2[t] = _mm512_setzero_ps();
    int64_t g = 0, left = bpg;  // the group of the next block, and its blocks still to come
    __m512i fill = kSparse ? _mm512_set1_epi8(static_cast<char>(zs[0])) : zero;
    const auto next_block = [&] {
      if (left == 0) {
        ++g;
        left = bpg;
        if constexpr (kSparse) fill = _mm512_set1_epi8(static_cast<char>(zs[g]));
      }
      --left;
    };
    over_pairs<T>(np, acc, acc2, [&](int64_t q, __m512 (&s)[T]) {
      const int64_t b = 2 * q;
      const bool second = b + 1 < nb;
      __mmask64 keep;
      if constexpr (kPairGroups) {
        next_block();
        const __m512i c0 = rd.block(b, fill, keep);
        __m512i d[T];
        for (int t = 0; t < T; ++t) d[t] = _mm512_dpbusd_epi32(zero, c0, input_block(x, t, b));
        if (second) {
          --left;  // groups hold whole pairs: the second block is in the first one's group
          const __m512i c1 = rd.block(b + 1, fill, keep);
          for (int t = 0; t < T; ++t) d[t] = _mm512_dpbusd_epi32(d[t], c1, input_block(x, t, b + 1));
        }
        const __m512 wsv = _mm512_set1_ps(ws[g]);
        for (int t = 0; t < T; ++t)
          s[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d[t]), pair_scale(x, t, q)), wsv,
                                 s[t]);
      } else {
        for (int64_t bb = b; bb < (second ? b + 2 : b + 1); ++bb) {
          next_block();
          const __m512i c = rd.block(bb, fill, keep);
          const __m512 wsv = _mm512_set1_ps(ws[g]);
          for (int t = 0; t < T; ++t) {
            const __m512i d = _mm512_dpbusd_epi32(zero, c, input_block(x, t, bb));
            s[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), pair_scale(x, t, q)), wsv,
                                   s[t]);
          }
        }
      }
    });
    finish_int_row(p, x, r, ws, T, acc, acc2, y, ldy);
  }
}

// Dense 4-bit codes a pair at a time: a block's byte i holds columns i and i + 32, so the 64
// bytes of blocks 2q and 2q + 1 unpack into [2q: 0..31, 2q+1: 0..31] (low nibbles) and
// [2q: 32..63, 2q+1: 32..63] (high nibbles), which multiply the input's pair layout
// (QuantizedInput::qp). kSameGroup: both blocks lie in one group; otherwise lanes 0..7 (block
// 2q) and 8..15 (block 2q + 1) take their own group's scale.
template <int T, bool kSameGroup>
void int4_pair_rows(const PackedView& p, const QuantizedInput& x, float* y, int64_t ldy,
                    int64_t r0, int64_t r1) {
  const int64_t nb = p.n_blocks, ng = p.n_groups, np = (nb + 1) / 2;
  const int64_t bpg = ng == 1 ? nb : p.group_size / kBlockCols;
  // Pairs per group (kSameGroup: one group per row, or groups of an even number of blocks).
  const int64_t ppg = ng == 1 ? np + 1 : bpg / 2;
  const __m512i zero = _mm512_setzero_si512(), nib = _mm512_set1_epi8(0x0f);
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  RowScales scales;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* codes = p.codes + r * p.row_bytes;
    const float* ws = scales.widen(p.scales + r * ng, ng);
    __m512 acc[T], acc2[T];
    for (int t = 0; t < T; ++t) acc[t] = acc2[t] = _mm512_setzero_ps();
    int64_t g = 0, left = ppg;
    over_pairs<T>(np, acc, acc2, [&](int64_t q, __m512 (&s)[T]) {
      const __m512i v = _mm512_loadu_si512(codes + 64 * q);
      const __m512i lo = _mm512_and_si512(v, nib);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      __m512 wsv;
      if constexpr (kSameGroup) {
        if (left == 0) {  // the next group (never reached with one group per row)
          ++g;
          left = ppg;
        }
        --left;
        wsv = _mm512_set1_ps(ws[g]);
      } else {
        const int64_t g0 = 2 * q / bpg, g1 = std::min(ng - 1, (2 * q + 1) / bpg);
        wsv = _mm512_permutexvar_ps(
            halves, _mm512_castps128_ps512(_mm_setr_ps(ws[g0], ws[g1], 0.0f, 0.0f)));
      }
      for (int t = 0; t < T; ++t) {
        const int8_t* xq = x.qp + t * x.ldq + 128 * q;
        __m512i d = _mm512_dpbusd_epi32(zero, lo, _mm512_load_si512(xq));
        d = _mm512_dpbusd_epi32(d, hi, _mm512_load_si512(xq + 64));
        s[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), pair_scale(x, t, q)), wsv,
                               s[t]);
      }
    });
    finish_int_row(p, x, r, ws, T, acc, acc2, y, ldy);
  }
}

// Bitmask rows of 4-bit Int codes a pair of blocks at a time, for groups of whole pairs (one
// group per row, or an even number of blocks per group): the pair's shared nibble bytes give
// both blocks' kept codes with one load, and each block's codes move to their columns with one
// vpexpandb, pruned columns taking the group's zero point. Rows [r0, r1) × T tokens.
// kGroupPerPair: groups of 128 columns, group q is pair q (no group counter in the loop). A row's
// odd last block is a pair of its own, after the loop over whole pairs.
template <int T, bool kGroupPerPair>
void sparse_int4_pair_rows(const PackedView& p, const QuantizedInput& x, float* y, int64_t ldy,
                           int64_t r0, int64_t r1) {
  const int64_t nb = p.n_blocks, ng = p.n_groups, np = (nb + 1) / 2, whole = nb / 2;
  const int64_t ppg = ng == 1 ? np + 1 : p.group_size / kBlockCols / 2;
  const __m512i zero = _mm512_setzero_si512(), nib = _mm512_set1_epi8(0x0f);
  RowScales scales;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* masks = p.codes + p.row_offsets[r];
    const uint8_t* cur = masks + nb * 8;
    RowPrefetch prefetch(masks, static_cast<int64_t>(p.row_offsets[r + 1] - p.row_offsets[r]), np);
    const float* ws = scales.widen(p.scales + r * ng, ng);
    const uint8_t* zs = p.zeros + r * ng;
    __m512 acc[T], acc2[T];
    for (int t = 0; t < T; ++t) acc[t] = acc2[t] = _mm512_setzero_ps();
    int64_t g = 0, left = ppg;
    __m512i fill = _mm512_set1_epi8(static_cast<char>(zs[0]));
    // Pair q; kSecond: block 2q + 1 exists.
    const auto step = [&]<bool kSecond>(int64_t q, __m512 (&s)[T]) {
      __m512 wsv;
      if constexpr (kGroupPerPair) {
        fill = _mm512_set1_epi8(static_cast<char>(zs[q]));
        wsv = _mm512_set1_ps(ws[q]);
      } else {
        if (left == 0) {  // the next group (never reached with one group per row)
          ++g;
          left = ppg;
          fill = _mm512_set1_epi8(static_cast<char>(zs[g]));
        }
        --left;
        wsv = _mm512_set1_ps(ws[g]);
      }
      const int64_t b = 2 * q;
      const uint64_t m0 = load_u64(masks + 8 * b);
      const uint64_t m1 = kSecond ? load_u64(masks + 8 * b + 8) : 0;
      prefetch.step();
      const __m512i v = load_in_register(cur);
      cur += std::max(std::popcount(m0), std::popcount(m1));
      const __m512i c0 = _mm512_mask_expand_epi8(fill, _cvtu64_mask64(m0), _mm512_and_si512(v, nib));
      const __m512i c1 = _mm512_mask_expand_epi8(fill, _cvtu64_mask64(m1),
                                                 _mm512_and_si512(_mm512_srli_epi16(v, 4), nib));
      for (int t = 0; t < T; ++t) {
        // A lone last block (m1 = 0): the input past the row is 0.
        const __m512i d = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(zero, c0, input_block(x, t, b)), c1, input_block(x, t, b + 1));
        s[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), pair_scale(x, t, q)), wsv,
                               s[t]);
      }
    };
    over_pairs<T>(whole, acc, acc2,
                  [&](int64_t q, __m512 (&s)[T]) { step.template operator()<true>(q, s); });
    if (whole < np) step.template operator()<false>(whole, acc);
    finish_int_row(p, x, r, ws, T, acc, acc2, y, ldy);
  }
}

// Palettes of 2..4 bits through their 8-bit tables (PackedView::lut_u8): u = table[code] by
// vpshufb (pruned columns: the zero point), rows [r0, r1) × T tokens. A pair's Σ u·q is scaled
// once by s_p; y = scale · (Σ − zero · Σ x̂).
template <int SB, bool kSparse, int T>
void palette8_rows(const PackedView& p, const QuantizedInput& x, float* y, int64_t ldy,
                   int64_t r0, int64_t r1) {
  const int64_t nb = p.n_blocks, np = (nb + 1) / 2;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t r = r0; r < r1; ++r) {
    CodeReader<SB, kSparse> rd(p, r);
    const int64_t tbl = r / p.group_rows;
    const __m512i tab = _mm512_broadcast_i32x4(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.lut_u8 + tbl * 16)));
    const __m512i zp = _mm512_set1_epi8(static_cast<char>(p.lut_u8_zero[tbl]));
    __m512 acc[T], acc2[T];
    for (int t = 0; t < T; ++t) acc[t] = acc2[t] = _mm512_setzero_ps();
    const auto values = [&](int64_t b) {
      __mmask64 keep;
      const __m512i c = rd.block(b, zero, keep);
      if constexpr (kSparse) {
        return _mm512_mask_shuffle_epi8(zp, keep, tab, c);
      } else {
        return _mm512_shuffle_epi8(tab, c);
      }
    };
    over_pairs<T>(np, acc, acc2, [&](int64_t q, __m512 (&s)[T]) {
      const int64_t b = 2 * q;
      const __m512i u0 = values(b);
      __m512i d[T];
      for (int t = 0; t < T; ++t) d[t] = _mm512_dpbusd_epi32(zero, u0, input_block(x, t, b));
      if (b + 1 < nb) {
        const __m512i u1 = values(b + 1);
        for (int t = 0; t < T; ++t) d[t] = _mm512_dpbusd_epi32(d[t], u1, input_block(x, t, b + 1));
      }
      for (int t = 0; t < T; ++t)
        s[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[t]), pair_scale(x, t, q), s[t]);
    });
    const float sc = p.lut_u8_scale[tbl], zf = p.lut_u8_zero[tbl];
    for (int t = 0; t < T; ++t)
      y[t * ldy + r] =
          sc * (_mm512_reduce_add_ps(_mm512_add_ps(acc[t], acc2[t])) - zf * x.group_sum[t]);
  }
}

// Palettes of 5..6 bits (codes stored as bytes) through the 16-bit byte-plane tables: rows
// [r0, r1) × T tokens. A pair's sums: d = 256 · Σ hi·q + Σ lo·q over both blocks, scaled once
// by s_p.
template <bool kSparse, int T>
void palette_rows(const PackedView& p, const QuantizedInput& x, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  const int64_t nb = p.n_blocks, np = (nb + 1) / 2;
  const __m512i zero = _mm512_setzero_si512();
  const __m512i hi_zero = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t r = r0; r < r1; ++r) {
    CodeReader<8, kSparse> rd(p, r);
    const int64_t tbl = r / p.group_rows;
    const __m512i th = _mm512_load_si512(p.lut_q + tbl * 128);
    const __m512i tl = _mm512_load_si512(p.lut_q + tbl * 128 + 64);
    __m512 acc[T], acc2[T];
    for (int t = 0; t < T; ++t) acc[t] = acc2[t] = _mm512_setzero_ps();
    // The two planes' codes of block b.
    const auto planes = [&](int64_t b, __m512i& h, __m512i& l) {
      __mmask64 keep;
      const __m512i c = rd.block(b, zero, keep);
      if constexpr (kSparse) {  // pruned columns: Q = 0
        h = _mm512_mask_permutexvar_epi8(hi_zero, keep, c, th);
        l = _mm512_maskz_permutexvar_epi8(keep, c, tl);
      } else {
        h = _mm512_permutexvar_epi8(c, th);
        l = _mm512_permutexvar_epi8(c, tl);
      }
    };
    over_pairs<T>(np, acc, acc2, [&](int64_t q, __m512 (&s)[T]) {
      const int64_t b = 2 * q;
      __m512i h0, l0;
      planes(b, h0, l0);
      __m512i d[T];
      if (b + 1 < nb) {
        __m512i h1, l1;
        planes(b + 1, h1, l1);
        for (int t = 0; t < T; ++t) {
          const __m512i x0 = input_block(x, t, b), x1 = input_block(x, t, b + 1);
          __m512i dh = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, h0, x0), h1, x1);
          d[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(dh, 8), l0, x0), l1, x1);
        }
      } else {
        for (int t = 0; t < T; ++t) {
          const __m512i x0 = input_block(x, t, b);
          d[t] = _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(zero, h0, x0), 8), l0,
                                     x0);
        }
      }
      for (int t = 0; t < T; ++t)
        s[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[t]), pair_scale(x, t, q), s[t]);
    });
    const float qs = p.lut_qscale[tbl];
    for (int t = 0; t < T; ++t)
      y[t * ldy + r] =
          qs * (_mm512_reduce_add_ps(_mm512_add_ps(acc[t], acc2[t])) - 32768.0f * x.group_sum[t]);
  }
}

// Calls f(std::integral_constant<int, T>) with T = n_tokens (1..8; more run as 8-token tiles).
template <typename F>
void for_token_count(int64_t n_tokens, F&& f) {
  switch (n_tokens) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 5:
      return f(std::integral_constant<int, 5>{});
    case 6:
      return f(std::integral_constant<int, 6>{});
    case 7:
      return f(std::integral_constant<int, 7>{});
    default:
      return f(std::integral_constant<int, 8>{});
  }
}

template <int SB, bool kSparse, bool kPairGroups>
void int_decode(const PackedView& p, const QuantizedInput& x, int64_t n_tokens, float* y,
                int64_t ldy, int64_t r0, int64_t r1) {
  for_token_count(n_tokens, [&](auto t) {
    int_rows<SB, kSparse, decltype(t)::value, kPairGroups>(p, x, y, ldy, r0, r1);
  });
}

template <int SB, bool kSparse>
FormatDecodeQ8Fn int_decode_fn(const PackedView& v) {
  const bool pair_groups = v.n_groups == 1 || (v.group_size / kBlockCols) % 2 == 0;
  return pair_groups ? &int_decode<SB, kSparse, true> : &int_decode<SB, kSparse, false>;
}

template <bool kGroupPerPair>
void sparse_int4_pair_decode(const PackedView& p, const QuantizedInput& x, int64_t n_tokens,
                             float* y, int64_t ldy, int64_t r0, int64_t r1) {
  for_token_count(n_tokens, [&](auto t) {
    sparse_int4_pair_rows<decltype(t)::value, kGroupPerPair>(p, x, y, ldy, r0, r1);
  });
}

template <bool kSameGroup>
void int4_pair_decode(const PackedView& p, const QuantizedInput& x, int64_t n_tokens, float* y,
                      int64_t ldy, int64_t r0, int64_t r1) {
  for_token_count(n_tokens, [&](auto t) {
    int4_pair_rows<decltype(t)::value, kSameGroup>(p, x, y, ldy, r0, r1);
  });
}

template <int SB, bool kSparse>
void palette8_decode(const PackedView& p, const QuantizedInput& x, int64_t n_tokens, float* y,
                     int64_t ldy, int64_t r0, int64_t r1) {
  for_token_count(n_tokens, [&](auto t) {
    palette8_rows<SB, kSparse, decltype(t)::value>(p, x, y, ldy, r0, r1);
  });
}

template <bool kSparse>
void palette_decode(const PackedView& p, const QuantizedInput& x, int64_t n_tokens, float* y,
                    int64_t ldy, int64_t r0, int64_t r1) {
  for_token_count(n_tokens, [&](auto t) {
    palette_rows<kSparse, decltype(t)::value>(p, x, y, ldy, r0, r1);
  });
}

}  // namespace

FormatDecodeQ8Fn decode_q8(const PackedView& v) {
  const bool sparse = v.positions == Positions::Bitmask;
  const int sb = sparse ? (v.bits <= 4 ? 4 : 8) : formats::stored_code_bits(v.bits);
  if (v.codec == Codec::Int) {
    if (v.n_groups > 1 && v.group_size % kBlockCols != 0) return nullptr;
    if (v.n_groups > kMaxRowGroups) return nullptr;
    if (sparse && sb == 4) {
      const bool pair_groups = v.n_groups == 1 || (v.group_size / kBlockCols) % 2 == 0;
      if (!pair_groups) return int_decode_fn<4, true>(v);
      return v.n_groups > 1 && v.group_size == 2 * kBlockCols ? &sparse_int4_pair_decode<true>
                                                              : &sparse_int4_pair_decode<false>;
    }
    if (sparse) return int_decode_fn<8, true>(v);
    switch (sb) {
      case 2: return int_decode_fn<2, false>(v);
      case 3: return int_decode_fn<3, false>(v);
      case 4: {
        const int64_t bpg = v.n_groups == 1 ? v.n_blocks : v.group_size / kBlockCols;
        return v.n_groups == 1 || bpg % 2 == 0 ? &int4_pair_decode<true>
                                                : &int4_pair_decode<false>;
      }
      default: return int_decode_fn<8, false>(v);
    }
  }
  if (v.codec == Codec::Palette && v.lut_u8 != nullptr) {
    if (sparse) return &palette8_decode<4, true>;
    switch (sb) {
      case 2: return &palette8_decode<2, false>;
      case 3: return &palette8_decode<3, false>;
      default: return &palette8_decode<4, false>;
    }
  }
  if (v.codec == Codec::Palette && v.lut_q != nullptr)
    return sparse ? &palette_decode<true> : &palette_decode<false>;
  return nullptr;
}

void quantize_input(const float* x, int64_t ldx, int64_t n_tokens, int64_t cols, int8_t* q,
                    int8_t* qp, int64_t ldq, float* scale, float* block_sum) {
  const int64_t nb = (cols + kBlockCols - 1) / kBlockCols, np = (nb + 1) / 2;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* xt = x + t * ldx;
    int8_t* qt = q + t * ldq;
    for (int64_t p = 0; p < np; ++p) {
      const int64_t c0 = p * kInputBlockCols;
      __m512 v[8];
      __m512 amax = _mm512_setzero_ps();
      for (int s = 0; s < 8; ++s) {
        v[s] = _mm512_maskz_loadu_ps(mask16(std::max<int64_t>(0, cols - c0 - 16 * s)),
                                     xt + c0 + 16 * s);
        amax = _mm512_max_ps(amax, _mm512_andnot_ps(sign, v[s]));
      }
      const float m = _mm512_reduce_max_ps(amax);
      const float s_p = m / 127.0f;
      __m512i sum[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
      for (int s = 0; s < 8; ++s) {
        // s_p = 0 only for an all-zero block: its codes are 0 (not 0 / 0).
        const __m512i qi = s_p > 0.0f
                               ? _mm512_cvtps_epi32(_mm512_div_ps(v[s], _mm512_set1_ps(s_p)))
                               : _mm512_setzero_si512();
        sum[s / 4] = _mm512_add_epi32(sum[s / 4], qi);
        _mm_store_si128(reinterpret_cast<__m128i*>(qt + c0 + 16 * s), _mm512_cvtepi32_epi8(qi));
      }
      scale[t * np + p] = s_p;
      block_sum[t * nb + 2 * p] = s_p * static_cast<float>(_mm512_reduce_add_epi32(sum[0]));
      if (2 * p + 1 < nb)
        block_sum[t * nb + 2 * p + 1] = s_p * static_cast<float>(_mm512_reduce_add_epi32(sum[1]));
    }
    // The pair layout: 32-column halves of blocks 2p and 2p + 1 interleaved.
    int8_t* qpt = qp + t * ldq;
    const __m512i idx = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
    for (int64_t p = 0; p < np; ++p) {
      const __m512i a = _mm512_load_si512(qt + 128 * p), b = _mm512_load_si512(qt + 128 * p + 64);
      const __m512i lo = _mm512_permutex2var_epi64(a, idx, b);
      const __m512i hi = _mm512_permutex2var_epi64(a, _mm512_add_epi64(idx, _mm512_set1_epi64(4)), b);
      _mm512_store_si512(qpt + 128 * p, lo);
      _mm512_store_si512(qpt + 128 * p + 64, hi);
    }
  }
}

}  // namespace sparsa::kernels::avx512vnni
