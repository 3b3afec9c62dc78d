#include "sparsa/model/llama.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <nlohmann/json.hpp>
#include <numbers>

#include "sparsa/core/cpu.h"
#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/kernels/linear.h"
#include "sparsa/kernels/packed_linear.h"

namespace sparsa::model {

namespace {

// Prefill runs in chunks of at most this many tokens, which bounds the activation workspace.
constexpr int64_t kMaxChunk = 512;

void to_f32(const io::TensorView& t, int64_t offset, int64_t n, float* out) {
  switch (t.dtype) {
    case DType::F32:
      std::memcpy(out, t.data + offset * 4, static_cast<size_t>(n) * 4);
      return;
    case DType::BF16: {
      const auto* p = reinterpret_cast<const uint16_t*>(t.data) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(p[i]);
      return;
    }
    case DType::F16: {
      const auto* p = reinterpret_cast<const uint16_t*>(t.data) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(p[i]);
      return;
    }
    default:
      fail("{}: tensor '{}' has dtype {}; expected F32, F16 or BF16", t.file, t.name,
           dtype_name(t.dtype));
  }
}

void check_float_dtype(const io::TensorView& t) {
  SPARSA_CHECK(t.dtype == DType::F32 || t.dtype == DType::F16 || t.dtype == DType::BF16,
               "{}: tensor '{}' has dtype {}; expected F32, F16 or BF16", t.file, t.name,
               dtype_name(t.dtype));
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

const io::TensorView& get_shaped(const io::Checkpoint& ck, const std::string& name,
                                 const std::vector<int64_t>& shape) {
  const io::TensorView& t = ck.get(name);
  SPARSA_CHECK(t.shape == shape, "{}: tensor '{}' has shape {}; the config implies {}", t.file,
               name, shape_str(t.shape), shape_str(shape));
  check_float_dtype(t);
  return t;
}

std::vector<float> load_vector(const io::Checkpoint& ck, const std::string& name, int64_t n) {
  const io::TensorView& t = get_shaped(ck, name, {n});
  std::vector<float> v(static_cast<size_t>(n));
  to_f32(t, 0, n, v.data());
  return v;
}

// Bytes of every tensor "<prefix>.<suffix>" other than the bias.
size_t stored_bytes(const io::Checkpoint& ck, const std::string& prefix) {
  size_t total = 0;
  for (const std::string& n : ck.names())
    if (n.size() > prefix.size() + 1 && n.compare(0, prefix.size() + 1, prefix + ".") == 0 &&
        n != prefix + ".bias")
      total += ck.get(n).nbytes;
  return total;
}

using formats::PackedWeight;

std::shared_ptr<const PackedWeight> share(PackedWeight w) {
  return std::make_shared<const PackedWeight>(std::move(w));
}

// The layer runs `values` (f32 [rows, cols], owned) with the dense kernel.
void set_decoded(Linear& l, std::vector<float> values, int64_t rows, int64_t cols) {
  auto owned = std::make_shared<const std::vector<float>>(std::move(values));
  l.weight = kernels::DenseWeight{DType::F32, rows, cols, owned->data()};
  l.packed = share(formats::pack_dense(DType::F32, rows, cols, owned->data(), false));
  l.owned = std::move(owned);
}

// Whether a keep mask with `pruned` of `n` weights pruned is worth its bits: the bitmask layout
// (1 bit per weight + the kept codes at `kept_bits`) reads fewer bytes than every code at
// `all_bits` (the packer makes the final choice; this only skips building useless masks).
bool mask_pays(int64_t pruned, int64_t n, int kept_bits, int all_bits) {
  return static_cast<double>(n) + static_cast<double>(n - pruned) * kept_bits <
         static_cast<double>(n) * all_bits;
}

// The keep mask of a [rows, cols] weight whose pruned positions satisfy is_zero(r, c), or an
// empty mask when a bitmask would not pay for itself at `bits` per code.
template <typename IsZero>
compress::Mask keep_mask_if_it_pays(int64_t rows, int64_t cols, int bits, IsZero is_zero) {
  const int64_t n = rows * cols;
  compress::Mask keep(static_cast<size_t>(n));
  int64_t pruned = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const bool z = is_zero(r, c);
      keep[static_cast<size_t>(r * cols + c)] = !z;
      pruned += z;
    }
  if (!mask_pays(pruned, n, bits <= 4 ? 4 : 8, formats::stored_code_bits(bits))) keep.clear();
  return keep;
}

// A float weight of the checkpoint, as the engine runs it: copied once, at load, into the panel
// layout (kernels::DenseWeight), in which a decode step of several sequences runs its
// multiply-adds at close to the FMA units' rate (the row-major tiles reach about three quarters
// of it) and one token streams as fast as from rows. The copy is 64-byte aligned; safetensors
// places tensors back to back after a header of any length, so a mapped tensor need not be.
formats::PackedWeight pack_float_weight(DType dtype, int64_t rows, int64_t cols, const void* data) {
  return formats::pack_dense(dtype, rows, cols, data, /*copy=*/true, /*panels=*/true);
}

// Packs a compressed weight for its kernels (formats/packed_weight.h). Layouts without a packed
// form (1-bit codes, groups that do not split the columns evenly) are decoded to f32.
void pack_stored(Linear& l, io::StoredWeight& s) {
  using Kind = io::StoredWeight::Kind;
  const int64_t rows = s.rows, cols = s.cols, n = rows * cols;
  switch (s.kind) {
    case Kind::kDense:
      l.weight = kernels::DenseWeight{s.tensor.dtype, rows, cols, s.tensor.data};
      l.packed = share(pack_float_weight(s.tensor.dtype, rows, cols, s.tensor.data));
      return;
    case Kind::kPackQuantized:
    case Kind::kIntQuantized: {
      if (s.bits < 2 || s.bits > 8 || cols % s.n_groups != 0) break;
      const int64_t gs = cols / s.n_groups;
      std::vector<int64_t> count(static_cast<size_t>(s.n_groups), 0);
      for (int32_t g : s.g_idx) ++count[static_cast<size_t>(g)];
      if (std::any_of(count.begin(), count.end(), [gs](int64_t c) { return c != gs; })) break;
      compress::QuantResult q;
      q.bits = s.bits;
      q.group_size = s.n_groups == 1 ? 0 : gs;
      q.scales = std::move(s.scales);
      q.zeros.assign(s.zeros.begin(), s.zeros.end());
      q.g_idx = std::move(s.g_idx);
      q.codes = std::move(s.codes);
      // Sparse + quantized checkpoints keep pruned weights as zero-point codes inside
      // weight_packed (sparsity_config format "dense"): where enough of them are, those
      // positions become the keep mask (their values are 0 either way).
      const auto is_zero = [&](int64_t r, int64_t c) {
        const size_t g = static_cast<size_t>(r * s.n_groups + q.g_idx[static_cast<size_t>(c)]);
        return q.codes[static_cast<size_t>(r * cols + c)] == q.zeros[g];
      };
      const compress::Mask keep = keep_mask_if_it_pays(rows, cols, s.bits, is_zero);
      l.packed = share(formats::pack_quantized(q, keep.empty() ? nullptr : &keep));
      return;
    }
    case Kind::kSparseBitmask:
    case Kind::kSparse24Bitmask: {
      if (s.dtype != DType::BF16) {  // f16 / f32 values: dense, exactly as stored
        l.packed = share(formats::pack_dense(s.dtype, rows, cols, s.values.data(), true));
        return;
      }
      compress::Matrix w(rows, cols);
      const auto* v = reinterpret_cast<const uint16_t*>(s.values.data());
      for (int64_t i = 0; i < n; ++i) w.data[static_cast<size_t>(i)] = bf16_to_f32(v[i]);
      l.packed = share(formats::pack_sparse(w, s.keep, formats::ValueFormat{}));
      return;
    }
    case Kind::kPalettized: {
      if (s.bits < 2 || s.bits > 8) break;
      compress::Palette p;
      p.bits = s.bits;
      p.group_rows = s.group_rows;
      p.lut = std::move(s.lut);
      p.indices = std::move(s.codes);
      // Pruned + palettized weights sit on an exact 0 of the table.
      const int64_t k = int64_t{1} << s.bits;
      const auto is_zero = [&](int64_t r, int64_t c) {
        const size_t e = static_cast<size_t>((r / p.group_rows) * k +
                                             p.indices[static_cast<size_t>(r * cols + c)]);
        return p.lut[e] == 0.0f;
      };
      const compress::Mask keep = keep_mask_if_it_pays(rows, cols, s.bits, is_zero);
      l.packed = share(formats::pack_palette(p, cols, keep.empty() ? nullptr : &keep));
      return;
    }
    case Kind::kLowRank: {
      const int64_t rank = s.u.shape[1];
      l.packed = share(formats::pack_dense(s.u.dtype, rows, rank, s.u.data, false));
      l.packed_v = share(formats::pack_dense(s.v.dtype, rank, cols, s.v.data, false));
      return;
    }
  }
  set_decoded(l, io::dequantize_stored_weight(s), rows, cols);
}

Linear load_linear(const io::Checkpoint& ck, const std::string& prefix, int64_t out, int64_t in,
                   bool bias, const io::CompressionConfig& compression, LinearPath path) {
  Linear l;
  if (io::is_compressed_weight(ck, prefix)) {
    io::StoredWeight s = io::read_stored_weight(ck, prefix, out, in, compression);
    l.name = prefix;
    l.format = s.format;
    l.input_bits = s.input_activation_bits;
    l.stored_bytes = stored_bytes(ck, prefix);
    if (path == LinearPath::kReference) {
      set_decoded(l, io::dequantize_stored_weight(s), out, in);
    } else {
      pack_stored(l, s);
    }
  } else {
    l.name = prefix + ".weight";
    const io::TensorView& w = get_shaped(ck, l.name, {out, in});
    l.weight = kernels::DenseWeight{w.dtype, out, in, w.data};
    l.packed = share(pack_float_weight(w.dtype, out, in, w.data));
    l.stored_bytes = w.nbytes;
  }
  if (bias) l.bias = load_vector(ck, prefix + ".bias", out);
  return l;
}

}  // namespace

int64_t Linear::rows() const { return packed ? packed->rows() : weight.rows; }

int64_t Linear::cols() const {
  if (packed_v) return packed_v->cols();
  return packed ? packed->cols() : weight.cols;
}

size_t Linear::bytes_per_token() const {
  const size_t b = bias.size() * sizeof(float);
  if (packed) return b + packed->bytes() + (packed_v ? packed_v->bytes() : 0);
  return b + static_cast<size_t>(weight.rows * weight.cols) * dtype_size(weight.dtype);
}

std::string Linear::describe() const {
  if (packed_v)
    return "u[" + std::to_string(packed->cols()) + "]" + packed->describe() + "·v" +
           packed_v->describe();
  if (packed) return packed->describe();
  std::string d(dtype_name(weight.dtype));
  std::transform(d.begin(), d.end(), d.begin(),
                 [](char c) { return static_cast<char>(std::tolower(c)); });
  return d;
}

namespace {

// The layer's packed weight, or `tmp` wrapped around its dense matrix without copying.
const formats::PackedWeight& packed_of(const Linear& l, formats::PackedWeight& tmp) {
  if (l.packed) return *l.packed;
  tmp = formats::pack_dense(l.weight.dtype, l.weight.rows, l.weight.cols, l.weight.data, false);
  return tmp;
}

}  // namespace

void linear_forward(const Linear& l, const float* x, int64_t ldx, int64_t n, float* y, int64_t ldy,
                    LinearScratch& scratch, ThreadPool& pool) {
  formats::PackedWeight tmp;
  const formats::PackedWeight& w = packed_of(l, tmp);
  // W8A8: x is quantized per token here, and the kernel reads it as it is (f32 input coding): its
  // own per-block int8 decode input would round it a second time.
  const bool w8a8 = l.input_bits == 8;
  if (w8a8) {
    const int64_t cols = l.cols();
    if (static_cast<int64_t>(scratch.xq.size()) < n * cols)
      scratch.xq.resize(static_cast<size_t>(n * cols));
    for (int64_t t = 0; t < n; ++t)
      quantize_activations_int8(x + t * ldx, 1, cols, scratch.xq.data() + t * cols);
    x = scratch.xq.data();
    ldx = cols;
  }
  const auto run = [&](const formats::PackedWeight& pw, const float* in, int64_t ldin, float* out,
                       int64_t ldout) {
    if (w8a8) {
      kernels::linear_isa(active_isa(), kernels::DecodeInput::F32, pw, in, ldin, n, out, ldout,
                          pool);
    } else {
      kernels::linear(pw, in, ldin, n, out, ldout, pool);
    }
  };
  if (!l.packed_v) {
    run(w, x, ldx, y, ldy);
    return;
  }
  const int64_t rank = l.packed_v->rows();
  if (static_cast<int64_t>(scratch.low_rank.size()) < n * rank)
    scratch.low_rank.resize(static_cast<size_t>(n * rank));
  run(*l.packed_v, x, ldx, scratch.low_rank.data(), rank);
  run(w, scratch.low_rank.data(), rank, y, ldy);
}

void linear_forward_many(const LinearTarget* targets, int count, const float* x, int64_t ldx,
                         int64_t n, LinearScratch& scratch, ThreadPool& pool) {
  constexpr int kMax = 8;
  bool together = count <= kMax;
  for (int i = 0; i < count; ++i)
    together = together && !targets[i].linear->packed_v && targets[i].linear->input_bits == 0;
  if (!together) {
    for (int i = 0; i < count; ++i)
      linear_forward(*targets[i].linear, x, ldx, n, targets[i].y, targets[i].ldy, scratch, pool);
    return;
  }
  formats::PackedWeight tmp[kMax];
  kernels::PackedLinearOutput outs[kMax];
  for (int i = 0; i < count; ++i)
    outs[i] = {&packed_of(*targets[i].linear, tmp[i]), targets[i].y, targets[i].ldy};
  kernels::linear_many(outs, count, x, ldx, n, pool);
}

void rms_norm(const float* x, const float* w, float eps, int64_t n, int64_t dim, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * dim;
    float* ot = out + t * dim;
    // Eight interleaved partial sums: independent chains the compiler can keep in vector
    // registers (one chain was latency-bound: a serial step of every batched decode layer).
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8)
      for (int j = 0; j < 8; ++j) part[j] += static_cast<double>(xt[i + j]) * xt[i + j];
    for (int j = 0; i + j < dim; ++j) part[j] += static_cast<double>(xt[i + j]) * xt[i + j];
    const double ss = ((part[0] + part[1]) + (part[2] + part[3])) +
                      ((part[4] + part[5]) + (part[6] + part[7]));
    const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    for (int64_t k = 0; k < dim; ++k) ot[k] = w[k] * (xt[k] * r);
  }
}

void quantize_activations_int8(const float* x, int64_t n, int64_t dim, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * dim;
    float* ot = out + t * dim;
    float m = 0.0f;
    for (int64_t j = 0; j < dim; ++j) m = std::max(m, std::abs(xt[j]));
    if (m == 0.0f) {
      std::fill(ot, ot + dim, 0.0f);
      continue;
    }
    const float scale = m / 127.0f;
    for (int64_t j = 0; j < dim; ++j)
      ot[j] = std::clamp(std::nearbyint(xt[j] / scale), -127.0f, 127.0f) * scale;
  }
}

void rope_angles(const float* inv_freq, int64_t half, int64_t position, float* cos, float* sin) {
  const float pos = static_cast<float>(position);
  for (int64_t i = 0; i < half; ++i) {
    const float a = pos * inv_freq[i];
    cos[i] = std::cos(a);
    sin[i] = std::sin(a);
  }
}

// Rotary embedding, rotate-half convention (HF Llama): the pair is (x[i], x[i + d/2]).
void apply_rope(float* x, int64_t ld, int64_t n, int64_t heads, int64_t hd, const float* cos,
                const float* sin, bool inverse) {
  const int64_t half = hd / 2;
  for (int64_t t = 0; t < n; ++t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + t * ld + h * hd;
      if (inverse) {
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] + b * s[i];
          v[i + half] = b * c[i] - a * s[i];
        }
      } else {
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] - b * s[i];
          v[i + half] = b * c[i] + a * s[i];
        }
      }
    }
  }
}

void add_bias(float* y, int64_t ld, int64_t n, const std::vector<float>& bias) {
  if (bias.empty()) return;
  for (int64_t t = 0; t < n; ++t)
    for (size_t i = 0; i < bias.size(); ++i) y[t * ld + static_cast<int64_t>(i)] += bias[i];
}

std::vector<float> rope_inverse_frequencies(const io::ModelConfig& c) {
  const int64_t half = c.head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    // HF computes base ** (arange(0, d, 2) / d) in f32.
    const float e = static_cast<float>(2 * i) / static_cast<float>(c.head_dim);
    inv[static_cast<size_t>(i)] = 1.0f / std::pow(static_cast<float>(c.rope_theta), e);
  }
  const io::RopeScaling& s = c.rope_scaling;
  if (s.type == "linear") {
    for (float& f : inv) f = static_cast<float>(f / s.factor);
  } else if (s.type == "llama3") {
    // Llama 3.1 frequency-dependent scaling (transformers' _compute_llama3_parameters).
    const double old_ctx = static_cast<double>(s.original_max_position_embeddings);
    const double low_wavelen = old_ctx / s.low_freq_factor;
    const double high_wavelen = old_ctx / s.high_freq_factor;
    for (float& f : inv) {
      const double wavelen = 2 * std::numbers::pi / f;
      if (wavelen < high_wavelen) continue;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / s.factor);
      } else {
        const double smooth =
            (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = static_cast<float>((1 - smooth) * f / s.factor + smooth * f);
      }
    }
  }
  return inv;
}

KvCache::KvCache(const io::ModelConfig& c, int64_t max_tokens, DType dtype) : dtype_(dtype) {
  SPARSA_CHECK(max_tokens > 0, "KV cache size must be positive, got {}", max_tokens);
  SPARSA_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::I8,
               "a KV cache of {} is not supported (expected F32, BF16 or I8)", dtype_name(dtype));
  capacity_ = std::min(max_tokens, c.max_context());
  row_ = c.num_kv_heads * c.head_dim;
  head_dim_ = c.head_dim;
  const size_t layers = static_cast<size_t>(c.num_layers);
  const size_t elems = static_cast<size_t>(capacity_ * row_);
  if (dtype == DType::F32) {
    k_.assign(layers, AlignedVector<float>(elems));
    v_ = k_;
  } else if (dtype == DType::BF16) {
    kh_.assign(layers, AlignedVector<uint16_t>(elems));
    vh_ = kh_;
  } else {
    kq_.assign(layers, AlignedVector<int8_t>(elems));
    vq_ = kq_;
    ks_.assign(layers, AlignedVector<float>(static_cast<size_t>(c.num_kv_heads * capacity_)));
    vs_ = ks_;
  }
}

int64_t KvCache::bytes_per_token(const io::ModelConfig& c, DType dtype) {
  int64_t row = c.num_kv_heads * c.head_dim * static_cast<int64_t>(dtype_size(dtype));
  if (dtype == DType::I8) row += c.num_kv_heads * static_cast<int64_t>(sizeof(float));
  return 2 * c.num_layers * row;
}

float* KvCache::keys(int64_t layer) {
  SPARSA_CHECK(dtype_ == DType::F32, "KvCache::keys: the cache holds {}, not F32",
               dtype_name(dtype_));
  return k_[static_cast<size_t>(layer)].data();
}

float* KvCache::values(int64_t layer) {
  SPARSA_CHECK(dtype_ == DType::F32, "KvCache::values: the cache holds {}, not F32",
               dtype_name(dtype_));
  return v_[static_cast<size_t>(layer)].data();
}

KvLayer KvCache::layer(int64_t layer) {
  const size_t l = static_cast<size_t>(layer);
  if (dtype_ == DType::F32) return {k_[l].data(), v_[l].data(), dtype_};
  if (dtype_ == DType::BF16) return {kh_[l].data(), vh_[l].data(), dtype_};
  return {kq_[l].data(), vq_[l].data(), dtype_, ks_[l].data(), vs_[l].data(), capacity_};
}

float quantize_kv_row(const float* x, int64_t n, int8_t* codes) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::abs(x[i]));
  if (amax == 0.0f) {
    std::memset(codes, 0, static_cast<size_t>(n));
    return 0.0f;
  }
  const float scale = amax / 127.0f;
  // x / scale is within [-127, 127] up to the rounding of the division (amax / scale can land
  // an ulp above 127): the clamp keeps it there. Adding and removing 1.5 · 2^23 rounds half to
  // even, as std::nearbyint does, but the loop vectorizes on baseline x86-64 (where nearbyint
  // is a call per value).
  constexpr float kMagic = 12582912.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float c = std::clamp(x[i] / scale, -127.0f, 127.0f);
    codes[i] = static_cast<int8_t>((c + kMagic) - kMagic);
  }
  return scale;
}

namespace {

// Rows pos .. pos + n - 1 of a cache layer from f32 rows of `row` = n_kv_heads · head_dim values
// (row stride ld): copied, rounded to bf16, or quantized per (token, kv head).
void store_rows(KvLayer kv, int64_t row, int64_t head_dim, int64_t pos, const float* k,
                const float* v, int64_t n, int64_t ld) {
  if (kv.dtype == DType::F32) {
    for (int64_t t = 0; t < n; ++t) {
      std::memcpy(static_cast<float*>(kv.k) + (pos + t) * row, k + t * ld,
                  static_cast<size_t>(row) * sizeof(float));
      std::memcpy(static_cast<float*>(kv.v) + (pos + t) * row, v + t * ld,
                  static_cast<size_t>(row) * sizeof(float));
    }
    return;
  }
  if (kv.dtype == DType::I8) {
    for (int64_t t = 0; t < n; ++t) {
      int8_t* kd = static_cast<int8_t*>(kv.k) + (pos + t) * row;
      int8_t* vd = static_cast<int8_t*>(kv.v) + (pos + t) * row;
      for (int64_t h = 0; h * head_dim < row; ++h) {
        const int64_t c = h * head_dim;
        kv.k_scales[h * kv.ld_scales + pos + t] = quantize_kv_row(k + t * ld + c, head_dim, kd + c);
        kv.v_scales[h * kv.ld_scales + pos + t] = quantize_kv_row(v + t * ld + c, head_dim, vd + c);
      }
    }
    return;
  }
  for (int64_t t = 0; t < n; ++t) {
    uint16_t* kd = static_cast<uint16_t*>(kv.k) + (pos + t) * row;
    uint16_t* vd = static_cast<uint16_t*>(kv.v) + (pos + t) * row;
    for (int64_t i = 0; i < row; ++i) {
      kd[i] = f32_to_bf16(k[t * ld + i]);
      vd[i] = f32_to_bf16(v[t * ld + i]);
    }
  }
}

}  // namespace

void KvCache::write(int64_t layer, int64_t pos, const float* k, const float* v, int64_t n,
                    int64_t ld) {
  SPARSA_CHECK(
      layer >= 0 && layer < static_cast<int64_t>(std::max({k_.size(), kh_.size(), kq_.size()})),
      "KvCache::write: no layer {}", layer);
  SPARSA_CHECK(pos >= 0 && n >= 0 && pos + n <= capacity_ && ld >= row_,
               "KvCache::write: rows {} .. {} (stride {}) do not fit the cache ({} rows of {})",
               pos, pos + n, ld, capacity_, row_);
  store_rows(this->layer(layer), row_, head_dim_, pos, k, v, n, ld);
}

void KvCache::truncate(int64_t n) { size_ = std::clamp<int64_t>(n, 0, size_); }

std::unique_ptr<Model> Model::load(const std::string& dir, LoadOptions options) {
  std::unique_ptr<Model> m(new Model());
  if (const char* env = std::getenv("SPARSA_REFERENCE_LINEAR");
      env != nullptr && std::string(env) == "1")
    options.linear = LinearPath::kReference;
  m->linear_path_ = options.linear;
  m->config_ = io::ModelConfig::from_dir(dir);
  m->checkpoint_ = io::Checkpoint::open_dir(dir, options.file_access);
  m->compression_ = io::read_compression_config(
      nlohmann::json::parse(read_text_file(dir + "/config.json")), dir + "/config.json");
  const io::ModelConfig& c = m->config_;
  const io::Checkpoint& ck = m->checkpoint_;
  const int64_t h = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  m->embed_ = get_shaped(ck, "model.embed_tokens.weight", {c.vocab_size, h});
  m->blocks_.resize(static_cast<size_t>(c.num_layers));
  const io::CompressionConfig& cc = m->compression_;
  const LinearPath path = options.linear;
  // Every (linear, layer) is independent: compressed checkpoints are decoded and packed on all
  // cores, 7 tasks per layer; a mapped dense checkpoint needs no threads.
  const bool compressed = cc.quantization || cc.sparsity || cc.sparsa;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(c.num_layers * 7));
  ThreadPool load_pool(compressed ? 0 : 1);
  load_pool.run(c.num_layers * 7, [&](int64_t task) {
    const int64_t l = task / 7;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Block& b = m->blocks_[static_cast<size_t>(l)];
    try {
      switch (task % 7) {
        case 0:
          b.attn_norm = load_vector(ck, p + "input_layernorm.weight", h);
          b.mlp_norm = load_vector(ck, p + "post_attention_layernorm.weight", h);
          b.q = load_linear(ck, p + "self_attn.q_proj", q, h, c.attention_bias, cc, path);
          break;
        case 1:
          b.k = load_linear(ck, p + "self_attn.k_proj", kv, h, c.attention_bias, cc, path);
          break;
        case 2:
          b.v = load_linear(ck, p + "self_attn.v_proj", kv, h, c.attention_bias, cc, path);
          break;
        case 3:
          b.o = load_linear(ck, p + "self_attn.o_proj", h, q, c.o_bias, cc, path);
          break;
        case 4:
          b.gate =
              load_linear(ck, p + "mlp.gate_proj", c.intermediate_size, h, c.mlp_bias, cc, path);
          break;
        case 5:
          b.up = load_linear(ck, p + "mlp.up_proj", c.intermediate_size, h, c.mlp_bias, cc, path);
          break;
        default:
          b.down =
              load_linear(ck, p + "mlp.down_proj", h, c.intermediate_size, c.mlp_bias, cc, path);
          break;
      }
    } catch (...) {
      errors[static_cast<size_t>(task)] = std::current_exception();
    }
  });
  // The first error in tensor order, as a sequential load would report it.
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  m->final_norm_ = load_vector(ck, "model.norm.weight", h);
  if (c.tie_word_embeddings && ck.find("lm_head.weight") == nullptr) {
    m->lm_head_.name = "model.embed_tokens.weight";
    m->lm_head_.weight = kernels::DenseWeight{m->embed_.dtype, c.vocab_size, h, m->embed_.data};
    m->lm_head_.packed = share(pack_float_weight(m->embed_.dtype, c.vocab_size, h, m->embed_.data));
  } else {
    m->lm_head_ = load_linear(ck, "lm_head", c.vocab_size, h, false, cc, path);
  }
  m->rope_inv_freq_ = rope_inverse_frequencies(c);
  return m;
}

std::unique_ptr<Model> Model::from_parts(io::ModelConfig config, io::TensorView embedding,
                                         std::vector<Block> blocks, std::vector<float> final_norm,
                                         Linear lm_head, std::shared_ptr<const void> storage) {
  const int64_t h = config.hidden_size;
  SPARSA_CHECK(static_cast<int64_t>(blocks.size()) == config.num_layers,
               "Model::from_parts: {} blocks for {} layers", blocks.size(), config.num_layers);
  SPARSA_CHECK(embedding.shape == (std::vector<int64_t>{config.vocab_size, h}),
               "Model::from_parts: the embedding has shape {}; the config implies [{}, {}]",
               shape_str(embedding.shape), config.vocab_size, h);
  check_float_dtype(embedding);
  SPARSA_CHECK(static_cast<int64_t>(final_norm.size()) == h &&
                   lm_head.rows() == config.vocab_size && lm_head.cols() == h,
               "Model::from_parts: the final norm or lm_head does not fit hidden size {}", h);
  std::unique_ptr<Model> m(new Model());
  m->config_ = std::move(config);
  m->embed_ = std::move(embedding);
  m->blocks_ = std::move(blocks);
  m->final_norm_ = std::move(final_norm);
  m->lm_head_ = std::move(lm_head);
  m->storage_ = std::move(storage);
  m->rope_inv_freq_ = rope_inverse_frequencies(m->config_);
  return m;
}

size_t Model::weight_bytes_per_token() const {
  // What one step reads: every linear weight as its kernel streams it, and one embedding row.
  size_t total = lm_head_.bytes_per_token() +
                 static_cast<size_t>(config_.hidden_size) * dtype_size(embed_.dtype);
  for (const Block& b : blocks_)
    for (const Linear* l : {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down})
      total += l->bytes_per_token();
  return total;
}

void BlockWorkspace::reserve(const io::ModelConfig& c, int64_t n) {
  if (n <= tokens) return;
  auto grow = [n](AlignedVector<float>& v, int64_t width) {
    v.resize(static_cast<size_t>(n * width));
  };
  grow(xn, c.hidden_size);
  grow(q, c.num_heads * c.head_dim);
  grow(attn, c.num_heads * c.head_dim);
  grow(gate, c.intermediate_size);
  grow(up, c.intermediate_size);
  grow(cos, c.head_dim / 2);
  grow(sin, c.head_dim / 2);
  grow(k, c.num_kv_heads * c.head_dim);
  grow(v, c.num_kv_heads * c.head_dim);
  tokens = n;
}

void block_forward(const io::ModelConfig& c, const Block& b, int64_t layer,
                   const std::vector<float>& inv_freq, float* x, int64_t n, int64_t pos0,
                   KvLayer kv, BlockWorkspace& ws, const LinearInputHook& hook, ThreadPool& pool) {
  const int64_t h = c.hidden_size, hd = c.head_dim, half = hd / 2;
  const int64_t qw = c.num_heads * hd, kvw = c.num_kv_heads * hd, ffn = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  ws.reserve(c, n);
  float *xn = ws.xn.data(), *q = ws.q.data(), *attn = ws.attn.data();
  float *gate = ws.gate.data(), *up = ws.up.data();
  for (int64_t t = 0; t < n; ++t)
    rope_angles(inv_freq.data(), half, pos0 + t, ws.cos.data() + t * half,
                ws.sin.data() + t * half);
  auto run_linear = [&](const char* tag, const Linear& l, const float* in, int64_t ldin, float* out,
                        int64_t ldout) {
    if (hook) hook(layer, tag, in, n);
    linear_forward(l, in, ldin, n, out, ldout, ws.linear, pool);
    add_bias(out, ldout, n, l.bias);
  };
  kernels::AttentionShape shape;
  shape.n_q = n;
  shape.pos0 = pos0;
  shape.n_heads = static_cast<int>(c.num_heads);
  shape.n_kv_heads = static_cast<int>(c.num_kv_heads);
  shape.head_dim = static_cast<int>(hd);
  shape.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  kv.describe(shape);

  // An f32 cache takes the new keys and values straight from the projections; a bf16 or int8
  // one gets them rounded or quantized once they are final (after RoPE).
  const bool direct = kv.dtype == DType::F32;
  float* kc = direct ? static_cast<float*>(kv.k) + pos0 * kvw : ws.k.data();
  float* vc = direct ? static_cast<float*>(kv.v) + pos0 * kvw : ws.v.data();
  rms_norm(x, b.attn_norm.data(), eps, n, h, xn);
  if (hook) {
    run_linear("q", b.q, xn, h, q, qw);
    run_linear("k", b.k, xn, h, kc, kvw);
    run_linear("v", b.v, xn, h, vc, kvw);
  } else {
    const LinearTarget qkv[3] = {{&b.q, q, qw}, {&b.k, kc, kvw}, {&b.v, vc, kvw}};
    linear_forward_many(qkv, 3, xn, h, n, ws.linear, pool);
    add_bias(q, qw, n, b.q.bias);
    add_bias(kc, kvw, n, b.k.bias);
    add_bias(vc, kvw, n, b.v.bias);
  }
  apply_rope(q, qw, n, c.num_heads, hd, ws.cos.data(), ws.sin.data());
  apply_rope(kc, kvw, n, c.num_kv_heads, hd, ws.cos.data(), ws.sin.data());
  if (!direct) store_rows(kv, kvw, hd, pos0, kc, vc, n, kvw);
  kernels::attention(shape, q, qw, kv.k, kv.v, kvw, attn, qw, pool);
  run_linear("o", b.o, attn, qw, xn, h);
  for (int64_t i = 0; i < n * h; ++i) x[i] += xn[i];

  rms_norm(x, b.mlp_norm.data(), eps, n, h, xn);
  if (hook) {
    run_linear("gate", b.gate, xn, h, gate, ffn);
    run_linear("up", b.up, xn, h, up, ffn);
  } else {
    const LinearTarget gate_up[2] = {{&b.gate, gate, ffn}, {&b.up, up, ffn}};
    linear_forward_many(gate_up, 2, xn, h, n, ws.linear, pool);
    add_bias(gate, ffn, n, b.gate.bias);
    add_bias(up, ffn, n, b.up.bias);
  }
  pool.parallel_for(n * ffn, 4096, [&](int64_t begin, int64_t end) {
    kernels::silu_mul(gate + begin, up + begin, end - begin);
  });
  run_linear("down", b.down, gate, ffn, xn, h);
  for (int64_t i = 0; i < n * h; ++i) x[i] += xn[i];
}

void Model::forward(std::span<const int32_t> tokens, KvCache& cache, float* logits, bool all_logits,
                    ThreadPool& pool) {
  SPARSA_CHECK(!tokens.empty(), "forward: no tokens given");
  SPARSA_CHECK(cache.size() + static_cast<int64_t>(tokens.size()) <= cache.capacity(),
               "sequence of {} tokens does not fit in the context ({} tokens)",
               cache.size() + static_cast<int64_t>(tokens.size()), cache.capacity());
  for (int32_t id : tokens)
    SPARSA_CHECK(id >= 0 && id < config_.vocab_size, "token id {} is outside the vocabulary ({})",
                 id, config_.vocab_size);
  const int64_t n = static_cast<int64_t>(tokens.size());
  for (int64_t begin = 0; begin < n; begin += kMaxChunk) {
    const int64_t len = std::min(kMaxChunk, n - begin);
    const bool last = begin + len == n;
    float* out = all_logits ? logits + begin * config_.vocab_size : (last ? logits : nullptr);
    forward_chunk(tokens.subspan(static_cast<size_t>(begin), static_cast<size_t>(len)), cache, out,
                  all_logits, pool);
  }
}

void Model::forward_chunk(std::span<const int32_t> tokens, KvCache& cache, float* logits,
                          bool all_logits, ThreadPool& pool) {
  const io::ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t h = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  if (static_cast<int64_t>(x_.size()) < n * h) x_.resize(static_cast<size_t>(n * h));
  ws_.reserve(c, n);
  float* x = x_.data();
  for (int64_t t = 0; t < n; ++t) to_f32(embed_, tokens[static_cast<size_t>(t)] * h, h, x + t * h);
  for (int64_t l = 0; l < c.num_layers; ++l)
    block_forward(c, blocks_[static_cast<size_t>(l)], l, rope_inv_freq_, x, n, cache.size(),
                  cache.layer(l), ws_, hook_, pool);
  cache.advance(n);
  if (logits == nullptr) return;
  float* xn = ws_.xn.data();
  if (all_logits) {
    rms_norm(x, final_norm_.data(), eps, n, h, xn);
    linear_forward(lm_head_, xn, h, n, logits, c.vocab_size, ws_.linear, pool);
  } else {
    rms_norm(x + (n - 1) * h, final_norm_.data(), eps, 1, h, xn);
    linear_forward(lm_head_, xn, h, 1, logits, c.vocab_size, ws_.linear, pool);
  }
}

}  // namespace sparsa::model
