// Reading one linear weight of a compressed-tensors checkpoint (or our extensions): its stored
// parts, validated (read_stored_weight), and their f32 decoding (decode_weight).
#include <cstring>
#include <string>
#include <vector>

#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"
#include "sparsa/io/compressed_tensors.h"
#include "sparsa/io/safetensors.h"

namespace sparsa::io {

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

const TensorView& get(const Checkpoint& ck, const std::string& name,
                      const std::vector<int64_t>& shape) {
  const TensorView& t = ck.get(name);
  SPARSA_CHECK(t.shape == shape, "{}: tensor '{}' has shape {}; expected {}", t.file, name,
               shape_str(t.shape), shape_str(shape));
  return t;
}

void expect_dtype(const TensorView& t, std::initializer_list<DType> ok) {
  for (DType d : ok)
    if (t.dtype == d) return;
  std::string names;
  for (DType d : ok) names += (names.empty() ? "" : " or ") + std::string(dtype_name(d));
  fail("{}: tensor '{}' has dtype {}; expected {}", t.file, t.name, dtype_name(t.dtype), names);
}

// Float values (F32/F16/BF16, raw bytes) to f32.
std::vector<float> floats(DType dtype, const uint8_t* data, size_t n) {
  std::vector<float> out(n);
  if (dtype == DType::F32) {
    std::memcpy(out.data(), data, n * sizeof(float));
  } else {
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, data + 2 * i, 2);
      out[i] = dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
  return out;
}

std::vector<float> floats(const TensorView& t) {
  expect_dtype(t, {DType::F32, DType::F16, DType::BF16});
  return floats(t.dtype, t.data, static_cast<size_t>(t.numel()));
}

template <class T>
std::vector<T> ints(const TensorView& t, DType want) {
  expect_dtype(t, {want});
  std::vector<T> out(static_cast<size_t>(t.numel()));
  std::memcpy(out.data(), t.data, out.size() * sizeof(T));
  return out;
}

void check_shape_tensor(const Checkpoint& ck, const std::string& name, int64_t rows, int64_t cols) {
  const TensorView& t = ck.get(name);
  expect_dtype(t, {DType::I64, DType::I32});
  SPARSA_CHECK(t.numel() == 2, "{}: tensor '{}' should hold 2 dimensions, holds {}", t.file, name,
               t.numel());
  int64_t v[2];
  for (int i = 0; i < 2; ++i) {
    if (t.dtype == DType::I64) {
      std::memcpy(&v[i], t.data + 8 * i, 8);
    } else {
      int32_t x;
      std::memcpy(&x, t.data + 4 * i, 4);
      v[i] = x;
    }
  }
  SPARSA_CHECK(v[0] == rows && v[1] == cols,
               "{}: tensor '{}' says [{}, {}]; the config implies [{}, {}]", t.file, name, v[0],
               v[1], rows, cols);
}

// weight_packed int32 [rows, packed_words(cols, B)] to codes [rows, cols], straight from the
// mapped tensor: the layout of unpack_quantized (value i of a word in bits [i·B, (i+1)·B)), with
// the word's values unrolled (this runs over every weight of a model at load).
template <int B>
void unpack_rows(const uint8_t* packed, int64_t rows, int64_t cols, uint8_t* codes) {
  constexpr int kPerWord = 32 / B;
  constexpr uint32_t kMask = (1u << B) - 1;
  const int64_t words = packed_words(cols, B);
  const int64_t full = cols / kPerWord;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* in = packed + r * words * 4;
    uint8_t* out = codes + r * cols;
    for (int64_t w = 0; w < full; ++w) {
      uint32_t v;
      std::memcpy(&v, in + 4 * w, 4);
      for (int i = 0; i < kPerWord; ++i)
        out[w * kPerWord + i] = static_cast<uint8_t>((v >> (B * i)) & kMask);
    }
    if (full < words) {
      uint32_t v;
      std::memcpy(&v, in + 4 * full, 4);
      for (int64_t c = full * kPerWord; c < cols; ++c, v >>= B)
        out[c] = static_cast<uint8_t>(v & kMask);
    }
  }
}

std::vector<uint8_t> unpack_codes(const TensorView& t, int64_t rows, int64_t cols, int bits) {
  expect_dtype(t, {DType::I32});
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
  switch (bits) {
    case 1:
      unpack_rows<1>(t.data, rows, cols, codes.data());
      break;
    case 2:
      unpack_rows<2>(t.data, rows, cols, codes.data());
      break;
    case 3:
      unpack_rows<3>(t.data, rows, cols, codes.data());
      break;
    case 4:
      unpack_rows<4>(t.data, rows, cols, codes.data());
      break;
    case 5:
      unpack_rows<5>(t.data, rows, cols, codes.data());
      break;
    case 6:
      unpack_rows<6>(t.data, rows, cols, codes.data());
      break;
    case 7:
      unpack_rows<7>(t.data, rows, cols, codes.data());
      break;
    case 8:
      unpack_rows<8>(t.data, rows, cols, codes.data());
      break;
    default:
      fail("{}: tensor '{}': {} bits per code are not supported (1..8)", t.file, t.name, bits);
  }
  return codes;
}

// The keep flags [rows, cols] of a compressed-tensors bitmask (bit j of byte k of a row is
// column 8k + j).
std::vector<uint8_t> expand_bitmask(const TensorView& mask, int64_t rows, int64_t cols) {
  std::vector<uint8_t> keep(static_cast<size_t>(rows * cols));
  const int64_t rb = bitmask_row_bytes(cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      keep[static_cast<size_t>(r * cols + c)] = (mask.data[r * rb + c / 8] >> (c % 8)) & 1u;
  return keep;
}

}  // namespace

bool is_compressed_weight(const Checkpoint& ck, const std::string& module) {
  for (std::string_view s : {ct_param::kWeightPacked, ct_param::kCompressed,
                             ct_param::kWeightIndicesPacked, ct_param::kWeightU})
    if (ck.find(module + "." + std::string(s)) != nullptr) return true;
  const TensorView* w = ck.find(module + ".weight");
  return w != nullptr && w->dtype == DType::I8;
}

std::vector<float> low_rank_product(const float* u, const float* v, int64_t rows, int64_t rank,
                                    int64_t cols) {
  std::vector<float> w(static_cast<size_t>(rows * cols), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* wr = w.data() + r * cols;
    for (int64_t k = 0; k < rank; ++k) {
      const float a = u[r * rank + k];
      const float* vk = v + k * cols;
      for (int64_t c = 0; c < cols; ++c) wr[c] += a * vk[c];
    }
  }
  return w;
}

StoredWeight read_stored_weight(const Checkpoint& ck, const std::string& module, int64_t rows,
                                int64_t cols, const CompressionConfig& config) {
  using Kind = StoredWeight::Kind;
  StoredWeight s;
  s.rows = rows;
  s.cols = cols;
  auto name = [&](std::string_view suffix) { return module + "." + std::string(suffix); };

  if (ck.find(name(ct_param::kWeightPacked)) != nullptr) {
    SPARSA_CHECK(config.quantization.has_value(),
                 "{}: '{}' is pack-quantized but config.json has no quantization_config",
                 ck.source(), module);
    const QuantizationConfig& q = *config.quantization;
    const int bits = q.bits;
    check_shape_tensor(ck, name(ct_param::kWeightShape), rows, cols);
    const TensorView& packed =
        get(ck, name(ct_param::kWeightPacked), {rows, packed_words(cols, bits)});
    s.codes = unpack_codes(packed, rows, cols, bits);
    const TensorView& st = ck.get(name(ct_param::kWeightScale));
    SPARSA_CHECK(st.shape.size() == 2 && st.shape[0] == rows && st.shape[1] >= 1,
                 "{}: tensor '{}' has shape {}; expected [{}, n_groups]", st.file, st.name,
                 shape_str(st.shape), rows);
    const int64_t n_groups = st.shape[1];
    s.scales = floats(st);
    s.g_idx.resize(static_cast<size_t>(cols));
    if (const TensorView* g = ck.find(name(ct_param::kWeightGIdx))) {
      SPARSA_CHECK(g->shape == std::vector<int64_t>{cols},
                   "{}: tensor '{}' has shape {}; expected [{}]", g->file, g->name,
                   shape_str(g->shape), cols);
      s.g_idx = ints<int32_t>(*g, DType::I32);
      s.act_order = true;
    } else {
      const int64_t gs = q.group_size > 0 ? q.group_size : cols;
      SPARSA_CHECK((cols + gs - 1) / gs == n_groups,
                   "{}: '{}' has {} scale groups per row; group size {} over {} columns needs {}",
                   ck.source(), module, n_groups, q.group_size, cols, (cols + gs - 1) / gs);
      for (int64_t c = 0; c < cols; ++c)
        s.g_idx[static_cast<size_t>(c)] = static_cast<int32_t>(c / gs);
    }
    for (int64_t c = 0; c < cols; ++c)
      SPARSA_CHECK(s.g_idx[c] >= 0 && s.g_idx[c] < n_groups,
                   "{}: '{}' g_idx[{}] = {} is outside 0..{}", ck.source(), module, c, s.g_idx[c],
                   n_groups - 1);
    if (const TensorView* z = ck.find(name(ct_param::kWeightZeroPoint))) {
      SPARSA_CHECK(z->shape == (std::vector<int64_t>{packed_words(rows, bits), n_groups}),
                   "{}: tensor '{}' has shape {}; expected [{}, {}]", z->file, z->name,
                   shape_str(z->shape), packed_words(rows, bits), n_groups);
      s.zeros = unpack_zero_points(ints<int32_t>(*z, DType::I32), rows, n_groups, bits);
    } else {
      s.zeros.assign(static_cast<size_t>(rows * n_groups), static_cast<uint8_t>(1u << (bits - 1)));
    }
    s.kind = Kind::kPackQuantized;
    s.bits = bits;
    s.n_groups = n_groups;
    s.format = "pack-quantized";
    return s;
  }

  if (ck.find(name(ct_param::kCompressed)) != nullptr) {
    const TensorView& comp = ck.get(name(ct_param::kCompressed));
    const TensorView& mask = get(ck, name(ct_param::kBitmask), {rows, bitmask_row_bytes(cols)});
    expect_dtype(mask, {DType::U8});
    expect_dtype(comp, {DType::F32, DType::F16, DType::BF16});
    const std::span<const uint8_t> cbytes(comp.data, comp.nbytes);
    const std::span<const uint8_t> mbytes(mask.data, mask.nbytes);
    if (ck.find(name(ct_param::kRowOffsets)) != nullptr) {
      const TensorView& ro = get(ck, name(ct_param::kRowOffsets), {rows});
      const std::vector<int64_t> offsets = ints<int64_t>(ro, DType::I64);
      s.values = sparse_bitmask_decompress(cbytes, mbytes, offsets, rows, cols, comp.dtype);
      s.kind = Kind::kSparseBitmask;
      s.format = "sparse-bitmask";
    } else {
      SPARSA_CHECK(comp.shape == (std::vector<int64_t>{rows, cols / 2}),
                   "{}: tensor '{}' has shape {}; sparse-24-bitmask expects [{}, {}]", comp.file,
                   comp.name, shape_str(comp.shape), rows, cols / 2);
      s.values = sparse_24_bitmask_decompress(cbytes, mbytes, rows, cols, comp.dtype);
      s.kind = Kind::kSparse24Bitmask;
      s.format = "sparse-24-bitmask";
    }
    s.dtype = comp.dtype;
    s.keep = expand_bitmask(mask, rows, cols);
    return s;
  }

  if (ck.find(name(ct_param::kWeightIndicesPacked)) != nullptr) {
    SPARSA_CHECK(config.sparsa.has_value(),
                 "{}: '{}' is palettized but config.json has no sparsa_config", ck.source(),
                 module);
    const TensorView& pal = ck.get(name(ct_param::kWeightPalette));
    SPARSA_CHECK(pal.shape.size() == 2 && pal.shape[0] >= 1 && pal.shape[1] >= 2 &&
                     (pal.shape[1] & (pal.shape[1] - 1)) == 0 && pal.shape[1] <= 256,
                 "{}: tensor '{}' has shape {}; expected [n_palettes, 2^bits]", pal.file, pal.name,
                 shape_str(pal.shape));
    int bits = 0;
    while ((int64_t{1} << bits) < pal.shape[1]) ++bits;
    const int64_t n_pal = pal.shape[0];
    SPARSA_CHECK(n_pal <= rows, "{}: '{}' has {} palettes for {} rows", ck.source(), module, n_pal,
                 rows);
    // Rows per palette: the config's palette_group_rows (the last palette may be short), else
    // an even split.
    int64_t group_rows = 0;
    for (const SparsaGroup& g : config.sparsa->groups) {
      const int64_t gr = g.palette_group_rows > 0 ? g.palette_group_rows : rows;
      if (g.format == SparsaFormat::kPalettized && (rows + gr - 1) / gr == n_pal) {
        group_rows = gr;
        break;
      }
    }
    if (group_rows == 0) group_rows = (rows + n_pal - 1) / n_pal;
    SPARSA_CHECK((rows + group_rows - 1) / group_rows == n_pal,
                 "{}: '{}' has {} palettes, which do not split {} rows into equal groups",
                 ck.source(), module, n_pal, rows);
    check_shape_tensor(ck, name(ct_param::kWeightShape), rows, cols);
    const TensorView& idx =
        get(ck, name(ct_param::kWeightIndicesPacked), {rows, packed_words(cols, bits)});
    s.codes = unpack_codes(idx, rows, cols, bits);
    s.lut = floats(pal);
    s.kind = Kind::kPalettized;
    s.bits = bits;
    s.group_rows = group_rows;
    s.format = "sparsa-palettized";
    return s;
  }

  if (ck.find(name(ct_param::kWeightU)) != nullptr) {
    const TensorView& u = ck.get(name(ct_param::kWeightU));
    SPARSA_CHECK(u.shape.size() == 2 && u.shape[0] == rows && u.shape[1] >= 1,
                 "{}: tensor '{}' has shape {}; expected [{}, rank]", u.file, u.name,
                 shape_str(u.shape), rows);
    expect_dtype(u, {DType::F32, DType::F16, DType::BF16});
    const int64_t rank = u.shape[1];
    const TensorView& v = get(ck, name(ct_param::kWeightV), {rank, cols});
    expect_dtype(v, {DType::F32, DType::F16, DType::BF16});
    s.kind = Kind::kLowRank;
    s.u = u;
    s.v = v;
    s.format = "sparsa-low-rank";
    return s;
  }

  const TensorView& w = get(ck, name(ct_param::kWeight), {rows, cols});
  if (w.dtype == DType::I8) {  // int-quantized: w = scale · q, one scale per output row
    const TensorView& st = get(ck, name(ct_param::kWeightScale), {rows, 1});
    s.scales = floats(st);
    s.codes.resize(static_cast<size_t>(rows * cols));
    const auto* q = reinterpret_cast<const int8_t*>(w.data);
    for (size_t i = 0; i < s.codes.size(); ++i) s.codes[i] = static_cast<uint8_t>(q[i] + 128);
    s.zeros.assign(static_cast<size_t>(rows), 128);
    s.g_idx.assign(static_cast<size_t>(cols), 0);
    s.n_groups = 1;
    s.bits = 8;
    s.kind = Kind::kIntQuantized;
    s.format = "int-quantized";
    if (config.quantization && config.quantization->input_activation_bits == 8)
      s.input_activation_bits = 8;
    return s;
  }
  expect_dtype(w, {DType::F32, DType::F16, DType::BF16});
  s.kind = Kind::kDense;
  s.tensor = w;
  s.format = "dense";
  return s;
}

std::vector<float> dequantize_stored_weight(const StoredWeight& s) {
  using Kind = StoredWeight::Kind;
  const int64_t rows = s.rows, cols = s.cols;
  std::vector<float> out;
  switch (s.kind) {
    case Kind::kPackQuantized:
    case Kind::kIntQuantized:
      out.resize(static_cast<size_t>(rows * cols));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t g = r * s.n_groups + s.g_idx[static_cast<size_t>(c)];
          out[r * cols + c] = s.scales[g] * (static_cast<float>(s.codes[r * cols + c]) -
                                             static_cast<float>(s.zeros[g]));
        }
      return out;
    case Kind::kSparseBitmask:
    case Kind::kSparse24Bitmask:
      return floats(s.dtype, s.values.data(), static_cast<size_t>(rows * cols));
    case Kind::kPalettized: {
      out.resize(static_cast<size_t>(rows * cols));
      const int64_t k = int64_t{1} << s.bits;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          out[r * cols + c] = s.lut[(r / s.group_rows) * k + s.codes[r * cols + c]];
      return out;
    }
    case Kind::kLowRank: {
      const std::vector<float> uf = floats(s.u), vf = floats(s.v);
      return low_rank_product(uf.data(), vf.data(), rows, s.u.shape[1], cols);
    }
    case Kind::kDense:
      break;
  }
  return floats(s.tensor);
}

DecodedWeight decode_weight(const Checkpoint& ck, const std::string& module, int64_t rows,
                            int64_t cols, const CompressionConfig& config) {
  const StoredWeight s = read_stored_weight(ck, module, rows, cols, config);
  DecodedWeight d;
  d.values = dequantize_stored_weight(s);
  d.format = s.format;
  d.input_activation_bits = s.input_activation_bits;
  return d;
}

}  // namespace sparsa::io
