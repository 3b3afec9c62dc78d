// The AVX-512 packed-weight kernels (F, BW, DQ, VL + VBMI, VBMI2): each 64-column block becomes
// four registers of 16 f32 weights, which are multiplied with up to 8 tokens.
//
//   codes of 2..4 bits: widened to 32-bit lanes and looked up in a 16-entry table held in one
//     register (vpermps reads only the low 4 bits of each index, so neighbouring codes left in
//     the upper bits cost no masking: 2-bit tables repeat their 4 entries 4 times). A quantized
//     group's table is scale · (i − zero), built once per group; a palette's is its LUT. 3-bit
//     codes look up their low 2 bits in two 4-entry tables and pick one per lane with the
//     high-bit plane as the write mask.
//   8-bit codes: widened and converted, (code − zero) · scale; palettes of 5..8 bits gather.
//   Bitmask sparsity: the block's compact codes are unpacked to bytes and vpexpandb (VBMI2)
//     moves them to their columns; pruned lanes are zeroed by the lookup's write mask. BF16
//     values expand as words (vpexpandw).
// Layouts that have no fast path here (group sizes that are not a multiple of 64) decode through
// the scalar RowDecoder.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <bit>
#include <cstdint>

#include "kernels/kernels_internal.h"

#define SPARSA_KERNELS_ISA avx512vbmi2
#include "kernels/formats_impl.h"

namespace sparsa::kernels::avx512vbmi2 {
namespace {

using formats::Codec;
using formats::PackedView;
using formats::Positions;

inline __mmask16 mask16(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline __mmask16 chunk_mask(uint64_t m, int s) {
  return _cvtu32_mask16(static_cast<uint32_t>(m >> (16 * s)) & 0xffffu);
}
inline __m512 iota() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline __m512 bf16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Block decoder of one row: codec C, positions P, and SB = stored bits per code (2, 3, 4, 8 for
// Positions::All; 4 = nibbles or 8 = bytes for Bitmask; 16 for BF16 values).
template <Codec C, Positions P, int SB>
class Decoder {
 public:
  Decoder(const PackedView& p, int64_t r)
      : kept_(P == Positions::All ? p.codes : p.codes + p.row_offsets[r], p.n_blocks,
              P == Positions::All ? 0
                                  : static_cast<int64_t>(p.row_offsets[r + 1] - p.row_offsets[r])) {
    if constexpr (P == Positions::All) {
      cur_ = p.codes + r * p.row_bytes;
    } else {
      masks_ = p.codes + p.row_offsets[r];
      cur_ = masks_ + p.n_blocks * 8;
    }
    if constexpr (C == Codec::Int) {
      scales_ = p.scales + r * p.n_groups;
      zeros_ = p.zeros + r * p.n_groups;
      // One group per row: its only table is built at block 0 (next_group_ is never reached).
      blocks_per_group_ = p.n_groups == 1 ? p.n_blocks : p.group_size / formats::kBlockCols;
    } else if constexpr (C == Codec::Palette) {
      lut_ = p.lut + (r / p.group_rows) * (int64_t{1} << p.bits);
      if constexpr (SB != 8) set_tables(_mm512_maskz_loadu_ps(mask16(1 << p.bits), lut_));
    }
  }

  void block(int64_t b, __m512 w[4]) {
    if constexpr (C == Codec::Int) {
      if (b == next_group_) {
        const int64_t g = b / blocks_per_group_;
        next_group_ = b + blocks_per_group_;
        scale_ = _mm512_set1_ps(_cvtsh_ss(scales_[g]));
        zero_ = _mm512_set1_ps(static_cast<float>(zeros_[g]));
        if constexpr (SB != 8) set_tables(_mm512_mul_ps(_mm512_sub_ps(iota(), zero_), scale_));
      }
    }
    if constexpr (P == Positions::All) {
      all_block(cur_ + b * 8 * SB, w);
    } else {
      mask_block(b, load_u64(masks_ + 8 * b), w);
    }
  }

 private:
  // The 16-entry table of the codes 0 .. 2^bits − 1; 2- and 3-bit codes of Positions::All also
  // get the 4-entry tables of their low 2 bits, repeated 4 times (high bit 0 and 1).
  void set_tables(__m512 plain) {
    if constexpr (P == Positions::All && (SB == 2 || SB == 3)) {
      const __m512i i3 = _mm512_and_si512(
          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
          _mm512_set1_epi32(3));
      table_ = _mm512_permutexvar_ps(i3, plain);
      table_hi_ = _mm512_permutexvar_ps(_mm512_add_epi32(i3, _mm512_set1_epi32(4)), plain);
    } else {
      table_ = plain;
    }
  }

  // Codes widened to 32-bit lanes -> weights, for Int and Palette.
  __m512 lookup(__m512i idx) const { return _mm512_permutexvar_ps(idx, table_); }
  __m512 convert8(__m512i codes) const {
    if constexpr (C == Codec::Int) {
      return _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(codes), zero_), scale_);
    } else {
      return _mm512_i32gather_ps(codes, lut_, 4);
    }
  }
  __m512 convert8(__m512i codes, __mmask16 k) const {
    if constexpr (C == Codec::Int) {
      return _mm512_maskz_mul_ps(k, _mm512_sub_ps(_mm512_cvtepi32_ps(codes), zero_), scale_);
    } else {
      return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, codes, lut_, 4);
    }
  }

  void all_block(const uint8_t* blk, __m512 w[4]) const {
    if constexpr (SB == 4) {
      const __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
      const __m512i hi =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
      w[0] = lookup(lo);
      w[1] = lookup(hi);
      w[2] = lookup(_mm512_srli_epi32(lo, 4));
      w[3] = lookup(_mm512_srli_epi32(hi, 4));
    } else if constexpr (SB == 2 || SB == 3) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
      const __m512i idx[4] = {v, _mm512_srli_epi32(v, 2), _mm512_srli_epi32(v, 4),
                              _mm512_srli_epi32(v, 6)};
      if constexpr (SB == 2) {
        for (int s = 0; s < 4; ++s) w[s] = lookup(idx[s]);
      } else {
        const uint64_t plane = load_u64(blk + 16);
        for (int s = 0; s < 4; ++s)
          w[s] = _mm512_mask_permutexvar_ps(lookup(idx[s]), chunk_mask(plane, s), idx[s],
                                            table_hi_);
      }
    } else {
      for (int s = 0; s < 4; ++s)
        w[s] = convert8(
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 * s))));
    }
  }

  void mask_block(int64_t b, uint64_t m, __m512 w[4]) {
    if constexpr (SB == 16) {  // BF16 values, 32 columns per expand
      const int c = std::popcount(m);
      const int c0 = std::popcount(static_cast<uint32_t>(m));
      kept_.prefetch();
      const __m512i v0 = load_in_register(cur_);
      const __m512i v1 = load_in_register(cur_ + 2 * c0);
      const __m512i e0 = _mm512_maskz_expand_epi16(_cvtu32_mask32(static_cast<uint32_t>(m)), v0);
      const __m512i e1 = _mm512_maskz_expand_epi16(_cvtu32_mask32(static_cast<uint32_t>(m >> 32)), v1);
      w[0] = bf16_to_f32(_mm512_castsi512_si256(e0));
      w[1] = bf16_to_f32(_mm512_extracti64x4_epi64(e0, 1));
      w[2] = bf16_to_f32(_mm512_castsi512_si256(e1));
      w[3] = bf16_to_f32(_mm512_extracti64x4_epi64(e1, 1));
      cur_ += 2 * c;
    } else {
      const __m512i e = _mm512_maskz_expand_epi8(_cvtu64_mask64(m), kept_.next(b));
      const __m128i q[4] = {_mm512_castsi512_si128(e), _mm512_extracti32x4_epi32(e, 1),
                            _mm512_extracti32x4_epi32(e, 2), _mm512_extracti32x4_epi32(e, 3)};
      for (int s = 0; s < 4; ++s) {
        const __m512i idx = _mm512_cvtepu8_epi32(q[s]);
        if constexpr (SB == 4) {
          w[s] = _mm512_maskz_permutexvar_ps(chunk_mask(m, s), idx, table_);
        } else {
          w[s] = convert8(idx, chunk_mask(m, s));
        }
      }
    }
  }

  const uint8_t* cur_ = nullptr;    // Positions::All codes; Bitmask BF16 values
  const uint8_t* masks_ = nullptr;
  KeptCodes<SB == 4 ? 4 : 8> kept_;  // Bitmask codes
  const uint16_t* scales_ = nullptr;  // f16
  const uint8_t* zeros_ = nullptr;
  const float* lut_ = nullptr;
  int64_t blocks_per_group_ = 0;
  int64_t next_group_ = 0;
  __m512 scale_ = _mm512_setzero_ps(), zero_ = _mm512_setzero_ps();
  __m512 table_ = _mm512_setzero_ps(), table_hi_ = _mm512_setzero_ps();
};

// Any layout, through the scalar decoder.
class ScalarDecoder {
 public:
  ScalarDecoder(const PackedView& p, int64_t r) : dec_(p, r) {}
  void block(int64_t b, __m512 w[4]) {
    alignas(64) float buf[formats::kBlockCols];
    dec_.block(b, buf);
    for (int s = 0; s < 4; ++s) w[s] = _mm512_load_ps(buf + 16 * s);
  }

 private:
  fmt::RowDecoder dec_;
};

// Rows [r0, r1) × T tokens. A independent sums per token keep the FMA latency hidden.
template <class D, int T>
void decode_t(const PackedView& p, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0,
              int64_t r1) {
  constexpr int A = T == 1 ? 4 : (T <= 3 ? 2 : 1);
  const int64_t full = p.cols / formats::kBlockCols;
  const int tail = static_cast<int>(p.cols % formats::kBlockCols);
  for (int64_t r = r0; r < r1; ++r) {
    D dec(p, r);
    __m512 acc[T][A];
    for (int t = 0; t < T; ++t)
      for (int a = 0; a < A; ++a) acc[t][a] = _mm512_setzero_ps();
    __m512 w[4];
    for (int64_t b = 0; b < full; ++b) {
      dec.block(b, w);
      const float* xb = x + b * formats::kBlockCols;
      for (int s = 0; s < 4; ++s)
        for (int t = 0; t < T; ++t)
          acc[t][s % A] = _mm512_fmadd_ps(w[s], _mm512_loadu_ps(xb + t * ldx + 16 * s), acc[t][s % A]);
    }
    if (tail > 0) {
      dec.block(full, w);
      const float* xb = x + full * formats::kBlockCols;
      for (int s = 0; s < 4 && 16 * s < tail; ++s) {
        const __mmask16 k = mask16(tail - 16 * s >= 16 ? 16 : tail - 16 * s);
        for (int t = 0; t < T; ++t)
          acc[t][s % A] =
              _mm512_fmadd_ps(w[s], _mm512_maskz_loadu_ps(k, xb + t * ldx + 16 * s), acc[t][s % A]);
      }
    }
    for (int t = 0; t < T; ++t) {
      __m512 sum = acc[t][0];
      for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[t][a]);
      y[t * ldy + r] = _mm512_reduce_add_ps(sum);
    }
  }
}

template <class D>
void decode(const PackedView& p, const float* x, int64_t ldx, int64_t n_tokens, float* y,
            int64_t ldy, int64_t r0, int64_t r1) {
  switch (n_tokens) {
    case 1: return decode_t<D, 1>(p, x, ldx, y, ldy, r0, r1);
    case 2: return decode_t<D, 2>(p, x, ldx, y, ldy, r0, r1);
    case 3: return decode_t<D, 3>(p, x, ldx, y, ldy, r0, r1);
    case 4: return decode_t<D, 4>(p, x, ldx, y, ldy, r0, r1);
    case 5: return decode_t<D, 5>(p, x, ldx, y, ldy, r0, r1);
    case 6: return decode_t<D, 6>(p, x, ldx, y, ldy, r0, r1);
    case 7: return decode_t<D, 7>(p, x, ldx, y, ldy, r0, r1);
    default: return decode_t<D, 8>(p, x, ldx, y, ldy, r0, r1);
  }
}

template <class D>
void dequant(const PackedView& p, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    D dec(p, r);
    float* o = out + (r - r0) * p.cols;
    __m512 w[4];
    for (int64_t b = 0; b < p.n_blocks; ++b) {
      dec.block(b, w);
      for (int s = 0; s < 4; ++s) {
        const int64_t c = b * formats::kBlockCols + 16 * s;
        if (c + 16 <= p.cols) {
          _mm512_storeu_ps(o + c, w[s]);
        } else if (c < p.cols) {
          _mm512_mask_storeu_ps(o + c, mask16(static_cast<int>(p.cols - c)), w[s]);
        }
      }
    }
  }
}

template <class D>
FormatKernels kernels_of() {
  return {&decode<D>, &dequant<D>};
}

template <Codec C>
FormatKernels code_kernels(const PackedView& v) {
  if (v.positions == Positions::Bitmask)
    return v.bits <= 4 ? kernels_of<Decoder<C, Positions::Bitmask, 4>>()
                       : kernels_of<Decoder<C, Positions::Bitmask, 8>>();
  switch (formats::stored_code_bits(v.bits)) {
    case 2: return kernels_of<Decoder<C, Positions::All, 2>>();
    case 3: return kernels_of<Decoder<C, Positions::All, 3>>();
    case 4: return kernels_of<Decoder<C, Positions::All, 4>>();
    default: return kernels_of<Decoder<C, Positions::All, 8>>();
  }
}

}  // namespace

FormatKernels format_kernels(const PackedView& v) {
  switch (v.codec) {
    case Codec::Float:
      return kernels_of<Decoder<Codec::Float, Positions::Bitmask, 16>>();
    case Codec::Int:
      // A block must lie in one group of scales for the per-group tables.
      if (v.n_groups > 1 && v.group_size % formats::kBlockCols != 0)
        return kernels_of<ScalarDecoder>();
      return code_kernels<Codec::Int>(v);
    case Codec::Palette:
      return code_kernels<Codec::Palette>(v);
  }
  return kernels_of<ScalarDecoder>();
}

}  // namespace sparsa::kernels::avx512vbmi2
