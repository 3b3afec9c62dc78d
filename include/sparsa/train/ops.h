// The training ops of a Llama block, forward and backward, as free functions over raw f32
// pointers and shapes (the llm.c layout: row-major activations [tokens, features], weights
// [out_features, in_features] as Hugging Face stores them).
//
//   using namespace sparsa::train;
//   ops::rmsnorm_forward(xn, rstd, x, w, n, c, eps, pool);
//   ops::matmul_forward(q, xn, wq, nullptr, n, c, qdim, pool);
//   ...
//   ops::matmul_backward(dxn, dwq, nullptr, dq, xn, wq, n, c, qdim, pool);
//   ops::rmsnorm_backward(dx, dw, dxn, x, w, rstd, n, c, pool);
//
// Conventions
// - Every backward *accumulates* (+=) into its gradient outputs, as llm.c's do: a residual
//   stream's gradient and a weight used by several micro-batches add up without copies. Callers
//   zero the buffers they want fresh.
// - Reductions run in an order that depends on the shapes only (never on which thread ran what),
//   so a step's result is bit-for-bit the same from run to run with the same thread count.
// - This is the CPU backend; GEMMs go through OpenBLAS (cblas_sgemm), split over the pool's
//   threads by output blocks. A CUDA backend mirrors these signatures (pointers to device memory,
//   a stream instead of the pool).
#pragma once

#include <cstdint>

#include "sparsa/core/thread_pool.h"

namespace sparsa::train::ops {

/// out[t] = table[ids[t]]; out [n, c], table [vocab, c].
void embedding_forward(float* out, const int32_t* ids, const float* table, int64_t n, int64_t c);
/// dtable[ids[t]] += dout[t].
void embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t n,
                        int64_t c);

/// RMSNorm (Zhang & Sennrich 2019): out[t] = w ⊙ x[t] · rstd[t], rstd[t] = 1/sqrt(mean(x[t]²)+eps).
/// x, out [n, c]; rstd [n] is kept for the backward.
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t n,
                     int64_t c, float eps, ThreadPool& pool);
/// dx += ∂L/∂x, dw += ∂L/∂w (dw may be null).
void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w,
                      const float* rstd, int64_t n, int64_t c, ThreadPool& pool);

/// out [n, oc] = in [n, c] · w [oc, c]ᵀ (+ bias [oc] unless null).
void matmul_forward(float* out, const float* in, const float* w, const float* bias, int64_t n,
                    int64_t c, int64_t oc, ThreadPool& pool);
/// din += dout · w, dw += doutᵀ · in, dbias += Σ_t dout[t]; any of din, dw, dbias may be null.
void matmul_backward(float* din, float* dw, float* dbias, const float* dout, const float* in,
                     const float* w, int64_t n, int64_t c, int64_t oc, ThreadPool& pool);

/// cos, sin [t, hd/2] for positions 0..t-1: angle = position · inv_freq[i] (f32, as HF computes).
void rope_tables(float* cos, float* sin, const float* inv_freq, int64_t t, int64_t half);
/// Rotary embedding, rotate-half convention (HF Llama), in place on x [b, t, heads · hd]:
/// (x_i, x_{i+hd/2}) ← (x_i cos − x_{i+hd/2} sin, x_{i+hd/2} cos + x_i sin).
void rope_forward(float* x, const float* cos, const float* sin, int64_t b, int64_t t,
                  int64_t heads, int64_t hd, ThreadPool& pool);
/// The transposed rotation, in place on dx (the gradient of the output becomes that of the input).
void rope_backward(float* dx, const float* cos, const float* sin, int64_t b, int64_t t,
                   int64_t heads, int64_t hd, ThreadPool& pool);

/// Causal grouped-query attention: q head h reads kv head h / (n_heads / n_kv_heads).
struct AttentionShape {
  int64_t batch = 1;
  int64_t seq = 1;  // tokens per sequence
  int64_t n_heads = 1;
  int64_t n_kv_heads = 1;
  int64_t head_dim = 1;
};
/// q [b, t, nh·hd], k and v [b, t, nkv·hd] (rotated already), out [b, t, nh·hd];
/// att [b, nh, t, t] receives the softmax probabilities (entries above the diagonal are 0),
/// scores scaled by 1/sqrt(hd).
void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                       const AttentionShape& s, ThreadPool& pool);
/// dq, dk, dv += the gradients (same shapes as q, k, v).
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* att,
                        const float* q, const float* k, const float* v, const AttentionShape& s,
                        ThreadPool& pool);

/// SwiGLU (Shazeer 2020): out = silu(gate) ⊙ up over n values.
void swiglu_forward(float* out, const float* gate, const float* up, int64_t n, ThreadPool& pool);
/// dgate += ∂L/∂gate, dup += ∂L/∂up.
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t n, ThreadPool& pool);

/// y += x over n values.
void add_inplace(float* y, const float* x, int64_t n, ThreadPool& pool);

// ---- losses: each returns the loss (a mean over rows) and, when dlogits is not null, adds
// ---- grad_scale · ∂loss/∂input to it.

/// Next-token cross-entropy: mean over the n rows of −log softmax(logits[t])[targets[t]];
/// rows whose target is negative are ignored (and do not count in the mean).
double cross_entropy(float* dlogits, const float* logits, const int32_t* targets, int64_t n,
                     int64_t vocab, float grad_scale, ThreadPool& pool);

/// Logit distillation (Hinton et al. 2015): T² · mean_t KL(softmax(teacher/T) ‖ softmax(student/T)).
/// The T² keeps the gradient's size independent of T.
double kl_distillation(float* dstudent, const float* student, const float* teacher, int64_t n,
                       int64_t vocab, float temperature, float grad_scale, ThreadPool& pool);

/// SquareHead feature distillation of one layer (Kurtic et al. 2023, "Sparse Fine-tuning for
/// Inference Acceleration of Large Language Models", eq. 2): MSE(student, teacher) / MSE(teacher, 0)
/// over `numel` values.
double squarehead(float* dstudent, const float* student, const float* teacher, int64_t numel,
                  float grad_scale, ThreadPool& pool);

// ---- optimizer ----------------------------------------------------------------------------------

/// Σ g² in f64, reduced in a fixed order.
double sum_of_squares(const float* g, int64_t n, ThreadPool& pool);
/// g *= s.
void scale(float* g, float s, int64_t n, ThreadPool& pool);

struct AdamW {
  float lr = 1e-4f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
};
/// One AdamW step (Loshchilov & Hutter 2019, decoupled weight decay) at step t (1-based):
/// m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²; w ← w − lr (m̂ / (sqrt(v̂) + eps) + wd · w).
void adamw_update(float* w, const float* g, float* m, float* v, int64_t n, const AdamW& opt,
                  int64_t t, ThreadPool& pool);

/// x[i] = 0 where keep[i] == 0 (weights after a step, gradients before one).
void apply_mask(float* x, const uint8_t* keep, int64_t n, ThreadPool& pool);

/// Keeps OpenBLAS single-threaded while alive (the ops split GEMMs over the ThreadPool
/// themselves), then restores its thread count.
class BlasSingleThread {
 public:
  BlasSingleThread();
  ~BlasSingleThread();
  BlasSingleThread(const BlasSingleThread&) = delete;
  BlasSingleThread& operator=(const BlasSingleThread&) = delete;

 private:
  int saved_ = 1;
};

}  // namespace sparsa::train::ops
