#include "sparsa/io/compressed_tensors.h"

#include <algorithm>
#include <bit>
#include <cctype>
#include <charconv>
#include <cstring>
#include <nlohmann/json.hpp>

#include "sparsa/core/error.h"

namespace sparsa::io {

namespace {

using nlohmann::json;

void check_bits(int bits, std::string_view what) {
  SPARSA_CHECK(bits >= 1 && bits <= 8, "{}: bits must be in 1..8, got {}", what, bits);
}

void check_shape(int64_t rows, int64_t cols, size_t size, size_t elem, std::string_view what,
                 std::string_view buffer) {
  SPARSA_CHECK(rows >= 0 && cols >= 0, "{}: negative shape [{}, {}]", what, rows, cols);
  SPARSA_CHECK(cols == 0 || rows <= INT64_MAX / cols, "{}: shape [{}, {}] overflows", what, rows,
               cols);
  SPARSA_CHECK(size == static_cast<size_t>(rows * cols) * elem,
               "{}: {} holds {} bytes, expected {} for shape [{}, {}]", what, buffer, size,
               static_cast<size_t>(rows * cols) * elem, rows, cols);
}

std::vector<int32_t> as_int32(const std::vector<uint32_t>& words) {
  std::vector<int32_t> out(words.size());
  std::transform(words.begin(), words.end(), out.begin(),
                 [](uint32_t w) { return std::bit_cast<int32_t>(w); });
  return out;
}

bool is_nonzero(const uint8_t* p, DType t) {
  switch (t) {
    case DType::F32: {
      uint32_t v;
      std::memcpy(&v, p, 4);
      return (v & 0x7fffffffu) != 0;
    }
    case DType::F64: {
      uint64_t v;
      std::memcpy(&v, p, 8);
      return (v & 0x7fffffffffffffffull) != 0;
    }
    case DType::F16:
    case DType::BF16: {
      uint16_t v;
      std::memcpy(&v, p, 2);
      return (v & 0x7fffu) != 0;
    }
    default:
      for (size_t i = 0; i < dtype_size(t); ++i) {
        if (p[i] != 0) return true;
      }
      return false;
  }
}

bool bit(std::span<const uint8_t> mask, int64_t row_bytes, int64_t r, int64_t c) {
  return (mask[static_cast<size_t>(r * row_bytes + c / 8)] >> (c % 8)) & 1u;
}

std::vector<uint8_t> scatter_bitmask(std::span<const uint8_t> compressed,
                                     std::span<const uint8_t> bitmask, int64_t rows, int64_t cols,
                                     DType dtype, std::string_view what) {
  const size_t es = dtype_size(dtype);
  const int64_t rb = bitmask_row_bytes(cols);
  check_shape(rows, rb, bitmask.size(), 1, what, "bitmask");
  SPARSA_CHECK(compressed.size() % es == 0,
               "{}: compressed holds {} bytes, not a whole number of {}", what, compressed.size(),
               dtype_name(dtype));
  std::vector<uint8_t> dense(static_cast<size_t>(rows * cols) * es, 0);
  size_t k = 0;
  const size_t n = compressed.size() / es;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      if (!bit(bitmask, rb, r, c)) continue;
      SPARSA_CHECK(k < n, "{}: the bitmask sets more bits than compressed holds values ({})", what,
                   n);
      std::memcpy(dense.data() + static_cast<size_t>(r * cols + c) * es, compressed.data() + k * es,
                  es);
      ++k;
    }
  }
  SPARSA_CHECK(k == n, "{}: compressed holds {} values but the bitmask sets {} bits", what, n, k);
  return dense;
}

// ---- JSON helpers -------------------------------------------------------------------------------

const json* field(const json& j, const char* key) {
  auto it = j.find(key);
  return (it == j.end() || it->is_null()) ? nullptr : &*it;
}

const json& object_at(const json& j, const std::string& src, const std::string& path) {
  SPARSA_CHECK(j.is_object(), "{}: {} must be an object, got {}", src, path, j.dump());
  return j;
}

std::string get_string(const json& j, const char* key, const std::string& src,
                       const std::string& path, std::optional<std::string> def = std::nullopt) {
  const json* v = field(j, key);
  if (v == nullptr) {
    SPARSA_CHECK(def.has_value(), "{}: missing required field {}.{}", src, path, key);
    return *def;
  }
  SPARSA_CHECK(v->is_string(), "{}: {}.{} must be a string, got {}", src, path, key, v->dump());
  return v->get<std::string>();
}

int64_t get_int(const json& j, const char* key, const std::string& src, const std::string& path,
                int64_t lo, int64_t hi, std::optional<int64_t> def = std::nullopt) {
  const json* v = field(j, key);
  if (v == nullptr) {
    SPARSA_CHECK(def.has_value(), "{}: missing required field {}.{}", src, path, key);
    return *def;
  }
  SPARSA_CHECK(v->is_number_integer(), "{}: {}.{} must be an integer, got {}", src, path, key,
               v->dump());
  const int64_t x = v->get<int64_t>();
  SPARSA_CHECK(x >= lo && x <= hi, "{}: {}.{} must be in [{}, {}], got {}", src, path, key, lo, hi,
               x);
  return x;
}

bool get_bool(const json& j, const char* key, const std::string& src, const std::string& path,
              bool def) {
  const json* v = field(j, key);
  if (v == nullptr) return def;
  SPARSA_CHECK(v->is_boolean(), "{}: {}.{} must be true or false, got {}", src, path, key,
               v->dump());
  return v->get<bool>();
}

std::vector<std::string> get_strings(const json& j, const char* key, const std::string& src,
                                     const std::string& path, std::vector<std::string> def = {}) {
  const json* v = field(j, key);
  if (v == nullptr) return def;
  if (v->is_string()) return {v->get<std::string>()};
  SPARSA_CHECK(v->is_array(), "{}: {}.{} must be a list of strings, got {}", src, path, key,
               v->dump());
  std::vector<std::string> out;
  for (const json& s : *v) {
    SPARSA_CHECK(s.is_string(), "{}: {}.{} must be a list of strings, got {}", src, path, key,
                 v->dump());
    out.push_back(s.get<std::string>());
  }
  return out;
}

void check_keys(const json& j, std::initializer_list<std::string_view> known,
                const std::string& src, const std::string& path) {
  for (const auto& [k, v] : j.items()) {
    SPARSA_CHECK(std::find(known.begin(), known.end(), k) != known.end(), "{}: unknown field {}.{}",
                 src, path, k);
  }
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool parse_nm(const std::string& s, int* n, int* m) {
  const size_t colon = s.find(':');
  if (colon == std::string::npos) return false;
  auto num = [](std::string_view t, int* out) {
    auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), *out);
    return ec == std::errc() && p == t.data() + t.size() && !t.empty();
  };
  return num(std::string_view(s).substr(0, colon), n) &&
         num(std::string_view(s).substr(colon + 1), m);
}

void check_structure(const std::string& s, const std::string& what) {
  if (s == "unstructured") return;
  int n = 0, m = 0;
  SPARSA_CHECK(parse_nm(s, &n, &m) && n > 0 && n < m,
               "{}: sparsity structure must be 'unstructured' or 'N:M' with 0 < N < M, got '{}'",
               what, s);
}

json actorder_json(ActOrder a) {
  switch (a) {
    case ActOrder::kGroup:
      return "group";
    case ActOrder::kWeight:
      return "weight";
    case ActOrder::kNone:
      break;
  }
  return nullptr;
}

void validate(const QuantizationConfig& q) {
  const std::string what = "quantization_config";
  check_bits(q.bits, what);
  SPARSA_CHECK(q.group_size >= 0, "{}: group_size must be > 0, or 0 for per channel, got {}", what,
               q.group_size);
  SPARSA_CHECK(q.input_activation_bits == 0 || q.input_activation_bits == 8,
               "{}: input activations are int8 (8) or not quantized (0), got {}", what,
               q.input_activation_bits);
  SPARSA_CHECK(q.actorder != ActOrder::kGroup || q.group_size > 0,
               "{}: actorder 'group' needs a group_size", what);
  const std::string f = q.resolved_format();
  SPARSA_CHECK(f == "pack-quantized" || f == "int-quantized",
               "{}: format must be 'pack-quantized' or 'int-quantized', got '{}'", what, f);
  SPARSA_CHECK(f != "pack-quantized" || q.input_activation_bits == 0,
               "{}: pack-quantized stores weight-only schemes; W8A8 is 'int-quantized'", what);
  SPARSA_CHECK(!q.targets.empty(), "{}: targets must not be empty", what);
}

void validate(const SparsityConfig& s) {
  const std::string what = "sparsity_config";
  SPARSA_CHECK(
      s.format == "sparse-bitmask" || s.format == "sparse-24-bitmask" || s.format == "dense",
      "{}: format must be 'sparse-bitmask', 'sparse-24-bitmask' or 'dense', got '{}'", what,
      s.format);
  check_structure(s.structure, what);
  SPARSA_CHECK(s.format != "sparse-24-bitmask" || s.structure == "2:4",
               "{}: format 'sparse-24-bitmask' needs structure '2:4', got '{}'", what, s.structure);
  SPARSA_CHECK(s.global_sparsity >= 0 && s.global_sparsity <= 1,
               "{}: global_sparsity must be in [0, 1], got {}", what, s.global_sparsity);
}

json weight_args(const QuantizationConfig& q) {
  return json{{"num_bits", q.bits},
              {"type", "int"},
              {"symmetric", q.symmetric},
              {"strategy", q.group_size > 0 ? "group" : "channel"},
              {"group_size", q.group_size > 0 ? json(q.group_size) : json(nullptr)},
              {"block_structure", nullptr},
              {"dynamic", false},
              {"actorder", actorder_json(q.actorder)},
              {"observer", "minmax"},
              {"observer_kwargs", json::object()}};
}

json token_int8_args() {
  return json{{"num_bits", 8},         {"type", "int"},
              {"symmetric", true},     {"strategy", "token"},
              {"group_size", nullptr}, {"block_structure", nullptr},
              {"dynamic", true},       {"actorder", nullptr},
              {"observer", nullptr},   {"observer_kwargs", json::object()}};
}

ActOrder parse_actorder(const json& j, const std::string& src, const std::string& path) {
  const json* v = field(j, "actorder");
  if (v == nullptr) return ActOrder::kNone;
  if (v->is_boolean()) return v->get<bool>() ? ActOrder::kGroup : ActOrder::kNone;
  SPARSA_CHECK(v->is_string(), "{}: {}.actorder must be null, a boolean or a string, got {}", src,
               path, v->dump());
  const std::string a = lower(v->get<std::string>());
  if (a == "group" || a == "dynamic") return ActOrder::kGroup;
  if (a == "weight" || a == "static") return ActOrder::kWeight;
  fail("{}: {}.actorder must be 'group' or 'weight', got '{}'", src, path, a);
}

void parse_weights(const json& w, const std::string& src, const std::string& path,
                   QuantizationConfig& q) {
  object_at(w, src, path);
  check_keys(w,
             {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure",
              "dynamic", "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"},
             src, path);
  q.bits = static_cast<int>(get_int(w, "num_bits", src, path, 1, 8, 8));
  const std::string type = lower(get_string(w, "type", src, path, "int"));
  SPARSA_CHECK(type == "int", "{}: {}.type must be 'int', got '{}'", src, path, type);
  q.symmetric = get_bool(w, "symmetric", src, path, true);
  SPARSA_CHECK(field(w, "block_structure") == nullptr, "{}: {}.block_structure is not supported",
               src, path);
  const json* dyn = field(w, "dynamic");
  SPARSA_CHECK(dyn == nullptr || (dyn->is_boolean() && !dyn->get<bool>()),
               "{}: {}.dynamic must be false for weights, got {}", src, path,
               dyn ? dyn->dump() : "");
  const json* gs = field(w, "group_size");
  std::optional<int64_t> group;
  if (gs != nullptr) group = get_int(w, "group_size", src, path, -1, INT32_MAX);
  std::string strategy;
  if (field(w, "strategy") != nullptr) {
    strategy = lower(get_string(w, "strategy", src, path));
  } else if (group && *group > 0) {
    strategy = "group";
  } else if (group && *group == -1) {
    strategy = "channel";
  } else {
    strategy = "tensor";
  }
  if (strategy == "group") {
    SPARSA_CHECK(group && *group > 0, "{}: {}.strategy 'group' needs group_size > 0", src, path);
    q.group_size = *group;
  } else if (strategy == "channel") {
    SPARSA_CHECK(!group || *group == -1, "{}: {}.strategy 'channel' takes no group_size, got {}",
                 src, path, group.value_or(0));
    q.group_size = 0;
  } else {
    fail(
        "{}: {}.strategy must be 'group' or 'channel' (per-tensor and block weights are not "
        "supported), got '{}'",
        src, path, strategy);
  }
  q.actorder = parse_actorder(w, src, path);
}

int parse_input_activations(const json& a, const std::string& src, const std::string& path) {
  object_at(a, src, path);
  const bool ok = get_int(a, "num_bits", src, path, 1, 64, 8) == 8 &&
                  lower(get_string(a, "type", src, path, "int")) == "int" &&
                  lower(get_string(a, "strategy", src, path, "")) == "token" &&
                  field(a, "dynamic") != nullptr && a["dynamic"] == true;
  SPARSA_CHECK(ok, "{}: {} supports only dynamic per-token int8 activations, got {}", src, path,
               a.dump());
  return 8;
}

}  // namespace

// ---- pack-quantized -----------------------------------------------------------------------------

int64_t packed_words(int64_t n, int bits) {
  check_bits(bits, "packed_words");
  SPARSA_CHECK(n >= 0, "packed_words: negative count {}", n);
  const int64_t per_word = 32 / bits;
  return (n + per_word - 1) / per_word;
}

std::vector<int32_t> pack_quantized(std::span<const uint8_t> codes, int64_t rows, int64_t cols,
                                    int bits) {
  check_bits(bits, "pack_quantized");
  check_shape(rows, cols, codes.size(), 1, "pack_quantized", "codes");
  const int64_t per_word = 32 / bits;
  const int64_t words = packed_words(cols, bits);
  std::vector<uint32_t> packed(static_cast<size_t>(rows * words), 0);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = codes.data() + r * cols;
    uint32_t* out = packed.data() + r * words;
    for (int64_t c = 0; c < cols; ++c) {
      SPARSA_CHECK(row[c] >> bits == 0,
                   "pack_quantized: code {} at row {}, column {} does not fit in {} bits", row[c],
                   r, c, bits);
      out[c / per_word] |= static_cast<uint32_t>(row[c]) << (bits * (c % per_word));
    }
  }
  return as_int32(packed);
}

std::vector<uint8_t> unpack_quantized(std::span<const int32_t> packed, int64_t rows, int64_t cols,
                                      int bits) {
  check_bits(bits, "unpack_quantized");
  const int64_t per_word = 32 / bits;
  const int64_t words = packed_words(cols, bits);
  check_shape(rows, words, packed.size(), 1, "unpack_quantized", "weight_packed (in words)");
  const uint32_t mask = (1u << bits) - 1;
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* in = packed.data() + r * words;
    for (int64_t c = 0; c < cols; ++c) {
      const uint32_t w = static_cast<uint32_t>(in[c / per_word]);
      codes[static_cast<size_t>(r * cols + c)] =
          static_cast<uint8_t>((w >> (bits * (c % per_word))) & mask);
    }
  }
  return codes;
}

std::vector<int32_t> pack_zero_points(std::span<const uint8_t> zero_points, int64_t rows,
                                      int64_t n_groups, int bits) {
  check_bits(bits, "pack_zero_points");
  check_shape(rows, n_groups, zero_points.size(), 1, "pack_zero_points", "zero_points");
  const int64_t per_word = 32 / bits;
  const int64_t words = packed_words(rows, bits);
  std::vector<uint32_t> packed(static_cast<size_t>(words * n_groups), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < n_groups; ++g) {
      const uint8_t z = zero_points[static_cast<size_t>(r * n_groups + g)];
      SPARSA_CHECK(z >> bits == 0,
                   "pack_zero_points: zero point {} at row {}, group {} does not fit in {} bits", z,
                   r, g, bits);
      packed[static_cast<size_t>((r / per_word) * n_groups + g)] |= static_cast<uint32_t>(z)
                                                                    << (bits * (r % per_word));
    }
  }
  return as_int32(packed);
}

std::vector<uint8_t> unpack_zero_points(std::span<const int32_t> packed, int64_t rows,
                                        int64_t n_groups, int bits) {
  check_bits(bits, "unpack_zero_points");
  const int64_t per_word = 32 / bits;
  check_shape(packed_words(rows, bits), n_groups, packed.size(), 1, "unpack_zero_points",
              "weight_zero_point (in words)");
  const uint32_t mask = (1u << bits) - 1;
  std::vector<uint8_t> zp(static_cast<size_t>(rows * n_groups));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < n_groups; ++g) {
      const uint32_t w =
          static_cast<uint32_t>(packed[static_cast<size_t>((r / per_word) * n_groups + g)]);
      zp[static_cast<size_t>(r * n_groups + g)] =
          static_cast<uint8_t>((w >> (bits * (r % per_word))) & mask);
    }
  }
  return zp;
}

// ---- sparse bitmasks ----------------------------------------------------------------------------

SparseBitmask sparse_bitmask_compress(const void* dense, int64_t rows, int64_t cols, DType dtype) {
  const size_t es = dtype_size(dtype);
  SPARSA_CHECK(rows >= 0 && cols >= 0, "sparse_bitmask_compress: negative shape [{}, {}]", rows,
               cols);
  SPARSA_CHECK(dense != nullptr || rows * cols == 0, "sparse_bitmask_compress: null input");
  const auto* in = static_cast<const uint8_t*>(dense);
  const int64_t rb = bitmask_row_bytes(cols);
  SparseBitmask s;
  s.dtype = dtype;
  s.bitmask.assign(static_cast<size_t>(rows * rb), 0);
  s.row_offsets.resize(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    s.row_offsets[static_cast<size_t>(r)] = s.nnz;
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t* v = in + static_cast<size_t>(r * cols + c) * es;
      if (!is_nonzero(v, dtype)) continue;
      s.bitmask[static_cast<size_t>(r * rb + c / 8)] |= static_cast<uint8_t>(1u << (c % 8));
      s.compressed.insert(s.compressed.end(), v, v + es);
      ++s.nnz;
    }
  }
  return s;
}

std::vector<uint8_t> sparse_bitmask_decompress(std::span<const uint8_t> compressed,
                                               std::span<const uint8_t> bitmask,
                                               std::span<const int64_t> row_offsets, int64_t rows,
                                               int64_t cols, DType dtype) {
  const std::string_view what = "sparse_bitmask_decompress";
  SPARSA_CHECK(rows >= 0 && cols >= 0, "{}: negative shape [{}, {}]", what, rows, cols);
  if (!row_offsets.empty()) {
    SPARSA_CHECK(row_offsets.size() == static_cast<size_t>(rows),
                 "{}: row_offsets holds {} entries for {} rows", what, row_offsets.size(), rows);
    const int64_t rb = bitmask_row_bytes(cols);
    check_shape(rows, rb, bitmask.size(), 1, what, "bitmask");
    int64_t offset = 0;
    for (int64_t r = 0; r < rows; ++r) {
      SPARSA_CHECK(row_offsets[static_cast<size_t>(r)] == offset,
                   "{}: row_offsets[{}] is {} but the bitmask puts row {} at {}", what, r,
                   row_offsets[static_cast<size_t>(r)], r, offset);
      for (int64_t c = 0; c < cols; ++c) offset += bit(bitmask, rb, r, c);
    }
  }
  return scatter_bitmask(compressed, bitmask, rows, cols, dtype, what);
}

Sparse24Bitmask sparse_24_bitmask_compress(const void* dense, int64_t rows, int64_t cols,
                                           DType dtype) {
  const std::string_view what = "sparse_24_bitmask_compress";
  SPARSA_CHECK(rows >= 0 && cols >= 0, "{}: negative shape [{}, {}]", what, rows, cols);
  SPARSA_CHECK(cols % 4 == 0, "{}: columns ({}) must be a multiple of 4", what, cols);
  SPARSA_CHECK(dense != nullptr || rows * cols == 0, "{}: null input", what);
  const size_t es = dtype_size(dtype);
  const auto* in = static_cast<const uint8_t*>(dense);
  const int64_t rb = bitmask_row_bytes(cols);
  Sparse24Bitmask s;
  s.dtype = dtype;
  s.bitmask.assign(static_cast<size_t>(rows * rb), 0);
  s.compressed.reserve(static_cast<size_t>(rows * cols / 2) * es);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c0 = 0; c0 < cols; c0 += 4) {
      bool keep[4];
      int nonzero = 0;
      for (int i = 0; i < 4; ++i) {
        keep[i] = is_nonzero(in + static_cast<size_t>(r * cols + c0 + i) * es, dtype);
        nonzero += keep[i];
      }
      SPARSA_CHECK(nonzero <= 2,
                   "{}: row {}, columns {}..{} hold {} nonzero values; not 2:4 sparse", what, r, c0,
                   c0 + 3, nonzero);
      for (int i = 0; i < 4 && nonzero < 2; ++i) {
        if (!keep[i]) keep[i] = true, ++nonzero;
      }
      for (int i = 0; i < 4; ++i) {
        if (!keep[i]) continue;
        const int64_t c = c0 + i;
        s.bitmask[static_cast<size_t>(r * rb + c / 8)] |= static_cast<uint8_t>(1u << (c % 8));
        const uint8_t* v = in + static_cast<size_t>(r * cols + c) * es;
        s.compressed.insert(s.compressed.end(), v, v + es);
      }
    }
  }
  return s;
}

std::vector<uint8_t> sparse_24_bitmask_decompress(std::span<const uint8_t> compressed,
                                                  std::span<const uint8_t> bitmask, int64_t rows,
                                                  int64_t cols, DType dtype) {
  const std::string_view what = "sparse_24_bitmask_decompress";
  SPARSA_CHECK(rows >= 0 && cols >= 0 && cols % 4 == 0,
               "{}: shape [{}, {}] needs a multiple of 4 columns", what, rows, cols);
  check_shape(rows, cols / 2, compressed.size(), dtype_size(dtype), what, "compressed");
  const int64_t rb = bitmask_row_bytes(cols);
  check_shape(rows, rb, bitmask.size(), 1, what, "bitmask");
  for (int64_t r = 0; r < rows; ++r) {
    int64_t kept = 0;
    for (int64_t c = 0; c < cols; ++c) kept += bit(bitmask, rb, r, c);
    SPARSA_CHECK(kept == cols / 2, "{}: row {} of the bitmask keeps {} of {} columns, expected {}",
                 what, r, kept, cols, cols / 2);
  }
  return scatter_bitmask(compressed, bitmask, rows, cols, dtype, what);
}

// ---- config.json blocks -------------------------------------------------------------------------

std::string QuantizationConfig::resolved_format() const {
  if (!format.empty()) return format;
  return input_activation_bits > 0 ? "int-quantized" : "pack-quantized";
}

bool QuantizationConfig::operator==(const QuantizationConfig& o) const {
  return bits == o.bits && group_size == o.group_size && symmetric == o.symmetric &&
         actorder == o.actorder && input_activation_bits == o.input_activation_bits &&
         targets == o.targets && ignore == o.ignore && resolved_format() == o.resolved_format();
}

std::string_view sparsa_format_name(SparsaFormat f) {
  return f == SparsaFormat::kPalettized ? "sparsa-palettized" : "sparsa-low-rank";
}

json quantization_config_json(const QuantizationConfig& q) {
  validate(q);
  json group{{"targets", q.targets},
             {"weights", weight_args(q)},
             {"input_activations", q.input_activation_bits ? token_int8_args() : json(nullptr)},
             {"output_activations", nullptr}};
  return json{{"config_groups", json{{"group_0", group}}},
              {"format", q.resolved_format()},
              {"global_compression_ratio", nullptr},
              {"ignore", q.ignore},
              {"kv_cache_scheme", nullptr},
              {"quant_method", "compressed-tensors"},
              {"quantization_status", "compressed"},
              {"version", kCompressedTensorsVersion}};
}

json sparsity_config_json(const SparsityConfig& s) {
  validate(s);
  return json{{"format", s.format},
              {"global_sparsity", s.global_sparsity},
              {"ignore", s.ignore},
              {"sparsity_structure", s.structure},
              {"targets", s.targets}};
}

json sparsa_config_json(const SparsaConfig& s) {
  json groups = json::object();
  for (size_t i = 0; i < s.groups.size(); ++i) {
    const SparsaGroup& g = s.groups[i];
    SPARSA_CHECK(!g.targets.empty(), "sparsa_config: group_{} has no targets", i);
    json j{{"format", sparsa_format_name(g.format)}, {"targets", g.targets}};
    if (g.format == SparsaFormat::kPalettized) {
      check_bits(g.bits, "sparsa_config");
      SPARSA_CHECK(g.palette_group_rows >= 0, "sparsa_config: group_{}: palette_group_rows {} < 0",
                   i, g.palette_group_rows);
      j["bits"] = g.bits;
      j["granularity"] = g.palette_group_rows > 0 ? "per_grouped_channel" : "per_tensor";
      if (g.palette_group_rows > 0) j["palette_group_rows"] = g.palette_group_rows;
    } else {
      j["method"] = g.method.empty() ? "svd" : g.method;
    }
    groups[fmt::format("group_{}", i)] = std::move(j);
  }
  return json{{"version", 1}, {"config_groups", std::move(groups)}, {"ignore", s.ignore}};
}

QuantizationConfig parse_quantization_config(const json& block, const std::string& source) {
  const std::string path = "quantization_config";
  object_at(block, source, path);
  const std::string method = get_string(block, "quant_method", source, path, "compressed-tensors");
  SPARSA_CHECK(method == "compressed-tensors",
               "{}: {}.quant_method is '{}'; only 'compressed-tensors' checkpoints are read",
               source, path, method);
  SPARSA_CHECK(field(block, "kv_cache_scheme") == nullptr,
               "{}: {}.kv_cache_scheme (a quantized KV cache) is not supported", source, path);
  const json* groups = field(block, "config_groups");
  SPARSA_CHECK(groups != nullptr && groups->is_object() && !groups->empty(),
               "{}: {}.config_groups must be a non-empty object", source, path);
  SPARSA_CHECK(groups->size() == 1,
               "{}: {}.config_groups has {} groups; one quantization scheme per model is supported",
               source, path, groups->size());
  QuantizationConfig q;
  const std::string name = groups->begin().key();
  const json& group = groups->begin().value();
  const std::string gpath = path + ".config_groups." + name;
  if (group.is_array()) {
    const std::string preset = [&] {
      std::string u = name;
      for (char& c : u) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      return u;
    }();
    q.targets = get_strings(*groups, name.c_str(), source, path + ".config_groups");
    if (preset == "W4A16" || preset == "W4A16_ASYM") {
      q.bits = 4, q.group_size = 128, q.symmetric = preset == "W4A16";
    } else if (preset == "W8A16") {
      q.bits = 8, q.group_size = 128, q.symmetric = true;
    } else if (preset == "W8A8" || preset == "INT8") {
      q.bits = 8, q.group_size = 0, q.symmetric = true, q.input_activation_bits = 8;
    } else {
      fail("{}: {}: unknown preset scheme '{}' (supported: W4A16, W4A16_ASYM, W8A16, W8A8)", source,
           gpath, name);
    }
  } else {
    object_at(group, source, gpath);
    check_keys(group, {"targets", "weights", "input_activations", "output_activations", "format"},
               source, gpath);
    q.targets = get_strings(group, "targets", source, gpath);
    SPARSA_CHECK(!q.targets.empty(), "{}: {}.targets must name at least one module", source, gpath);
    const json* w = field(group, "weights");
    SPARSA_CHECK(w != nullptr,
                 "{}: {}.weights is missing: activation-only schemes are not "
                 "supported",
                 source, gpath);
    parse_weights(*w, source, gpath + ".weights", q);
    if (const json* a = field(group, "input_activations")) {
      q.input_activation_bits = parse_input_activations(*a, source, gpath + ".input_activations");
    }
    SPARSA_CHECK(field(group, "output_activations") == nullptr,
                 "{}: {}.output_activations is not supported", source, gpath);
  }
  q.ignore = get_strings(block, "ignore", source, path);
  q.format = get_string(block, "format", source, path, q.resolved_format());
  SPARSA_CHECK(q.format == "pack-quantized" || q.format == "int-quantized",
               "{}: {}.format '{}' is not supported (supported: pack-quantized, int-quantized)",
               source, path, q.format);
  SPARSA_CHECK(q.actorder != ActOrder::kGroup || q.group_size > 0,
               "{}: {}: actorder 'group' needs strategy 'group'", source, gpath);
  return q;
}

SparsityConfig parse_sparsity_config(const json& block, const std::string& source) {
  const std::string path = "sparsity_config";
  object_at(block, source, path);
  SparsityConfig s;
  s.format = get_string(block, "format", source, path);
  std::string st = lower(get_string(block, "sparsity_structure", source, path, "unstructured"));
  if (st == "0:0") st = "unstructured";
  s.structure = st;
  if (const json* g = field(block, "global_sparsity")) {
    SPARSA_CHECK(g->is_number(), "{}: {}.global_sparsity must be a number, got {}", source, path,
                 g->dump());
    s.global_sparsity = g->get<double>();
  }
  s.targets = get_strings(block, "targets", source, path, {"Linear"});
  s.ignore = get_strings(block, "ignore", source, path);
  try {
    validate(s);
  } catch (const Error& e) {
    fail("{}: {}", source, e.what());
  }
  return s;
}

SparsaConfig parse_sparsa_config(const json& block, const std::string& source) {
  const std::string path = "sparsa_config";
  object_at(block, source, path);
  check_keys(block, {"version", "config_groups", "ignore"}, source, path);
  get_int(block, "version", source, path, 1, 1);
  SparsaConfig s;
  s.ignore = get_strings(block, "ignore", source, path);
  const json* groups = field(block, "config_groups");
  SPARSA_CHECK(groups != nullptr && groups->is_object() && !groups->empty(),
               "{}: {}.config_groups must be a non-empty object", source, path);
  for (const auto& [name, g] : groups->items()) {
    const std::string gpath = path + ".config_groups." + name;
    object_at(g, source, gpath);
    SparsaGroup out;
    const std::string format = get_string(g, "format", source, gpath);
    out.targets = get_strings(g, "targets", source, gpath);
    SPARSA_CHECK(!out.targets.empty(), "{}: {}.targets must name at least one module", source,
                 gpath);
    if (format == "sparsa-palettized") {
      check_keys(g, {"format", "targets", "bits", "granularity", "palette_group_rows"}, source,
                 gpath);
      out.format = SparsaFormat::kPalettized;
      out.bits = static_cast<int>(get_int(g, "bits", source, gpath, 1, 8));
      const std::string gran = get_string(g, "granularity", source, gpath);
      if (gran == "per_grouped_channel") {
        out.palette_group_rows = get_int(g, "palette_group_rows", source, gpath, 1, INT64_MAX);
      } else {
        SPARSA_CHECK(gran == "per_tensor",
                     "{}: {}.granularity must be 'per_tensor' or 'per_grouped_channel', got '{}'",
                     source, gpath, gran);
        SPARSA_CHECK(field(g, "palette_group_rows") == nullptr,
                     "{}: {}.palette_group_rows needs granularity 'per_grouped_channel'", source,
                     gpath);
      }
    } else if (format == "sparsa-low-rank") {
      check_keys(g, {"format", "targets", "method"}, source, gpath);
      out.format = SparsaFormat::kLowRank;
      out.method = get_string(g, "method", source, gpath, "svd");
    } else {
      fail("{}: {}.format must be 'sparsa-palettized' or 'sparsa-low-rank', got '{}'", source,
           gpath, format);
    }
    s.groups.push_back(std::move(out));
  }
  return s;
}

void write_compression_config(const CompressionConfig& c, json& config_json) {
  SPARSA_CHECK(config_json.is_object(), "write_compression_config: config.json is not an object");
  config_json.erase("quantization_config");
  config_json.erase("compression_config");
  config_json.erase("sparsa_config");
  if (c.quantization || c.sparsity) {
    json block = c.quantization ? quantization_config_json(*c.quantization)
                                : json{{"quant_method", "compressed-tensors"},
                                       {"version", kCompressedTensorsVersion}};
    if (c.sparsity) block["sparsity_config"] = sparsity_config_json(*c.sparsity);
    config_json["quantization_config"] = std::move(block);
  }
  if (c.sparsa) config_json["sparsa_config"] = sparsa_config_json(*c.sparsa);
}

CompressionConfig read_compression_config(const json& config_json, const std::string& source) {
  object_at(config_json, source, "config.json");
  CompressionConfig c;
  const json* block = field(config_json, "quantization_config");
  if (block == nullptr) block = field(config_json, "compression_config");
  if (block != nullptr) {
    object_at(*block, source, "quantization_config");
    const std::string method =
        get_string(*block, "quant_method", source, "quantization_config", "compressed-tensors");
    SPARSA_CHECK(method == "compressed-tensors",
                 "{}: quantization_config.quant_method is '{}'; only 'compressed-tensors' "
                 "checkpoints are read",
                 source, method);
    c.version = get_string(*block, "version", source, "quantization_config", "");
    if (field(*block, "config_groups") != nullptr) {
      c.quantization = parse_quantization_config(*block, source);
    }
    if (const json* s = field(*block, "sparsity_config")) {
      c.sparsity = parse_sparsity_config(*s, source);
    }
  }
  if (const json* s = field(config_json, "sparsa_config")) {
    c.sparsa = parse_sparsa_config(*s, source);
  }
  return c;
}

}  // namespace sparsa::io
