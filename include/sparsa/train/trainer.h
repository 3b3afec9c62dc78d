// Sparse fine-tuning with distillation: AdamW with warmup and a cosine schedule, global-norm
// gradient clipping, gradient accumulation, masks that keep pruned weights exactly zero, gradual
// magnitude pruning on the cubic schedule, and a loss mixing next-token cross-entropy, logit KL
// and SquareHead against a dense teacher — as a fine-tuning stage of a recipe describes it
// (sparsa/compress/recipe.h).
//
//   sparsa::train::Model student = sparsa::train::Model::load("out/tiny-magnitude-50");
//   sparsa::train::Model teacher = sparsa::train::Model::load("models/tiny");
//   sparsa::train::Trainer trainer(student, &teacher, *recipe.finetune_stage(),
//                                  sparsa::train::TokenData(tokens, seq_len, eval_windows), pool);
//   while (trainer.step() < trainer.total_steps()) trainer.train_step();
//   trainer.save_checkpoint("ckpt/step-100");   // Trainer::load_checkpoint resumes bit for bit
//
// A step's result depends only on the state and the data (never on timing): resuming from a
// checkpoint with the same thread count reproduces an uninterrupted run bit for bit.
// The same step runs on the GPU after use_cuda() (sparsa/train/cuda.h): the weights, moments
// and masks then live there, and sync_to_host() brings them back (checkpoints do it themselves).
// Quantization-aware training: a QuantizationModifier in the finetune stage makes its target
// projections run forward (and backward) on a fake-quantized copy of their fp32 master weights,
// w_q = s · (clamp(round(w / s) + z, 0, 2^bits − 1) − z), on a grid fixed when training starts —
// the student's own grid when it is stored quantized (GPTQ's, set_quant_grid), else round-to-
// nearest's over the student's weights — and the gradient passes straight through to the master
// weights (Bengio et al. 2013). Pruned weights stay 0, which every grid holds.
// Clustering-aware training: a PalettizationModifier in the finetune stage makes its targets run
// on their soft assignment to palettes learnt along (DKM, sparsa/train/dkm.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sparsa/compress/recipe.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/train/dkm.h"
#include "sparsa/train/model.h"
#include "sparsa/train/ops.h"

namespace sparsa::train {

namespace cuda {
class Engine;
}

/// Learning rate of optimizer step `step` (0-based) of `total`: linear warmup to lr over
/// warmup_steps (step + 1) / warmup, then a cosine from lr down to lr · min_lr_ratio at the end.
double learning_rate(const compress::TrainingArgs& a, int64_t step, int64_t total);

/// The sparsity target of gradual pruning at `step` (Zhu & Gupta 2017, eq. 1):
/// s_0 before start_step, s_f from end_step on, s_f + (s_0 − s_f)(1 − (t − t_0)/(n Δt))³ between.
double cubic_sparsity(const compress::GradualPruningArgs& a, int64_t step);
/// Whether gradual pruning updates the masks before optimizer step `step`: every
/// update_frequency steps from start_step, and at end_step.
bool pruning_step(const compress::GradualPruningArgs& a, int64_t step);

/// Prunes the `numel` weights w to `sparsity` by magnitude (the round(sparsity · numel) smallest
/// |w| become 0); weights already masked (keep == 0) are pruned first, so a mask only grows.
void magnitude_prune(float* w, uint8_t* keep, int64_t numel, double sparsity);

/// The grid of one quantization-aware weight [rows, cols]: w[r, c] is fake-quantized with
/// scales[r, g] and zeros[r, g], g = g_idx[c].
struct FakeQuantGrid {
  int bits = 4;
  int64_t rows = 0, cols = 0, n_groups = 0;
  std::vector<float> scales, zeros;  // [rows, n_groups]; zeros are integers
  std::vector<int32_t> g_idx;        // [cols]
};
/// out = s · (clamp(round(w / s) + z, 0, 2^bits − 1) − z) for every weight (round half to even,
/// as the quantization passes round); `codes` (optional, rows · cols) receives the codes.
void fake_quantize(const float* w, float* out, const FakeQuantGrid& g, uint8_t* codes = nullptr);
/// Round-to-nearest's grid over w (min–max per group of `group_size` columns, 0: per row), the
/// weights with keep == 0 counted as 0 (keep may be null).
FakeQuantGrid rtn_grid(const float* w, const uint8_t* keep, int64_t rows, int64_t cols, int bits,
                       int64_t group_size, bool symmetric);

/// A token stream cut into windows of seq_len + 1 tokens (inputs and shifted targets) at a stride
/// of seq_len; the last `eval_windows` windows are held out for validation. Training windows are
/// visited in a fresh permutation every epoch, drawn from the seed.
class TokenData {
 public:
  TokenData(std::vector<int32_t> tokens, int64_t seq_len, int64_t eval_windows);
  /// Separate validation tokens (every window of them is used, up to eval_windows).
  TokenData(std::vector<int32_t> tokens, std::vector<int32_t> valid_tokens, int64_t seq_len,
            int64_t eval_windows);

  int64_t seq_len() const { return seq_len_; }
  int64_t train_windows() const { return static_cast<int64_t>(train_.size()); }
  int64_t eval_windows() const { return static_cast<int64_t>(valid_.size()); }
  /// The `index`-th training window drawn (over all epochs), tokens [seq_len + 1].
  const int32_t* train_window(int64_t index, uint64_t seed) const;
  const int32_t* eval_window(int64_t i) const { return valid_[static_cast<size_t>(i)]; }
  /// FNV-1a of the training windows' tokens: a checkpoint is only resumed on the same data.
  uint64_t fingerprint() const { return fingerprint_; }

 private:
  void cut(int64_t eval_windows, bool hold_out);
  std::vector<int32_t> tokens_, valid_tokens_;
  int64_t seq_len_ = 0;
  std::vector<const int32_t*> train_, valid_;
  mutable int64_t perm_epoch_ = -1;
  mutable uint64_t perm_seed_ = 0;
  mutable std::vector<int64_t> perm_;
  uint64_t fingerprint_ = 0;
};

struct StepStats {
  int64_t step = 0;  // 1-based: the optimizer step just taken
  int64_t tokens = 0;  // training tokens seen so far
  double lr = 0;
  double loss = 0;  // the weighted total, mean over the step's micro-batches
  double ce = 0, kl = 0, squarehead = 0;
  double grad_norm = 0;  // before clipping
  double sparsity = 0;   // over the masked tensors
  double seconds = 0;    // wall time of the step
};

struct EvalStats {
  int64_t step = 0;
  double ce = 0;  // mean next-token cross-entropy over the validation windows
  double ppl = 0;
};

class Trainer {
 public:
  /// `teacher` may be null when the stage distils nothing (kl and squarehead weights 0).
  /// total_steps: the stage's steps, or max_tokens / tokens per step when max_tokens_override
  /// (> 0) or the stage's max_tokens is given. Throws naming the stage and field at fault.
  Trainer(Model& student, Model* teacher, const compress::Stage& stage, TokenData data,
          ThreadPool& pool, int64_t max_tokens_override = 0);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// Runs the following steps on CUDA device `device` with GEMMs in `matmul` precision ("bf16"
  /// or "fp32"); throws naming why when there is no usable GPU.
  void use_cuda(const std::string& matmul, int device = 0);
  bool on_gpu() const { return gpu_ != nullptr; }
  /// "cpu (N threads)" or the GPU's name and GEMM precision.
  std::string device_description() const;
  /// Copies the weights and AdamW moments back from the GPU (nothing to do on the CPU).
  void sync_to_host();

  /// Quantization-aware tensors (targets of the stage's QuantizationModifier), in tensor order.
  std::vector<std::string> quantized_tensors() const;
  const FakeQuantGrid& quant_grid(const std::string& tensor) const;
  /// Replaces a quantization-aware tensor's grid (the student's stored one); the shape and bits
  /// must match.
  void set_quant_grid(const std::string& tensor, FakeQuantGrid grid);
  const compress::QuantScheme* quant_scheme() const { return qat_ ? &qat_scheme_ : nullptr; }

  /// Clustering-aware tensors (targets of the stage's PalettizationModifier), in tensor order.
  std::vector<std::string> clustered_tensors() const;
  /// Their palettes as they stand (the GPU's copied back first by sync_to_host).
  const DkmTensor& clustering(const std::string& tensor) const;
  /// Replaces a clustering-aware tensor's palettes (the student's stored ones, say).
  void set_clustering(const std::string& tensor, DkmTensor t);

  int64_t step() const { return step_; }
  int64_t total_steps() const { return total_steps_; }
  int64_t tokens_per_step() const;
  /// Model FLOPs of one training token, as PaLM's model-FLOPs utilisation counts them (Chowdhery
  /// et al. 2022, appendix B): 6 per weight of the student's projections and lm_head plus
  /// 12 · layers · seq_len · q_dim for its attention (forward and backward), and, when a teacher
  /// is distilled from, 2 per teacher weight plus 4 · layers · seq_len · q_dim (forward only).
  double flops_per_token() const;
  const compress::TrainingArgs& args() const { return args_; }

  /// One optimizer step over grad_accum micro-batches.
  StepStats train_step();
  /// Mean cross-entropy of the student over the validation windows (recorded in evals()).
  EvalStats evaluate();

  const std::vector<StepStats>& history() const { return history_; }
  const std::vector<EvalStats>& evals() const { return evals_; }

  /// Whether the tensor's zeros are kept (it is a target of ConstantMask or GradualPruning).
  bool masked(const std::string& tensor) const;
  /// 0/1 per parameter (1 for unmasked tensors), in the parameter layout.
  const std::vector<uint8_t>& keep() const { return keep_; }
  /// Fraction of zeros over the masked tensors (0 when none).
  double masked_sparsity() const;

  /// Writes weights, AdamW moments, masks, step, data position and the loss history into DIR
  /// (a temporary directory renamed into place).
  void save_checkpoint(const std::string& dir);
  /// Restores what save_checkpoint wrote; the model shape and the data must be the same.
  void load_checkpoint(const std::string& dir);

 private:
  void update_masks(int64_t step);
  /// The student's forward weights: the fake-quantized copy of the quantization-aware tensors
  /// and the soft-clustered one of the clustering-aware tensors (after `update_centroids`
  /// centroid updates when asked: once per step).
  void refresh_forward_weights(bool update_centroids = false);
  void upload_clustering();
  void upload_fake_quant();
  double micro_batch(int64_t index, float grad_scale, double* ce, double* kl, double* sq);

  Model& student_;
  Model* teacher_;
  compress::TrainingArgs args_;
  compress::DistillationArgs distill_;
  std::vector<compress::Modifier> modifiers_;
  TokenData data_;
  ThreadPool& pool_;
  int64_t total_steps_ = 0;
  int64_t step_ = 0;
  int64_t consumed_ = 0;  // training windows drawn so far
  std::vector<float> m_, v_;
  std::vector<uint8_t> keep_;
  std::vector<uint8_t> tensor_masked_;  // per tensor of student.tensors()
  std::vector<const compress::GradualPruningArgs*> tensor_schedule_;  // null: no schedule
  std::vector<int32_t> batch_ids_, batch_targets_;
  std::vector<StepStats> history_;
  std::vector<EvalStats> evals_;
  std::unique_ptr<cuda::Engine> gpu_;
  bool qat_ = false;
  compress::QuantScheme qat_scheme_;
  std::vector<FakeQuantGrid> grids_;  // per tensor; rows == 0: not quantization-aware
  bool dkm_ = false;
  DkmOptions dkm_opts_;
  std::vector<DkmTensor> dkm_tensors_;  // per tensor; rows == 0: not clustering-aware
  std::vector<float> dkm_deriv_;        // ∂w̃/∂w, in the parameter layout (CPU)
};

}  // namespace sparsa::train
