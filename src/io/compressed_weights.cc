// Decoding one linear weight of a compressed-tensors checkpoint (or our extensions) back to f32.
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
  fail("{}: tensor '{}' has dtype {}; expected {}", t.file, t.name, dtype_name(t.dtype),
              names);
}

// Float tensor (F32/F16/BF16) to f32.
std::vector<float> floats(const TensorView& t) {
  expect_dtype(t, {DType::F32, DType::F16, DType::BF16});
  const size_t n = static_cast<size_t>(t.numel());
  std::vector<float> out(n);
  if (t.dtype == DType::F32) {
    std::memcpy(out.data(), t.data, n * sizeof(float));
  } else {
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      out[i] = t.dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
  return out;
}

template <class T>
std::vector<T> ints(const TensorView& t, DType want) {
  expect_dtype(t, {want});
  std::vector<T> out(static_cast<size_t>(t.numel()));
  std::memcpy(out.data(), t.data, out.size() * sizeof(T));
  return out;
}

void check_shape_tensor(const Checkpoint& ck, const std::string& name, int64_t rows,
                        int64_t cols) {
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
  SPARSA_CHECK(v[0] == rows && v[1] == cols, "{}: tensor '{}' says [{}, {}]; the config implies [{}, {}]",
               t.file, name, v[0], v[1], rows, cols);
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

DecodedWeight decode_weight(const Checkpoint& ck, const std::string& module, int64_t rows,
                            int64_t cols, const CompressionConfig& config) {
  DecodedWeight d;
  auto name = [&](std::string_view suffix) { return module + "." + std::string(suffix); };
  const size_t n = static_cast<size_t>(rows * cols);

  if (ck.find(name(ct_param::kWeightPacked)) != nullptr) {
    SPARSA_CHECK(config.quantization.has_value(),
                 "{}: '{}' is pack-quantized but config.json has no quantization_config",
                 ck.source(), module);
    const QuantizationConfig& q = *config.quantization;
    const int bits = q.bits;
    check_shape_tensor(ck, name(ct_param::kWeightShape), rows, cols);
    const TensorView& packed =
        get(ck, name(ct_param::kWeightPacked), {rows, packed_words(cols, bits)});
    const std::vector<uint8_t> codes =
        unpack_quantized(ints<int32_t>(packed, DType::I32), rows, cols, bits);
    const TensorView& st = ck.get(name(ct_param::kWeightScale));
    SPARSA_CHECK(st.shape.size() == 2 && st.shape[0] == rows && st.shape[1] >= 1,
                 "{}: tensor '{}' has shape {}; expected [{}, n_groups]", st.file, st.name,
                 shape_str(st.shape), rows);
    const int64_t n_groups = st.shape[1];
    const std::vector<float> scales = floats(st);
    std::vector<int32_t> g_idx(static_cast<size_t>(cols));
    if (const TensorView* g = ck.find(name(ct_param::kWeightGIdx))) {
      SPARSA_CHECK(g->shape == std::vector<int64_t>{cols}, "{}: tensor '{}' has shape {}; expected [{}]",
                   g->file, g->name, shape_str(g->shape), cols);
      g_idx = ints<int32_t>(*g, DType::I32);
    } else {
      const int64_t gs = q.group_size > 0 ? q.group_size : cols;
      SPARSA_CHECK((cols + gs - 1) / gs == n_groups,
                   "{}: '{}' has {} scale groups per row; group size {} over {} columns needs {}",
                   ck.source(), module, n_groups, q.group_size, cols, (cols + gs - 1) / gs);
      for (int64_t c = 0; c < cols; ++c) g_idx[static_cast<size_t>(c)] = static_cast<int32_t>(c / gs);
    }
    for (int64_t c = 0; c < cols; ++c)
      SPARSA_CHECK(g_idx[c] >= 0 && g_idx[c] < n_groups,
                   "{}: '{}' g_idx[{}] = {} is outside 0..{}", ck.source(), module, c, g_idx[c],
                   n_groups - 1);
    std::vector<uint8_t> zeros;
    if (const TensorView* z = ck.find(name(ct_param::kWeightZeroPoint))) {
      SPARSA_CHECK(z->shape == (std::vector<int64_t>{packed_words(rows, bits), n_groups}),
                   "{}: tensor '{}' has shape {}; expected [{}, {}]", z->file, z->name,
                   shape_str(z->shape), packed_words(rows, bits), n_groups);
      zeros = unpack_zero_points(ints<int32_t>(*z, DType::I32), rows, n_groups, bits);
    } else {
      zeros.assign(static_cast<size_t>(rows * n_groups), static_cast<uint8_t>(1u << (bits - 1)));
    }
    d.values.resize(n);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t g = r * n_groups + g_idx[static_cast<size_t>(c)];
        d.values[r * cols + c] =
            scales[g] * (static_cast<float>(codes[r * cols + c]) - static_cast<float>(zeros[g]));
      }
    d.format = "pack-quantized";
    return d;
  }

  if (ck.find(name(ct_param::kCompressed)) != nullptr) {
    const TensorView& comp = ck.get(name(ct_param::kCompressed));
    const TensorView& mask = get(ck, name(ct_param::kBitmask), {rows, bitmask_row_bytes(cols)});
    expect_dtype(mask, {DType::U8});
    expect_dtype(comp, {DType::F32, DType::F16, DType::BF16});
    const std::span<const uint8_t> cbytes(comp.data, comp.nbytes);
    const std::span<const uint8_t> mbytes(mask.data, mask.nbytes);
    std::vector<uint8_t> dense;
    if (ck.find(name(ct_param::kRowOffsets)) != nullptr) {
      const TensorView& ro = get(ck, name(ct_param::kRowOffsets), {rows});
      const std::vector<int64_t> offsets = ints<int64_t>(ro, DType::I64);
      dense = sparse_bitmask_decompress(cbytes, mbytes, offsets, rows, cols, comp.dtype);
      d.format = "sparse-bitmask";
    } else {
      SPARSA_CHECK(comp.shape == (std::vector<int64_t>{rows, cols / 2}),
                   "{}: tensor '{}' has shape {}; sparse-24-bitmask expects [{}, {}]", comp.file,
                   comp.name, shape_str(comp.shape), rows, cols / 2);
      dense = sparse_24_bitmask_decompress(cbytes, mbytes, rows, cols, comp.dtype);
      d.format = "sparse-24-bitmask";
    }
    TensorView view = comp;
    view.shape = {rows, cols};
    view.data = dense.data();
    view.nbytes = dense.size();
    d.values = floats(view);
    return d;
  }

  if (ck.find(name(ct_param::kWeightIndicesPacked)) != nullptr) {
    SPARSA_CHECK(config.sparsa.has_value(),
                 "{}: '{}' is palettized but config.json has no sparsa_config", ck.source(),
                 module);
    const TensorView& pal = ck.get(name(ct_param::kWeightPalette));
    SPARSA_CHECK(pal.shape.size() == 2 && pal.shape[0] >= 1 && pal.shape[1] >= 2 &&
                     (pal.shape[1] & (pal.shape[1] - 1)) == 0 && pal.shape[1] <= 256,
                 "{}: tensor '{}' has shape {}; expected [n_palettes, 2^bits]", pal.file,
                 pal.name, shape_str(pal.shape));
    int bits = 0;
    while ((int64_t{1} << bits) < pal.shape[1]) ++bits;
    const int64_t n_pal = pal.shape[0];
    SPARSA_CHECK(rows % n_pal == 0 || n_pal == 1 || (rows + n_pal - 1) / n_pal > 0,
                 "{}: '{}' has {} palettes for {} rows", ck.source(), module, n_pal, rows);
    const int64_t group_rows = (rows + n_pal - 1) / n_pal;
    check_shape_tensor(ck, name(ct_param::kWeightShape), rows, cols);
    const TensorView& idx =
        get(ck, name(ct_param::kWeightIndicesPacked), {rows, packed_words(cols, bits)});
    const std::vector<uint8_t> index =
        unpack_quantized(ints<int32_t>(idx, DType::I32), rows, cols, bits);
    const std::vector<float> lut = floats(pal);
    d.values.resize(n);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        d.values[r * cols + c] = lut[(r / group_rows) * pal.shape[1] + index[r * cols + c]];
    d.format = "sparsa-palettized";
    return d;
  }

  if (ck.find(name(ct_param::kWeightU)) != nullptr) {
    const TensorView& u = ck.get(name(ct_param::kWeightU));
    SPARSA_CHECK(u.shape.size() == 2 && u.shape[0] == rows && u.shape[1] >= 1,
                 "{}: tensor '{}' has shape {}; expected [{}, rank]", u.file, u.name,
                 shape_str(u.shape), rows);
    const int64_t rank = u.shape[1];
    const TensorView& v = get(ck, name(ct_param::kWeightV), {rank, cols});
    const std::vector<float> uf = floats(u), vf = floats(v);
    d.values = low_rank_product(uf.data(), vf.data(), rows, rank, cols);
    d.format = "sparsa-low-rank";
    return d;
  }

  const TensorView& w = get(ck, name(ct_param::kWeight), {rows, cols});
  if (w.dtype == DType::I8) {  // int-quantized: w = scale · q, one scale per output row
    const TensorView& st = get(ck, name(ct_param::kWeightScale), {rows, 1});
    const std::vector<float> scales = floats(st);
    d.values.resize(n);
    const auto* q = reinterpret_cast<const int8_t*>(w.data);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        d.values[r * cols + c] = scales[r] * static_cast<float>(q[r * cols + c]);
    d.format = "int-quantized";
    if (config.quantization && config.quantization->input_activation_bits == 8)
      d.input_activation_bits = 8;
    return d;
  }
  d.values = floats(w);
  d.format = "dense";
  return d;
}

}  // namespace sparsa::io
