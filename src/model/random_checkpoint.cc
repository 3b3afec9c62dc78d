#include "sparsa/model/random_checkpoint.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/core/progress.h"
#include "sparsa/io/safetensors.h"
#include "sparsa/runtime/sampler.h"

namespace sparsa::model {

namespace {

io::ModelConfig make(std::string type, int64_t vocab, int64_t hidden, int64_t ffn, int64_t layers,
                     int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_pos,
                     double theta, bool tied) {
  io::ModelConfig c;
  c.model_type = std::move(type);
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = ffn;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.max_position_embeddings = max_pos;
  c.rope_theta = theta;
  c.tie_word_embeddings = tied;
  c.rms_norm_eps = 1e-5;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

}  // namespace

std::vector<std::string> named_shape_list() {
  return {"tinyllama-1.1b", "llama-3.2-1b", "llama-3-8b", "qwen2-0.5b", "mistral-7b", "small-27m"};
}

io::ModelConfig named_shape(const std::string& name) {
  if (name == "tinyllama-1.1b")
    return make("llama", 32000, 2048, 5632, 22, 32, 4, 64, 2048, 10000.0, false);
  if (name == "llama-3.2-1b") {
    io::ModelConfig c = make("llama", 128256, 2048, 8192, 16, 32, 8, 64, 131072, 500000.0, true);
    c.rope_scaling = {"llama3", 32.0, 1.0, 4.0, 8192};
    c.bos_token_id = 128000;
    c.eos_token_ids = {128001};
    return c;
  }
  if (name == "llama-3-8b") {
    io::ModelConfig c = make("llama", 128256, 4096, 14336, 32, 32, 8, 128, 8192, 500000.0, false);
    c.bos_token_id = 128000;
    c.eos_token_ids = {128001};
    return c;
  }
  if (name == "qwen2-0.5b") {
    io::ModelConfig c = make("qwen2", 151936, 896, 4864, 24, 14, 2, 64, 32768, 1000000.0, true);
    c.attention_bias = true;
    c.rms_norm_eps = 1e-6;
    return c;
  }
  if (name == "mistral-7b") {
    io::ModelConfig c = make("mistral", 32000, 4096, 14336, 32, 32, 8, 128, 32768, 10000.0, false);
    c.sliding_window = 4096;
    return c;
  }
  if (name == "small-27m") return make("llama", 8192, 512, 1024, 8, 8, 4, 64, 1024, 10000.0, false);
  std::string known;
  for (const auto& n : named_shape_list()) known += (known.empty() ? "" : ", ") + n;
  fail("unknown shape '{}' (known: {})", name, known);
}

void write_random_checkpoint(const io::ModelConfig& c, const std::string& dir,
                             const RandomCheckpointOptions& opt) {
  namespace fs = std::filesystem;
  SPARSA_CHECK(opt.dtype == DType::BF16 || opt.dtype == DType::F16 || opt.dtype == DType::F32,
               "random checkpoints are written in BF16, F16 or F32, not {}",
               dtype_name(opt.dtype));
  std::error_code ec;
  fs::create_directories(dir, ec);
  SPARSA_CHECK(!ec, "{}: cannot create directory: {}", dir, ec.message());

  // Tensor list in Hugging Face order.
  const int64_t h = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  std::vector<io::TensorSpec> specs;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    specs.push_back({std::move(name), opt.dtype, std::move(shape)});
  };
  add("model.embed_tokens.weight", {c.vocab_size, h});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {h});
    add(p + "self_attn.q_proj.weight", {q, h});
    add(p + "self_attn.k_proj.weight", {kv, h});
    add(p + "self_attn.v_proj.weight", {kv, h});
    if (c.attention_bias) {
      add(p + "self_attn.q_proj.bias", {q});
      add(p + "self_attn.k_proj.bias", {kv});
      add(p + "self_attn.v_proj.bias", {kv});
    }
    add(p + "self_attn.o_proj.weight", {h, q});
    if (c.o_bias) add(p + "self_attn.o_proj.bias", {h});
    add(p + "post_attention_layernorm.weight", {h});
    add(p + "mlp.gate_proj.weight", {c.intermediate_size, h});
    add(p + "mlp.up_proj.weight", {c.intermediate_size, h});
    add(p + "mlp.down_proj.weight", {h, c.intermediate_size});
  }
  add("model.norm.weight", {h});
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, h});

  // Group into shards.
  std::vector<std::vector<io::TensorSpec>> shards(1);
  size_t shard_bytes = 0;
  for (auto& s : specs) {
    if (shard_bytes > 0 && shard_bytes + s.nbytes() > opt.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shard_bytes += s.nbytes();
    shards.back().push_back(s);
  }

  Rng rng(opt.seed);
  Progress bar("init-random", static_cast<int64_t>(specs.size()), "tensors", !opt.quiet);
  std::vector<uint8_t> buf;
  nlohmann::json weight_map = nlohmann::json::object();
  size_t total_bytes = 0;
  for (size_t si = 0; si < shards.size(); ++si) {
    const std::string file =
        shards.size() == 1 ? "model.safetensors"
                           : fmt::format("model-{:05d}-of-{:05d}.safetensors", si + 1, shards.size());
    io::SafetensorsWriter writer((fs::path(dir) / file).string(), shards[si],
                                 {{"format", "pt"}});
    for (const io::TensorSpec& s : shards[si]) {
      const int64_t n = s.shape.size() == 1 ? s.shape[0] : s.shape[0] * s.shape[1];
      const bool ones = s.name.find("norm") != std::string::npos;
      const bool bias = s.name.size() > 5 && s.name.compare(s.name.size() - 5, 5, ".bias") == 0;
      buf.resize(s.nbytes());
      for (int64_t i = 0; i < n; ++i) {
        float v;
        if (ones) {
          v = 1.0f;
        } else if (bias) {
          v = 0.0f;
        } else {
          // Irwin–Hall: the sum of 4 uniforms, rescaled to unit variance, is close enough to a
          // normal for benchmark weights and much cheaper than Box–Muller.
          const uint64_t r = rng.next();
          const double sum = static_cast<double>(r & 0xffff) + static_cast<double>((r >> 16) & 0xffff) +
                             static_cast<double>((r >> 32) & 0xffff) + static_cast<double>(r >> 48);
          v = static_cast<float>((sum / 65536.0 - 2.0) * std::sqrt(3.0) * opt.stddev);
        }
        if (opt.dtype == DType::F32) {
          std::memcpy(buf.data() + i * 4, &v, 4);
        } else {
          const uint16_t b = opt.dtype == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
          std::memcpy(buf.data() + i * 2, &b, 2);
        }
      }
      writer.write(s.name, buf.data(), buf.size());
      weight_map[s.name] = file;
      total_bytes += s.nbytes();
      bar.advance();
    }
    writer.finish();
  }
  bar.finish();
  if (shards.size() > 1) {
    const nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}},
                                  {"weight_map", weight_map}};
    const std::string text = index.dump(2);
    write_file_atomic((fs::path(dir) / "model.safetensors.index.json").string(), text.data(),
                      text.size());
  }
  nlohmann::json cfg = c.to_json();
  const std::string cfg_text = cfg.dump(2);
  write_file_atomic((fs::path(dir) / "config.json").string(), cfg_text.data(), cfg_text.size());
  nlohmann::json gen = {{"eos_token_id", c.eos_token_ids}};
  if (c.bos_token_id) gen["bos_token_id"] = *c.bos_token_id;
  const std::string gen_text = gen.dump(2);
  write_file_atomic((fs::path(dir) / "generation_config.json").string(), gen_text.data(),
                    gen_text.size());
}

}  // namespace sparsa::model
