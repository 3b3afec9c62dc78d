// The packed-weight kernels written once in scalar C++ over a vector type V (generic, AVX2; and
// the AVX-512 path's fallback for rare layouts), compiled into each formats_<isa>.cc inside
// namespace sparsa::kernels::<isa> (SPARSA_KERNELS_ISA), as linear_impl.h is.
//
// RowDecoder turns one row of any packed format into f32, 64 columns at a time; the drivers
// multiply those blocks with up to kDecodeMaxTokens input rows (decode) or store them (the
// prefill's dequantized panels).
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#include "kernels/kernels_internal.h"
#include "sparsa/core/dtype.h"
#include "sparsa/formats/packed_weight.h"

#ifndef SPARSA_KERNELS_ISA
#error "define SPARSA_KERNELS_ISA before including formats_impl.h"
#endif

namespace sparsa::kernels::SPARSA_KERNELS_ISA::fmt {

using formats::Codec;
using formats::kBlockCols;
using formats::PackedView;
using formats::Positions;


// Code i (< 64) of a Positions::All block stored with `sbits` bits per code.
inline uint32_t block_code(const uint8_t* blk, int sbits, int i) {
  switch (sbits) {
    case 8:
      return blk[i];
    case 4:
      return i < 32 ? blk[i] & 15u : blk[i - 32] >> 4;
    case 3:
      return ((blk[i & 15] >> (2 * (i >> 4))) & 3u) |
             static_cast<uint32_t>((load_u64(blk + 16) >> i) & 1u) << 2;
    default:  // 2
      return (blk[i & 15] >> (2 * (i >> 4))) & 3u;
  }
}

// Decodes one row of a packed weight block by block, in order (Positions::Bitmask streams).
class RowDecoder {
 public:
  RowDecoder(const PackedView& p, int64_t r) : p_(p) {
    if (p.positions == Positions::All) {
      cur_ = p.codes + r * p.row_bytes;
      block_bytes_ = p.row_bytes / p.n_blocks;
    } else {
      masks_ = p.codes + p.row_offsets[r];
      cur_ = masks_ + p.n_blocks * 8;
    }
    if (p.codec == Codec::Int) {
      scales_ = p.scales + r * p.n_groups;
      zeros_ = p.zeros + r * p.n_groups;
    } else if (p.codec == Codec::Palette) {
      lut_ = p.lut + (r / p.group_rows) * (int64_t{1} << p.bits);
    }
  }

  // The 64 weights of block b; columns past the row's end are finite (0 or a table entry).
  void block(int64_t b, float* out) {
    const int64_t c0 = b * kBlockCols;
    if (p_.positions == Positions::All) {
      const int sbits = formats::stored_code_bits(p_.bits);
      const uint8_t* blk = cur_ + b * block_bytes_;
      for (int i = 0; i < kBlockCols; ++i) out[i] = value(c0 + i, block_code(blk, sbits, i));
      return;
    }
    const uint64_t m = load_u64(masks_ + b * 8);
    const int c = std::popcount(m);
    int k = 0;
    if (p_.codec == Codec::Float) {  // BF16 values
      for (int i = 0; i < kBlockCols; ++i) {
        uint16_t h = 0;
        if ((m >> i) & 1u) std::memcpy(&h, cur_ + 2 * k++, 2);
        out[i] = bf16_to_f32(h);
      }
      cur_ += 2 * c;
      return;
    }
    // Nibbles: blocks 2p and 2p + 1 share max(c_2p, c_2p+1) bytes, low and high nibbles.
    const bool nibbles = p_.bits <= 4;
    const uint8_t* src = cur_;
    int shift = 0;
    if (!nibbles) {
      cur_ += c;
    } else if (b % 2 == 0) {
      pair_ = cur_;
      const int c1 = b + 1 < p_.n_blocks ? std::popcount(load_u64(masks_ + (b + 1) * 8)) : 0;
      cur_ += c > c1 ? c : c1;
    } else {
      src = pair_;
      shift = 4;
    }
    for (int i = 0; i < kBlockCols; ++i) {
      if (!((m >> i) & 1u)) {
        out[i] = 0.0f;
        continue;
      }
      const uint32_t code = !nibbles ? src[k] : (src[k] >> shift) & 15u;
      out[i] = value(c0 + i, code);
      ++k;
    }
  }

 private:
  float value(int64_t col, uint32_t code) {
    if (p_.codec == Codec::Palette) return lut_[code];
    const int64_t g = col < p_.cols ? col / p_.group_size : 0;
    if (g != group_) {  // the f16 scale is widened once per group
      group_ = g;
      scale_ = f16_to_f32(scales_[g]);
    }
    return scale_ * (static_cast<float>(code) - static_cast<float>(zeros_[g]));
  }

  const PackedView& p_;
  const uint8_t* cur_ = nullptr;
  const uint8_t* masks_ = nullptr;
  const uint8_t* pair_ = nullptr;  // Bitmask nibbles: the bytes of the current pair of blocks
  int64_t block_bytes_ = 0;
  const uint16_t* scales_ = nullptr;  // f16
  const uint8_t* zeros_ = nullptr;
  int64_t group_ = -1;  // the group whose scale is scale_
  float scale_ = 0.0f;
  const float* lut_ = nullptr;
};

// y[t * ldy + r] for rows [r0, r1) and T tokens: each block decoded once, used T times.
template <class V, int T>
void decode_rows_t(const PackedView& p, const float* x, int64_t ldx, float* y, int64_t ldy,
                   int64_t r0, int64_t r1) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  alignas(64) float w[kBlockCols];
  for (int64_t r = r0; r < r1; ++r) {
    RowDecoder dec(p, r);
    Reg acc[T];
    for (int t = 0; t < T; ++t) acc[t] = V::zero();
    for (int64_t b = 0; b < p.n_blocks; ++b) {
      dec.block(b, w);
      const int64_t c0 = b * kBlockCols;
      const int64_t n = p.cols - c0 < kBlockCols ? p.cols - c0 : kBlockCols;
      for (int64_t j = 0; j < n; j += L) {
        const Reg wv = V::load(w + j);
        const int m = static_cast<int>(n - j < L ? n - j : L);
        for (int t = 0; t < T; ++t) {
          const float* xp = x + t * ldx + c0 + j;
          acc[t] = V::fmadd(wv, m == L ? V::load(xp) : V::load_partial(xp, m), acc[t]);
        }
      }
    }
    for (int t = 0; t < T; ++t) y[t * ldy + r] = V::reduce_add(acc[t]);
  }
}

template <class V>
void decode_rows(const PackedView& p, const float* x, int64_t ldx, int64_t n_tokens, float* y,
                 int64_t ldy, int64_t r0, int64_t r1) {
  switch (n_tokens) {
    case 1: return decode_rows_t<V, 1>(p, x, ldx, y, ldy, r0, r1);
    case 2: return decode_rows_t<V, 2>(p, x, ldx, y, ldy, r0, r1);
    case 3: return decode_rows_t<V, 3>(p, x, ldx, y, ldy, r0, r1);
    case 4: return decode_rows_t<V, 4>(p, x, ldx, y, ldy, r0, r1);
    case 5: return decode_rows_t<V, 5>(p, x, ldx, y, ldy, r0, r1);
    case 6: return decode_rows_t<V, 6>(p, x, ldx, y, ldy, r0, r1);
    case 7: return decode_rows_t<V, 7>(p, x, ldx, y, ldy, r0, r1);
    default: return decode_rows_t<V, 8>(p, x, ldx, y, ldy, r0, r1);
  }
}

// out[(r - r0) * cols + c] = W[r, c] for rows [r0, r1).
inline void dequant_rows(const PackedView& p, int64_t r0, int64_t r1, float* out) {
  alignas(64) float w[kBlockCols];
  for (int64_t r = r0; r < r1; ++r) {
    RowDecoder dec(p, r);
    float* o = out + (r - r0) * p.cols;
    for (int64_t b = 0; b < p.n_blocks; ++b) {
      dec.block(b, w);
      const int64_t c0 = b * kBlockCols;
      const int64_t n = p.cols - c0 < kBlockCols ? p.cols - c0 : kBlockCols;
      std::memcpy(o + c0, w, static_cast<size_t>(n) * sizeof(float));
    }
  }
}

}  // namespace sparsa::kernels::SPARSA_KERNELS_ISA::fmt
