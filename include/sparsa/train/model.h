// A Llama-family decoder for training, in llm.c's style: every parameter, gradient and
// activation lives in one planned allocation per kind (tensors are views into it), and the
// forward and backward passes are written out op by op (sparsa/train/ops.h).
//
//   sparsa::ThreadPool pool(2);
//   auto m = sparsa::train::Model::load("models/tiny");   // f32 copy of the weights
//   m.enable_gradients();
//   m.forward(ids.data(), batch, seq, pool);               // logits(): [batch·seq, vocab]
//   m.zero_grad();
//   std::fill_n(m.dlogits(), ...);  ops::cross_entropy(m.dlogits(), m.logits(), ...);
//   m.backward(pool);                                      // grads() += ∂L/∂params
//
// Parameters are named as in the Hugging Face checkpoint ("model.layers.0.self_attn.q_proj.weight");
// a tied lm_head is the embedding table itself. Biases exist where the config asks for them
// (Qwen2's q/k/v, attention_bias, mlp_bias).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sparsa/core/thread_pool.h"
#include "sparsa/io/model_config.h"

namespace sparsa::train {

/// One parameter tensor: a view [offset, offset + numel) of the parameter buffer (and of the
/// gradient and optimizer buffers, which share the layout).
struct ParamTensor {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0;
  int64_t numel = 0;
  bool matrix = false;  // 2-D (weight decay applies)
  bool linear = false;  // a projection inside a decoder block (q/k/v/o/gate/up/down), maskable
};

class Model {
 public:
  /// Zero-initialised parameters of the given shape; validates the config.
  explicit Model(const io::ModelConfig& config);
  /// Reads a Hugging Face directory through model::Model (so compressed checkpoints are decoded)
  /// and copies every weight into f32.
  static Model load(const std::string& dir);

  const io::ModelConfig& config() const { return config_; }
  /// RoPE inverse frequencies [head_dim / 2] (rope scaling applied), as model::Model uses them.
  const std::vector<float>& inv_freq() const { return inv_freq_; }
  const std::vector<ParamTensor>& tensors() const { return tensors_; }
  /// nullptr when absent.
  const ParamTensor* find(const std::string& name) const;
  int64_t num_params() const { return static_cast<int64_t>(params_.size()); }
  float* params() { return params_.data(); }
  const float* params() const { return params_.data(); }
  float* param(const std::string& name);

  /// The weights forward() and backward() compute with, when they differ from the parameters
  /// (quantization-aware training keeps fake-quantized weights here; the gradients still land in
  /// grads(), straight through). The first call allocates a copy of params().
  float* forward_weights();
  bool has_forward_weights() const { return !fwd_.empty(); }

  /// Allocates the gradient buffers (a teacher never needs them).
  void enable_gradients();
  bool has_gradients() const { return !grads_.empty(); }
  float* grads() { return grads_.data(); }
  void zero_grad();

  /// Runs `batch` sequences of `seq` tokens (ids [batch, seq]) keeping every activation the
  /// backward needs. Activation buffers are planned for the largest shape seen so far.
  void forward(const int32_t* ids, int64_t batch, int64_t seq, ThreadPool& pool);
  int64_t tokens() const { return batch_ * seq_; }
  /// [tokens, vocab] of the last forward.
  const float* logits() const { return logits_; }
  /// Output of decoder block `layer` (the residual stream after it), [tokens, hidden].
  const float* block_output(int64_t layer) const;

  /// Gradient inputs of the backward, zeroed by forward(): ∂L/∂logits, and extra ∂L/∂(block
  /// output) per layer (feature distillation adds into them).
  float* dlogits() { return dlogits_; }
  float* dblock_output(int64_t layer);
  /// grads() += ∂L/∂params for the last forward (enable_gradients() first).
  void backward(ThreadPool& pool);

 private:
  struct LayerParams {
    float *attn_norm, *wq, *wk, *wv, *wo, *mlp_norm, *wgate, *wup, *wdown;
    float *bq, *bk, *bv, *bo, *bgate, *bup, *bdown;  // nullptr when absent
  };
  struct LayerActs {
    float *ln1, *rstd1, *q, *k, *v, *att, *atty, *res2, *ln2, *rstd2, *gate, *up, *swi, *res3;
  };
  std::vector<LayerParams> layer_views(const float* base) const;
  void plan_activations(int64_t batch, int64_t seq);

  io::ModelConfig config_;
  std::vector<ParamTensor> tensors_;
  std::vector<float> params_, grads_, fwd_;
  const float* weights() const { return fwd_.empty() ? params_.data() : fwd_.data(); }
  // Offsets into the parameter buffer (-1: absent).
  struct LayerOffsets {
    int64_t attn_norm, wq, wk, wv, wo, mlp_norm, wgate, wup, wdown;
    int64_t bq = -1, bk = -1, bv = -1, bo = -1, bgate = -1, bup = -1, bdown = -1;
  };
  std::vector<LayerOffsets> layer_offsets_;
  int64_t embed_ = 0, final_norm_ = 0, lm_head_ = 0;
  std::vector<float> inv_freq_;

  // Activations of the last forward: one buffer, planned for capacity_tokens_ × capacity_seq_.
  int64_t batch_ = 0, seq_ = 0, planned_batch_ = 0, planned_seq_ = 0;
  std::vector<float> acts_;
  std::vector<int32_t> ids_;
  float *x0_ = nullptr, *lnf_ = nullptr, *rstdf_ = nullptr, *logits_ = nullptr;
  float *cos_ = nullptr, *sin_ = nullptr;
  std::vector<LayerActs> layer_acts_;
  // Gradients of activations: one buffer, reused by every layer of the backward.
  std::vector<float> grad_acts_;
  float *dlogits_ = nullptr, *dres_ = nullptr, *dln_ = nullptr, *dswi_ = nullptr,
        *dgate_ = nullptr, *dup_ = nullptr, *datty_ = nullptr, *dq_ = nullptr, *dk_ = nullptr,
        *dv_ = nullptr;
  std::vector<float*> dblock_;
};

}  // namespace sparsa::train
