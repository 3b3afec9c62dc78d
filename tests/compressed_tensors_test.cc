#include "sparsa/io/compressed_tensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"

namespace sparsa::io {
namespace {

using nlohmann::json;

std::set<std::string> keys(const json& j) {
  std::set<std::string> k;
  for (const auto& [key, v] : j.items()) k.insert(key);
  return k;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// ---- pack-quantized -----------------------------------------------------------------------------

TEST(PackQuantized, WordsPerRow) {
  EXPECT_EQ(packed_words(128, 4), 16);
  EXPECT_EQ(packed_words(129, 4), 17);
  EXPECT_EQ(packed_words(30, 3), 3);  // 10 three-bit values per word
  EXPECT_EQ(packed_words(31, 3), 4);
  EXPECT_EQ(packed_words(16, 2), 1);
  EXPECT_EQ(packed_words(5, 8), 2);
  EXPECT_EQ(packed_words(0, 4), 0);
  EXPECT_THROW(packed_words(8, 9), Error);
  EXPECT_THROW(packed_words(8, 0), Error);
}

// The words pack_to_int32 produces (compressed-tensors, quantized_compressors/pack_quantized.py):
// value i of a word in bits [i*b, (i+1)*b), the first column in the lowest bits, zero padded.
TEST(PackQuantized, MatchesTheLibrarysWordsOnHandCheckedCodes) {
  // The library's docstring: num_bits=8, signed [1, 2] -> unsigned [129, 130] -> 33409.
  EXPECT_EQ(pack_quantized(std::vector<uint8_t>{129, 130}, 1, 2, 8), std::vector<int32_t>{33409});
  // 4 bits: codes 1..9 -> 0x87654321 (an int32 below zero), then 9 and seven zero nibbles.
  EXPECT_EQ(pack_quantized(std::vector<uint8_t>{1, 2, 3, 4, 5, 6, 7, 8, 9}, 1, 9, 4),
            (std::vector<int32_t>{-2023406815, 9}));
  // 3 bits: ten values per word (bits 0..29), the top two bits unused.
  EXPECT_EQ(pack_quantized(std::vector<uint8_t>{1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 5}, 1, 11, 3),
            (std::vector<int32_t>{0x111f58d1, 5}));
  // 2 bits: sixteen values per word; [3, 0, 1, 2] -> 0b10010011 = 0x93 per byte.
  const std::vector<uint8_t> two = {3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 1};
  EXPECT_EQ(pack_quantized(two, 1, 17, 2), (std::vector<int32_t>{-1819044973, 1}));
  // Rows pack independently: [rows, words] row-major.
  EXPECT_EQ(pack_quantized(std::vector<uint8_t>{15, 0, 0, 15}, 2, 2, 4),
            (std::vector<int32_t>{0xf, 0xf0}));
}

TEST(PackQuantized, ZeroPointsPackAlongRows) {
  // zero_points [9 rows, 2 groups] = (r + g), 4 bits: word [0][g] holds rows 0..7 of group g.
  std::vector<uint8_t> zp(18);
  for (int r = 0; r < 9; ++r) {
    for (int g = 0; g < 2; ++g) zp[r * 2 + g] = static_cast<uint8_t>(r + g);
  }
  const std::vector<int32_t> packed = pack_zero_points(zp, 9, 2, 4);
  // [packed_words(9, 4) = 2, 2 groups]
  EXPECT_EQ(packed, (std::vector<int32_t>{0x76543210, -2023406815, 8, 9}));
  EXPECT_EQ(unpack_zero_points(packed, 9, 2, 4), zp);
}

TEST(PackQuantized, RoundTripsOddShapesForEveryWidth) {
  std::mt19937 rng(7);
  for (int bits = 1; bits <= 8; ++bits) {
    for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{
             {3, 37}, {5, 77}, {1, 1}, {4, 31}, {2, 128}, {7, 10}, {0, 9}, {3, 0}}) {
      SCOPED_TRACE(::testing::Message() << "bits " << bits << " shape " << rows << "x" << cols);
      std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
      for (uint8_t& c : codes) c = static_cast<uint8_t>(rng() % (1u << bits));
      const std::vector<int32_t> packed = pack_quantized(codes, rows, cols, bits);
      ASSERT_EQ(packed.size(), static_cast<size_t>(rows * packed_words(cols, bits)));
      EXPECT_EQ(unpack_quantized(packed, rows, cols, bits), codes);
      // The padding in each row's last word is zero, as np.pad / F.pad leave it.
      const int per_word = 32 / bits;
      for (int64_t r = 0; r < rows && cols % per_word != 0; ++r) {
        const uint32_t last = static_cast<uint32_t>(packed[(r + 1) * packed_words(cols, bits) - 1]);
        EXPECT_EQ(last >> (bits * (cols % per_word)), 0u);
      }
      const std::vector<int32_t> zp = pack_zero_points(codes, rows, cols, bits);
      ASSERT_EQ(zp.size(), static_cast<size_t>(packed_words(rows, bits) * cols));
      EXPECT_EQ(unpack_zero_points(zp, rows, cols, bits), codes);
    }
  }
}

TEST(PackQuantized, RejectsCodesThatDoNotFitAndWrongSizes) {
  EXPECT_NE(error_of([] {
              pack_quantized(std::vector<uint8_t>{1, 16}, 1, 2, 4);
            }).find("code 16 at row 0, column 1 does not fit in 4 bits"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              pack_quantized(std::vector<uint8_t>{1, 2, 3}, 1, 2, 4);
            }).find("codes holds 3 bytes, expected 2"),
            std::string::npos);
  EXPECT_THROW(unpack_quantized(std::vector<int32_t>{1, 2, 3}, 1, 9, 4), Error);
  EXPECT_NO_THROW(unpack_quantized(std::vector<int32_t>{1, 2}, 1, 16, 4));
  EXPECT_THROW(unpack_quantized(std::vector<int32_t>{1}, 2, 8, 4), Error);
  EXPECT_THROW(pack_zero_points(std::vector<uint8_t>{9}, 1, 1, 3), Error);
}

// ---- sparse bitmasks ----------------------------------------------------------------------------

std::vector<uint8_t> bytes_of(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

TEST(SparseBitmask, BitOrderIsLittleEndianWithinEachRowByte) {
  // Row 0: columns 1, 8, 11 kept (-0.0 at column 10 is dropped, as `tensor != 0` drops it).
  // Row 1: column 0 and 7 -> 0b10000001.
  const std::vector<float> dense = {0,    1.5f, 0, 0, 0, 0, 0, 0,    2.0f, 0, -0.0f, 3.0f,
                                    4.0f, 0,    0, 0, 0, 0, 0, 5.0f, 0,    0, 0,     0};
  const SparseBitmask s = sparse_bitmask_compress(dense.data(), 2, 12, DType::F32);
  EXPECT_EQ(s.nnz, 5);
  // np.packbits(row != 0, bitorder="little"): bit j of byte k is column 8k + j.
  EXPECT_EQ(s.bitmask, (std::vector<uint8_t>{0x02, 0x09, 0x81, 0x00}));
  EXPECT_EQ(s.row_offsets, (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(s.compressed, bytes_of({1.5f, 2.0f, 3.0f, 4.0f, 5.0f}));
  std::vector<float> back(24);
  const std::vector<uint8_t> raw = sparse_bitmask_decompress(s, 2, 12);
  std::memcpy(back.data(), raw.data(), raw.size());
  for (size_t i = 0; i < dense.size(); ++i) {
    EXPECT_EQ(back[i], dense[i]) << i;  // -0.0 comes back as 0 (== -0.0)
  }
}

TEST(SparseBitmask, RoundTripsEveryValueType) {
  std::mt19937 rng(3);
  for (DType t : {DType::F32, DType::BF16, DType::F16, DType::I8, DType::I32, DType::F64}) {
    for (const auto& [rows, cols] :
         std::vector<std::pair<int64_t, int64_t>>{{3, 13}, {4, 64}, {1, 1}, {2, 7}}) {
      const size_t es = dtype_size(t);
      std::vector<uint8_t> dense(static_cast<size_t>(rows * cols) * es, 0);
      for (int64_t i = 0; i < rows * cols; ++i) {
        if (rng() % 2) {
          for (size_t b = 0; b < es; ++b) dense[i * es + b] = static_cast<uint8_t>(rng() | 1);
        }
      }
      const SparseBitmask s = sparse_bitmask_compress(dense.data(), rows, cols, t);
      EXPECT_EQ(s.bitmask.size(), static_cast<size_t>(rows * bitmask_row_bytes(cols)));
      EXPECT_EQ(s.compressed.size(), static_cast<size_t>(s.nnz) * es);
      EXPECT_EQ(sparse_bitmask_decompress(s, rows, cols), dense);
    }
  }
}

TEST(SparseBitmask, DecompressChecksCountsAndOffsets) {
  const std::vector<float> dense = {1, 0, 2, 0, 0, 3};
  SparseBitmask s = sparse_bitmask_compress(dense.data(), 2, 3, DType::F32);
  EXPECT_EQ(s.row_offsets, (std::vector<int64_t>{0, 2}));
  std::vector<uint8_t> short_values(s.compressed.begin(), s.compressed.end() - 4);
  EXPECT_NE(error_of([&] {
              sparse_bitmask_decompress(short_values, s.bitmask, {}, 2, 3, DType::F32);
            }).find("sets more bits than compressed holds values"),
            std::string::npos);
  std::vector<int64_t> bad_offsets = {0, 1};
  EXPECT_NE(error_of([&] {
              sparse_bitmask_decompress(s.compressed, s.bitmask, bad_offsets, 2, 3, DType::F32);
            }).find("row_offsets[1] is 1 but the bitmask puts row 1 at 2"),
            std::string::npos);
  EXPECT_THROW(sparse_bitmask_decompress(s.compressed, s.bitmask, {}, 3, 3, DType::F32), Error);
}

TEST(Sparse24Bitmask, KeepsTwoOfEveryFour) {
  // Group 0: two nonzeros; group 1: one nonzero (a zero at column 4 is kept to make two);
  // group 2: none (columns 8, 9 kept).
  const std::vector<float> dense = {0, 1, 0, 2, 0, 0, 3, 0, 0, 0, 0, 0,
                                    5, 6, 0, 0, 0, 0, 7, 8, 0, 9, 0, 0};
  const Sparse24Bitmask s = sparse_24_bitmask_compress(dense.data(), 2, 12, DType::F32);
  EXPECT_EQ(s.compressed, bytes_of({1, 2, 0, 3, 0, 0, 5, 6, 7, 8, 0, 9}));
  // Row 0 keeps columns 1, 3, 4, 6, 8, 9: byte 0 = 0b01011010, byte 1 = 0b00000011; row 1 keeps
  // 0, 1, 6, 7, 8, 9.
  EXPECT_EQ(s.bitmask, (std::vector<uint8_t>{0x5a, 0x03, 0xc3, 0x03}));
  const std::vector<uint8_t> back =
      sparse_24_bitmask_decompress(s.compressed, s.bitmask, 2, 12, DType::F32);
  EXPECT_EQ(back, bytes_of(dense));
}

TEST(Sparse24Bitmask, RejectsMatricesThatAreNotTwoFour) {
  const std::vector<float> dense = {1, 2, 3, 0};
  EXPECT_NE(error_of([&] {
              sparse_24_bitmask_compress(dense.data(), 1, 4, DType::F32);
            }).find("row 0, columns 0..3 hold 3 nonzero values"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              sparse_24_bitmask_compress(dense.data(), 2, 2, DType::F32);
            }).find("multiple of 4"),
            std::string::npos);
  const std::vector<uint8_t> three_kept = {0x07};
  EXPECT_THROW(sparse_24_bitmask_decompress(bytes_of({1, 2}), three_kept, 1, 4, DType::F32), Error);
}

// ---- config.json --------------------------------------------------------------------------------

const std::set<std::string> kWeightKeys = {
    "num_bits",        "type",    "symmetric", "strategy", "group_size",
    "block_structure", "dynamic", "actorder",  "observer", "observer_kwargs"};

TEST(QuantizationConfigJson, HasTheKeysTheLibraryExpects) {
  QuantizationConfig q;
  q.bits = 4;
  q.group_size = 128;
  q.symmetric = false;
  q.targets = {"Linear"};
  q.ignore = {"lm_head"};
  const json j = quantization_config_json(q);
  EXPECT_EQ(keys(j), (std::set<std::string>{"config_groups", "format", "global_compression_ratio",
                                            "ignore", "kv_cache_scheme", "quant_method",
                                            "quantization_status", "version"}));
  EXPECT_EQ(j["quant_method"], "compressed-tensors");
  EXPECT_EQ(j["format"], "pack-quantized");
  EXPECT_EQ(j["quantization_status"], "compressed");
  EXPECT_EQ(j["ignore"], json::array({"lm_head"}));
  EXPECT_TRUE(j["kv_cache_scheme"].is_null());
  ASSERT_EQ(keys(j["config_groups"]), std::set<std::string>{"group_0"});
  const json& g = j["config_groups"]["group_0"];
  EXPECT_EQ(keys(g), (std::set<std::string>{"targets", "weights", "input_activations",
                                            "output_activations"}));
  EXPECT_EQ(g["targets"], json::array({"Linear"}));
  EXPECT_TRUE(g["input_activations"].is_null());
  const json& w = g["weights"];
  EXPECT_EQ(keys(w), kWeightKeys);
  EXPECT_EQ(w["num_bits"], 4);
  EXPECT_EQ(w["type"], "int");
  EXPECT_EQ(w["symmetric"], false);
  EXPECT_EQ(w["strategy"], "group");
  EXPECT_EQ(w["group_size"], 128);
  EXPECT_TRUE(w["actorder"].is_null());
  EXPECT_EQ(w["dynamic"], false);

  q.group_size = 0;
  q.actorder = ActOrder::kWeight;
  const json c = quantization_config_json(q)["config_groups"]["group_0"]["weights"];
  EXPECT_EQ(c["strategy"], "channel");
  EXPECT_TRUE(c["group_size"].is_null());
  EXPECT_EQ(c["actorder"], "weight");

  QuantizationConfig w8a8{
      .bits = 8, .group_size = 0, .symmetric = true, .input_activation_bits = 8};
  const json k = quantization_config_json(w8a8);
  EXPECT_EQ(k["format"], "int-quantized");
  const json& a = k["config_groups"]["group_0"]["input_activations"];
  EXPECT_EQ(keys(a), kWeightKeys);
  EXPECT_EQ(a["strategy"], "token");
  EXPECT_EQ(a["dynamic"], true);
  EXPECT_EQ(a["num_bits"], 8);
}

TEST(QuantizationConfigJson, RejectsImpossibleSchemes) {
  EXPECT_THROW(quantization_config_json({.bits = 9}), Error);
  EXPECT_THROW(quantization_config_json({.bits = 4, .group_size = 0, .actorder = ActOrder::kGroup}),
               Error);
  EXPECT_THROW(
      quantization_config_json({.bits = 8, .input_activation_bits = 8, .format = "pack-quantized"}),
      Error);
  EXPECT_THROW(quantization_config_json({.bits = 4, .format = "marlin-24"}), Error);
}

TEST(SparsityConfigJson, HasTheKeysTheLibraryExpects) {
  const SparsityConfig s{.format = "sparse-24-bitmask",
                         .structure = "2:4",
                         .global_sparsity = 0.45,
                         .ignore = {"lm_head"}};
  const json j = sparsity_config_json(s);
  EXPECT_EQ(keys(j), (std::set<std::string>{"format", "global_sparsity", "ignore",
                                            "sparsity_structure", "targets"}));
  EXPECT_EQ(j["format"], "sparse-24-bitmask");
  EXPECT_EQ(j["sparsity_structure"], "2:4");
  EXPECT_EQ(j["targets"], json::array({"Linear"}));
  EXPECT_THROW(sparsity_config_json({.format = "sparse-24-bitmask"}), Error);  // unstructured
  EXPECT_THROW(sparsity_config_json({.format = "bitmask"}), Error);
  EXPECT_THROW(sparsity_config_json({.structure = "4:2"}), Error);
}

TEST(CompressionConfig, NestsTheSparsityBlockAsTheLibraryDoes) {
  json config = {{"model_type", "llama"}, {"quantization_config", {{"stale", true}}}};
  CompressionConfig c;
  c.sparsity = SparsityConfig{.global_sparsity = 0.5, .ignore = {"lm_head"}};
  write_compression_config(c, config);
  // Sparsity only: {quant_method, version, sparsity_config}.
  EXPECT_EQ(keys(config["quantization_config"]),
            (std::set<std::string>{"quant_method", "version", "sparsity_config"}));
  EXPECT_EQ(config["quantization_config"]["quant_method"], "compressed-tensors");
  EXPECT_EQ(config["model_type"], "llama");
  EXPECT_FALSE(config.contains("sparsa_config"));

  c.quantization =
      QuantizationConfig{.bits = 4, .group_size = 128, .symmetric = false, .ignore = {"lm_head"}};
  c.sparsity->format = "dense";  // the zeros live in weight_packed
  write_compression_config(c, config);
  const json& q = config["quantization_config"];
  EXPECT_EQ(q["format"], "pack-quantized");
  EXPECT_EQ(q["sparsity_config"]["format"], "dense");

  const CompressionConfig back = read_compression_config(config, "config.json");
  EXPECT_EQ(back.quantization, c.quantization);
  EXPECT_EQ(back.sparsity, c.sparsity);
  EXPECT_FALSE(back.sparsa.has_value());
  EXPECT_EQ(back.version, kCompressedTensorsVersion);

  write_compression_config({}, config);
  EXPECT_FALSE(config.contains("quantization_config"));
  const CompressionConfig none = read_compression_config(config, "config.json");
  EXPECT_FALSE(none.quantization || none.sparsity || none.sparsa);
}

TEST(CompressionConfig, ReadsConfigsTheLibraryWrote) {
  // As llm-compressor writes a W4A16 group-32 model (keys sorted, older fields included).
  const json config = json::parse(R"({
    "architectures": ["LlamaForCausalLM"],
    "quantization_config": {
      "config_groups": {"group_0": {
        "input_activations": null, "output_activations": null, "targets": ["Linear"],
        "weights": {"actorder": null, "block_structure": null, "dynamic": false,
                    "group_size": 32, "num_bits": 4, "observer": "minmax",
                    "observer_kwargs": {}, "strategy": "group", "symmetric": true,
                    "type": "int"}}},
      "format": "pack-quantized", "global_compression_ratio": null, "ignore": ["lm_head"],
      "kv_cache_scheme": null, "quant_method": "compressed-tensors",
      "quantization_status": "compressed", "version": "0.9.1",
      "sparsity_config": {"format": "dense", "global_sparsity": 0.14, "ignore": [],
                          "registry_requires_subclass": false,
                          "sparsity_structure": "unstructured", "targets": []}}})");
  const CompressionConfig c = read_compression_config(config, "config.json");
  ASSERT_TRUE(c.quantization.has_value());
  EXPECT_EQ(*c.quantization, (QuantizationConfig{.bits = 4,
                                                 .group_size = 32,
                                                 .symmetric = true,
                                                 .targets = {"Linear"},
                                                 .ignore = {"lm_head"},
                                                 .format = "pack-quantized"}));
  ASSERT_TRUE(c.sparsity.has_value());
  EXPECT_EQ(c.sparsity->format, "dense");
  EXPECT_DOUBLE_EQ(c.sparsity->global_sparsity, 0.14);
  EXPECT_EQ(c.version, "0.9.1");

  // The preset spelling of a group, and group_size -1 meaning per channel.
  const QuantizationConfig preset = parse_quantization_config(
      json::parse(R"({"config_groups": {"W4A16": ["Linear"]}, "format": "pack-quantized"})"), "p");
  EXPECT_EQ(preset.bits, 4);
  EXPECT_EQ(preset.group_size, 128);
  EXPECT_TRUE(preset.symmetric);
  const QuantizationConfig channel = parse_quantization_config(json::parse(R"({
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8,
                                                                 "group_size": -1}}}})"),
                                                               "c");
  EXPECT_EQ(channel.group_size, 0);
  EXPECT_EQ(channel.bits, 8);
  EXPECT_EQ(channel.actorder, ActOrder::kNone);
  const QuantizationConfig actorder = parse_quantization_config(json::parse(R"({
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4,
          "strategy": "group", "group_size": 128, "actorder": true}}}})"),
                                                                "a");
  EXPECT_EQ(actorder.actorder, ActOrder::kGroup);
}

TEST(CompressionConfig, RejectsWhatWeCannotRead) {
  auto err = [](const std::string& text) {
    return error_of([&] { read_compression_config(json::parse(text), "cfg.json"); });
  };
  EXPECT_NE(err(R"({"quantization_config": {"quant_method": "gptq", "bits": 4}})")
                .find("cfg.json: quantization_config.quant_method is 'gptq'"),
            std::string::npos);
  const std::string two_groups = R"({"quantization_config": {"config_groups": {
      "a": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "channel"}},
      "b": {"targets": ["lm_head"], "weights": {"num_bits": 8, "strategy": "channel"}}}}})";
  EXPECT_NE(err(two_groups).find("config_groups has 2 groups"), std::string::npos);
  EXPECT_NE(err(R"({"quantization_config": {"config_groups": {"g": {"targets": ["Linear"],
      "weights": {"num_bits": 16, "strategy": "channel"}}}}})")
                .find("quantization_config.config_groups.g.weights.num_bits must be in [1, 8]"),
            std::string::npos);
  EXPECT_NE(err(R"({"quantization_config": {"config_groups": {"g": {"targets": ["Linear"],
      "weights": {"num_bits": 4, "strategy": "channel", "bits": 4}}}}})")
                .find("unknown field quantization_config.config_groups.g.weights.bits"),
            std::string::npos);
  EXPECT_NE(err(R"({"quantization_config": {"config_groups": {"g": {"targets": ["Linear"],
      "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}}}}})")
                .find("weights.type must be 'int'"),
            std::string::npos);
  EXPECT_NE(err(R"({"quantization_config": {"kv_cache_scheme": {"num_bits": 8},
      "config_groups": {"W4A16": ["Linear"]}}})")
                .find("kv_cache_scheme"),
            std::string::npos);
  EXPECT_NE(err(R"({"quantization_config": {"sparsity_config": {"format": "marlin"}}})")
                .find("format must be 'sparse-bitmask', 'sparse-24-bitmask' or 'dense'"),
            std::string::npos);
  EXPECT_NE(err(R"({"sparsa_config": {"version": 1, "config_groups": {"g": {
      "format": "sparsa-palettized", "targets": ["Linear"], "bits": 4,
      "granularity": "per_tensor", "palette_group_rows": 8}}}})")
                .find("palette_group_rows needs granularity 'per_grouped_channel'"),
            std::string::npos);
}

TEST(SparsaConfig, RoundTripsTheExtensionBlock) {
  SparsaConfig s;
  s.groups.push_back({.format = SparsaFormat::kPalettized,
                      .targets = {"re:.*mlp.*"},
                      .bits = 3,
                      .palette_group_rows = 16});
  s.groups.push_back(
      {.format = SparsaFormat::kPalettized, .targets = {"re:.*self_attn.*"}, .bits = 4});
  s.groups.push_back({.format = SparsaFormat::kLowRank,
                      .targets = {"re:.*o_proj$"},
                      .bits = 4,
                      .method = "svd_whitened"});
  s.ignore = {"lm_head"};
  const json j = sparsa_config_json(s);
  EXPECT_EQ(j["version"], 1);
  EXPECT_EQ(j["config_groups"]["group_0"]["format"], "sparsa-palettized");
  EXPECT_EQ(j["config_groups"]["group_0"]["granularity"], "per_grouped_channel");
  EXPECT_EQ(j["config_groups"]["group_0"]["palette_group_rows"], 16);
  EXPECT_EQ(j["config_groups"]["group_1"]["granularity"], "per_tensor");
  EXPECT_EQ(j["config_groups"]["group_2"]["format"], "sparsa-low-rank");
  EXPECT_EQ(parse_sparsa_config(j, "x"), s);

  // Beside, not inside, quantization_config.
  json config = json::object();
  write_compression_config({.sparsa = s}, config);
  EXPECT_FALSE(config.contains("quantization_config"));
  EXPECT_EQ(read_compression_config(config, "x").sparsa, s);
}

TEST(SparsaConfig, PaletteIndicesPackLikeQuantizedCodes) {
  // weight_indices_packed uses pack-quantized's word layout with the indices as codes.
  const std::vector<uint8_t> indices = {7, 0, 3, 5, 1, 2, 6, 4, 7, 7, 1};
  const std::vector<int32_t> packed = pack_quantized(indices, 1, 11, 3);
  EXPECT_EQ(packed.size(), 2u);
  EXPECT_EQ(static_cast<uint32_t>(packed[1]), 1u);  // the 11th index alone in word 1
  EXPECT_EQ(unpack_quantized(packed, 1, 11, 3), indices);
}

}  // namespace
}  // namespace sparsa::io
