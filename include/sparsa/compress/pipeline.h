// The sequential calibration pipeline behind `sparsa compress`: the model is processed one
// decoder layer at a time — load only that layer in f32, run the calibration activations through
// it while gathering each linear layer's input statistics, apply the recipe's passes, recompute
// the layer's outputs with the compressed weights (they feed the next layer), write the layer
// out, free it. Peak memory is one layer's weights, its input statistics and the calibration
// activations, whatever the model's size.
//
//   sparsa::compress::CompressOptions opt;
//   opt.model_dir = "models/small"; opt.recipe_path = "recipes/sparsegpt-50.yaml";
//   opt.calibration_path = "train.jsonl"; opt.output_dir = "out/small-sparsegpt-50";
//   sparsa::compress::CompressReport report = sparsa::compress::compress_model(opt, pool);
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "sparsa/core/thread_pool.h"

namespace sparsa::compress {

struct CompressOptions {
  std::string model_dir;
  std::string recipe_path;
  std::string calibration_path;  // JSON lines or plain text
  std::string output_dir;
  int64_t samples = -1;  // calibration windows; -1: the recipe's (default 128)
  int64_t seq_len = -1;  // tokens per window; -1: the recipe's (default 512)
  bool progress = true;
  bool overwrite = false;  // replace an existing output directory
  /// Keep the logits the compressed model computes in memory for the first calibration window
  /// (report.probe_logits, [seq_len, vocab]): a reloaded checkpoint must reproduce them exactly.
  bool keep_probe_logits = false;
};

/// One linear layer's outcome.
struct LinearReport {
  std::string name;  // e.g. model.layers.3.mlp.down_proj
  int64_t rows = 0, cols = 0;  // the dense shape (structured pruning stores fewer rows or cols)
  double sparsity = 0;         // fraction of exact zeros, structurally removed weights included
  double bits_per_weight = 0;  // bytes on disk * 8 / (rows * cols)
  size_t bytes = 0;            // bytes on disk of all its tensors
  double relative_error = 0;   // ‖WX − ŴX‖² / ‖WX‖² over the calibration inputs
  std::string format;          // dense, sparse-bitmask, pack-quantized, ...
};

struct CompressReport {
  std::vector<LinearReport> linears;
  int64_t calibration_tokens = 0;
  double seconds = 0;
  std::vector<double> layer_seconds;
  size_t peak_rss_anon_bytes = 0;  // sampled at each step of each layer
  size_t output_bytes = 0;
  double total_sparsity = 0;       // over the compressed linear layers
  double total_bits_per_weight = 0;
  std::vector<int32_t> probe_tokens;  // the first calibration window
  std::vector<float> probe_logits;    // [seq_len, vocab], when keep_probe_logits
};

CompressReport compress_model(const CompressOptions& options, ThreadPool& pool);

/// RssAnon of this process from /proc/self/status, in bytes (0 where unavailable).
size_t rss_anon_bytes();

}  // namespace sparsa::compress
