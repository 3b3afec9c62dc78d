#include "sparsa/io/model_config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <numbers>

#include "sparsa/core/error.h"
#include "sparsa/model/llama.h"
#include "test_util.h"

namespace sparsa::io {
namespace {

using nlohmann::json;

json base() {
  return json{{"model_type", "llama"},       {"vocab_size", 100},
              {"hidden_size", 64},           {"intermediate_size", 128},
              {"num_hidden_layers", 2},      {"num_attention_heads", 4},
              {"num_key_value_heads", 2},    {"max_position_embeddings", 256},
              {"rms_norm_eps", 1e-5},        {"eos_token_id", 1}};
}

std::string error_of(const json& j) {
  try {
    ModelConfig::from_json(j, "cfg.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ModelConfig, ReadsTheVendoredTinyModel) {
  const ModelConfig c = ModelConfig::from_dir(testing::tiny_model_dir());
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.hidden_size, 128);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);  // from rope_parameters
  EXPECT_EQ(c.eos_token_ids, std::vector<int32_t>{1});
  EXPECT_EQ(c.max_context(), 1024);
}

TEST(ModelConfig, RopeThetaTopLevelOrInsideRopeParameters) {
  json a = base();
  a["rope_theta"] = 500000.0;
  EXPECT_DOUBLE_EQ(ModelConfig::from_json(a, "a").rope_theta, 500000.0);
  json b = base();
  b["rope_parameters"] = {{"rope_theta", 1e6}, {"rope_type", "default"}};
  EXPECT_DOUBLE_EQ(ModelConfig::from_json(b, "b").rope_theta, 1e6);
}

TEST(ModelConfig, HeadDimDefaultsAndExplicit) {
  EXPECT_EQ(ModelConfig::from_json(base(), "x").head_dim, 16);
  json j = base();
  j["head_dim"] = 32;  // explicit, not hidden / heads (as in Qwen3 or Gemma)
  EXPECT_EQ(ModelConfig::from_json(j, "x").head_dim, 32);
}

TEST(ModelConfig, Qwen2HasQkvBiasesAndMistralSlidingWindow) {
  json q = base();
  q["model_type"] = "qwen2";
  q["tie_word_embeddings"] = true;
  const ModelConfig cq = ModelConfig::from_json(q, "q");
  EXPECT_TRUE(cq.attention_bias);
  EXPECT_FALSE(cq.o_bias);
  EXPECT_TRUE(cq.tie_word_embeddings);
  json m = base();
  m["model_type"] = "mistral";
  m["sliding_window"] = 128;
  EXPECT_EQ(ModelConfig::from_json(m, "m").max_context(), 128);
  m["sliding_window"] = nullptr;
  EXPECT_EQ(ModelConfig::from_json(m, "m").max_context(), 256);
}

TEST(ModelConfig, EosMayBeAList) {
  json j = base();
  j["eos_token_id"] = {1, 7};
  EXPECT_EQ(ModelConfig::from_json(j, "x").eos_token_ids, (std::vector<int32_t>{1, 7}));
}

TEST(ModelConfig, Llama3RopeScalingMatchesTheFormula) {
  json j = base();
  j["head_dim"] = 64;
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 32.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  const ModelConfig c = ModelConfig::from_json(j, "x");
  const auto inv = model::rope_inverse_frequencies(c);
  ASSERT_EQ(inv.size(), 32u);
  int high = 0, low = 0, mid = 0;
  for (size_t i = 0; i < inv.size(); ++i) {
    const double base_f = 1.0 / std::pow(500000.0, 2.0 * static_cast<double>(i) / 64.0);
    const double wavelen = 2 * std::numbers::pi / base_f;
    double expect;
    if (wavelen < 8192.0 / 4.0) {
      expect = base_f;
      ++high;
    } else if (wavelen > 8192.0) {
      expect = base_f / 32.0;
      ++low;
    } else {
      const double s = (8192.0 / wavelen - 1.0) / 3.0;
      expect = (1 - s) * base_f / 32.0 + s * base_f;
      ++mid;
    }
    EXPECT_NEAR(inv[i] / expect, 1.0, 1e-5) << "frequency " << i;
  }
  EXPECT_GT(high, 0);
  EXPECT_GT(low, 0);
  EXPECT_GT(mid, 0);
}

TEST(ModelConfig, BadConfigsNameTheField) {
  json j = base();
  j["model_type"] = "gpt2";
  EXPECT_NE(error_of(j).find("unknown architecture 'gpt2'"), std::string::npos);
  j = base();
  j.erase("hidden_size");
  EXPECT_NE(error_of(j).find("missing required field 'hidden_size'"), std::string::npos);
  j = base();
  j["num_attention_heads"] = "four";
  EXPECT_NE(error_of(j).find("'num_attention_heads' must be an integer"), std::string::npos);
  j = base();
  j["num_key_value_heads"] = 3;
  EXPECT_NE(error_of(j).find("multiple of num_key_value_heads"), std::string::npos);
  j = base();
  j["vocab_size"] = 0;
  EXPECT_NE(error_of(j).find("'vocab_size' = 0 must be at least 1"), std::string::npos);
  j = base();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  EXPECT_NE(error_of(j).find("rope scaling type 'yarn' is not supported"), std::string::npos);
  j = base();
  j["hidden_act"] = "gelu";
  EXPECT_NE(error_of(j).find("hidden_act"), std::string::npos);
  EXPECT_NE(error_of(json::array()).find("must be a JSON object"), std::string::npos);
}

}  // namespace
}  // namespace sparsa::io
