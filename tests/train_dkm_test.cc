// Clustering-aware fine-tuning (DKM): the soft assignment and its derivative, the centroid
// updates over the unique-value table, trainer steps on models/tiny that compute with the
// soft-clustered weights and resume bit for bit, and the palettized output of `sparsa finetune`.
#include "sparsa/train/dkm.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/io/compressed_tensors.h"
#include "sparsa/io/safetensors.h"
#include "sparsa/runtime/perplexity.h"
#include "sparsa/runtime/tokenizer.h"
#include "sparsa/train/trainer.h"
#include "test_util.h"
#include "train_util.h"

namespace sparsa::train {
namespace {

using testing::readme_tokens;

namespace fs = std::filesystem;

TEST(Dkm, SoftWeightsAndTheirDerivativeMatchFiniteDifferences) {
  DkmTensor t;
  t.bits = 2;
  t.rows = 1;
  t.cols = 1;
  t.group_rows = 1;
  t.centroids = {-0.5f, 0.0f, 0.25f, 0.5f};
  const DkmOptions o{1.0, 0};  // τ = (1 / 3)²
  EXPECT_NEAR(dkm_tau(t, 0, o), 1.0 / 9.0, 1e-7);
  // Values and steps on the bf16 grid (8 significant bits), where the forward reads them exactly.
  for (const float v : {0.125f, -0.375f, 0.3125f, 0.0f}) {
    const float h = 1.0f / 512;
    float y = 0, d = 0, yp = 0, ym = 0;
    dkm_soft_weights(t, &v, o, &y, &d);
    const float vp = v + h, vm = v - h;
    dkm_soft_weights(t, &vp, o, &yp, nullptr);
    dkm_soft_weights(t, &vm, o, &ym, nullptr);
    EXPECT_NEAR(d, (yp - ym) / (2 * h), 2e-3 * std::max(1.0f, std::abs(d))) << "v = " << v;
    EXPECT_GT(y, t.centroids.front());
    EXPECT_LT(y, t.centroids.back());
  }
  // A weight sitting on a centroid far from the others keeps (almost) its value.
  const float on = 0.5f;
  float y = 0;
  dkm_soft_weights(t, &on, {0.02, 0}, &y, nullptr);
  EXPECT_NEAR(y, 0.5f, 1e-3f);
}

TEST(Dkm, CentroidUpdatesMoveToTheClusterMeans) {
  // Two clusters of bf16-exact values around -1 and 2, one palette of 2 entries per row group.
  std::vector<float> w;
  for (int i = 0; i < 64; ++i) w.push_back(i % 2 ? -1.0f + (i % 8) / 64.0f : 2.0f - (i % 8) / 64.0f);
  DkmTensor t;
  t.bits = 1;
  t.rows = 2;
  t.cols = 32;
  t.group_rows = 2;
  t.centroids = {-0.5f, 1.0f};
  dkm_update_centroids(t, w.data(), {0.05, 20});
  double lo = 0, hi = 0;
  int nlo = 0, nhi = 0;
  for (float x : w) (x < 0 ? (lo += x, ++nlo) : (hi += x, ++nhi));
  EXPECT_NEAR(t.centroids[0], lo / nlo, 1e-4);
  EXPECT_NEAR(t.centroids[1], hi / nhi, 1e-4);
  // The hard assignment takes the nearest entry of the sorted palette.
  const compress::Palette p = dkm_palette(t, w.data());
  ASSERT_EQ(p.lut.size(), 2u);
  for (size_t i = 0; i < w.size(); ++i) EXPECT_EQ(p.indices[i], w[i] < 0 ? 0 : 1) << i;
}

constexpr const char* kDkmStage = R"(ft_stage:
  run_type: finetune
  training: {{lr: 2e-3, warmup_steps: 1, steps: {}, batch_size: 4, seq_len: 32, clip: 1.0,
             seed: 5, eval_windows: 8}}
  m_modifiers:
    PalettizationModifier: {{bits: 3, granularity: per_grouped_channel, group_size: 16,
                            temperature: 0.2, iterations: 2, targets: ["re:.*_proj$"],
                            ignore: [lm_head]}}
    DistillationModifier: {{ce: 1.0, kl: 1.0, squarehead: 0.5, temperature: 2.0}}
)";

TEST(DkmTrainer, StepsComputeWithSoftClusteredWeightsAndResumeBitForBit) {
  ThreadPool pool(2);
  const compress::Recipe r =
      compress::Recipe::from_yaml(fmt::format(fmt::runtime(kDkmStage), 12), "dkm-test.yaml");
  const std::vector<int32_t> tokens = readme_tokens();
  Model teacher = Model::load(testing::tiny_model_dir());
  Model a = Model::load(testing::tiny_model_dir());
  Trainer ta(a, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  const std::vector<std::string> ct = ta.clustered_tensors();
  ASSERT_EQ(ct.size(), 14u);
  EXPECT_EQ(ta.clustering(ct[0]).n_groups(), 128 / 16);
  const double ce0 = ta.evaluate().ce;
  while (ta.step() < ta.total_steps()) ta.train_step();
  const double ce1 = ta.evaluate().ce;
  EXPECT_LT(ce1, ce0 - 0.05) << "validation CE " << ce0 << " -> " << ce1;
  // The forward weights are the soft assignment of the masters to the current palettes.
  ASSERT_TRUE(a.has_forward_weights());
  for (const std::string& name : ct) {
    const ParamTensor* t = a.find(name);
    std::vector<float> expect(static_cast<size_t>(t->numel));
    dkm_soft_weights(ta.clustering(name), a.params() + t->offset, {0.2, 2}, expect.data(), nullptr);
    ASSERT_EQ(std::memcmp(a.forward_weights() + t->offset, expect.data(), expect.size() * 4), 0)
        << name;
  }

  const fs::path dir = fs::temp_directory_path() / ("sparsa_dkm_resume_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  {
    Model b = Model::load(testing::tiny_model_dir());
    Trainer tb(b, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
    for (int i = 0; i < 3; ++i) tb.train_step();
    tb.save_checkpoint((dir / "step-3").string());
  }
  Model c = Model::load(testing::tiny_model_dir());
  Trainer tc(c, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  tc.load_checkpoint((dir / "step-3").string());
  while (tc.step() < tc.total_steps()) tc.train_step();
  EXPECT_EQ(std::memcmp(a.params(), c.params(), static_cast<size_t>(a.num_params()) * 4), 0);
  for (const std::string& name : ct)
    EXPECT_EQ(tc.clustering(name).centroids, ta.clustering(name).centroids) << name;
  fs::remove_all(dir);
}

TEST(DkmTrainer, RefusesMaskedOrHessianWeightedTargets) {
  ThreadPool pool(1);
  Model student = Model::load(testing::tiny_model_dir());
  Model teacher = Model::load(testing::tiny_model_dir());
  auto error_of = [&](const std::string& yaml) -> std::string {
    try {
      const compress::Recipe r = compress::Recipe::from_yaml(yaml, "x.yaml");
      Trainer t(student, &teacher, *r.finetune_stage(), TokenData(readme_tokens(), 32, 4), pool);
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  const std::string base = R"(ft_stage:
  run_type: finetune
  training: {steps: 2, batch_size: 2, seq_len: 32}
  m_modifiers:
)";
  EXPECT_NE(error_of(base + R"(    ConstantMaskModifier: {targets: ["re:.*_proj$"]}
    PalettizationModifier: {bits: 3, targets: ["re:.*_proj$"]}
)").find("clustering-aware training takes dense, unquantized tensors"),
            std::string::npos);
  EXPECT_NE(error_of(base + "    PalettizationModifier: {bits: 3, weight: hessian}\n")
                .find("field 'weight': clustering-aware training weighs every weight alike"),
            std::string::npos);
}

TEST(DkmCli, FinetuneWritesPalettizedWeightsTheRuntimeReads) {
  const fs::path dir = fs::temp_directory_path() / ("sparsa_dkm_cli_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "dkm.yaml") << fmt::format(fmt::runtime(kDkmStage), 3);
  const std::string data = testing::source_dir() + "/README.md";
  const testing::CliRun r = testing::run_cli(
      "finetune '" + testing::tiny_model_dir() + "' --teacher '" + testing::tiny_model_dir() +
      "' --data '" + data + "' -r '" + (dir / "dkm.yaml").string() + "' -t 2 --json -o '" +
      (dir / "out").string() + "'");
  ASSERT_EQ(r.code, 0) << r.out;
  const nlohmann::json cfg =
      nlohmann::json::parse(read_text_file((dir / "out" / "config.json").string()));
  const io::CompressionConfig cc = io::read_compression_config(cfg, "out");
  ASSERT_TRUE(cc.sparsa.has_value()) << cfg.dump();
  ASSERT_EQ(cc.sparsa->groups.size(), 1u);
  EXPECT_EQ(cc.sparsa->groups[0].bits, 3);
  EXPECT_EQ(cc.sparsa->groups[0].palette_group_rows, 16);
  EXPECT_EQ(cc.sparsa->groups[0].targets.size(), 14u);
  const io::Checkpoint ck = io::Checkpoint::open_dir((dir / "out").string());
  const io::StoredWeight w = io::read_stored_weight(ck, "model.layers.1.mlp.down_proj", 128, 384, cc);
  ASSERT_EQ(w.kind, io::StoredWeight::Kind::kPalettized);
  EXPECT_EQ(w.lut.size(), 8u * 8u);  // 8 palettes of 8 entries
  const testing::CliRun e = testing::run_cli("eval '" + (dir / "out").string() + "' --data '" +
                                             data + "' --max-windows 2 -t 2 --json");
  ASSERT_EQ(e.code, 0) << e.out;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sparsa::train
