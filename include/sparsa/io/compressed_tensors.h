// The compressed-tensors checkpoint layout (the format llm-compressor writes and vLLM reads): how a
// quantized or sparse weight matrix is stored as safetensors tensors, and the `quantization_config`
// block of `config.json` that describes it. Pure functions over buffers; the pipeline that writes a
// model calls them per weight.
//
//   // 4-bit asymmetric group-128 GPTQ weight of module "model.layers.0.mlp.down_proj":
//   std::vector<int32_t> packed = sparsa::io::pack_quantized(codes, rows, cols, 4);
//   //   -> "<module>.weight_packed" int32 [rows, packed_words(cols, 4)]
//   std::vector<int32_t> zp = sparsa::io::pack_zero_points(zero_points, rows, n_groups, 4);
//   //   -> "<module>.weight_zero_point" int32 [packed_words(rows, 4), n_groups]
//   sparsa::io::QuantizationConfig q{.bits = 4, .group_size = 128, .symmetric = false,
//                                    .ignore = {"lm_head"}};
//   sparsa::io::write_compression_config({.quantization = q}, config_json);
//
// Conventions, matched to the library's source (neuralmagic / vllm-project compressed-tensors,
// src/compressed_tensors/compressors/quantized_compressors/pack_quantized.py,
// sparse_compressors/sparse_bitmask.py, sparse_compressors/sparse_24_bitmask.py,
// quantization/quant_args.py, quantization/quant_config.py, config/base.py,
// compressors/model_compressors/model_compressor.py):
//
// "pack-quantized" (weight-only int, 1..8 bits; per group of input columns or per output channel)
//   <module>.weight_packed      int32 [rows, ceil(cols / (32 / bits))]
//   <module>.weight_scale       [rows, n_groups], the model's float dtype (n_groups 1 per channel)
//   <module>.weight_zero_point  int32 [ceil(rows / (32 / bits)), n_groups]; asymmetric only
//   <module>.weight_g_idx       int32 [cols], the group of each input column; actorder "group"
//   <module>.weight_shape       int64 [2] = {rows, cols}
//   The library quantizes to signed q in [-2^(b-1), 2^(b-1)) and packs q + 2^(b-1):
//   `pack_to_int32` puts 32 / bits values in each word, value i of a word in bits [i*b, (i+1)*b)
//   (the first column in the lowest bits), and pads the last word with zeros; 3, 5, 6 and 7 bits
//   leave the top 2, 2, 2 and 4 bits of every word unused. The functions below take the unsigned
//   codes u = q + 2^(b-1) directly. Zero points are signed too (z in [-2^(b-1), 2^(b-1)), int8
//   before packing) and are packed the same way but along the output dimension (`packed_dim=0`);
//   pass u_z = z + 2^(b-1). Dequantization: w = (q - z) * scale = (u - u_z) * scale. Symmetric
//   schemes store no zero point (0 in the signed domain, 2^(b-1) as a code). Older releases,
//   from before zero points were packed, wrote them unpacked as int8 [rows, n_groups] (signed);
//   unpack_zero_points reads only the packed form, the caller converts the other with z + 2^(b-1).
// "int-quantized" (8-bit weights with int8 dynamic per-token activations, W8A8)
//   <module>.weight        int8 [rows, cols], signed q;  <module>.weight_scale [rows, 1]
// "sparse-bitmask" (unstructured; any value dtype)
//   <module>.compressed   [nnz] the nonzero values, row by row, in the weight's dtype
//   <module>.bitmask      uint8 [rows, ceil(cols / 8)]: bit j of byte k of row r is set when
//                         column 8k + j is nonzero (numpy.packbits(bitorder="little") per row)
//   <module>.row_offsets  int64 [rows], the index in `compressed` where row r starts
//   <module>.shape        int64 [2]
//   "Nonzero" is the library's `tensor != 0`: -0.0 is dropped, NaN kept.
// "sparse-24-bitmask" (2 of every 4 consecutive input columns kept)
//   <module>.compressed   [rows, cols / 2] kept values;  <module>.bitmask as above;
//   <module>.shape        int64 [2, 1] (the library writes `shape.reshape(-1, 1)`; read [2] too)
// "dense": sparse weights stored as plain `weight`; used when quantization also applies (the
//   zeros then live inside weight_packed) and the sparsity block is only a description.
//
// config.json: `quantization_config` = {config_groups: {group_0: {targets, weights,
// input_activations, output_activations}}, format, ignore, kv_cache_scheme, quant_method:
// "compressed-tensors", quantization_status: "compressed", global_compression_ratio, version,
// sparsity_config: {format, targets, ignore, global_sparsity, sparsity_structure}}. With only
// sparsity, the block is {quant_method, version, sparsity_config}. The weights' keys are those that
// every library version's QuantizationArgs accepts (it forbids unknown keys): num_bits, type,
// symmetric, strategy, group_size, block_structure, dynamic, actorder, observer, observer_kwargs.
//
// Our extensions, in the same style (unknown to the library and to vLLM):
// "sparsa-palettized": each weight is an index into a small table of values (a palette, k-means
//   centroids); one palette per group of `palette_group_rows` consecutive output rows, or one per
//   tensor (per_tensor).
//   <module>.weight_palette         [n_palettes, 2^bits] in the model's float dtype,
//                                   n_palettes = ceil(rows / palette_group_rows), or 1 per tensor
//   <module>.weight_indices_packed  int32 [rows, ceil(cols / (32 / bits))], the indices packed
//                                   exactly as pack-quantized codes (no offset: index = code)
//   <module>.weight_shape           int64 [2]
//   Row r uses palette r / palette_group_rows: w[r][c] = palette[r / g][index[r][c]].
// "sparsa-low-rank": W ≈ U V
//   <module>.weight_u  [rows, rank] and <module>.weight_v [rank, cols] in the model's float dtype
// These are described by a top-level `sparsa_config` block of config.json (not inside
// `quantization_config`: the library validates that block as a QuantizationConfig, which requires
// config_groups, so a palettized-only model would fail to load there):
//   {"version": 1, "config_groups": {"group_0": {"format": "sparsa-palettized", "targets": [...],
//    "bits": 4, "granularity": "per_grouped_channel", "palette_group_rows": 16}, "group_1":
//    {"format": "sparsa-low-rank", "targets": [...], "method": "svd_whitened"}}, "ignore": [...]}
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "sparsa/core/dtype.h"
#include "sparsa/io/safetensors.h"  // TensorView

namespace sparsa::io {

/// Tensor-name suffixes ("<module>.<suffix>") of the layouts above.
namespace ct_param {
inline constexpr std::string_view kWeight = "weight";
inline constexpr std::string_view kWeightPacked = "weight_packed";
inline constexpr std::string_view kWeightScale = "weight_scale";
inline constexpr std::string_view kWeightZeroPoint = "weight_zero_point";
inline constexpr std::string_view kWeightGIdx = "weight_g_idx";
inline constexpr std::string_view kWeightShape = "weight_shape";
inline constexpr std::string_view kCompressed = "compressed";
inline constexpr std::string_view kBitmask = "bitmask";
inline constexpr std::string_view kRowOffsets = "row_offsets";
inline constexpr std::string_view kShape = "shape";
inline constexpr std::string_view kWeightPalette = "weight_palette";
inline constexpr std::string_view kWeightIndicesPacked = "weight_indices_packed";
inline constexpr std::string_view kWeightU = "weight_u";
inline constexpr std::string_view kWeightV = "weight_v";
}  // namespace ct_param

/// The compressed-tensors release whose layout this file follows; written as "version".
inline constexpr std::string_view kCompressedTensorsVersion = "0.12.2";

// ---- pack-quantized -----------------------------------------------------------------------------

/// Words needed for n values of `bits` bits: ceil(n / (32 / bits)). bits in 1..8.
int64_t packed_words(int64_t n, int bits);

/// codes: [rows, cols] unsigned codes in [0, 2^bits) (the library's signed value + 2^(bits-1)).
/// Returns weight_packed, int32 [rows, packed_words(cols, bits)]. Errors name the first bad code.
std::vector<int32_t> pack_quantized(std::span<const uint8_t> codes, int64_t rows, int64_t cols,
                                    int bits);
/// The inverse: [rows, cols] codes. `packed` must hold rows * packed_words(cols, bits) words.
std::vector<uint8_t> unpack_quantized(std::span<const int32_t> packed, int64_t rows, int64_t cols,
                                      int bits);

/// zero_points: [rows, n_groups] unsigned codes (signed zero point + 2^(bits-1)). Returns the
/// library's weight_zero_point, int32 [packed_words(rows, bits), n_groups], packed along rows.
std::vector<int32_t> pack_zero_points(std::span<const uint8_t> zero_points, int64_t rows,
                                      int64_t n_groups, int bits);
std::vector<uint8_t> unpack_zero_points(std::span<const int32_t> packed, int64_t rows,
                                        int64_t n_groups, int bits);

// ---- sparse-bitmask / sparse-24-bitmask ---------------------------------------------------------

/// Bytes per row of a bitmask: ceil(cols / 8).
inline int64_t bitmask_row_bytes(int64_t cols) { return (cols + 7) / 8; }

struct SparseBitmask {
  DType dtype = DType::F32;
  int64_t nnz = 0;
  std::vector<uint8_t> compressed = {};   // [nnz] values, raw bytes in `dtype`
  std::vector<uint8_t> bitmask = {};      // uint8 [rows, ceil(cols / 8)]
  std::vector<int64_t> row_offsets = {};  // int64 [rows]
};

/// dense: [rows, cols] raw values in `dtype`. Keeps the values that are != 0.
SparseBitmask sparse_bitmask_compress(const void* dense, int64_t rows, int64_t cols, DType dtype);
/// Rebuilds [rows, cols] raw bytes. `compressed` must hold exactly as many values as bits are set;
/// `row_offsets`, when not empty, is checked against the bitmask.
std::vector<uint8_t> sparse_bitmask_decompress(std::span<const uint8_t> compressed,
                                               std::span<const uint8_t> bitmask,
                                               std::span<const int64_t> row_offsets, int64_t rows,
                                               int64_t cols, DType dtype);
inline std::vector<uint8_t> sparse_bitmask_decompress(const SparseBitmask& s, int64_t rows,
                                                      int64_t cols) {
  return sparse_bitmask_decompress(s.compressed, s.bitmask, s.row_offsets, rows, cols, s.dtype);
}

struct Sparse24Bitmask {
  DType dtype = DType::F32;
  std::vector<uint8_t> compressed = {};  // [rows, cols / 2] kept values, raw bytes in `dtype`
  std::vector<uint8_t> bitmask = {};     // uint8 [rows, ceil(cols / 8)]
};

/// cols must be a multiple of 4 and every group of 4 consecutive columns hold at most 2 nonzero
/// values (an error names the first row and column that does not). Exactly 2 positions per group
/// are kept: the nonzero ones, then the first zero ones.
Sparse24Bitmask sparse_24_bitmask_compress(const void* dense, int64_t rows, int64_t cols,
                                           DType dtype);
std::vector<uint8_t> sparse_24_bitmask_decompress(std::span<const uint8_t> compressed,
                                                  std::span<const uint8_t> bitmask, int64_t rows,
                                                  int64_t cols, DType dtype);

// ---- config.json blocks -------------------------------------------------------------------------

enum class ActOrder : uint8_t { kNone, kGroup, kWeight };

/// One config group of `quantization_config` (we write exactly one).
struct QuantizationConfig {
  int bits = 4;              // weights' num_bits, 1..8
  int64_t group_size = 128;  // input columns per scale; 0: per output channel
  bool symmetric = true;
  ActOrder actorder = ActOrder::kNone;  // kGroup: weight_g_idx is stored
  int input_activation_bits = 0;  // 0: weight only; 8: dynamic per-token symmetric int8 (W8A8)
  std::vector<std::string> targets = {"Linear"};
  std::vector<std::string> ignore = {};
  /// "pack-quantized" (weight only) or "int-quantized" (8-bit weights, with W8A8); empty: chosen
  /// from the above.
  std::string format = {};

  std::string resolved_format() const;
  /// Formats compare resolved ("" equals the format it resolves to).
  bool operator==(const QuantizationConfig& o) const;
};

/// `sparsity_config`.
struct SparsityConfig {
  std::string format = "sparse-bitmask";   // "sparse-bitmask" | "sparse-24-bitmask" | "dense"
  std::string structure = "unstructured";  // "unstructured" | "2:4" (any "N:M" is read)
  double global_sparsity = 0.0;
  std::vector<std::string> targets = {"Linear"};
  std::vector<std::string> ignore = {};
  bool operator==(const SparsityConfig&) const = default;
};

enum class SparsaFormat : uint8_t { kPalettized, kLowRank };
/// "sparsa-palettized" | "sparsa-low-rank".
std::string_view sparsa_format_name(SparsaFormat f);

struct SparsaGroup {
  SparsaFormat format = SparsaFormat::kPalettized;
  std::vector<std::string> targets = {};
  int bits = 4;                    // palettized: 2^bits palette entries, 1..8
  int64_t palette_group_rows = 0;  // palettized: rows per palette; 0: one palette per tensor
  std::string method = {};         // low-rank: "svd" | "svd_whitened" (informational)
  bool operator==(const SparsaGroup&) const = default;
};

/// `sparsa_config`: the weights stored in our extension formats.
struct SparsaConfig {
  std::vector<SparsaGroup> groups = {};
  std::vector<std::string> ignore = {};
  bool operator==(const SparsaConfig&) const = default;
};

struct CompressionConfig {
  std::optional<QuantizationConfig> quantization = {};
  std::optional<SparsityConfig> sparsity = {};
  std::optional<SparsaConfig> sparsa = {};
  std::string version = {};  // compressed-tensors version read back (informational)
};

/// The quantization part of `quantization_config` (config_groups, format, ignore, quant_method,
/// quantization_status, kv_cache_scheme, global_compression_ratio, version).
nlohmann::json quantization_config_json(const QuantizationConfig& q);
nlohmann::json sparsity_config_json(const SparsityConfig& s);
nlohmann::json sparsa_config_json(const SparsaConfig& s);

/// Readers; errors name `source` and the field. parse_quantization_config takes the whole
/// `quantization_config` block (a nested sparsity_config is ignored here) and accepts the preset
/// group form {"W4A16": ["Linear"]} (W4A16, W4A16_ASYM, W8A16, W8A8).
QuantizationConfig parse_quantization_config(const nlohmann::json& block,
                                             const std::string& source);
SparsityConfig parse_sparsity_config(const nlohmann::json& block, const std::string& source);
SparsaConfig parse_sparsa_config(const nlohmann::json& block, const std::string& source);

/// Sets config_json["quantization_config"] (when quantization or sparsity is set; the sparsity
/// block nested inside, as the library writes it) and config_json["sparsa_config"] (when set);
/// removes stale blocks otherwise.
void write_compression_config(const CompressionConfig& c, nlohmann::json& config_json);
/// Reads them back from a config.json object ("compression_config" is read as an older name of
/// "quantization_config"); everything is nullopt for an uncompressed model.
CompressionConfig read_compression_config(const nlohmann::json& config_json,
                                          const std::string& source);

}  // namespace sparsa::io

// ---- reading a compressed linear weight back ----------------------------------------------------

namespace sparsa::io {

class Checkpoint;

/// One linear weight of a checkpoint, decoded to f32 [rows, cols], whatever its layout: a plain
/// `weight` (f32/f16/bf16, or int8 of "int-quantized" times its weight_scale), pack-quantized,
/// sparse-bitmask, sparse-24-bitmask, sparsa-palettized or sparsa-low-rank. The arithmetic is
/// the one the compression passes use, so the values are bit-identical to the compressed
/// weights they were written from: w = scale · (code − zero) in f32, palette[index], and
/// low_rank_product(U, V).
struct DecodedWeight {
  std::vector<float> values;  // [rows, cols]
  std::string format;         // "dense", "pack-quantized", "int-quantized", "sparse-bitmask", ...
  int input_activation_bits = 0;  // 8: the layer expects dynamically int8-quantized inputs
};

/// Whether `module` ("model.layers.0.mlp.down_proj") is stored in any of the layouts above (as
/// opposed to a plain float `weight`, which callers may keep memory-mapped).
bool is_compressed_weight(const Checkpoint& ck, const std::string& module);

/// Decodes `module`'s weight, checking every tensor's dtype and shape against [rows, cols] and
/// `config`; errors name the tensor and what is wrong.
DecodedWeight decode_weight(const Checkpoint& ck, const std::string& module, int64_t rows,
                            int64_t cols, const CompressionConfig& config);

/// The stored parts of one linear weight, validated against [rows, cols] and the config but not
/// decoded: what decode_weight() dequantizes and what the runtime's packed layouts
/// (sparsa/formats/packed_weight.h) are built from without going through f32.
struct StoredWeight {
  enum class Kind : uint8_t {
    kDense,            // a plain float `weight` (`tensor`)
    kPackQuantized,    // codes, scales, zeros, g_idx
    kIntQuantized,     // int8 per output channel: codes = q + 128, zeros = 128, n_groups = 1
    kSparseBitmask,    // values (dense, raw in `dtype`) and keep
    kSparse24Bitmask,  // the same, 2 of every 4 columns
    kPalettized,       // codes (indices), lut, group_rows
    kLowRank,          // u [rows, rank], v [rank, cols]
  };
  Kind kind = Kind::kDense;
  std::string format;             // as DecodedWeight::format
  int input_activation_bits = 0;  // 8: the layer expects dynamically int8-quantized inputs
  int64_t rows = 0, cols = 0;
  int bits = 0;                   // quantized: code bits; palettized: log2(table size)
  std::vector<uint8_t> codes;     // [rows, cols] unsigned codes or palette indices
  // Quantized: w[r, c] = scales[r, g] · (codes[r, c] − zeros[r, g]) with g = g_idx[c].
  int64_t n_groups = 0;
  std::vector<float> scales;    // [rows, n_groups]
  std::vector<uint8_t> zeros;   // [rows, n_groups]
  std::vector<int32_t> g_idx;   // [cols]
  bool act_order = false;       // g_idx was stored (weight_g_idx), not c / group_size
  // Sparse: the decompressed matrix and which positions were stored.
  DType dtype = DType::F32;
  std::vector<uint8_t> values;  // [rows, cols] raw values in `dtype`
  std::vector<uint8_t> keep;    // [rows, cols], 1 = stored in the bitmask
  // Palettized: w[r, c] = lut[(r / group_rows) · 2^bits + codes[r, c]].
  std::vector<float> lut;       // [n_palettes, 2^bits]
  int64_t group_rows = 0;
  // Dense: the tensor itself; low-rank: the two factors (float tensors, memory-mapped).
  TensorView tensor, u, v;
};

/// Reads `module`'s weight parts with the checks of decode_weight().
StoredWeight read_stored_weight(const Checkpoint& ck, const std::string& module, int64_t rows,
                                int64_t cols, const CompressionConfig& config);
/// The weight as f32 [rows, cols], with decode_weight()'s arithmetic.
std::vector<float> dequantize_stored_weight(const StoredWeight& s);

/// W = U V for U [rows, rank] and V [rank, cols], accumulated in f32 over k in order (the one
/// definition both the low-rank pass and the loader use).
std::vector<float> low_rank_product(const float* u, const float* v, int64_t rows, int64_t rank,
                                    int64_t cols);

}  // namespace sparsa::io
