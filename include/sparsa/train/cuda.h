// The CUDA backend of the training engine: the same Llama block, op for op, as the CPU one
// (sparsa/train/ops.h, sparsa/train/model.h), on one NVIDIA GPU.
//
//   if (!sparsa::train::cuda::available(&why)) ...;           // built with nvcc and a GPU seen
//   sparsa::train::cuda::Engine gpu(student, &teacher, keep, cuda::Matmul::kBf16);
//   gpu.zero_grad();
//   cuda::Losses l = gpu.micro_batch(ids, targets, batch, seq, weights, 1.0f);
//   double norm = gpu.optimizer_step(updates, clip, adamw, step);
//   gpu.download_params(student.params());
//
// What lives on the GPU: the student's fp32 master weights, gradients, AdamW moments and masks,
// the teacher's weights, and every activation of one micro-batch (planned once for the largest
// shape, like the CPU model). GEMMs go through cuBLAS: kFp32 computes them in fp32 (the reference
// for gradient checks), kBf16 on bf16 tensor cores with fp32 accumulation and fp32 outputs
// (CUBLAS_COMPUTE_32F_FAST_16BF: operands rounded to bf16), the mixed precision of a bf16
// autocast run. Everything else (RMSNorm, RoPE, causal softmax, SwiGLU, the losses, AdamW) runs
// in our own fp32 kernels.
//
// Reductions are done in a fixed order (per-block partial sums, then one ordered pass; the
// embedding gradient is gathered per token id, never scattered with atomics), so a step's result
// is the same bit for bit from run to run on the same GPU.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sparsa/train/model.h"
#include "sparsa/train/ops.h"

namespace sparsa::train::cuda {

/// Whether this build has the CUDA backend and a GPU is visible; if not, `why` says which.
bool available(std::string* why = nullptr);

enum class Matmul { kFp32, kBf16 };
Matmul parse_matmul(const std::string& name);  // "fp32" | "bf16"
const char* matmul_name(Matmul m);

/// Weights of the loss terms (sparsa/compress/recipe.h, DistillationModifier).
struct LossWeights {
  double ce = 1.0, kl = 0.0, squarehead = 0.0, temperature = 1.0;
};
/// The terms of one micro-batch: ce and kl are means over its tokens, squarehead the sum over
/// layers (the same definitions as ops::cross_entropy, ops::kl_distillation, ops::squarehead).
struct Losses {
  double ce = 0, kl = 0, squarehead = 0;
};

/// One parameter tensor's AdamW update.
struct TensorUpdate {
  int64_t offset = 0, numel = 0;
  bool masked = false;  // keep[] zeros stay zero, with no update
  float weight_decay = 0.0f;
};

/// A quantization-aware tensor: its forward weights are the fake-quantized master weights
/// (sparsa/train/trainer.h, fake_quantize), recomputed after every update.
struct FakeQuantTensor {
  int64_t offset = 0;
  int bits = 4;
  int64_t rows = 0, cols = 0, n_groups = 0;
  const float* scales = nullptr;  // [rows, n_groups]
  const float* zeros = nullptr;   // [rows, n_groups]
  const int32_t* g_idx = nullptr; // [cols]
};

/// A clustering-aware tensor (sparsa/train/dkm.h): palettes of group_rows rows, 2^bits
/// centroids each (bits <= 4 on the GPU).
struct ClusteredTensor {
  int64_t offset = 0;
  int bits = 3;
  int64_t rows = 0, cols = 0, group_rows = 0;
  const float* centroids = nullptr;  // [ceil(rows / group_rows), 2^bits]
};

class Engine {
 public:
  /// Copies the student's parameters (and the teacher's, when given) and the keep mask (0/1 per
  /// parameter, in the student's layout) to GPU `device`. Throws when the GPU is missing or too
  /// small.
  Engine(const Model& student, const Model* teacher, const std::vector<uint8_t>& keep,
         Matmul matmul, int device = 0);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  std::string device_name() const;
  Matmul matmul() const;

  /// State transfers, in the student's parameter layout (num_params values each).
  void upload_params(const float* params);
  void upload_keep(const uint8_t* keep);
  void upload_moments(const float* m, const float* v);
  void download_params(float* params) const;
  void download_moments(float* m, float* v) const;
  void download_grads(float* grads) const;

  /// Quantization-aware training: the student computes with fake-quantized copies of these
  /// tensors (gradients straight through to the master weights). Copies the grids.
  void set_fake_quant(const std::vector<FakeQuantTensor>& tensors);
  /// Clustering-aware training (DKM): these tensors compute with their soft assignment to the
  /// palettes, whose centroids move `iterations` times per step. Copies the centroids.
  void set_clustering(const std::vector<ClusteredTensor>& tensors, double temperature,
                      int64_t iterations);
  /// The current centroids, one pointer per tensor given to set_clustering, in that order.
  void download_centroids(const std::vector<float*>& out) const;
  /// Recomputes the forward weights from the master weights (after every update, with the
  /// centroid updates).
  void refresh_forward_weights(bool update_centroids);

  void zero_grad();
  /// Forward of the teacher (when a distillation weight asks for it) and the student over
  /// `batch` sequences of `seq` tokens, the loss, and the backward: gradients += grad_scale ·
  /// ∂(w.ce·ce + w.kl·kl + w.squarehead·squarehead)/∂params. Targets < 0 are ignored.
  Losses micro_batch(const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq,
                     const LossWeights& w, float grad_scale);
  /// Σ of the student's next-token cross-entropy over the targets >= 0 (their count in *count).
  double eval_ce_sum(const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq,
                     int64_t* count);
  /// Masks the gradients of masked tensors, measures the global gradient norm, clips it to
  /// `clip` (when > 0), and takes one AdamW step (t 1-based) per tensor; masked weights are left
  /// at exactly zero. Returns the norm before clipping.
  double optimizer_step(const std::vector<TensorUpdate>& tensors, double clip,
                        const ops::AdamW& opt, int64_t t);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sparsa::train::cuda
