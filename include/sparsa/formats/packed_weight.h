// Packed weights: each compressed weight matrix is converted once, at load time, into the layout
// its decode kernel streams (sparsa/kernels/packed_linear.h). The compression library's logical
// results (compress::QuantResult, Palette, Mask) are the input.
//
//   using namespace sparsa;
//   compress::QuantResult q = compress::rtn_quantize(w, {.bits = 4, .group_size = 128});
//   formats::PackedWeight pw = formats::pack_quantized(q);           // int4, group 128
//   formats::PackedWeight sp = formats::pack_quantized(q, &keep);    // + unstructured sparsity
//   kernels::linear(pw, x, cols, n_tokens, y, rows, pool);
//
// A packed weight [rows, cols] is a value coding (Codec) times a position coding (Positions).
// Every row is stored on its own, in blocks of 64 columns (the last one padded), so that threads
// can split the rows and a row is read front to back exactly once per decode pass.
//
// Codec::Float      raw F32 / F16 / BF16 values. With Positions::All this is the dense weight
//                   itself, row-major, possibly not owned (an mmapped tensor).
// Codec::Int        group-quantized codes (GPTQ / RTN grids): value = scale[r, g] · (code − zero[r, g])
//                   with g = column / group_size; scales f16 (IEEE half, as GPTQ and AWQ
//                   checkpoints store them: 3 bytes a group with the zero point, where f32
//                   scales took 5) and zeros u8, [rows, n_groups] each.
// Codec::Palette    indices into a table of 2^bits f32 values shared by `group_rows` rows
//                   (k-means palettization, eDKM / SqueezeLLM style).
//
// Code storage of one 64-column block (Positions::All), by stored bits:
//   8 (bits 5..8)  64 bytes, byte i = code of column i.
//   4              32 bytes, byte i = code[i] | code[i + 32] << 4 (both halves widen with one
//                  shift, no shuffle).
//   3              16 bytes of the low 2 bits, byte i = lo[i] | lo[i+16] << 2 | lo[i+32] << 4 |
//                  lo[i+48] << 6, then 8 bytes: bit i = bit 2 of code i (a plane that is an
//                  AVX-512 mask register as it stands).
//   2              the 16 bytes of the 2-bit plane alone.
//
// Positions::Bitmask (unstructured or N:M sparsity; pruned weights are exactly 0): each row is
//   [n_blocks × u64 keep mask, bit i = column 64 b + i][the kept values of block 0][block 1]...
// with c = popcount(mask) kept values per block, compact and in column order:
//   codes of <= 4 bits: blocks 2p and 2p + 1 share max(c_2p, c_2p+1) bytes, byte k =
//                   v_2p[k] | v_2p+1[k] << 4 (0 past a block's count; a row's odd last block
//                   takes the low nibbles alone). One and and one shift give both blocks' codes
//                   as bytes, ready for vpexpandb. The padding, |c_2p − c_2p+1| / 2 bytes per
//                   pair on average, adds about 3.5% to a 50%-sparse row (random masks) and
//                   nothing to 2:4, whose blocks all keep 32;
//   codes of 5..8 bits: c bytes;  BF16 values: c × u16.
// Rows start at 8-byte aligned offsets (row_offsets). N:M masks (e.g. 2:4) use the same layout:
// for 2:4 a bitmask costs 4 bits per 4 columns, exactly what two 2-bit positions would.
//
// The position coding is chosen automatically: Bitmask where the mask saves more value bytes than
// it costs (sparsity above 1 / (bits + 1)), otherwise All with the pruned weights stored as zeros
// (zero-point codes). A palettized weight with a mask always uses Bitmask (its table may have no 0).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sparsa/compress/matrix.h"
#include "sparsa/compress/palettize.h"
#include "sparsa/compress/quantize.h"
#include "sparsa/core/dtype.h"

namespace sparsa::formats {

enum class Codec : uint8_t { Float, Int, Palette };
enum class Positions : uint8_t { All, Bitmask };

/// Columns per storage block (of codes, and of the sparse keep masks).
inline constexpr int64_t kBlockCols = 64;

/// Bits one stored code takes in Positions::All: 2, 3, 4 or 8 (codes of 5..8 bits use a byte).
int stored_code_bits(int bits);

/// Everything a kernel reads, as plain pointers into the packed storage (or external memory).
struct PackedView {
  Codec codec = Codec::Float;
  Positions positions = Positions::All;
  DType dtype = DType::F32;  // Codec::Float: the value type (BF16 only with Bitmask)
  int bits = 0;              // Int / Palette: code bits, 2..8
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t n_blocks = 0;  // ceil(cols / 64)
  // Positions::All with Int / Palette: a row's codes are codes + r * row_bytes.
  int64_t row_bytes = 0;
  const uint8_t* codes = nullptr;
  // Positions::Bitmask: row r is the byte range [row_offsets[r], row_offsets[r + 1]) of codes.
  const uint64_t* row_offsets = nullptr;
  // Codec::Int: [rows, n_groups] each; group of column c is c / group_size.
  int64_t group_size = 0;
  int64_t n_groups = 0;
  const uint16_t* scales = nullptr;  // f16 bits
  const uint8_t* zeros = nullptr;
  // Codec::Palette: rows r share table r / group_rows; lut is [n_row_groups, 2^bits].
  int64_t group_rows = 0;
  const float* lut = nullptr;
  // Codec::Palette of 2..4 bits, for the int8-input kernels: each table as unsigned bytes
  // lut_u8[table][j] = u_j with lut_j ≈ lut_u8_scale[table] · (u_j − lut_u8_zero[table]) to
  // within half a step (the range from min(0, lut) to max(0, lut) in 255 steps, so that 0 is the
  // zero point exactly); [n_row_groups][16], entries past 2^bits hold the zero point.
  const uint8_t* lut_u8 = nullptr;
  const float* lut_u8_scale = nullptr;
  const uint8_t* lut_u8_zero = nullptr;
  // Codec::Palette of 5..6 bits, for the int8-input kernels: each table as 16-bit integers
  // Q_j = round(lut_j / lut_qscale[table]), |Q_j| <= 32767, split into two 64-entry byte planes
  // [n_row_groups][2][64]: plane 0 holds (Q_j >> 8) + 128, plane 1 holds Q_j & 255.
  const uint8_t* lut_q = nullptr;
  const float* lut_qscale = nullptr;
  // Codec::Float with Positions::All: the [rows, cols] matrix of `dtype`, row-major or (panels)
  // in the kernels' panel layout (kernels::DenseWeight).
  const void* dense = nullptr;
  bool panels = false;
  // Act-order (GPTQ desc_act) weights are stored with their columns sorted by group: stored
  // column j is input feature perm[j]; kernels gather x through it. Null: identity.
  const int32_t* perm = nullptr;
};

/// One packed [rows, cols] weight. Move-only; owns its 64-byte aligned storage (except a dense
/// weight packed without copying, which references the caller's memory).
class PackedWeight {
 public:
  PackedWeight() = default;
  PackedWeight(PackedWeight&&) noexcept = default;
  PackedWeight& operator=(PackedWeight&&) noexcept = default;
  PackedWeight(const PackedWeight&) = delete;
  PackedWeight& operator=(const PackedWeight&) = delete;

  const PackedView& view() const { return view_; }
  int64_t rows() const { return view_.rows; }
  int64_t cols() const { return view_.cols; }
  Codec codec() const { return view_.codec; }
  Positions positions() const { return view_.positions; }
  /// The mask is N:M regular (n kept of every m columns); 0, 0 otherwise. Informational.
  int nm_n() const { return nm_n_; }
  int nm_m() const { return nm_m_; }

  /// Bytes one decode pass reads: codes or values, masks, scales, zeros and tables.
  size_t bytes() const { return bytes_; }
  /// A deep copy (a dense weight packed without copying still references the same memory).
  PackedWeight clone() const;
  /// A short name such as "int4g128", "bitmask-int4g128 (2:4)", "palette3", "bf16".
  std::string describe() const;
  /// The weights, [rows, cols] row-major f32 (scalar code: the tests' reference).
  void dequantize_to(float* out) const;

 private:
  friend struct Packer;
  struct AlignedFree {
    void operator()(uint8_t* p) const;
  };
  PackedView view_;
  std::unique_ptr<uint8_t[], AlignedFree> storage_;
  size_t storage_size_ = 0;
  size_t bytes_ = 0;
  int nm_n_ = 0, nm_m_ = 0;
};

/// Dense F32 / F16 / BF16 [rows, cols] (row-major `data`). copy = false references `data`, which
/// must outlive the packed weight (e.g. a memory-mapped checkpoint tensor); panels = true
/// stores a copy in the panel layout (kernels::DenseWeight), which batched decode streams
/// fastest.
PackedWeight pack_dense(DType dtype, int64_t rows, int64_t cols, const void* data, bool copy,
                        bool panels = false);

/// The position coding of a masked weight.
enum class SparseEncoding { Auto, All, Bitmask };

/// Group-quantized codes (act-order g_idx allowed), optionally with a keep mask ([rows, cols],
/// 1 = kept; null or empty: dense). Pruned weights become exactly 0.
PackedWeight pack_quantized(const compress::QuantResult& q, const compress::Mask* keep = nullptr,
                            SparseEncoding encoding = SparseEncoding::Auto);

/// The value type of pack_sparse(): BF16, or int codes quantized here by round to nearest on the
/// kept weights (bits 2..8, group_size dividing cols or 0 for one group per row).
struct ValueFormat {
  enum Kind { BF16, Int } kind = BF16;
  int bits = 4;
  int64_t group_size = 128;
  bool symmetric = false;
};

/// Unstructured (or N:M) sparse weight w with mask keep (w's pruned entries are ignored).
PackedWeight pack_sparse(const compress::Matrix& w, const compress::Mask& keep, ValueFormat values,
                         SparseEncoding encoding = SparseEncoding::Auto);

/// A palettized weight [indices.size() / cols, cols] (bits 2..8), optionally masked.
PackedWeight pack_palette(const compress::Palette& p, int64_t cols,
                          const compress::Mask* keep = nullptr);

}  // namespace sparsa::formats
