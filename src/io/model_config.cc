#include "sparsa/io/model_config.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"

namespace sparsa::io {

namespace {

using nlohmann::json;

const json* field(const json& j, const char* key) {
  auto it = j.find(key);
  return (it == j.end() || it->is_null()) ? nullptr : &*it;
}

int64_t get_int(const json& j, const char* key, const std::string& src, int64_t min_value,
                std::optional<int64_t> def = std::nullopt) {
  const json* v = field(j, key);
  if (v == nullptr) {
    SPARSA_CHECK(def.has_value(), "{}: missing required field '{}'", src, key);
    return *def;
  }
  SPARSA_CHECK(v->is_number_integer(), "{}: field '{}' must be an integer, got {}", src, key,
               v->dump());
  const int64_t x = v->get<int64_t>();
  SPARSA_CHECK(x >= min_value, "{}: field '{}' = {} must be at least {}", src, key, x, min_value);
  return x;
}

double get_double(const json& j, const char* key, const std::string& src, double def) {
  const json* v = field(j, key);
  if (v == nullptr) return def;
  SPARSA_CHECK(v->is_number(), "{}: field '{}' must be a number, got {}", src, key, v->dump());
  return v->get<double>();
}

bool get_bool(const json& j, const char* key, const std::string& src, bool def) {
  const json* v = field(j, key);
  if (v == nullptr) return def;
  SPARSA_CHECK(v->is_boolean(), "{}: field '{}' must be true or false, got {}", src, key,
               v->dump());
  return v->get<bool>();
}

std::vector<int32_t> get_ids(const json& j, const char* key, const std::string& src) {
  const json* v = field(j, key);
  if (v == nullptr) return {};
  std::vector<int32_t> ids;
  auto one = [&](const json& x) {
    SPARSA_CHECK(x.is_number_integer() && x.get<int64_t>() >= 0 && x.get<int64_t>() < (1LL << 31),
                 "{}: field '{}' must hold non-negative token ids, got {}", src, key, x.dump());
    ids.push_back(static_cast<int32_t>(x.get<int64_t>()));
  };
  if (v->is_array()) {
    for (const auto& x : *v) one(x);
  } else {
    one(*v);
  }
  return ids;
}

RopeScaling parse_rope_scaling(const json& r, const std::string& src, const char* where) {
  SPARSA_CHECK(r.is_object(), "{}: '{}' must be an object", src, where);
  RopeScaling s;
  const json* type = field(r, "rope_type");
  if (type == nullptr) type = field(r, "type");
  if (type != nullptr) {
    SPARSA_CHECK(type->is_string(), "{}: '{}.rope_type' must be a string", src, where);
    s.type = type->get<std::string>();
  }
  SPARSA_CHECK(s.type == "default" || s.type == "linear" || s.type == "llama3",
               "{}: rope scaling type '{}' is not supported (supported: default, linear, llama3)",
               src, s.type);
  s.factor = get_double(r, "factor", src, 1.0);
  SPARSA_CHECK(s.factor > 0, "{}: '{}.factor' must be positive", src, where);
  if (s.type == "llama3") {
    s.low_freq_factor = get_double(r, "low_freq_factor", src, 1.0);
    s.high_freq_factor = get_double(r, "high_freq_factor", src, 4.0);
    s.original_max_position_embeddings =
        get_int(r, "original_max_position_embeddings", src, 1, int64_t{8192});
    SPARSA_CHECK(s.high_freq_factor > s.low_freq_factor,
                 "{}: llama3 rope scaling needs high_freq_factor > low_freq_factor", src);
  }
  return s;
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j, const std::string& src) {
  SPARSA_CHECK(j.is_object(), "{}: config must be a JSON object", src);
  ModelConfig c;
  const json* mt = field(j, "model_type");
  SPARSA_CHECK(mt != nullptr && mt->is_string(), "{}: missing 'model_type'", src);
  c.model_type = mt->get<std::string>();
  SPARSA_CHECK(c.model_type == "llama" || c.model_type == "mistral" || c.model_type == "qwen2",
               "{}: unknown architecture '{}' (supported: llama, mistral, qwen2)", src,
               c.model_type);
  if (const json* act = field(j, "hidden_act"); act != nullptr) {
    SPARSA_CHECK(act->is_string() && act->get<std::string>() == "silu",
                 "{}: hidden_act {} is not supported (only silu)", src, act->dump());
  }
  c.vocab_size = get_int(j, "vocab_size", src, 1);
  c.hidden_size = get_int(j, "hidden_size", src, 1);
  c.intermediate_size = get_int(j, "intermediate_size", src, 1);
  c.num_layers = get_int(j, "num_hidden_layers", src, 1);
  c.num_heads = get_int(j, "num_attention_heads", src, 1);
  c.num_kv_heads = get_int(j, "num_key_value_heads", src, 1, c.num_heads);
  SPARSA_CHECK(c.num_heads % c.num_kv_heads == 0,
               "{}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", src,
               c.num_heads, c.num_kv_heads);
  if (field(j, "head_dim") != nullptr) {
    c.head_dim = get_int(j, "head_dim", src, 1);
  } else {
    SPARSA_CHECK(c.hidden_size % c.num_heads == 0,
                 "{}: hidden_size ({}) is not a multiple of num_attention_heads ({}) and no "
                 "head_dim is given",
                 src, c.hidden_size, c.num_heads);
    c.head_dim = c.hidden_size / c.num_heads;
  }
  SPARSA_CHECK(c.head_dim % 2 == 0, "{}: head_dim ({}) must be even for rotary embeddings", src,
               c.head_dim);
  c.max_position_embeddings = get_int(j, "max_position_embeddings", src, 1, int64_t{2048});
  if (const json* sw = field(j, "sliding_window"); sw != nullptr && c.model_type != "llama") {
    const bool used = c.model_type == "mistral" || get_bool(j, "use_sliding_window", src, false);
    if (used) c.sliding_window = get_int(j, "sliding_window", src, 1);
  }
  c.rms_norm_eps = get_double(j, "rms_norm_eps", src, 1e-6);
  SPARSA_CHECK(c.rms_norm_eps > 0, "{}: rms_norm_eps must be positive", src);

  c.rope_theta = get_double(j, "rope_theta", src, 10000.0);
  if (const json* rp = field(j, "rope_parameters"); rp != nullptr) {
    SPARSA_CHECK(rp->is_object(), "{}: 'rope_parameters' must be an object", src);
    c.rope_theta = get_double(*rp, "rope_theta", src, c.rope_theta);
    c.rope_scaling = parse_rope_scaling(*rp, src, "rope_parameters");
  }
  if (const json* rs = field(j, "rope_scaling"); rs != nullptr)
    c.rope_scaling = parse_rope_scaling(*rs, src, "rope_scaling");
  SPARSA_CHECK(c.rope_theta > 0, "{}: rope_theta must be positive", src);

  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", src, false);
  if (c.model_type == "qwen2") {
    c.attention_bias = true;  // Qwen2 always has q/k/v biases and no o bias
  } else {
    c.attention_bias = get_bool(j, "attention_bias", src, false);
    c.o_bias = c.model_type == "llama" && c.attention_bias;
  }
  c.mlp_bias = get_bool(j, "mlp_bias", src, false);
  if (auto ids = get_ids(j, "bos_token_id", src); !ids.empty()) c.bos_token_id = ids[0];
  if (auto ids = get_ids(j, "pad_token_id", src); !ids.empty()) c.pad_token_id = ids[0];
  c.eos_token_ids = get_ids(j, "eos_token_id", src);
  return c;
}

ModelConfig ModelConfig::from_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  SPARSA_CHECK(fs::is_directory(dir), "{}: not a model directory", dir);
  const std::string path = (fs::path(dir) / "config.json").string();
  SPARSA_CHECK(fs::exists(path), "{}: missing config.json", dir);
  json j;
  try {
    j = json::parse(read_text_file(path));
  } catch (const json::exception& e) {
    fail("{}: malformed JSON: {}", path, e.what());
  }
  ModelConfig c = from_json(j, path);
  const std::string gen = (fs::path(dir) / "generation_config.json").string();
  if (fs::exists(gen)) {
    json g;
    try {
      g = json::parse(read_text_file(gen));
    } catch (const json::exception& e) {
      fail("{}: malformed JSON: {}", gen, e.what());
    }
    SPARSA_CHECK(g.is_object(), "{}: must be a JSON object", gen);
    for (int32_t id : get_ids(g, "eos_token_id", gen))
      if (std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), id) == c.eos_token_ids.end())
        c.eos_token_ids.push_back(id);
  }
  for (int32_t id : c.eos_token_ids)
    SPARSA_CHECK(id < c.vocab_size, "{}: eos_token_id {} is outside the vocabulary ({})", path, id,
                 c.vocab_size);
  return c;
}

json ModelConfig::to_json() const {
  static const char* kArch[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"};
  const int arch = model_type == "mistral" ? 1 : model_type == "qwen2" ? 2 : 0;
  json j = {{"architectures", {kArch[arch]}},
            {"model_type", model_type},
            {"vocab_size", vocab_size},
            {"hidden_size", hidden_size},
            {"intermediate_size", intermediate_size},
            {"num_hidden_layers", num_layers},
            {"num_attention_heads", num_heads},
            {"num_key_value_heads", num_kv_heads},
            {"head_dim", head_dim},
            {"max_position_embeddings", max_position_embeddings},
            {"rms_norm_eps", rms_norm_eps},
            {"rope_theta", rope_theta},
            {"hidden_act", "silu"},
            {"tie_word_embeddings", tie_word_embeddings},
            {"attention_bias", attention_bias},
            {"mlp_bias", mlp_bias},
            {"torch_dtype", "bfloat16"}};
  if (rope_scaling.type != "default") {
    json r = {{"rope_type", rope_scaling.type}, {"factor", rope_scaling.factor}};
    if (rope_scaling.type == "llama3") {
      r["low_freq_factor"] = rope_scaling.low_freq_factor;
      r["high_freq_factor"] = rope_scaling.high_freq_factor;
      r["original_max_position_embeddings"] = rope_scaling.original_max_position_embeddings;
    }
    j["rope_scaling"] = r;
  }
  if (sliding_window) j["sliding_window"] = *sliding_window;
  if (bos_token_id) j["bos_token_id"] = *bos_token_id;
  if (pad_token_id) j["pad_token_id"] = *pad_token_id;
  if (eos_token_ids.size() == 1) j["eos_token_id"] = eos_token_ids[0];
  if (eos_token_ids.size() > 1) j["eos_token_id"] = eos_token_ids;
  return j;
}

int64_t ModelConfig::max_context() const {
  return sliding_window ? std::min(max_position_embeddings, *sliding_window)
                        : max_position_embeddings;
}

int64_t ModelConfig::parameter_count() const {
  const int64_t q = num_heads * head_dim, kv = num_kv_heads * head_dim;
  const int64_t attn = hidden_size * (q + 2 * kv) + q * hidden_size;
  const int64_t mlp = 3 * hidden_size * intermediate_size;
  const int64_t layer = attn + mlp + 2 * hidden_size;
  const int64_t embed = vocab_size * hidden_size * (tie_word_embeddings ? 1 : 2);
  return num_layers * layer + embed + hidden_size;
}

}  // namespace sparsa::io
