// The trainer: schedules, masks, gradual pruning, the fine-tuning of models/tiny (loss goes down,
// pruned weights stay exactly zero), bit-identical resume, and the finetune stage of recipes.
#include "sparsa/train/trainer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "sparsa/compress/quantize.h"
#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/runtime/perplexity.h"
#include "sparsa/runtime/tokenizer.h"
#include "test_util.h"
#include "train_util.h"

namespace sparsa::train {
namespace {

namespace fs = std::filesystem;
using compress::Recipe;
using testing::half_pruned_tiny;
using testing::readme_tokens;

TEST(TrainSchedule, WarmupThenCosineToTheFloor) {
  compress::TrainingArgs a;
  a.lr = 1e-3;
  a.warmup_steps = 4;
  a.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(learning_rate(a, 0, 24), 0.25e-3);
  EXPECT_DOUBLE_EQ(learning_rate(a, 3, 24), 1e-3);
  EXPECT_DOUBLE_EQ(learning_rate(a, 4, 24), 1e-3);
  EXPECT_NEAR(learning_rate(a, 23, 24), 1e-4, 1e-12);
  // Halfway through the decay: the mean of peak and floor.
  a.warmup_steps = 0;
  EXPECT_NEAR(learning_rate(a, 5, 11), 0.55e-3, 1e-12);
  for (int64_t s = 1; s < 11; ++s) EXPECT_LE(learning_rate(a, s, 11), learning_rate(a, s - 1, 11));
}

TEST(TrainSchedule, CubicSparsityFollowsZhuAndGupta) {
  compress::GradualPruningArgs g{0.1, 0.7, 10, 30, 5};
  EXPECT_DOUBLE_EQ(cubic_sparsity(g, 0), 0.1);
  EXPECT_DOUBLE_EQ(cubic_sparsity(g, 10), 0.1);
  EXPECT_NEAR(cubic_sparsity(g, 20), 0.7 + (0.1 - 0.7) * 0.125, 1e-12);
  EXPECT_DOUBLE_EQ(cubic_sparsity(g, 30), 0.7);
  EXPECT_DOUBLE_EQ(cubic_sparsity(g, 99), 0.7);
  std::vector<int64_t> steps;
  for (int64_t s = 0; s < 40; ++s)
    if (pruning_step(g, s)) steps.push_back(s);
  EXPECT_EQ(steps, (std::vector<int64_t>{10, 15, 20, 25, 30}));
  g.update_frequency = 7;  // end_step is always an update
  steps.clear();
  for (int64_t s = 0; s < 40; ++s)
    if (pruning_step(g, s)) steps.push_back(s);
  EXPECT_EQ(steps, (std::vector<int64_t>{10, 17, 24, 30}));
}

TEST(TrainSchedule, MagnitudePruneKeepsTheLargestAndOnlyGrowsTheMask) {
  std::vector<float> w = {0.5f, -0.1f, 0.0f, 2.0f, -3.0f, 0.2f, 0.05f, -0.7f};
  std::vector<uint8_t> keep(w.size(), 1);
  keep[3] = 0;  // masked although large: pruned first
  w[3] = 0.0f;
  magnitude_prune(w.data(), keep.data(), 8, 0.5);
  EXPECT_EQ(keep, (std::vector<uint8_t>{1, 0, 0, 0, 1, 1, 0, 1}));
  for (size_t i = 0; i < w.size(); ++i)
    if (!keep[i]) {
      EXPECT_EQ(w[i], 0.0f);
    }
}

Recipe finetune_recipe(const std::string& modifiers, int64_t steps, double lr = 2e-3) {
  return Recipe::from_yaml(fmt::format(R"(ft_stage:
  run_type: finetune
  training: {{lr: {}, warmup_steps: 2, steps: {}, batch_size: 4, seq_len: 32, grad_accum: 2,
             clip: 1.0, weight_decay: 0.01, seed: 5, eval_windows: 8, min_lr_ratio: 0.1}}
  m_modifiers:
{})",
                                       lr, steps, modifiers),
                           "test.yaml");
}

const char* kConstantAndDistill = R"(    ConstantMaskModifier: {targets: ["re:.*_proj$"], ignore: [lm_head]}
    DistillationModifier: {ce: 1.0, kl: 1.0, squarehead: 0.5, temperature: 2.0}
)";

TEST(Trainer, FineTunesPrunedTinyWithMasksFixedAndLossGoingDown) {
  ThreadPool pool(2);
  Model student = half_pruned_tiny();
  const std::vector<float> before(student.params(), student.params() + student.num_params());
  Model teacher = Model::load(testing::tiny_model_dir());
  const Recipe r = finetune_recipe(kConstantAndDistill, 12);
  Trainer trainer(student, &teacher, *r.finetune_stage(), TokenData(readme_tokens(), 32, 8), pool);
  ASSERT_EQ(trainer.total_steps(), 12);
  // Model FLOPs per token: 6 · (2 layers · 196608 projection weights + 1048576 of lm_head) +
  // 12 · 2 · 32 · 128 for the student, 2 · 1441792 + 4 · 2 · 32 · 128 for the teacher's forward.
  EXPECT_DOUBLE_EQ(trainer.flops_per_token(), 8650752.0 + 98304.0 + 2883584.0 + 32768.0);
  const double sparsity0 = trainer.masked_sparsity();
  EXPECT_NEAR(sparsity0, 0.5, 1e-3);
  const EvalStats e0 = trainer.evaluate();
  while (trainer.step() < trainer.total_steps()) trainer.train_step();
  const EvalStats e1 = trainer.evaluate();
  const auto& h = trainer.history();
  ASSERT_EQ(h.size(), 12u);
  EXPECT_LT(e1.ce, e0.ce - 0.05) << "validation CE " << e0.ce << " -> " << e1.ce;
  EXPECT_LT(h.back().loss, h.front().loss) << h.front().loss << " -> " << h.back().loss;
  EXPECT_GT(h.front().kl, 0.0);
  EXPECT_GT(h.front().squarehead, 0.0);
  EXPECT_EQ(h.back().tokens, 12 * 2 * 4 * 32);
  // Every pruned weight is exactly zero; the others moved.
  int64_t moved = 0;
  for (const ParamTensor& t : student.tensors()) {
    if (!t.linear) continue;
    EXPECT_TRUE(trainer.masked(t.name)) << t.name;
    for (int64_t i = 0; i < t.numel; ++i) {
      const float w0 = before[static_cast<size_t>(t.offset + i)], w1 = student.params()[t.offset + i];
      if (w0 == 0.0f) {
        ASSERT_EQ(w1, 0.0f) << t.name << "[" << i << "]";
        ASSERT_EQ(std::signbit(w1), false);
      } else {
        moved += w1 != w0;
      }
    }
  }
  EXPECT_GT(moved, 0);
  EXPECT_DOUBLE_EQ(trainer.masked_sparsity(), sparsity0);
}

TEST(Trainer, GradualPruningReachesTheFinalSparsityOnTheCubicSchedule) {
  ThreadPool pool(2);
  Model student = Model::load(testing::tiny_model_dir());
  Model teacher = Model::load(testing::tiny_model_dir());
  const Recipe r = finetune_recipe(R"(    GradualPruningModifier: {init_sparsity: 0.1, final_sparsity: 0.6, start_step: 0, end_step: 4, update_frequency: 2, targets: ["re:.*mlp.*"]}
    DistillationModifier: {ce: 0.5, kl: 1.0}
)",
                                   6);
  Trainer trainer(student, &teacher, *r.finetune_stage(), TokenData(readme_tokens(), 32, 4), pool);
  std::vector<double> sparsity;
  while (trainer.step() < trainer.total_steps()) sparsity.push_back(trainer.train_step().sparsity);
  // Pruned before steps 0, 2 and 4 to s(0) = 0.1, s(2) = 0.6 − 0.5/8, s(4) = 0.6.
  EXPECT_NEAR(sparsity[0], 0.1, 1e-3);
  EXPECT_NEAR(sparsity[1], 0.1, 1e-3);
  EXPECT_NEAR(sparsity[2], 0.6 - 0.5 / 8, 1e-3);
  EXPECT_NEAR(sparsity[4], 0.6, 1e-3);
  EXPECT_NEAR(sparsity[5], 0.6, 1e-3);
  EXPECT_FALSE(trainer.masked("model.layers.0.self_attn.q_proj.weight"));
  EXPECT_TRUE(trainer.masked("model.layers.1.mlp.down_proj.weight"));
  // The attention projections were not touched by the pruning.
  const ParamTensor* q = student.find("model.layers.0.self_attn.q_proj.weight");
  int64_t zeros = 0;
  for (int64_t i = 0; i < q->numel; ++i) zeros += student.params()[q->offset + i] == 0.0f;
  EXPECT_LT(zeros, q->numel / 100);
  for (const ParamTensor& t : student.tensors()) {
    if (!trainer.masked(t.name)) continue;
    for (int64_t i = 0; i < t.numel; ++i)
      if (!trainer.keep()[static_cast<size_t>(t.offset + i)]) {
        ASSERT_EQ(student.params()[t.offset + i], 0.0f);
      }
  }
}

TEST(Trainer, ResumingACheckpointEqualsAnUninterruptedRunBitForBit) {
  ThreadPool pool(2);
  const Recipe r = finetune_recipe(kConstantAndDistill, 6);
  const std::vector<int32_t> tokens = readme_tokens();
  Model teacher = Model::load(testing::tiny_model_dir());

  Model a = half_pruned_tiny();
  Trainer ta(a, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  while (ta.step() < ta.total_steps()) ta.train_step();

  const fs::path dir = fs::temp_directory_path() / ("sparsa_train_resume_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  {
    Model b = half_pruned_tiny();
    Trainer tb(b, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
    for (int i = 0; i < 3; ++i) tb.train_step();
    tb.save_checkpoint((dir / "step-3").string());
  }
  Model c = half_pruned_tiny();
  // A fresh student: the checkpoint must bring back weights, moments, masks and data position.
  Trainer tc(c, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  tc.load_checkpoint((dir / "step-3").string());
  EXPECT_EQ(tc.step(), 3);
  while (tc.step() < tc.total_steps()) tc.train_step();
  ASSERT_EQ(a.num_params(), c.num_params());
  EXPECT_EQ(std::memcmp(a.params(), c.params(), static_cast<size_t>(a.num_params()) * 4), 0);
  ASSERT_EQ(ta.history().size(), tc.history().size());
  for (size_t i = 0; i < ta.history().size(); ++i) {
    EXPECT_EQ(ta.history()[i].loss, tc.history()[i].loss) << "step " << i + 1;
    EXPECT_EQ(ta.history()[i].grad_norm, tc.history()[i].grad_norm) << "step " << i + 1;
  }
  // Other data is refused.
  std::vector<int32_t> other = tokens;
  other[5] ^= 1;
  Model d = half_pruned_tiny();
  Trainer td(d, &teacher, *r.finetune_stage(), TokenData(other, 32, 8), pool);
  try {
    td.load_checkpoint((dir / "step-3").string());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("was trained on other data"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

TEST(FakeQuant, RoundTripsRtnWeightsAndKeepsPrunedZeros) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  const int64_t rows = 6, cols = 64;
  compress::Matrix w(rows, cols);
  for (float& x : w.data) x = nd(rng);
  std::vector<uint8_t> keep(static_cast<size_t>(rows * cols), 1);
  for (size_t i = 0; i < keep.size(); i += 3) keep[i] = 0, w.data[i] = 0.0f;
  const std::vector<float> original = w.data;
  const compress::Mask mask = keep;
  const compress::QuantResult q =
      compress::rtn_quantize(w, {.bits = 4, .symmetric = false, .group_size = 16}, &mask);
  const FakeQuantGrid g = rtn_grid(original.data(), keep.data(), rows, cols, 4, 16, false);
  ASSERT_EQ(g.n_groups, 4);
  EXPECT_EQ(g.scales, q.scales);
  // Weights already on the grid come back unchanged, with RTN's codes; zeros stay 0.
  std::vector<float> out(w.data.size());
  std::vector<uint8_t> codes(w.data.size());
  fake_quantize(w.data.data(), out.data(), g, codes.data());
  EXPECT_EQ(out, w.data);
  EXPECT_EQ(codes, q.codes);
  fake_quantize(original.data(), out.data(), g, nullptr);
  EXPECT_EQ(out, w.data);
  for (size_t i = 0; i < keep.size(); i += 3) EXPECT_EQ(out[i], 0.0f);
}

const char* kQatModifiers = R"(    ConstantMaskModifier: {targets: ["re:.*_proj$"], ignore: [lm_head]}
    QuantizationModifier: {scheme: {bits: 4, group_size: 32, symmetric: false}, targets: ["re:.*mlp.*_proj$"], ignore: [lm_head]}
    DistillationModifier: {ce: 1.0, kl: 1.0, squarehead: 0.5, temperature: 2.0}
)";

TEST(Trainer, QuantizationAwareStepsComputeOnTheGridAndKeepMasks) {
  ThreadPool pool(2);
  Model student = half_pruned_tiny();
  const std::vector<float> before(student.params(), student.params() + student.num_params());
  Model teacher = Model::load(testing::tiny_model_dir());
  const Recipe r = finetune_recipe(kQatModifiers, 8);
  Trainer trainer(student, &teacher, *r.finetune_stage(), TokenData(readme_tokens(), 32, 8), pool);
  const std::vector<std::string> qt = trainer.quantized_tensors();
  ASSERT_EQ(qt.size(), 6u);  // gate, up, down of 2 layers
  EXPECT_EQ(qt[0], "model.layers.0.mlp.gate_proj.weight");
  const EvalStats e0 = trainer.evaluate();
  while (trainer.step() < trainer.total_steps()) trainer.train_step();
  EXPECT_LT(trainer.evaluate().ce, e0.ce);
  ASSERT_TRUE(student.has_forward_weights());
  const float* fw = student.forward_weights();
  int64_t off_grid = 0;
  for (const ParamTensor& t : student.tensors()) {
    const bool quant = std::find(qt.begin(), qt.end(), t.name) != qt.end();
    std::vector<float> expect(student.params() + t.offset, student.params() + t.offset + t.numel);
    if (quant) {
      fake_quantize(student.params() + t.offset, expect.data(), trainer.quant_grid(t.name));
      for (int64_t i = 0; i < t.numel; ++i) off_grid += expect[i] != student.params()[t.offset + i];
    }
    // The forward weights: the fake-quantized masters of the quantized tensors, the masters of
    // the others.
    ASSERT_EQ(std::memcmp(fw + t.offset, expect.data(), static_cast<size_t>(t.numel) * 4), 0)
        << t.name;
    if (!t.linear) continue;
    for (int64_t i = 0; i < t.numel; ++i)
      if (before[static_cast<size_t>(t.offset + i)] == 0.0f) {
        ASSERT_EQ(student.params()[t.offset + i], 0.0f) << t.name;
        ASSERT_EQ(fw[t.offset + i], 0.0f) << t.name;
      }
  }
  EXPECT_GT(off_grid, 0);  // the masters themselves are not on the grid
  // A grid that does not fit is refused.
  FakeQuantGrid bad = trainer.quant_grid(qt[0]);
  bad.bits = 3;
  EXPECT_THROW(trainer.set_quant_grid(qt[0], bad), Error);
  EXPECT_THROW(trainer.quant_grid("model.layers.0.self_attn.q_proj.weight"), Error);
}

TEST(Trainer, DistillationWithoutATeacherIsRefused) {
  ThreadPool pool(1);
  Model student = Model::load(testing::tiny_model_dir());
  const Recipe r = finetune_recipe("    DistillationModifier: {ce: 1.0, kl: 1.0}\n", 2);
  try {
    Trainer t(student, nullptr, *r.finetune_stage(), TokenData(readme_tokens(), 32, 4), pool);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'DistillationModifier' needs a teacher"),
              std::string::npos)
        << e.what();
  }
}

// ---- recipes ------------------------------------------------------------------------------------

std::string error_of(const std::string& yaml) {
  try {
    Recipe::from_yaml(yaml, "recipes/x.yaml");
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(FinetuneRecipe, ReadsTheShippedRecipes) {
  const Recipe sq = Recipe::from_file(testing::source_dir() + "/recipes/finetune-squarehead.yaml");
  const compress::Stage* s = sq.finetune_stage();
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->training.steps, 200);
  EXPECT_DOUBLE_EQ(s->training.lr, 1e-4);
  EXPECT_EQ(s->training.seq_len, 256);
  ASSERT_EQ(s->modifiers.size(), 2u);
  EXPECT_EQ(s->modifiers[0].type(), compress::ModifierType::kConstantMask);
  const auto& d = std::get<compress::DistillationArgs>(s->modifiers[1].args);
  EXPECT_EQ(d, (compress::DistillationArgs{1.0, 1.0, 1.0, 2.0}));
  EXPECT_EQ(Recipe::from_yaml(sq.to_yaml(), "again"), sq) << sq.to_yaml();

  // The GPU-scale recipes: 48 M tokens of 32 x 512 at 3e-4; one with cross-entropy, one without.
  for (const char* name : {"finetune-squarehead-50m", "finetune-distill-50m"}) {
    const Recipe big = Recipe::from_file(testing::source_dir() + "/recipes/" + name + ".yaml");
    const compress::TrainingArgs& t = big.finetune_stage()->training;
    EXPECT_EQ(t.max_tokens, 48000000) << name;
    EXPECT_EQ(t.batch_size * t.seq_len, 32 * 512) << name;
    EXPECT_DOUBLE_EQ(t.lr, 3e-4) << name;
    const auto& dd = std::get<compress::DistillationArgs>(big.finetune_stage()->modifiers[1].args);
    EXPECT_EQ(dd.ce, std::string(name) == "finetune-distill-50m" ? 0.0 : 1.0) << name;
    EXPECT_EQ(dd.kl, 1.0) << name;
    EXPECT_EQ(dd.squarehead, 1.0) << name;
  }

  const Recipe qat = Recipe::from_file(testing::source_dir() + "/recipes/finetune-qat-w4g128.yaml");
  const auto& qm = std::get<compress::QuantizationArgs>(qat.finetune_stage()->modifiers[1].args);
  EXPECT_EQ(qm.scheme.bits, 4);
  EXPECT_EQ(qm.scheme.group_size, 128);
  EXPECT_FALSE(qm.scheme.symmetric);

  const Recipe dkm = Recipe::from_file(testing::source_dir() + "/recipes/finetune-dkm-3bit.yaml");
  const auto& pm = std::get<compress::PalettizationArgs>(dkm.finetune_stage()->modifiers[0].args);
  EXPECT_EQ(pm.bits, 3);
  EXPECT_EQ(pm.group_size, 16);
  EXPECT_DOUBLE_EQ(pm.temperature, 0.02);
  EXPECT_EQ(pm.iterations, 2);
  EXPECT_EQ(Recipe::from_yaml(dkm.to_yaml(), "again"), dkm) << dkm.to_yaml();

  const Recipe gp = Recipe::from_file(testing::source_dir() + "/recipes/gradual-prune-70.yaml");
  const auto& g = std::get<compress::GradualPruningArgs>(gp.finetune_stage()->modifiers[0].args);
  EXPECT_EQ(g, (compress::GradualPruningArgs{0.0, 0.7, 0, 300, 10}));
  EXPECT_EQ(Recipe::from_yaml(gp.to_yaml(), "again"), gp) << gp.to_yaml();
}

TEST(FinetuneRecipe, RejectsBadFieldsNamingStageModifierAndField) {
  const std::string head = "ft_stage:\n  run_type: finetune\n";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {head + "  training: {lr: 0}\n  m_modifiers:\n    ConstantMaskModifier: {}\n",
       "recipes/x.yaml: stage 'ft_stage', field 'training.lr': must be in (0, 10], got 0"},
      {head + "  training: {steps: 5, max_tokens: 100}\n  m_modifiers:\n    ConstantMaskModifier: {}\n",
       "field 'training.max_tokens': give either steps or max_tokens, not both"},
      {head + "  training: {batch: 4}\n  m_modifiers:\n    ConstantMaskModifier: {}\n",
       "field 'training.batch': unknown field (did you mean 'batch_size'?)"},
      {head + "  m_modifiers:\n    GradualPruningModifier: {final_sparsity: 0.5, start_step: 10, end_step: 5}\n",
       "stage 'ft_stage', modifier 'GradualPruningModifier', field 'end_step': must be >= "
       "start_step 10, got 5"},
      {head + "  m_modifiers:\n    GradualPruningModifier: {end_step: 5}\n",
       "modifier 'GradualPruningModifier', field 'final_sparsity': missing required field"},
      {head + "  m_modifiers:\n    GradualPruningModifier: {final_sparsity: 0.3, init_sparsity: 0.5, end_step: 5}\n",
       "field 'init_sparsity': must be <= final_sparsity 0.3, got 0.5"},
      {head + "  m_modifiers:\n    DistillationModifier: {ce: 0, kl: 0}\n",
       "modifier 'DistillationModifier', field 'ce': at least one of ce, kl and squarehead must "
       "be > 0"},
      {head + "  m_modifiers:\n    DistillationModifier: {temperature: 0}\n",
       "modifier 'DistillationModifier', field 'temperature': must be in (0, 1000], got 0"},
      {head + "  m_modifiers:\n    MagnitudePruningModifier: {sparsity: 0.5}\n",
       "modifier 'MagnitudePruningModifier': is not a fine-tuning modifier"},
      {"oneshot_stage:\n  m_modifiers:\n    ConstantMaskModifier: {}\n",
       "stage 'oneshot_stage', modifier 'ConstantMaskModifier': belongs in a stage with "
       "run_type: finetune"},
      {"oneshot_stage:\n  training: {lr: 0.1}\n  m_modifiers:\n    MagnitudePruningModifier: {sparsity: 0.5}\n",
       "stage 'oneshot_stage', field 'training': needs run_type: finetune"},
      {head + "  run_type: finetune\n  m_modifiers:\n    ConstantMaskModifier: {}\n",
       "given twice"},
      {"ft_stage:\n  run_type: train\n  m_modifiers:\n    ConstantMaskModifier: {}\n",
       "field 'run_type': must be 'oneshot', got train ('finetune' marks a fine-tuning stage)"},
      {head + "  m_modifiers:\n    ConstantMaskModifier: {}\n" + "ft2_stage:\n  run_type: finetune\n  m_modifiers:\n    ConstantMaskModifier: {}\n",
       "a recipe holds one finetune stage ('ft_stage' is one already)"},
      {head + "  a_modifiers:\n    DistillationModifier: {}\n  b_modifiers:\n    DistillationModifier: {}\n",
       "a stage holds one DistillationModifier"},
  };
  for (const auto& [yaml, expected] : cases) {
    SCOPED_TRACE(yaml);
    EXPECT_NE(error_of(yaml).find(expected), std::string::npos) << error_of(yaml);
  }
}

}  // namespace
}  // namespace sparsa::train
