// The training model: its logits equal the inference engine's (model::Model) on the same tokens,
// and its backward equals finite differences of its loss on a random model with every optional
// part switched on (GQA, biases, tied embeddings off and on).
#include "sparsa/train/model.h"

#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "sparsa/model/llama.h"
#include "sparsa/train/ops.h"
#include "test_util.h"

namespace sparsa::train {
namespace {

TEST(TrainModel, LogitsEqualTheInferenceEngineOnTiny) {
  ThreadPool pool(2);
  const std::string dir = testing::tiny_model_dir();
  auto ref = model::Model::load(dir);
  Model m = Model::load(dir);
  const io::ModelConfig& c = m.config();
  const int64_t batch = 2, seq = 48;
  std::vector<int32_t> ids(batch * seq);
  std::mt19937 rng(7);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % c.vocab_size);
  m.forward(ids.data(), batch, seq, pool);
  double max_diff = 0, max_abs = 0;
  for (int64_t b = 0; b < batch; ++b) {
    model::KvCache cache(c, seq);
    std::vector<float> logits(seq * c.vocab_size);
    ref->forward(std::span<const int32_t>(ids.data() + b * seq, seq), cache, logits.data(), true,
                 pool);
    const float* mine = m.logits() + b * seq * c.vocab_size;
    for (int64_t i = 0; i < seq * c.vocab_size; ++i) {
      max_diff = std::max(max_diff, static_cast<double>(std::abs(mine[i] - logits[i])));
      max_abs = std::max(max_abs, static_cast<double>(std::abs(logits[i])));
    }
  }
  ASSERT_GT(max_abs, 1.0);
  EXPECT_LT(max_diff / max_abs, 1e-4) << "max |Δ| " << max_diff << " of max |logit| " << max_abs;
}

io::ModelConfig small_config(bool tied) {
  nlohmann::json j = {{"model_type", "llama"},        {"vocab_size", 17},
                      {"hidden_size", 12},            {"intermediate_size", 10},
                      {"num_hidden_layers", 2},       {"num_attention_heads", 3},
                      {"num_key_value_heads", 1},     {"head_dim", 4},
                      {"max_position_embeddings", 64}, {"tie_word_embeddings", tied},
                      {"attention_bias", true},       {"mlp_bias", true},
                      {"bos_token_id", 1},            {"eos_token_id", 2}};
  return io::ModelConfig::from_json(j, "test");
}

TEST(TrainModel, BackwardMatchesFiniteDifferencesOfTheWholeLoss) {
  for (bool tied : {false, true}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    ThreadPool pool(2);
    Model m(small_config(tied));
    std::mt19937 rng(3);
    std::normal_distribution<float> d(0.0f, 0.4f);
    for (int64_t i = 0; i < m.num_params(); ++i) m.params()[i] = d(rng);
    for (const ParamTensor& t : m.tensors())
      if (t.name.find("norm") != std::string::npos)
        for (int64_t i = 0; i < t.numel; ++i) m.params()[t.offset + i] = 1.0f + d(rng);
    m.enable_gradients();
    const int64_t batch = 2, seq = 5, n = batch * seq, h = 12;
    std::vector<int32_t> ids(n), targets(n);
    for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>(rng() % 17);
    for (int64_t i = 0; i < n; ++i) targets[i] = static_cast<int32_t>(rng() % 17);
    std::vector<float> teacher_feat(n * h);
    for (float& x : teacher_feat) x = d(rng);
    // L = CE + 0.5 · SquareHead(block 0 output, a fixed random "teacher").
    auto loss = [&](bool grad) {
      m.forward(ids.data(), batch, seq, pool);
      double l = ops::cross_entropy(grad ? m.dlogits() : nullptr, m.logits(), targets.data(), n,
                                    17, 1.0f, pool);
      l += 0.5 * ops::squarehead(grad ? m.dblock_output(0) : nullptr, m.block_output(0),
                                 teacher_feat.data(), n * h, 0.5f, pool);
      return l;
    };
    m.zero_grad();
    loss(true);
    m.backward(pool);
    const std::vector<float> analytic(m.grads(), m.grads() + m.num_params());
    for (const ParamTensor& t : m.tensors()) {
      SCOPED_TRACE(t.name);
      double num2 = 0, diff2 = 0;
      for (int64_t i = 0; i < t.numel; i += std::max<int64_t>(1, t.numel / 40)) {
        float& p = m.params()[t.offset + i];
        const float keep = p, eps = 1e-2f;
        p = keep + eps;
        const double lp = loss(false);
        p = keep - eps;
        const double lm = loss(false);
        p = keep;
        const double g = (lp - lm) / (2 * eps);
        num2 += g * g;
        diff2 += (g - analytic[t.offset + i]) * (g - analytic[t.offset + i]);
      }
      ASSERT_GT(num2, 0.0);
      EXPECT_LT(std::sqrt(diff2 / num2), 1e-2);
    }
  }
}

TEST(TrainModel, RejectsTokensOutsideTheVocabulary) {
  ThreadPool pool(1);
  Model m(small_config(false));
  std::vector<int32_t> ids = {1, 2, 17};
  try {
    m.forward(ids.data(), 1, 3, pool);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 17 is outside the vocabulary"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace sparsa::train
