// Structured pruning: the scores keep the channels that matter on synthetic layers, FLAP's bias
// compensation is exact for constant inputs, heads go in whole GQA groups, and `compress` of the
// tiny model writes a smaller standard checkpoint that reloads to the model it computed in
// memory, runs under `sparsa eval`, and refuses recipes it cannot honour.
#include "sparsa/compress/structured.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>

#include "sparsa/compress/pipeline.h"
#include "sparsa/compress/recipe.h"
#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/io/safetensors.h"
#include "sparsa/model/llama.h"
#include "logits_util.h"
#include "test_util.h"

namespace sparsa::compress {
namespace {

namespace fs = std::filesystem;

// ---- the pure functions -------------------------------------------------------------------------

Matrix random_matrix(int64_t rows, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Matrix w(rows, cols);
  for (float& v : w.data) v = nd(rng);
  return w;
}

TEST(StructuredScores, FluctuationRemovesConstantInputsAndCompensationIsExact) {
  std::mt19937 rng(7);
  const int64_t rows = 8, cols = 6, n = 200;
  const Matrix w = random_matrix(rows, cols, rng);
  // Columns 1, 3 and 4 carry a constant (a different one each); 0, 2 and 5 vary.
  const float constant[cols] = {0, 2.5f, 0, -1.25f, 4.0f, 0};
  const bool varies[cols] = {true, false, true, false, false, true};
  std::normal_distribution<float> nd(0.3f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n * cols));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < cols; ++j) x[t * cols + j] = varies[j] ? nd(rng) : constant[j];
  ChannelMoments m(cols);
  m.accumulate(x.data(), n, cols);
  const std::vector<double> s =
      output_channel_scores(w, ChannelScore::kFluctuation, {}, m.variance());
  const std::vector<int64_t> kept = keep_highest(s, 3);
  EXPECT_EQ(kept, (std::vector<int64_t>{0, 2, 5}));

  const std::vector<float> b = removed_channel_bias(w, kept, m.mean());
  const Matrix wk = select_cols(w, kept);
  ASSERT_EQ(wk.rows, rows);
  ASSERT_EQ(wk.cols, 3);
  double worst = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      double full = 0.0, pruned = b[r];
      for (int64_t j = 0; j < cols; ++j) full += static_cast<double>(w.at(r, j)) * x[t * cols + j];
      for (int64_t j = 0; j < 3; ++j) pruned += static_cast<double>(wk.at(r, j)) * x[t * cols + kept[j]];
      worst = std::max(worst, std::abs(full - pruned));
    }
  }
  EXPECT_LT(worst, 1e-5);
  // Without the bias the removed constants are lost.
  double lost = 0.0;
  for (float v : b) lost = std::max(lost, static_cast<double>(std::abs(v)));
  EXPECT_GT(lost, 0.1);
}

TEST(StructuredScores, ActivationWeighsWeightsByInputNorms) {
  // Column 0 has large weights and a tiny input, column 3 small weights and a large input: the
  // activation score keeps 3 and drops 0, the magnitude score the other way round.
  Matrix w(4, 4);
  const float scale[4] = {10.0f, 1.0f, 2.0f, 0.5f};
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t c = 0; c < 4; ++c) w.at(r, c) = scale[c] * (r % 2 ? -1.0f : 1.0f);
  const std::vector<double> sq_norms = {0.0001, 4.0, 4.0, 10000.0};
  const std::vector<double> act = output_channel_scores(w, ChannelScore::kActivation, sq_norms, {});
  EXPECT_DOUBLE_EQ(act[0], 4 * 10.0 * 0.01);
  EXPECT_DOUBLE_EQ(act[3], 4 * 0.5 * 100.0);
  EXPECT_EQ(keep_highest(act, 2), (std::vector<int64_t>{2, 3}));
  const std::vector<double> mag = output_channel_scores(w, ChannelScore::kMagnitude, {}, {});
  EXPECT_EQ(keep_highest(mag, 2), (std::vector<int64_t>{0, 2}));
  // Heads of two channels: {0,1} scores 0.04 + 8, {2,3} scores 16 + 200.
  EXPECT_EQ(keep_highest(sum_groups(act, 2), 1), (std::vector<int64_t>{1}));
}

TEST(StructuredScores, KeepHighestBreaksTiesToTheLowerIndexAndRejectsBadInput) {
  EXPECT_EQ(keep_highest({1.0, 3.0, 3.0, 0.5, 3.0}, 2), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(keep_highest({2.0, 1.0}, 2), (std::vector<int64_t>{0, 1}));
  EXPECT_THROW(keep_highest({1.0, 2.0}, 0), Error);
  EXPECT_THROW(keep_highest({1.0, 2.0}, 3), Error);
  EXPECT_THROW(keep_highest({1.0, std::numeric_limits<double>::quiet_NaN()}, 1), Error);
  EXPECT_THROW(sum_groups({1.0, 2.0, 3.0}, 2), Error);
  EXPECT_THROW(output_channel_scores(Matrix(2, 3), ChannelScore::kActivation, {1.0}, {}), Error);
}

TEST(StructuredScores, MomentsMatchDirectSums) {
  const std::vector<float> x = {1, -2, 3, 4, 5, -6, 0.5f, 8, 2};  // [3, 3]
  ChannelMoments m(3);
  m.accumulate(x.data(), 2, 3);
  m.accumulate(x.data() + 6, 1, 3);
  EXPECT_EQ(m.tokens(), 3);
  const std::vector<double> mean = m.mean(), var = m.variance();
  for (int j = 0; j < 3; ++j) {
    const double mu = (x[j] + x[3 + j] + x[6 + j]) / 3.0;
    double v = 0;
    for (int t = 0; t < 3; ++t) v += (x[t * 3 + j] - mu) * (x[t * 3 + j] - mu);
    EXPECT_NEAR(mean[j], mu, 1e-12);
    EXPECT_NEAR(var[j], v / 2.0, 1e-12);
  }
}

// Each entry holds its own coordinates, so a selection is checked by value.
Matrix indexed(int64_t rows, int64_t cols) {
  Matrix w(rows, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) w.at(r, c) = static_cast<float>(r * 1000 + c);
  return w;
}

TEST(StructuredPrune, KvGroupsGoWithTheirQueryHeads) {
  // 4 query heads over 2 KV heads of width 2, hidden 3: group 1 = query heads 2, 3 = q rows
  // 4..7, KV head 1 = k/v rows 2..3, o columns 4..7.
  const HeadLayout layout{4, 2, 2};
  Matrix q = indexed(8, 3), k = indexed(4, 3), v = indexed(4, 3), o = indexed(3, 8);
  prune_kv_groups(q, k, v, o, layout, {1});
  ASSERT_EQ(q.rows, 4);
  ASSERT_EQ(k.rows, 2);
  ASSERT_EQ(v.rows, 2);
  ASSERT_EQ(o.cols, 4);
  for (int64_t r = 0; r < 4; ++r) EXPECT_EQ(q.at(r, 1), (4 + r) * 1000 + 1);
  for (int64_t r = 0; r < 2; ++r) EXPECT_EQ(k.at(r, 2), (2 + r) * 1000 + 2);
  for (int64_t c = 0; c < 4; ++c) EXPECT_EQ(o.at(2, c), 2000 + 4 + c);
  EXPECT_THROW(prune_kv_groups(q, k, v, o, layout, {0}), Error);  // shapes no longer match
  Matrix q2 = indexed(8, 3), k2 = indexed(4, 3), v2 = indexed(4, 3), o2 = indexed(3, 8);
  EXPECT_THROW(prune_kv_groups(q2, k2, v2, o2, layout, {}), Error);
  EXPECT_THROW(prune_kv_groups(q2, k2, v2, o2, layout, {1, 0}), Error);
}

TEST(StructuredPrune, MlpChannelsShrinkGateUpRowsAndDownColumns) {
  Matrix gate = indexed(5, 3), up = indexed(5, 3), down = indexed(3, 5);
  prune_mlp_channels(gate, up, down, {0, 3, 4});
  ASSERT_EQ(gate.rows, 3);
  ASSERT_EQ(up.rows, 3);
  ASSERT_EQ(down.cols, 3);
  EXPECT_EQ(gate.at(1, 0), 3000);
  EXPECT_EQ(up.at(2, 2), 4002);
  EXPECT_EQ(down.at(1, 1), 1003);
  EXPECT_EQ(structured_prune_count(0.25, 384), 96);
  EXPECT_EQ(structured_prune_count(0.25, 2), 0);
  EXPECT_EQ(structured_prune_count(0.57, 100), 57);
}

// ---- recipes ------------------------------------------------------------------------------------

std::string structured_recipe(const std::string& args) {
  return "calibration: {samples: 8, seq_len: 64}\noneshot_stage:\n  pruning_modifiers:\n"
         "    StructuredPruningModifier:\n" +
         args;
}

std::string recipe_error(const std::string& yaml) {
  try {
    Recipe::from_yaml(yaml, "recipes/s.yaml");
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(StructuredRecipe, ReadsAndWritesItsFields) {
  const Recipe r = Recipe::from_yaml(
      structured_recipe("      head_sparsity: 0.5\n      mlp_sparsity: 0.25\n"
                        "      importance: fluctuation\n      bias_compensation: true\n"),
      "s");
  const auto& a = std::get<StructuredPruningArgs>(r.modifiers()[0]->args);
  EXPECT_DOUBLE_EQ(a.head_sparsity, 0.5);
  EXPECT_DOUBLE_EQ(a.mlp_sparsity, 0.25);
  EXPECT_EQ(a.importance, Importance::kFluctuation);
  EXPECT_TRUE(a.bias_compensation);
  EXPECT_EQ(Recipe::from_yaml(r.to_yaml(), "stored"), r) << r.to_yaml();
  const Recipe defaults = Recipe::from_yaml(structured_recipe("      mlp_sparsity: 0.1\n"), "s");
  const auto& d = std::get<StructuredPruningArgs>(defaults.modifiers()[0]->args);
  EXPECT_EQ(d.importance, Importance::kActivation);
  EXPECT_FALSE(d.bias_compensation);
  EXPECT_DOUBLE_EQ(d.head_sparsity, 0.0);
}

TEST(StructuredRecipe, MalformedFieldsAreNamed) {
  const std::string where =
      "recipes/s.yaml: stage 'oneshot_stage', modifier 'StructuredPruningModifier', ";
  const std::pair<std::string, std::string> cases[] = {
      {"      head_sparsity: 1\n", "field 'head_sparsity': must be in [0, 1), got 1"},
      {"      mlp_sparsity: -0.1\n", "field 'mlp_sparsity': must be in [0, 1), got -0.1"},
      {"      mlp_sparsity: half\n", "field 'mlp_sparsity': must be a number, got half"},
      {"      head_sparsity: 0\n      mlp_sparsity: 0\n",
       "field 'head_sparsity': at least one of head_sparsity and mlp_sparsity must be > 0"},
      {"      mlp_sparsity: 0.2\n      importance: flap\n",
       "field 'importance': must be one of activation, fluctuation, magnitude, got flap"},
      {"      mlp_sparsity: 0.2\n      bias_compensation: 3\n",
       "field 'bias_compensation': must be true or false, got 3"},
      {"      heads_sparsity: 0.2\n",
       "field 'heads_sparsity': unknown field (did you mean 'head_sparsity'?)"},
      {"      mlp_sparsity: 0.2\n      targets: [\"re:(gate\"]\n",
       "field 'targets': bad regex 're:(gate'"},
  };
  for (const auto& [args, message] : cases) {
    const std::string e = recipe_error(structured_recipe(args));
    EXPECT_NE(e.find(where + message), std::string::npos) << args << " → " << e;
  }
}

// ---- the pipeline on the tiny model -------------------------------------------------------------

std::string temp_path(const std::string& name) {
  const fs::path p = fs::temp_directory_path() /
                     ("sparsa-structured-test-" + std::to_string(::getpid()) + "-" + name);
  fs::remove_all(p);
  return p.string();
}

std::string write_recipe(const std::string& name, const std::string& yaml) {
  const std::string path = temp_path(name + ".yaml");
  std::ofstream(path) << yaml;
  return path;
}

CompressOptions tiny_options(const std::string& recipe_path, const std::string& out) {
  CompressOptions o;
  o.model_dir = testing::tiny_model_dir();
  o.recipe_path = recipe_path;
  o.calibration_path = testing::fixtures_dir() + "/calibration.jsonl";
  o.output_dir = out;
  o.samples = 8;
  o.seq_len = 64;
  o.progress = false;
  o.keep_probe_logits = true;
  return o;
}

using testing::CliRun;
using testing::run_cli;

size_t dir_bytes(const std::string& dir) {
  size_t total = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".safetensors") total += e.file_size();
  return total;
}

double eval_ppl(const std::string& model) {
  const CliRun r = run_cli("eval '" + model + "' --data '" + testing::fixtures_dir() +
                           "/calibration.jsonl' --ctx 64 --json");
  EXPECT_EQ(r.code, 0) << r.out;
  const size_t brace = r.out.find('{');
  if (brace == std::string::npos) return 0.0;
  return nlohmann::json::parse(r.out.substr(brace)).at("ppl").get<double>();
}

struct TinyCase {
  const char* name;
  const char* importance;
  bool compensation;
};

class StructuredTiny : public ::testing::TestWithParam<TinyCase> {};

// Tiny: 4 query heads over 2 KV heads of 32, ffn 384. head_sparsity 0.5 removes one GQA group
// (2 query heads, 1 KV head), mlp_sparsity 0.25 removes 96 channels.
TEST_P(StructuredTiny, WritesASmallerStandardModelThatReloadsBitIdentically) {
  const TinyCase c = GetParam();
  const std::string recipe = write_recipe(
      c.name, structured_recipe(fmt::format("      head_sparsity: 0.5\n      mlp_sparsity: 0.25\n"
                                            "      importance: {}\n      bias_compensation: {}\n",
                                            c.importance, c.compensation)));
  const std::string out = temp_path(std::string("out-") + c.name);
  ThreadPool pool(2);
  const CompressReport r = compress_model(tiny_options(recipe, out), pool);

  // config.json: the shrunk shape, head_dim explicit, biases only with compensation.
  const auto config = nlohmann::json::parse(read_text_file(out + "/config.json"));
  EXPECT_EQ(config.at("num_attention_heads"), 2);
  EXPECT_EQ(config.at("num_key_value_heads"), 1);
  EXPECT_EQ(config.at("intermediate_size"), 288);
  EXPECT_EQ(config.at("head_dim"), 32);
  EXPECT_EQ(config.at("hidden_size"), 128);
  EXPECT_EQ(config.at("attention_bias"), c.compensation);
  EXPECT_EQ(config.at("mlp_bias"), c.compensation);
  EXPECT_FALSE(config.contains("quantization_config"));
  EXPECT_FALSE(config.contains("sparsa_config"));

  // The tensors have the shrunk shapes, dense, in the model's dtype.
  const io::Checkpoint ck = io::Checkpoint::open_dir(out);
  const std::pair<const char*, std::vector<int64_t>> shapes[] = {
      {"self_attn.q_proj", {64, 128}}, {"self_attn.k_proj", {32, 128}},
      {"self_attn.v_proj", {32, 128}}, {"self_attn.o_proj", {128, 64}},
      {"mlp.gate_proj", {288, 128}},   {"mlp.up_proj", {288, 128}},
      {"mlp.down_proj", {128, 288}}};
  for (int l = 0; l < 2; ++l) {
    for (const auto& [suffix, shape] : shapes) {
      const std::string name = "model.layers." + std::to_string(l) + "." + suffix;
      const io::TensorView* t = ck.find(name + ".weight");
      ASSERT_NE(t, nullptr) << name;
      EXPECT_EQ(t->shape, shape) << name;
      EXPECT_EQ(t->dtype, DType::BF16) << name;
      const io::TensorView* b = ck.find(name + ".bias");
      EXPECT_EQ(b != nullptr, c.compensation) << name;
      if (b != nullptr) {
        EXPECT_EQ(b->shape, (std::vector<int64_t>{shape[0]})) << name;
      }
    }
  }
  EXPECT_LT(dir_bytes(out), dir_bytes(testing::tiny_model_dir()));
  EXPECT_GT(r.output_bytes, 0u);

  // The report counts removed weights against the dense shapes.
  ASSERT_EQ(r.linears.size(), 14u);
  for (const LinearReport& l : r.linears) {
    const bool attn = l.name.find("self_attn") != std::string::npos;
    EXPECT_NEAR(l.sparsity, attn ? 0.5 : 0.25, 1e-3) << l.name;
    EXPECT_GT(l.relative_error, 0.0) << l.name;
    EXPECT_LT(l.relative_error, 1.0) << l.name;
  }
  EXPECT_EQ(r.linears[0].rows, 128);  // q_proj's dense shape

  // Reloaded, the checkpoint gives the logits the pipeline computed in memory.
  auto model = model::Model::load(out);
  EXPECT_EQ(model->config().num_heads, 2);
  EXPECT_EQ(model->config().num_kv_heads, 1);
  EXPECT_EQ(model->config().intermediate_size, 288);
  const std::vector<float> logits = testing::all_logits(*model, r.probe_tokens, pool);
  const size_t differ = testing::count_differing(logits, r.probe_logits);
  EXPECT_EQ(differ, 0u) << differ << " of " << logits.size() << " logits differ";

  // `sparsa eval` runs it; pruning a quarter of the MLP and half the heads costs perplexity.
  const double ppl = eval_ppl(out), dense_ppl = eval_ppl(testing::tiny_model_dir());
  EXPECT_TRUE(std::isfinite(ppl)) << ppl;
  EXPECT_GT(ppl, dense_ppl);
  std::printf("%s: ppl %.3f (dense %.3f)\n", c.name, ppl, dense_ppl);
  fs::remove_all(out);
  fs::remove(recipe);
}

INSTANTIATE_TEST_SUITE_P(Importance, StructuredTiny,
                         ::testing::Values(TinyCase{"activation", "activation", false},
                                           TinyCase{"fluctuation_bias", "fluctuation", true},
                                           TinyCase{"magnitude", "magnitude", false}),
                         [](const auto& info) { return std::string(info.param.name); });

// MLP channels alone: the attention stays as it was (copied, not re-encoded).
TEST(StructuredTinyMlpOnly, LeavesTheAttentionUntouched) {
  const std::string recipe =
      write_recipe("mlp-only", structured_recipe("      mlp_sparsity: 0.5\n"));
  const std::string out = temp_path("out-mlp-only");
  ThreadPool pool(2);
  compress_model(tiny_options(recipe, out), pool);
  const auto config = nlohmann::json::parse(read_text_file(out + "/config.json"));
  EXPECT_EQ(config.at("num_attention_heads"), 4);
  EXPECT_EQ(config.at("num_key_value_heads"), 2);
  EXPECT_EQ(config.at("intermediate_size"), 192);
  const io::Checkpoint pruned = io::Checkpoint::open_dir(out);
  const io::Checkpoint dense = io::Checkpoint::open_dir(testing::tiny_model_dir());
  const std::string q = "model.layers.1.self_attn.q_proj.weight";
  const io::TensorView &a = pruned.get(q), &b = dense.get(q);
  ASSERT_EQ(a.nbytes, b.nbytes);
  EXPECT_EQ(std::memcmp(a.data, b.data, a.nbytes), 0);
  EXPECT_EQ(pruned.get("model.layers.1.mlp.down_proj.weight").shape,
            (std::vector<int64_t>{128, 192}));
  fs::remove_all(out);
  fs::remove(recipe);
}

// Structured pruning followed by quantization: the later modifier works on the shrunk matrices
// and the checkpoint still reloads bit-identically.
TEST(StructuredTinyThenQuantize, LaterModifiersSeeTheShrunkLayers) {
  const std::string recipe = write_recipe(
      "then-rtn",
      structured_recipe("      head_sparsity: 0.5\n      mlp_sparsity: 0.25\n") +
          "  quantization_modifiers:\n    QuantizationModifier:\n"
          "      scheme: {bits: 4, group_size: 32, symmetric: true}\n"
          "      targets: [\"re:.*(q|k|v|o|gate|up|down)_proj$\"]\n");
  const std::string out = temp_path("out-then-rtn");
  ThreadPool pool(2);
  const CompressReport r = compress_model(tiny_options(recipe, out), pool);
  const io::Checkpoint ck = io::Checkpoint::open_dir(out);
  EXPECT_EQ(ck.get("model.layers.0.mlp.down_proj.weight_packed").shape,
            (std::vector<int64_t>{128, 288 / 8}));
  EXPECT_EQ(ck.get("model.layers.0.self_attn.k_proj.weight_packed").shape,
            (std::vector<int64_t>{32, 128 / 8}));
  auto model = model::Model::load(out);
  const int64_t n = static_cast<int64_t>(r.probe_tokens.size());
  model::KvCache cache(model->config(), n);
  std::vector<float> logits(static_cast<size_t>(n * model->config().vocab_size));
  model->forward(r.probe_tokens, cache, logits.data(), true, pool);
  EXPECT_EQ(logits, r.probe_logits);
  fs::remove_all(out);
  fs::remove(recipe);
}

void expect_compress_error(const std::string& name, const std::string& yaml,
                           const std::string& fragment, const std::string& model_dir = {}) {
  const std::string recipe = write_recipe(name, yaml);
  const std::string out = temp_path("out-" + name);
  CompressOptions o = tiny_options(recipe, out);
  if (!model_dir.empty()) o.model_dir = model_dir;
  ThreadPool pool(2);
  try {
    compress_model(o, pool);
    ADD_FAILURE() << name << ": no error; expected one containing '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out)) << name;
  fs::remove(recipe);
}

TEST(StructuredTinyErrors, RecipesTheModelCannotHonourAreRefused) {
  const std::string m = "stage 'oneshot_stage', modifier 'StructuredPruningModifier', ";
  // 0.25 of 2 KV heads is no whole group.
  expect_compress_error("quarter-heads", structured_recipe("      head_sparsity: 0.25\n"),
                        m + "field 'head_sparsity': 0.25 removes no whole KV-head group of 2");
  expect_compress_error("tiny-mlp", structured_recipe("      mlp_sparsity: 0.001\n"),
                        m + "field 'mlp_sparsity': 0.001 removes no channel of 384");
  // One layer left out would give the layers different shapes.
  expect_compress_error(
      "one-layer",
      structured_recipe("      mlp_sparsity: 0.25\n      ignore: [\"model.layers.1\"]\n"),
      m + "field 'targets': MLP channels are pruned, but model.layers.1.mlp.gate_proj is not "
          "targeted");
  expect_compress_error("not-first",
                        "oneshot_stage:\n  quantization_modifiers:\n    QuantizationModifier:\n"
                        "      scheme: {bits: 4, group_size: 32}\n  pruning_modifiers:\n"
                        "    StructuredPruningModifier:\n      mlp_sparsity: 0.25\n",
                        "'StructuredPruningModifier' must be the recipe's first modifier");
  // Mistral has no o_proj / down_proj bias to compensate with.
  const std::string mistral = temp_path("mistral");
  fs::create_directories(mistral);
  for (const auto& e : fs::directory_iterator(testing::tiny_model_dir()))
    fs::copy_file(e.path(), fs::path(mistral) / e.path().filename());
  auto config = nlohmann::json::parse(read_text_file(mistral + "/config.json"));
  config["model_type"] = "mistral";
  std::ofstream(mistral + "/config.json") << config.dump(2);
  expect_compress_error(
      "mistral-bias",
      structured_recipe("      mlp_sparsity: 0.25\n      bias_compensation: true\n"),
      m + "field 'bias_compensation': needs model_type llama", mistral);
  fs::remove_all(mistral);
}

}  // namespace
}  // namespace sparsa::compress
