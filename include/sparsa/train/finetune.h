// `sparsa finetune`: sparse fine-tuning of a (pruned, possibly compressed) student against a
// dense teacher, driven by the finetune stage of a recipe.
//
//   sparsa::train::FinetuneOptions o;
//   o.student_dir = "out/tiny-magnitude-50"; o.teacher_dir = "models/tiny";
//   o.data_path = "train.jsonl"; o.recipe_path = "recipes/finetune-squarehead.yaml";
//   o.output_dir = "out/tiny-ft";
//   sparsa::train::FinetuneReport r = sparsa::train::finetune(o, pool);
//
// What it does: loads both checkpoints in f32 (compressed students decoded; the masks are the
// nonzero pattern of the student's weights), tokenizes the JSON-lines data with the student's
// tokenizer (documents without BOS joined by EOS, as `eval` and `compress` do), trains, and writes
// - OUT/: a Hugging Face checkpoint in the student's float dtype (masked layers in the
//   compressed-tensors sparse-bitmask layout, so the sparsity is kept on disk), config.json,
//   tokenizer files and the recipe; written to a temporary directory, fsynced and renamed;
// - OUT/train_log.csv, OUT/valid_log.csv and OUT/loss.svg: the loss curves;
// - checkpoint_dir/step-NNNNNN/ every checkpoint_every steps: weights, AdamW moments, masks,
//   step and data position; resume_dir continues from one to the bit-identical result.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sparsa/core/dtype.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/train/trainer.h"

namespace sparsa::train {

struct FinetuneOptions {
  std::string student_dir;
  std::string teacher_dir;     // required when the recipe distils (kl or squarehead > 0)
  std::string data_path;       // JSON lines ({"text": ...}) or plain text
  std::string valid_path;      // optional; default: windows held out from the data
  std::string recipe_path;
  std::string output_dir;
  std::string checkpoint_dir;  // default: output_dir + ".checkpoints"
  std::string resume_dir;      // a checkpoint directory (step-NNNNNN) to continue from
  std::string device = "cpu";  // cpu | cuda
  std::string precision = "bf16";  // GEMMs on the GPU: bf16 (tensor cores, fp32 accumulation) | fp32
  int64_t max_tokens = 0;      // > 0: overrides the recipe's steps / max_tokens
  int64_t stop_after = 0;      // > 0: stop after this step with a checkpoint, write no model
  bool overwrite = false;
  bool progress = true;
};

struct FinetuneReport {
  std::string device;         // where the steps ran (Trainer::device_description)
  int64_t steps = 0;          // optimizer steps taken in this run
  int64_t total_steps = 0;
  int64_t tokens = 0;         // training tokens seen in this run
  double seconds = 0;         // training wall time of this run (evaluation excluded)
  double tokens_per_s = 0;
  double flops_per_token = 0;  // Trainer::flops_per_token
  double model_tflops = 0;     // tokens_per_s · flops_per_token / 1e12
  double first_loss = 0, last_loss = 0;
  double valid_ce_before = 0, valid_ce_after = 0;
  double sparsity = 0;        // over the masked tensors, at the end
  std::vector<std::string> checkpoints;
  std::string output_dir;     // empty when stopped early
};

FinetuneReport finetune(const FinetuneOptions& options, ThreadPool& pool);

/// Tensors to write quantized (pack-quantized, on their grids) and the scheme they follow, and
/// tensors to write palettized (sparsa-palettized).
struct QuantizedOutput {
  compress::QuantScheme scheme;
  std::vector<std::pair<std::string, const FakeQuantGrid*>> tensors;
  std::vector<std::pair<std::string, compress::Palette>> palettes;
};

/// Writes `model` as a Hugging Face checkpoint into `dir` (atomically) in dtype `dtype` (F32,
/// BF16 or F16), config.json and tokenizer files taken from `source_dir`; tensors named in
/// `sparse_tensors` are stored as sparse-bitmask, and those of `quantized` (optional) as
/// pack-quantized on their grids (a quantized tensor's zeros stay in its codes; with
/// quantization, the other masked tensors are written dense) or sparsa-palettized. Returns the
/// bytes written.
size_t write_hf_checkpoint(const Model& model, const std::string& source_dir,
                           const std::string& dir, DType dtype,
                           const std::vector<std::string>& sparse_tensors, bool overwrite,
                           const std::vector<std::pair<std::string, std::string>>& extra_files,
                           const QuantizedOutput* quantized = nullptr);

/// The loss curves as an SVG line plot (train loss and CE per step, validation CE per eval).
std::string loss_svg(const std::vector<StepStats>& history, const std::vector<EvalStats>& evals);

}  // namespace sparsa::train
