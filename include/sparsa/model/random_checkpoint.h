// Random-weight checkpoints in the Hugging Face layout, for benchmarks of real model shapes.
//
//   auto cfg = sparsa::model::named_shape("tinyllama-1.1b");
//   sparsa::model::write_random_checkpoint(cfg, "/tmp/tinyllama-random", {});
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sparsa/core/dtype.h"
#include "sparsa/io/model_config.h"

namespace sparsa::model {

/// Known shapes: tinyllama-1.1b, llama-3.2-1b, llama-3-8b, qwen2-0.5b, mistral-7b, small-27m.
io::ModelConfig named_shape(const std::string& name);
std::vector<std::string> named_shape_list();

struct RandomCheckpointOptions {
  uint64_t seed = 0;
  DType dtype = DType::BF16;
  double stddev = 0.02;
  size_t max_shard_bytes = size_t{4} << 30;  // larger models are sharded with an index
  bool quiet = false;
};

/// Writes config.json, generation_config.json and model*.safetensors (+ index when sharded) of
/// normally distributed weights (norm weights 1) to `dir`, each file atomically.
void write_random_checkpoint(const io::ModelConfig& config, const std::string& dir,
                             const RandomCheckpointOptions& options);

}  // namespace sparsa::model
