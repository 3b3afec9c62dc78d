// The hyper-parameters of a Llama-family decoder, read from a Hugging Face `config.json`.
//
//   sparsa::io::ModelConfig cfg = sparsa::io::ModelConfig::from_dir("models/tiny");
//   cfg.num_layers, cfg.hidden_size, cfg.head_dim, ...
//
// Supported `model_type`s: llama, mistral, qwen2. `rope_theta` is read at the top level or inside
// `rope_parameters` (transformers 5.x); `rope_scaling` of type default, linear or llama3.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace sparsa::io {

struct RopeScaling {
  std::string type = "default";  // default | linear | llama3
  double factor = 1.0;
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
};

struct ModelConfig {
  std::string model_type;  // llama | mistral | qwen2
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 2048;
  std::optional<int64_t> sliding_window;  // mistral; the context is capped to it
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v (and o for llama) biases; always on for qwen2 q/k/v
  bool o_bias = false;
  bool mlp_bias = false;
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;
  std::optional<int32_t> pad_token_id;

  /// Parses and validates; errors name `source` and the field.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& source);
  /// Reads DIR/config.json, and DIR/generation_config.json for extra EOS ids when present.
  static ModelConfig from_dir(const std::string& dir);
  /// A config.json that from_json reads back (transformers' field names).
  nlohmann::json to_json() const;

  /// The longest sequence the model can attend over.
  int64_t max_context() const;
  /// Weight parameters of the decoder (embeddings and lm_head included, once when tied).
  int64_t parameter_count() const;
};

}  // namespace sparsa::io
