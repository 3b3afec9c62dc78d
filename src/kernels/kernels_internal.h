// Private to src/kernels: the kernels compiled once per ISA (kernels_<isa>.cc) and the tables
// through which linear.cc, attention.cc and bandwidth.cc pick them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>

#include "sparsa/core/dtype.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::formats {
struct PackedView;
}

namespace sparsa::kernels {

/// Up to this many tokens, linear() streams W once through the decode kernel; above, a GEMM.
inline constexpr int64_t kDecodeMaxTokens = 8;
/// The same for dense weights, whose decode tiles keep a tile of rows in L1 for every group of
/// tokens: up to 16 tokens they beat the GEMM, which packs all of W first (`small`'s 1024 × 512
/// bf16 on 2 threads: 12 tokens 44 µs against 76 µs, 16 tokens 67 against 88, even at 24).
inline constexpr int64_t kDenseDecodeMaxTokens = 16;

/// Eight bytes at p, unaligned (bit masks and bit planes of the packed formats).
inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if defined(__AVX512F__)
// 64 bytes at p, kept in a register: the compiler must not fold this load into the vpexpandb /
// vpexpandw that consumes it, because the memory-source forms of those are microcoded and several
// times slower on AMD Zen 4 and 5 (a sparse row decoded 3x slower with them). The kernels read
// past a row's last kept value into the packed weight's spare line, never past the allocation.
inline __m512i load_in_register(const void* p) {
  __m512i v = _mm512_loadu_si512(p);
  asm("" : "+v"(v));
  return v;
}
#endif

// Software prefetch of one row's bytes, read front to back in `steps` even steps (a sparse row:
// its masks, then its kept values). The hardware prefetchers keep up with a dense row but not with
// a Bitmask row, whose mask and value streams advance at different, data-dependent rates: from
// DRAM, a 50%-sparse int4 row decoded at 11-13 GB/s with them alone and 28-29 GB/s with this
// (bench_formats sparse50-int4g128 2048x5632, one token). Each step() prefetches the line kAhead
// bytes past the point step / steps of the way through the row (the integer bytes per step
// lose less than a line over a row); past the row's end that is the next row, which follows it
// in memory. Steps of more than 64 bytes prefetch two lines.
class RowPrefetch {
 public:
  static constexpr int64_t kAhead = 1024;

  RowPrefetch(const uint8_t* begin, int64_t bytes, int64_t steps)
      : at_(reinterpret_cast<const char*>(begin) + kAhead),
        stride_(steps > 0 ? bytes / steps : 0) {}

  void step() {
    __builtin_prefetch(at_);
    if (stride_ > 64) __builtin_prefetch(at_ + 64);
    at_ += stride_;
  }

 private:
  const char* at_;
  int64_t stride_;
};

#if defined(__AVX512VBMI__)
// The kept codes of a Positions::Bitmask row (sparsa/formats/packed_weight.h), block after block
// in order: next(b) gives block b's codes as bytes in order (the lanes past its count hold
// whatever follows). SB = 4: blocks 2p and 2p + 1 share their bytes as low and high nibbles, so
// an even block loads the pair and masks the low nibbles, and the odd one shifts the same
// register; SB = 8: one byte per code.
template <int SB>
class KeptCodes {
  static_assert(SB == 4 || SB == 8);

 public:
  // The row's `bytes` bytes start at `masks` (a reader of Positions::All rows, which never calls
  // next() or prefetch(), passes 0).
  KeptCodes(const uint8_t* masks, int64_t n_blocks, int64_t bytes)
      : cur_(masks + n_blocks * 8),
        masks_(masks),
        n_blocks_(n_blocks),
        prefetch_(masks, bytes, SB == 4 ? (n_blocks + 1) / 2 : n_blocks) {}

  uint64_t mask(int64_t b) const { return load_u64(masks_ + 8 * b); }
  /// The row's prefetch for the next block, for readers of values that are not codes (BF16),
  /// which do not call next().
  void prefetch() { prefetch_.step(); }

  __m512i next(int64_t b) {
    if constexpr (SB == 4) {
      const __m512i nib = _mm512_set1_epi8(0x0f);
      if (b % 2 == 1) return _mm512_and_si512(_mm512_srli_epi16(pair_, 4), nib);
      prefetch_.step();
      pair_ = load_in_register(cur_);
      const int c1 = b + 1 < n_blocks_ ? std::popcount(mask(b + 1)) : 0;
      cur_ += std::max(std::popcount(mask(b)), c1);
      return _mm512_and_si512(pair_, nib);
    } else {
      prefetch_.step();
      const __m512i v = load_in_register(cur_);
      cur_ += std::popcount(mask(b));
      return v;
    }
  }

 private:
  const uint8_t* cur_;
  const uint8_t* masks_;
  int64_t n_blocks_;
  RowPrefetch prefetch_;
  __m512i pair_ = _mm512_setzero_si512();
};
#endif

/// Decode splits the rows of its weights into chunks of whole row blocks of kDecodeRowAlign rows
/// (whole cache lines of y for each thread), handed out largest first: each chunk takes about
/// 1 / (2 · threads) of the rows not yet handed out (guided self-scheduling), down to a floor of
/// kDecodeMinChunkRows rows and 1/32 of the whole. Whichever thread is ahead takes the next
/// chunk, so a thread slowed by the machine's other work delays the step by one small chunk at
/// most, for about a dozen claims per weight.
inline constexpr int64_t kDecodeRowAlign = 16;
inline constexpr int64_t kDecodeMinChunkRows = 64;

/// linear_many runs at most this many outputs together.
inline constexpr int kMaxManyOutputs = 8;

/// Rows [r0, r1) of output `output`.
struct DecodeChunk {
  int output;
  int64_t r0, r1;
};
/// At most total / floor + one per output (floor >= total / 32, outputs <= kMaxManyOutputs).
inline constexpr int kMaxDecodeChunks = 32 + kMaxManyOutputs;

/// The chunks of `count` outputs of rows[i] rows each, in the order they are handed out; returns
/// how many.
inline int decode_chunks(const int64_t* rows, int count, int threads, DecodeChunk* out) {
  int64_t total = 0;
  for (int i = 0; i < count; ++i) total += rows[i];
  const auto align = [](int64_t n) {
    return (n + kDecodeRowAlign - 1) / kDecodeRowAlign * kDecodeRowAlign;
  };
  const int64_t floor = align(std::max<int64_t>(kDecodeMinChunkRows, (total + 31) / 32));
  int64_t left = total;
  int n = 0;
  for (int i = 0; i < count; ++i) {
    for (int64_t r = 0; r < rows[i];) {
      int64_t take = std::max(floor, align(left / (2 * int64_t{threads})));
      // A remainder smaller than the floor joins this chunk.
      if (rows[i] - r - take < floor) take = rows[i] - r;
      out[n++] = {i, r, r + take};
      r += take;
      left -= take;
    }
  }
  return n;
}

/// Below this many weights a decode call is too short to be worth waking the other threads.
inline constexpr int64_t kMinParallelWeights = int64_t{1} << 15;

/// fn(r0, r1) over the rows of one [rows, cols] weight, split across the pool.
template <class F>
void split_decode_rows(int64_t rows, int64_t cols, ThreadPool& pool, F&& fn) {
  if (pool.size() == 1 || rows * cols < kMinParallelWeights) {
    fn(int64_t{0}, rows);
    return;
  }
  DecodeChunk chunks[kMaxDecodeChunks];
  const int n = decode_chunks(&rows, 1, pool.size(), chunks);
  pool.run(n, [&](int64_t c) { fn(chunks[c].r0, chunks[c].r1); });
}

/// linear_many's split: the outputs' rows cut into chunks as decode_chunks says, each inside one
/// output; fn(output, r0, r1) runs once per chunk on the pool.
template <class F>
void split_decode_outputs(const int64_t* rows, int count, ThreadPool& pool, F&& fn) {
  DecodeChunk chunks[kMaxDecodeChunks];
  const int n = decode_chunks(rows, count, pool.size(), chunks);
  pool.run(n, [&](int64_t c) { fn(chunks[c].output, chunks[c].r0, chunks[c].r1); });
}

/// Rows [r0, r1) of y = x Wᵀ for a few tokens; each row of W is read once from memory.
using DecodeFn = void (*)(const DenseWeight& w, const float* x, int64_t ldx, int64_t n_tokens,
                          float* y, int64_t ldy, int64_t r0, int64_t r1);
/// Packs rows [n0, n0 + n) × columns [k0, k0 + kc) of W, in f32, as dst[kc][nr] (the GEMM's
/// B micro-panel); rows n .. nr-1 are zero.
using PackBFn = void (*)(const DenseWeight& w, int64_t n0, int n, int64_t k0, int kc, float* dst);
/// c[i * ldc + j] (+)= sum_k a[k * mr + i] * b[k * nr + j] for i < m <= mr, j < n <= nr.
using MicroFn = void (*)(int m, int n, int64_t kc, const float* a, const float* b, float* c,
                         int64_t ldc, bool accumulate);

/// The linear kernels of one (weight dtype, ISA); decode == nullptr when the pair is unsupported.
struct LinearKernels {
  DecodeFn decode = nullptr;
  PackBFn pack_b = nullptr;
  DecodeFn decode_panels = nullptr;  // the same for weights in the panel layout
  PackBFn pack_b_panels = nullptr;
  MicroFn micro = nullptr;
  int mr = 0;  // tokens per micro-tile
  int nr = 0;  // output features per micro-tile
};

/// Sums n floats with wide loads (the bandwidth probe's read loop).
using StreamSumFn = float (*)(const float* p, int64_t n);

#define SPARSA_DECLARE_ISA_KERNELS(ns)                                                     \
  namespace ns {                                                                           \
  LinearKernels linear_kernels(DType dtype);                                               \
  void attention(const AttentionShape& s, const float* q, int64_t ldq, const void* k,      \
                 const void* v, int64_t ldkv, float* out, int64_t ldo, ThreadPool& pool);  \
  float stream_sum(const float* p, int64_t n);                                             \
  void silu_mul(float* gate, const float* up, int64_t n);                                  \
  void exp_shifted(const float* x, float shift, float* y, int64_t n);                      \
  }
SPARSA_DECLARE_ISA_KERNELS(generic)
SPARSA_DECLARE_ISA_KERNELS(avx2)
SPARSA_DECLARE_ISA_KERNELS(avx512)
#undef SPARSA_DECLARE_ISA_KERNELS

/// Rows [r0, r1) of y = x Wᵀ for a packed weight and n_tokens <= kDecodeMaxTokens tokens.
using FormatDecodeFn = void (*)(const formats::PackedView& w, const float* x, int64_t ldx,
                                int64_t n_tokens, float* y, int64_t ldy, int64_t r0, int64_t r1);
/// out[(r - r0) * cols + c] = W[r, c] in f32 for rows [r0, r1) (prefill's dequantized panels).
using FormatDequantFn = void (*)(const formats::PackedView& w, int64_t r0, int64_t r1,
                                 float* out);
/// A decode input quantized to int8 once per call (sparsa/kernels/packed_linear.h,
/// DecodeInput::Int8), in blocks of kInputBlockCols stored columns, each the columns of a pair
/// of weight blocks (2p, 2p + 1): token t's stored column c is scale[t][c / 128] · q[t][c].
inline constexpr int64_t kInputBlockCols = 128;
struct QuantizedInput {
  const int8_t* q = nullptr;          // [n_tokens][ldq], 64-byte aligned, 0 past the columns
  // The same codes with each pair's 64-column halves interleaved for 4-bit codes: 128 bytes per
  // pair, columns [2p: 0..31, 2p+1: 0..31, 2p: 32..63, 2p+1: 32..63].
  const int8_t* qp = nullptr;
  const float* scale = nullptr;       // [n_tokens][n_pairs]
  const float* group_sum = nullptr;   // [n_tokens][n_groups]: Σ over the weight's group of
                                      // scale · Σ q (palettes: one group per row)
  int64_t ldq = 0;                    // n_pairs · 128
  int64_t n_blocks = 0;               // 64-column weight blocks
  int64_t n_pairs = 0;                // ceil(n_blocks / 2)
  int64_t n_groups = 0;
};
/// Rows [r0, r1) of y = x Wᵀ from a quantized input (n_tokens <= kDecodeMaxTokens).
using FormatDecodeQ8Fn = void (*)(const formats::PackedView& w, const QuantizedInput& x,
                                  int64_t n_tokens, float* y, int64_t ldy, int64_t r0,
                                  int64_t r1);
/// The packed-weight kernels of one (format, ISA): formats_<isa>.cc map a format to these.
/// decode_q8 is null where the (format, ISA) has no int8-input kernel.
struct FormatKernels {
  FormatDecodeFn decode = nullptr;
  FormatDequantFn dequant = nullptr;
  FormatDecodeQ8Fn decode_q8 = nullptr;
};
namespace generic {
FormatKernels format_kernels(const formats::PackedView& w);
}
namespace avx2 {
FormatKernels format_kernels(const formats::PackedView& w);
}
/// AVX-512 F/BW/DQ/VL plus VBMI and VBMI2 (byte expand): Ice Lake, Zen 4 and later.
namespace avx512vbmi2 {
FormatKernels format_kernels(const formats::PackedView& w);
}
/// AVX-512 VBMI2 plus VNNI: the int8-input decode kernels (null for formats without one) and
/// the quantization of the input: per token and 128-column block, s = max|x| / 127 and
/// q = round-to-nearest-even(x / s). Writes the QuantizedInput arrays q and qp
/// ([n_tokens][ldq] bytes, 64-aligned) and scale ([n_tokens][n_pairs]), and block_sum
/// ([n_tokens][n_blocks]): s · Σ q over each 64-column weight block.
namespace avx512vnni {
FormatDecodeQ8Fn decode_q8(const formats::PackedView& w);
void quantize_input(const float* x, int64_t ldx, int64_t n_tokens, int64_t cols, int8_t* q,
                    int8_t* qp, int64_t ldq, float* scale, float* block_sum);
}

/// Scratch buffers that live as long as their thread, one per slot, 64-byte aligned. A call
/// returns at least n floats and invalidates the slot's previous pointer when it has to grow.
enum class Scratch {
  kPackA,
  kPackB,
  kScores,
  kKeys,
  kQueries,
  kDequantW,   // packed_linear: a panel of packed weights dequantized for the prefill GEMM
  kPermutedX,  // packed_linear: the input gathered into an act-order weight's column order
  kQuantX,     // packed_linear: the int8-quantized decode input, its scales and sums
  kCount
};
float* thread_scratch(Scratch slot, size_t n_floats);

}  // namespace sparsa::kernels
