#include "sparsa/train/model.h"

#include <algorithm>
#include <cstring>

#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"
#include "sparsa/model/llama.h"
#include "sparsa/train/ops.h"

namespace sparsa::train {

namespace {

void to_f32(DType dt, const void* src, int64_t n, float* out) {
  switch (dt) {
    case DType::F32:
      std::memcpy(out, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::BF16: {
      const auto* p = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(p[i]);
      return;
    }
    case DType::F16: {
      const auto* p = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(p[i]);
      return;
    }
    default:
      fail("train: weights of dtype {} cannot be trained", dtype_name(dt));
  }
}

}  // namespace

Model::Model(const io::ModelConfig& c) : config_(c) {
  SPARSA_CHECK(c.hidden_size > 0 && c.num_layers > 0 && c.num_heads > 0 && c.num_kv_heads > 0 &&
                   c.num_heads % c.num_kv_heads == 0 && c.head_dim > 0 && c.head_dim % 2 == 0 &&
                   c.vocab_size > 0 && c.intermediate_size > 0,
               "train: unsupported model shape (hidden {}, heads {}/{}, head_dim {})",
               c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
  const int64_t h = c.hidden_size, qd = c.num_heads * c.head_dim, kd = c.num_kv_heads * c.head_dim,
                f = c.intermediate_size;
  int64_t off = 0;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, bool linear) {
    ParamTensor t;
    t.name = name;
    t.numel = 1;
    for (int64_t d : shape) t.numel *= d;
    t.shape = std::move(shape);
    t.matrix = t.shape.size() == 2;
    t.linear = linear;
    // Every tensor starts on a 64-byte boundary.
    off = (off + 15) / 16 * 16;
    t.offset = off;
    off += t.numel;
    tensors_.push_back(t);
    return t.offset;
  };
  embed_ = add("model.embed_tokens.weight", {c.vocab_size, h}, false);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerOffsets o;
    o.attn_norm = add(p + "input_layernorm.weight", {h}, false);
    o.wq = add(p + "self_attn.q_proj.weight", {qd, h}, true);
    if (c.attention_bias) o.bq = add(p + "self_attn.q_proj.bias", {qd}, false);
    o.wk = add(p + "self_attn.k_proj.weight", {kd, h}, true);
    if (c.attention_bias) o.bk = add(p + "self_attn.k_proj.bias", {kd}, false);
    o.wv = add(p + "self_attn.v_proj.weight", {kd, h}, true);
    if (c.attention_bias) o.bv = add(p + "self_attn.v_proj.bias", {kd}, false);
    o.wo = add(p + "self_attn.o_proj.weight", {h, qd}, true);
    if (c.o_bias) o.bo = add(p + "self_attn.o_proj.bias", {h}, false);
    o.mlp_norm = add(p + "post_attention_layernorm.weight", {h}, false);
    o.wgate = add(p + "mlp.gate_proj.weight", {f, h}, true);
    if (c.mlp_bias) o.bgate = add(p + "mlp.gate_proj.bias", {f}, false);
    o.wup = add(p + "mlp.up_proj.weight", {f, h}, true);
    if (c.mlp_bias) o.bup = add(p + "mlp.up_proj.bias", {f}, false);
    o.wdown = add(p + "mlp.down_proj.weight", {h, f}, true);
    if (c.mlp_bias) o.bdown = add(p + "mlp.down_proj.bias", {h}, false);
    layer_offsets_.push_back(o);
  }
  final_norm_ = add("model.norm.weight", {h}, false);
  lm_head_ = c.tie_word_embeddings ? embed_ : add("lm_head.weight", {c.vocab_size, h}, false);
  params_.assign(static_cast<size_t>(off), 0.0f);
  inv_freq_ = model::rope_inverse_frequencies(c);
}

Model Model::load(const std::string& dir) {
  // The f32 reference path: every linear weight as a dense matrix (`Linear::weight`).
  const auto src = model::Model::load(dir, {.linear = model::LinearPath::kReference});
  const io::ModelConfig& c = src->config();
  Model m(c);
  auto put_vec = [&](const std::string& name, const std::vector<float>& v) {
    const ParamTensor* t = m.find(name);
    SPARSA_CHECK(t != nullptr && t->numel == static_cast<int64_t>(v.size()),
                 "train: {}: tensor '{}' does not fit the training layout", dir, name);
    std::copy(v.begin(), v.end(), m.params_.begin() + t->offset);
  };
  auto put_linear = [&](const std::string& module, const model::Linear& l) {
    const ParamTensor* t = m.find(module + ".weight");
    SPARSA_CHECK(t != nullptr && l.weight.data != nullptr &&
                     t->numel == l.weight.rows * l.weight.cols,
                 "train: {}: '{}' does not fit the training layout", dir, module);
    to_f32(l.weight.dtype, l.weight.data, t->numel, m.params_.data() + t->offset);
    if (!l.bias.empty()) put_vec(module + ".bias", l.bias);
  };
  const io::TensorView& e = src->embedding();
  to_f32(e.dtype, e.data, c.vocab_size * c.hidden_size, m.params_.data() + m.embed_);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const model::Block& b = src->blocks()[static_cast<size_t>(l)];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    put_vec(p + "input_layernorm.weight", b.attn_norm);
    put_vec(p + "post_attention_layernorm.weight", b.mlp_norm);
    put_linear(p + "self_attn.q_proj", b.q);
    put_linear(p + "self_attn.k_proj", b.k);
    put_linear(p + "self_attn.v_proj", b.v);
    put_linear(p + "self_attn.o_proj", b.o);
    put_linear(p + "mlp.gate_proj", b.gate);
    put_linear(p + "mlp.up_proj", b.up);
    put_linear(p + "mlp.down_proj", b.down);
  }
  put_vec("model.norm.weight", src->final_norm());
  if (!c.tie_word_embeddings) {
    put_linear("lm_head", src->lm_head());
  }
  return m;
}

const ParamTensor* Model::find(const std::string& name) const {
  for (const ParamTensor& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

float* Model::param(const std::string& name) {
  const ParamTensor* t = find(name);
  SPARSA_CHECK(t != nullptr, "train: no parameter '{}'", name);
  return params_.data() + t->offset;
}

void Model::enable_gradients() {
  if (grads_.empty()) grads_.assign(params_.size(), 0.0f);
  if (planned_batch_ > 0) {
    const int64_t b = planned_batch_, s = planned_seq_;
    planned_batch_ = planned_seq_ = 0;
    plan_activations(b, s);
  }
}

float* Model::forward_weights() {
  if (fwd_.empty()) fwd_ = params_;
  return fwd_.data();
}

void Model::zero_grad() { std::fill(grads_.begin(), grads_.end(), 0.0f); }

std::vector<Model::LayerParams> Model::layer_views(const float* base) const {
  std::vector<LayerParams> out;
  // The views are mutable for the gradient buffer; parameters are only read through them.
  float* b = const_cast<float*>(base);
  auto at = [b](int64_t off) { return off < 0 ? nullptr : b + off; };
  for (const LayerOffsets& o : layer_offsets_) {
    out.push_back({at(o.attn_norm), at(o.wq), at(o.wk), at(o.wv), at(o.wo), at(o.mlp_norm),
                   at(o.wgate), at(o.wup), at(o.wdown), at(o.bq), at(o.bk), at(o.bv), at(o.bo),
                   at(o.bgate), at(o.bup), at(o.bdown)});
  }
  return out;
}

void Model::plan_activations(int64_t batch, int64_t seq) {
  if (batch * seq <= planned_batch_ * planned_seq_ && seq <= planned_seq_ &&
      batch <= planned_batch_)
    return;
  const io::ModelConfig& c = config_;
  const int64_t n = batch * seq, h = c.hidden_size, qd = c.num_heads * c.head_dim,
                kd = c.num_kv_heads * c.head_dim, f = c.intermediate_size, v = c.vocab_size,
                half = c.head_dim / 2;
  // Sizes first, then one allocation; every view starts on a 64-byte boundary.
  std::vector<std::pair<float**, int64_t>> plan;
  x0_ = nullptr;
  plan.push_back({&x0_, n * h});
  layer_acts_.assign(static_cast<size_t>(c.num_layers), LayerActs{});
  for (LayerActs& a : layer_acts_) {
    plan.push_back({&a.ln1, n * h});
    plan.push_back({&a.rstd1, n});
    plan.push_back({&a.q, n * qd});
    plan.push_back({&a.k, n * kd});
    plan.push_back({&a.v, n * kd});
    plan.push_back({&a.att, batch * c.num_heads * seq * seq});
    plan.push_back({&a.atty, n * qd});
    plan.push_back({&a.res2, n * h});
    plan.push_back({&a.ln2, n * h});
    plan.push_back({&a.rstd2, n});
    plan.push_back({&a.gate, n * f});
    plan.push_back({&a.up, n * f});
    plan.push_back({&a.swi, n * f});
    plan.push_back({&a.res3, n * h});
  }
  plan.push_back({&lnf_, n * h});
  plan.push_back({&rstdf_, n});
  plan.push_back({&logits_, n * v});
  plan.push_back({&cos_, seq * half});
  plan.push_back({&sin_, seq * half});
  int64_t total = 0;
  for (auto& [p, size] : plan) total += (size + 15) / 16 * 16;
  acts_.assign(static_cast<size_t>(total), 0.0f);
  int64_t off = 0;
  for (auto& [p, size] : plan) {
    *p = acts_.data() + off;
    off += (size + 15) / 16 * 16;
  }

  grad_acts_.clear();
  dblock_.assign(static_cast<size_t>(c.num_layers), nullptr);
  if (!grads_.empty()) {
    std::vector<std::pair<float**, int64_t>> g = {
        {&dlogits_, n * v}, {&dres_, n * h}, {&dln_, n * h},    {&dswi_, n * f},
        {&dgate_, n * f},   {&dup_, n * f},  {&datty_, n * qd}, {&dq_, n * qd},
        {&dk_, n * kd},     {&dv_, n * kd}};
    for (float*& d : dblock_) g.push_back({&d, n * h});
    int64_t gt = 0;
    for (auto& [p, size] : g) gt += (size + 15) / 16 * 16;
    grad_acts_.assign(static_cast<size_t>(gt), 0.0f);
    int64_t go = 0;
    for (auto& [p, size] : g) {
      *p = grad_acts_.data() + go;
      go += (size + 15) / 16 * 16;
    }
  }
  planned_batch_ = batch;
  planned_seq_ = seq;
}

const float* Model::block_output(int64_t layer) const {
  SPARSA_CHECK(layer >= 0 && layer < config_.num_layers && !layer_acts_.empty(),
               "train: no block output {} (run forward first)", layer);
  return layer_acts_[static_cast<size_t>(layer)].res3;
}

float* Model::dblock_output(int64_t layer) {
  SPARSA_CHECK(layer >= 0 && layer < config_.num_layers && !grad_acts_.empty(),
               "train: no block gradient {} (enable_gradients and run forward first)", layer);
  return dblock_[static_cast<size_t>(layer)];
}

void Model::forward(const int32_t* ids, int64_t batch, int64_t seq, ThreadPool& pool) {
  const io::ModelConfig& c = config_;
  SPARSA_CHECK(batch > 0 && seq > 0, "train: empty batch ({} x {})", batch, seq);
  SPARSA_CHECK(seq <= c.max_context(), "train: sequence of {} tokens exceeds the context ({})",
               seq, c.max_context());
  const int64_t n = batch * seq;
  for (int64_t i = 0; i < n; ++i)
    SPARSA_CHECK(ids[i] >= 0 && ids[i] < c.vocab_size,
                 "train: token id {} is outside the vocabulary ({})", ids[i], c.vocab_size);
  plan_activations(batch, seq);
  batch_ = batch;
  seq_ = seq;
  ids_.assign(ids, ids + n);
  const ops::BlasSingleThread blas;
  const int64_t h = c.hidden_size, qd = c.num_heads * c.head_dim,
                kd = c.num_kv_heads * c.head_dim, f = c.intermediate_size, hd = c.head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const ops::AttentionShape shape{batch, seq, c.num_heads, c.num_kv_heads, hd};
  const float* W = weights();
  const std::vector<LayerParams> P = layer_views(W);
  ops::rope_tables(cos_, sin_, inv_freq_.data(), seq, hd / 2);
  ops::embedding_forward(x0_, ids, W + embed_, n, h);
  const float* x = x0_;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerParams& p = P[static_cast<size_t>(l)];
    const LayerActs& a = layer_acts_[static_cast<size_t>(l)];
    ops::rmsnorm_forward(a.ln1, a.rstd1, x, p.attn_norm, n, h, eps, pool);
    ops::matmul_forward(a.q, a.ln1, p.wq, p.bq, n, h, qd, pool);
    ops::matmul_forward(a.k, a.ln1, p.wk, p.bk, n, h, kd, pool);
    ops::matmul_forward(a.v, a.ln1, p.wv, p.bv, n, h, kd, pool);
    ops::rope_forward(a.q, cos_, sin_, batch, seq, c.num_heads, hd, pool);
    ops::rope_forward(a.k, cos_, sin_, batch, seq, c.num_kv_heads, hd, pool);
    ops::attention_forward(a.atty, a.att, a.q, a.k, a.v, shape, pool);
    ops::matmul_forward(a.res2, a.atty, p.wo, p.bo, n, qd, h, pool);
    ops::add_inplace(a.res2, x, n * h, pool);
    ops::rmsnorm_forward(a.ln2, a.rstd2, a.res2, p.mlp_norm, n, h, eps, pool);
    ops::matmul_forward(a.gate, a.ln2, p.wgate, p.bgate, n, h, f, pool);
    ops::matmul_forward(a.up, a.ln2, p.wup, p.bup, n, h, f, pool);
    ops::swiglu_forward(a.swi, a.gate, a.up, n * f, pool);
    ops::matmul_forward(a.res3, a.swi, p.wdown, p.bdown, n, f, h, pool);
    ops::add_inplace(a.res3, a.res2, n * h, pool);
    x = a.res3;
  }
  ops::rmsnorm_forward(lnf_, rstdf_, x, W + final_norm_, n, h, eps, pool);
  ops::matmul_forward(logits_, lnf_, W + lm_head_, nullptr, n, h, c.vocab_size, pool);
  if (!grad_acts_.empty()) {
    std::fill_n(dlogits_, n * c.vocab_size, 0.0f);
    for (float* d : dblock_) std::fill_n(d, n * h, 0.0f);
  }
}

void Model::backward(ThreadPool& pool) {
  SPARSA_CHECK(!grads_.empty(), "train: backward needs enable_gradients()");
  SPARSA_CHECK(batch_ > 0, "train: backward before forward");
  const io::ModelConfig& c = config_;
  const ops::BlasSingleThread blas;
  const int64_t batch = batch_, seq = seq_, n = batch * seq;
  const int64_t h = c.hidden_size, qd = c.num_heads * c.head_dim,
                kd = c.num_kv_heads * c.head_dim, f = c.intermediate_size, hd = c.head_dim;
  const ops::AttentionShape shape{batch, seq, c.num_heads, c.num_kv_heads, hd};
  const float* W = weights();
  const std::vector<LayerParams> P = layer_views(W);
  const std::vector<LayerParams> G = layer_views(grads_.data());
  auto zero = [](float* p, int64_t size) { std::fill_n(p, size, 0.0f); };

  zero(dln_, n * h);
  ops::matmul_backward(dln_, grads_.data() + lm_head_, nullptr, dlogits_, lnf_, W + lm_head_, n,
                       h, c.vocab_size, pool);
  zero(dres_, n * h);
  const float* last = layer_acts_.back().res3;
  ops::rmsnorm_backward(dres_, grads_.data() + final_norm_, dln_, last, W + final_norm_, rstdf_, n,
                        h, pool);
  for (int64_t l = c.num_layers - 1; l >= 0; --l) {
    const LayerParams& p = P[static_cast<size_t>(l)];
    const LayerParams& g = G[static_cast<size_t>(l)];
    const LayerActs& a = layer_acts_[static_cast<size_t>(l)];
    const float* x = l == 0 ? x0_ : layer_acts_[static_cast<size_t>(l - 1)].res3;
    ops::add_inplace(dres_, dblock_[static_cast<size_t>(l)], n * h, pool);
    // MLP: res3 = res2 + down(swiglu(gate(ln2), up(ln2))), ln2 = rmsnorm(res2).
    zero(dswi_, n * f);
    ops::matmul_backward(dswi_, g.wdown, g.bdown, dres_, a.swi, p.wdown, n, f, h, pool);
    zero(dgate_, n * f);
    zero(dup_, n * f);
    ops::swiglu_backward(dgate_, dup_, dswi_, a.gate, a.up, n * f, pool);
    zero(dln_, n * h);
    ops::matmul_backward(dln_, g.wgate, g.bgate, dgate_, a.ln2, p.wgate, n, h, f, pool);
    ops::matmul_backward(dln_, g.wup, g.bup, dup_, a.ln2, p.wup, n, h, f, pool);
    ops::rmsnorm_backward(dres_, g.mlp_norm, dln_, a.res2, p.mlp_norm, a.rstd2, n, h, pool);
    // Attention: res2 = x + o(attn(rope(q(ln1)), rope(k(ln1)), v(ln1))), ln1 = rmsnorm(x).
    zero(datty_, n * qd);
    ops::matmul_backward(datty_, g.wo, g.bo, dres_, a.atty, p.wo, n, qd, h, pool);
    zero(dq_, n * qd);
    zero(dk_, n * kd);
    zero(dv_, n * kd);
    ops::attention_backward(dq_, dk_, dv_, datty_, a.att, a.q, a.k, a.v, shape, pool);
    ops::rope_backward(dq_, cos_, sin_, batch, seq, c.num_heads, hd, pool);
    ops::rope_backward(dk_, cos_, sin_, batch, seq, c.num_kv_heads, hd, pool);
    zero(dln_, n * h);
    ops::matmul_backward(dln_, g.wq, g.bq, dq_, a.ln1, p.wq, n, h, qd, pool);
    ops::matmul_backward(dln_, g.wk, g.bk, dk_, a.ln1, p.wk, n, h, kd, pool);
    ops::matmul_backward(dln_, g.wv, g.bv, dv_, a.ln1, p.wv, n, h, kd, pool);
    ops::rmsnorm_backward(dres_, g.attn_norm, dln_, x, p.attn_norm, a.rstd1, n, h, pool);
  }
  ops::embedding_backward(grads_.data() + embed_, dres_, ids_.data(), n, h);
}

}  // namespace sparsa::train
