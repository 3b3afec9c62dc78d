// Batched decoder step (see sparsa/model/batch.h). The structure follows block_forward() in
// llama.cc, with two differences: positions (hence rotary angles) are per stacked token, and the
// keys and values of each sequence's tokens are copied into that sequence's own cache before
// attention runs over it.
#include "sparsa/model/batch.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "sparsa/core/error.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::model {

namespace {

void grow(AlignedVector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
}

void embed_row(const io::TensorView& t, int64_t row, int64_t h, float* out) {
  const int64_t offset = row * h;
  switch (t.dtype) {
    case DType::F32:
      std::memcpy(out, t.data + offset * 4, static_cast<size_t>(h) * 4);
      return;
    case DType::BF16: {
      const auto* p = reinterpret_cast<const uint16_t*>(t.data) + offset;
      for (int64_t i = 0; i < h; ++i) out[i] = bf16_to_f32(p[i]);
      return;
    }
    case DType::F16: {
      const auto* p = reinterpret_cast<const uint16_t*>(t.data) + offset;
      for (int64_t i = 0; i < h; ++i) out[i] = f16_to_f32(p[i]);
      return;
    }
    default:
      fail("{}: embedding '{}' has dtype {}; expected F32, F16 or BF16", t.file, t.name,
           dtype_name(t.dtype));
  }
}

// Sequences with at most this many new tokens share one parallel attention run.
constexpr int64_t kFewTokens = 4;

// Runs a task list on the calling thread (a pool of one has no workers).
ThreadPool& serial_pool() {
  static ThreadPool pool(1);
  return pool;
}

}  // namespace

void forward_batch(const Model& model, std::span<const BatchSequence> seqs, BatchWorkspace& ws,
                   ThreadPool& pool) {
  const io::ModelConfig& c = model.config();
  const int64_t h = c.hidden_size, hd = c.head_dim, half = hd / 2;
  const int64_t qw = c.num_heads * hd, kvw = c.num_kv_heads * hd, ffn = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  SPARSA_CHECK(!seqs.empty(), "forward_batch: no sequences given");

  // Validate everything first, so that a bad request leaves every cache as it was.
  int64_t n = 0, n_out = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const BatchSequence& q = seqs[s];
    SPARSA_CHECK(q.cache != nullptr, "forward_batch: sequence {} has no KV cache", s);
    SPARSA_CHECK(!q.tokens.empty(), "forward_batch: sequence {} has no tokens", s);
    const int64_t len = static_cast<int64_t>(q.tokens.size());
    SPARSA_CHECK(q.cache->size() + len <= q.cache->capacity(),
                 "sequence of {} tokens does not fit in the context ({} tokens)",
                 q.cache->size() + len, q.cache->capacity());
    SPARSA_CHECK(q.cache->row_stride() == kvw, "forward_batch: KV cache of sequence {} has rows "
                 "of {} floats; the model needs {}", s, q.cache->row_stride(), kvw);
    for (int32_t id : q.tokens)
      SPARSA_CHECK(id >= 0 && id < c.vocab_size, "token id {} is outside the vocabulary ({})",
                   id, c.vocab_size);
    for (size_t o = 0; o < s; ++o)
      SPARSA_CHECK(seqs[o].cache != q.cache, "forward_batch: sequences {} and {} share a cache",
                   o, s);
    n += len;
    if (q.logits != nullptr) ++n_out;
  }

  grow(ws.x, n * h);
  grow(ws.xn, n * h);
  grow(ws.q, n * qw);
  grow(ws.k, n * kvw);
  grow(ws.v, n * kvw);
  grow(ws.attn, n * qw);
  grow(ws.gate, n * ffn);
  grow(ws.up, n * ffn);
  grow(ws.cos, n * half);
  grow(ws.sin, n * half);
  ws.pos.resize(static_cast<size_t>(n));
  float *x = ws.x.data(), *xn = ws.xn.data(), *q = ws.q.data(), *k = ws.k.data();
  float *v = ws.v.data(), *attn = ws.attn.data(), *gate = ws.gate.data(), *up = ws.up.data();

  // Stack the embeddings and record each token's position; the rotary angles depend only on the
  // position, so they are computed once for all layers (f32, as HF does).
  const std::vector<float>& inv_freq = model.rope_inv_freq();
  int64_t row = 0;
  for (const BatchSequence& s : seqs) {
    for (size_t i = 0; i < s.tokens.size(); ++i, ++row) {
      const int64_t pos = s.cache->size() + static_cast<int64_t>(i);
      ws.pos[static_cast<size_t>(row)] = pos;
      embed_row(model.embedding(), s.tokens[i], h, x + row * h);
      rope_angles(inv_freq.data(), half, pos, ws.cos.data() + row * half,
                  ws.sin.data() + row * half);
    }
  }

  std::vector<std::pair<size_t, int64_t>> few;  // (sequence, first row) of short sequences
  kernels::AttentionShape shape;
  shape.n_heads = static_cast<int>(c.num_heads);
  shape.n_kv_heads = static_cast<int>(c.num_kv_heads);
  shape.head_dim = static_cast<int>(hd);
  shape.scale = 1.0f / std::sqrt(static_cast<float>(hd));

  for (int64_t l = 0; l < c.num_layers; ++l) {
    const Block& b = model.blocks()[static_cast<size_t>(l)];
    rms_norm(x, b.attn_norm.data(), eps, n, h, xn);
    const LinearTarget qkv[3] = {{&b.q, q, qw}, {&b.k, k, kvw}, {&b.v, v, kvw}};
    linear_forward_many(qkv, 3, xn, h, n, ws.linear, pool);
    add_bias(q, qw, n, b.q.bias);
    add_bias(k, kvw, n, b.k.bias);
    add_bias(v, kvw, n, b.v.bias);
    apply_rope(q, qw, n, c.num_heads, hd, ws.cos.data(), ws.sin.data());
    apply_rope(k, kvw, n, c.num_kv_heads, hd, ws.cos.data(), ws.sin.data());

    // Attention runs per sequence over its own cache. A sequence of a few new tokens (a decode
    // step) is too little work to spread over the threads by itself: those sequences are the
    // tasks of one parallel run instead, each computed exactly as alone.
    row = 0;
    few.clear();
    for (size_t i = 0; i < seqs.size(); ++i) {
      const BatchSequence& s = seqs[i];
      const int64_t len = static_cast<int64_t>(s.tokens.size());
      const int64_t pos0 = s.cache->size();
      s.cache->write(l, pos0, k + row * kvw, v + row * kvw, len, kvw);
      if (seqs.size() > 1 && len <= kFewTokens) {
        few.push_back({i, row});
      } else {
        const model::KvLayer kv = s.cache->layer(l);
        shape.n_q = len;
        shape.pos0 = pos0;
        kv.describe(shape);
        kernels::attention(shape, q + row * qw, qw, kv.k, kv.v, kvw, attn + row * qw, qw, pool);
      }
      row += len;
    }
    pool.run(static_cast<int64_t>(few.size()), [&](int64_t t) {
      const auto [i, r] = few[static_cast<size_t>(t)];
      const BatchSequence& s = seqs[i];
      kernels::AttentionShape one = shape;
      one.n_q = static_cast<int64_t>(s.tokens.size());
      one.pos0 = s.cache->size();
      const model::KvLayer kv = s.cache->layer(l);
      kv.describe(one);
      kernels::attention(one, q + r * qw, qw, kv.k, kv.v, kvw, attn + r * qw, qw, serial_pool());
    });
    linear_forward(b.o, attn, qw, n, xn, h, ws.linear, pool);
    add_bias(xn, h, n, b.o.bias);
    for (int64_t i = 0; i < n * h; ++i) x[i] += xn[i];

    rms_norm(x, b.mlp_norm.data(), eps, n, h, xn);
    const LinearTarget gate_up[2] = {{&b.gate, gate, ffn}, {&b.up, up, ffn}};
    linear_forward_many(gate_up, 2, xn, h, n, ws.linear, pool);
    add_bias(gate, ffn, n, b.gate.bias);
    add_bias(up, ffn, n, b.up.bias);
    pool.parallel_for(n * ffn, 4096, [&](int64_t begin, int64_t end) {
      kernels::silu_mul(gate + begin, up + begin, end - begin);
    });
    linear_forward(b.down, gate, ffn, n, xn, h, ws.linear, pool);
    add_bias(xn, h, n, b.down.bias);
    for (int64_t i = 0; i < n * h; ++i) x[i] += xn[i];
  }

  // Only the last token of each sequence that asked for logits goes through lm_head, and all of
  // them in one call.
  row = 0;
  int64_t out = 0;
  for (const BatchSequence& s : seqs) {
    row += static_cast<int64_t>(s.tokens.size());
    s.cache->advance(static_cast<int64_t>(s.tokens.size()));
    if (s.logits == nullptr) continue;
    rms_norm(x + (row - 1) * h, model.final_norm().data(), eps, 1, h, xn + out * h);
    ++out;
  }
  if (n_out == 0) return;
  const int64_t vocab = c.vocab_size;
  grow(ws.logits, n_out * vocab);
  linear_forward(model.lm_head(), xn, h, n_out, ws.logits.data(), vocab, ws.linear, pool);
  out = 0;
  for (const BatchSequence& s : seqs) {
    if (s.logits == nullptr) continue;
    std::memcpy(s.logits, ws.logits.data() + out * vocab, static_cast<size_t>(vocab) * sizeof(float));
    ++out;
  }
}

}  // namespace sparsa::model
