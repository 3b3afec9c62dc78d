#include "sparsa/model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>

#include <nlohmann/json.hpp>

#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"

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

Linear load_linear(const io::Checkpoint& ck, const std::string& prefix, int64_t out, int64_t in,
                   bool bias, const io::CompressionConfig& compression) {
  Linear l;
  if (io::is_compressed_weight(ck, prefix)) {
    // Compressed layouts are decoded to f32 once (fast kernels over the packed formats read
    // them directly where they exist).
    io::DecodedWeight d = io::decode_weight(ck, prefix, out, in, compression);
    auto owned = std::make_shared<const std::vector<float>>(std::move(d.values));
    l.name = prefix;
    l.weight = kernels::DenseWeight{DType::F32, out, in, owned->data()};
    l.owned = std::move(owned);
    l.format = d.format;
    l.input_bits = d.input_activation_bits;
    l.stored_bytes = stored_bytes(ck, prefix);
  } else {
    l.name = prefix + ".weight";
    const io::TensorView& w = get_shaped(ck, l.name, {out, in});
    l.weight = kernels::DenseWeight{w.dtype, out, in, w.data};
    l.stored_bytes = w.nbytes;
  }
  if (bias) l.bias = load_vector(ck, prefix + ".bias", out);
  return l;
}

}  // namespace

void rms_norm(const float* x, const float* w, float eps, int64_t n, int64_t dim, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * dim;
    float* ot = out + t * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xt[i]) * xt[i];
    const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    for (int64_t i = 0; i < dim; ++i) ot[i] = w[i] * (xt[i] * r);
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

// Rotary embedding, rotate-half convention (HF Llama): the pair is (x[i], x[i + d/2]).
void apply_rope(float* x, int64_t ld, int64_t n, int64_t heads, int64_t hd, const float* cos,
                const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t t = 0; t < n; ++t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + t * ld + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
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

KvCache::KvCache(const io::ModelConfig& c, int64_t max_tokens) {
  SPARSA_CHECK(max_tokens > 0, "KV cache size must be positive, got {}", max_tokens);
  capacity_ = std::min(max_tokens, c.max_context());
  row_ = c.num_kv_heads * c.head_dim;
  k_.assign(static_cast<size_t>(c.num_layers),
            std::vector<float>(static_cast<size_t>(capacity_ * row_)));
  v_ = k_;
}

void KvCache::truncate(int64_t n) { size_ = std::clamp<int64_t>(n, 0, size_); }

std::unique_ptr<Model> Model::load(const std::string& dir) {
  std::unique_ptr<Model> m(new Model());
  m->config_ = io::ModelConfig::from_dir(dir);
  m->checkpoint_ = io::Checkpoint::open_dir(dir);
  m->compression_ = io::read_compression_config(
      nlohmann::json::parse(read_text_file(dir + "/config.json")), dir + "/config.json");
  const io::ModelConfig& c = m->config_;
  const io::Checkpoint& ck = m->checkpoint_;
  const int64_t h = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  m->embed_ = get_shaped(ck, "model.embed_tokens.weight", {c.vocab_size, h});
  m->blocks_.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Block& b = m->blocks_[static_cast<size_t>(l)];
    b.attn_norm = load_vector(ck, p + "input_layernorm.weight", h);
    b.mlp_norm = load_vector(ck, p + "post_attention_layernorm.weight", h);
    b.q = load_linear(ck, p + "self_attn.q_proj", q, h, c.attention_bias, m->compression_);
    b.k = load_linear(ck, p + "self_attn.k_proj", kv, h, c.attention_bias, m->compression_);
    b.v = load_linear(ck, p + "self_attn.v_proj", kv, h, c.attention_bias, m->compression_);
    b.o = load_linear(ck, p + "self_attn.o_proj", h, q, c.o_bias, m->compression_);
    b.gate = load_linear(ck, p + "mlp.gate_proj", c.intermediate_size, h, c.mlp_bias, m->compression_);
    b.up = load_linear(ck, p + "mlp.up_proj", c.intermediate_size, h, c.mlp_bias, m->compression_);
    b.down = load_linear(ck, p + "mlp.down_proj", h, c.intermediate_size, c.mlp_bias, m->compression_);
  }
  m->final_norm_ = load_vector(ck, "model.norm.weight", h);
  if (c.tie_word_embeddings && ck.find("lm_head.weight") == nullptr) {
    m->lm_head_.name = "model.embed_tokens.weight";
    m->lm_head_.weight = kernels::DenseWeight{m->embed_.dtype, c.vocab_size, h, m->embed_.data};
  } else {
    m->lm_head_ = load_linear(ck, "lm_head", c.vocab_size, h, false, m->compression_);
  }
  m->rope_inv_freq_ = rope_inverse_frequencies(c);
  return m;
}

size_t Model::weight_bytes_per_token() const {
  // What one step reads: the weights as the kernels see them (decoded f32 for compressed
  // layers, until their packed kernels exist).
  auto bytes = [](const Linear& l) {
    return static_cast<size_t>(l.weight.rows * l.weight.cols) * dtype_size(l.weight.dtype) +
           l.bias.size() * sizeof(float);
  };
  size_t total = bytes(lm_head_) + static_cast<size_t>(config_.hidden_size) * dtype_size(embed_.dtype);
  for (const Block& b : blocks_)
    for (const Linear* l : {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down}) total += bytes(*l);
  return total;
}

void BlockWorkspace::reserve(const io::ModelConfig& c, int64_t n) {
  if (n <= tokens) return;
  auto grow = [n](std::vector<float>& v, int64_t width) { v.resize(static_cast<size_t>(n * width)); };
  grow(xn, c.hidden_size);
  grow(q, c.num_heads * c.head_dim);
  grow(attn, c.num_heads * c.head_dim);
  grow(gate, c.intermediate_size);
  grow(up, c.intermediate_size);
  grow(cos, c.head_dim / 2);
  grow(sin, c.head_dim / 2);
  grow(xq, std::max({c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size}));
  tokens = n;
}

void block_forward(const io::ModelConfig& c, const Block& b, int64_t layer,
                   const std::vector<float>& inv_freq, float* x, int64_t n, int64_t pos0,
                   float* k_cache, float* v_cache, BlockWorkspace& ws,
                   const LinearInputHook& hook, ThreadPool& pool) {
  const int64_t h = c.hidden_size, hd = c.head_dim, half = hd / 2;
  const int64_t qw = c.num_heads * hd, kvw = c.num_kv_heads * hd, ffn = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  ws.reserve(c, n);
  float *xn = ws.xn.data(), *q = ws.q.data(), *attn = ws.attn.data();
  float *gate = ws.gate.data(), *up = ws.up.data();
  for (int64_t t = 0; t < n; ++t) {
    // HF: freqs = position (f32) * inv_freq (f32), then cos/sin in f32.
    const float pos = static_cast<float>(pos0 + t);
    for (int64_t i = 0; i < half; ++i) {
      const float a = pos * inv_freq[static_cast<size_t>(i)];
      ws.cos[static_cast<size_t>(t * half + i)] = std::cos(a);
      ws.sin[static_cast<size_t>(t * half + i)] = std::sin(a);
    }
  }
  auto run_linear = [&](const char* tag, const Linear& l, const float* in, int64_t ldin,
                        float* out, int64_t ldout) {
    if (hook) hook(layer, tag, in, n);
    if (l.input_bits == 8) {
      const int64_t cols = l.weight.cols;
      for (int64_t t = 0; t < n; ++t)
        quantize_activations_int8(in + t * ldin, 1, cols, ws.xq.data() + t * cols);
      in = ws.xq.data();
      ldin = cols;
    }
    kernels::linear(l.weight, in, ldin, n, out, ldout, pool);
    add_bias(out, ldout, n, l.bias);
  };
  kernels::AttentionShape shape;
  shape.n_q = n;
  shape.pos0 = pos0;
  shape.n_heads = static_cast<int>(c.num_heads);
  shape.n_kv_heads = static_cast<int>(c.num_kv_heads);
  shape.head_dim = static_cast<int>(hd);
  shape.scale = 1.0f / std::sqrt(static_cast<float>(hd));

  float* kc = k_cache + pos0 * kvw;
  float* vc = v_cache + pos0 * kvw;
  rms_norm(x, b.attn_norm.data(), eps, n, h, xn);
  if (hook || b.q.input_bits || b.k.input_bits || b.v.input_bits) {
    run_linear("q", b.q, xn, h, q, qw);
    run_linear("k", b.k, xn, h, kc, kvw);
    run_linear("v", b.v, xn, h, vc, kvw);
  } else {
    const kernels::LinearOutput qkv[3] = {
        {b.q.weight, q, qw}, {b.k.weight, kc, kvw}, {b.v.weight, vc, kvw}};
    kernels::linear_many(qkv, 3, xn, h, n, pool);
    add_bias(q, qw, n, b.q.bias);
    add_bias(kc, kvw, n, b.k.bias);
    add_bias(vc, kvw, n, b.v.bias);
  }
  apply_rope(q, qw, n, c.num_heads, hd, ws.cos.data(), ws.sin.data());
  apply_rope(kc, kvw, n, c.num_kv_heads, hd, ws.cos.data(), ws.sin.data());
  kernels::attention(shape, q, qw, k_cache, v_cache, kvw, attn, qw, pool);
  run_linear("o", b.o, attn, qw, xn, h);
  for (int64_t i = 0; i < n * h; ++i) x[i] += xn[i];

  rms_norm(x, b.mlp_norm.data(), eps, n, h, xn);
  if (hook || b.gate.input_bits || b.up.input_bits) {
    run_linear("gate", b.gate, xn, h, gate, ffn);
    run_linear("up", b.up, xn, h, up, ffn);
  } else {
    const kernels::LinearOutput gate_up[2] = {{b.gate.weight, gate, ffn}, {b.up.weight, up, ffn}};
    kernels::linear_many(gate_up, 2, xn, h, n, pool);
    add_bias(gate, ffn, n, b.gate.bias);
    add_bias(up, ffn, n, b.up.bias);
  }
  pool.parallel_for(n * ffn, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = gate[i];
      gate[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  });
  run_linear("down", b.down, gate, ffn, xn, h);
  for (int64_t i = 0; i < n * h; ++i) x[i] += xn[i];
}

void Model::forward(std::span<const int32_t> tokens, KvCache& cache, float* logits,
                    bool all_logits, ThreadPool& pool) {
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
    forward_chunk(tokens.subspan(static_cast<size_t>(begin), static_cast<size_t>(len)), cache,
                  out, all_logits, pool);
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
                  cache.keys(l), cache.values(l), ws_, hook_, pool);
  cache.advance(n);
  if (logits == nullptr) return;
  float* xn = ws_.xn.data();
  if (all_logits) {
    rms_norm(x, final_norm_.data(), eps, n, h, xn);
    kernels::linear(lm_head_.weight, xn, h, n, logits, c.vocab_size, pool);
  } else {
    rms_norm(x + (n - 1) * h, final_norm_.data(), eps, 1, h, xn);
    kernels::linear(lm_head_.weight, xn, h, 1, logits, c.vocab_size, pool);
  }
}

}  // namespace sparsa::model
