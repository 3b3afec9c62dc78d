// `sparsa finetune` end to end on models/tiny: a student pruned by `sparsa compress` (stored
// sparse-bitmask, so it is loaded decoded), distilled from the dense model; its output loads,
// keeps every pruned weight at zero, carries the loss curves, and a run stopped at a checkpoint
// and resumed writes the same bytes as an uninterrupted one.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "sparsa/core/mapped_file.h"
#include "sparsa/io/compressed_tensors.h"
#include "sparsa/io/safetensors.h"
#include "sparsa/model/llama.h"
#include "sparsa/train/cuda.h"
#include "sparsa/train/model.h"
#include "test_util.h"

namespace sparsa {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

using testing::CliRun;

CliRun run(const std::string& args) { return testing::run_cli(args); }

class FinetuneCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("sparsa_finetune_" + std::to_string(::getpid()) + "_" +
                                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    // Training text: the README's paragraphs as JSON-lines documents.
    const std::string readme = read_text_file(testing::source_dir() + "/README.md");
    std::ofstream data(dir_ / "data.jsonl");
    size_t begin = 0;
    while (begin < readme.size()) {
      size_t end = readme.find("\n\n", begin);
      if (end == std::string::npos) end = readme.size();
      if (end > begin) data << json{{"text", readme.substr(begin, end - begin)}}.dump() << "\n";
      begin = end + 2;
    }
    std::ofstream(dir_ / "ft.yaml") << R"(finetune_stage:
  run_type: finetune
  training: {lr: 2.0e-3, warmup_steps: 1, steps: 4, batch_size: 2, seq_len: 32, clip: 1.0,
             seed: 3, checkpoint_every: 2, eval_every: 2, eval_windows: 4}
  pruning_modifiers:
    ConstantMaskModifier: {targets: ["re:.*_proj$"], ignore: [lm_head]}
  distillation_modifiers:
    DistillationModifier: {ce: 1.0, kl: 1.0, squarehead: 1.0, temperature: 2.0}
)";
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return "'" + (dir_ / name).string() + "'"; }

  // models/tiny pruned to 50% by magnitude, stored sparse-bitmask.
  void make_student() {
    const CliRun c = run("compress '" + testing::tiny_model_dir() + "' -r '" +
                         testing::source_dir() + "/recipes/magnitude-50.yaml' --calib " +
                         path("data.jsonl") + " --samples 1 --seq-len 32 -t 2 -o " +
                         path("student") + " --json");
    ASSERT_EQ(c.code, 0) << c.out;
  }

  std::string finetune(const std::string& extra) {
    return "finetune " + path("student") + " --teacher '" + testing::tiny_model_dir() +
           "' --data " + path("data.jsonl") + " -r " + path("ft.yaml") + " -t 2 --json " + extra;
  }

  fs::path dir_;
};

TEST_F(FinetuneCli, TrainsAPrunedStudentAndResumesBitForBit) {
  make_student();
  const CliRun a = run(finetune("-o " + path("out_a")));
  ASSERT_EQ(a.code, 0) << a.out;
  const json ja = json::parse(a.out.substr(a.out.rfind("{\"")));
  EXPECT_EQ(ja["steps"], 4);
  EXPECT_EQ(ja["tokens"], 4 * 2 * 32);
  EXPECT_GT(ja["tokens_per_s"].get<double>(), 0.0);
  EXPECT_LT(ja["valid_ce_after"].get<double>(), ja["valid_ce_before"].get<double>());
  EXPECT_NEAR(ja["sparsity"].get<double>(), 0.5, 1e-3);
  EXPECT_EQ(ja["checkpoints"].size(), 2u);

  const fs::path out = dir_ / "out_a";
  for (const char* f : {"model.safetensors", "config.json", "tokenizer.json", "recipe.yaml",
                        "train_log.csv", "valid_log.csv", "loss.svg"})
    EXPECT_TRUE(fs::exists(out / f)) << f;
  const std::string csv = read_text_file((out / "train_log.csv").string());
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 5);  // header + 4 steps
  const std::string valid = read_text_file((out / "valid_log.csv").string());
  EXPECT_EQ(std::count(valid.begin(), valid.end(), '\n'), 4);  // header + steps 0, 2, 4
  EXPECT_EQ(read_text_file((out / "loss.svg").string()).rfind("<svg", 0), 0u);
  const json config = json::parse(read_text_file((out / "config.json").string()));
  EXPECT_EQ(config["quantization_config"]["sparsity_config"]["format"], "sparse-bitmask");

  // The output loads in the inference engine, and every weight the student had pruned is zero.
  auto engine = model::Model::load(out.string());
  EXPECT_EQ(engine->blocks()[0].q.format, "sparse-bitmask");
  const train::Model student = train::Model::load((dir_ / "student").string());
  const train::Model tuned = train::Model::load(out.string());
  int64_t changed = 0;
  for (const train::ParamTensor& t : student.tensors()) {
    if (!t.linear) continue;
    for (int64_t i = 0; i < t.numel; ++i) {
      const float s = student.params()[t.offset + i], f = tuned.params()[t.offset + i];
      if (s == 0.0f) {
        ASSERT_EQ(f, 0.0f) << t.name;
      }
      changed += s != f;
    }
  }
  EXPECT_GT(changed, 0);

  // Stopped after step 2 (a checkpoint, no model), then resumed: the same bytes.
  const CliRun b = run(finetune("-o " + path("out_b") + " --stop-after 2 --checkpoint-dir " +
                                path("ck_b")));
  ASSERT_EQ(b.code, 0) << b.out;
  EXPECT_FALSE(fs::exists(dir_ / "out_b"));
  ASSERT_TRUE(fs::exists(dir_ / "ck_b" / "step-000002" / "state.safetensors"));
  const CliRun c = run(finetune("-o " + path("out_b") + " --resume " + path("ck_b/step-000002")));
  ASSERT_EQ(c.code, 0) << c.out;
  EXPECT_EQ(read_text_file((dir_ / "out_b" / "model.safetensors").string()),
            read_text_file((out / "model.safetensors").string()));
  EXPECT_EQ(read_text_file((dir_ / "out_b" / "valid_log.csv").string()), valid);
}

TEST_F(FinetuneCli, QuantizationAwareTrainingKeepsTheGptqGridAndWritesPackQuantized) {
  // SparseGPT 50% + GPTQ 4-bit g128 of models/tiny, fine-tuned with the shipped QAT recipe's
  // modifiers at a test's size.
  const CliRun c = run("compress '" + testing::tiny_model_dir() + "' -r '" +
                       testing::source_dir() + "/recipes/sparsegpt-50-gptq-w4g128.yaml' --calib " +
                       path("data.jsonl") + " --samples 4 --seq-len 32 -t 2 -o " +
                       path("student") + " --json");
  ASSERT_EQ(c.code, 0) << c.out;
  std::string recipe = read_text_file(testing::source_dir() + "/recipes/finetune-qat-w4g128.yaml");
  auto set = [&](const std::string& key, const std::string& value) {
    const size_t at = recipe.find("    " + key + ": ");
    ASSERT_NE(at, std::string::npos) << key;
    recipe.replace(at, recipe.find('\n', at) - at, "    " + key + ": " + value);
  };
  set("max_tokens", "384");  // 6 steps of 2 x 32
  set("batch_size", "2");
  set("seq_len", "32");
  set("warmup_steps", "1");
  set("lr", "1.0e-2");
  set("checkpoint_every", "0");
  set("eval_every", "0");
  set("eval_windows", "4");
  std::ofstream(dir_ / "qat.yaml") << recipe;
  const CliRun r = run("finetune " + path("student") + " --teacher '" + testing::tiny_model_dir() +
                       "' --data " + path("data.jsonl") + " -r " + path("qat.yaml") +
                       " -t 2 --json -o " + path("out"));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(json::parse(r.out.substr(r.out.find('{')))["steps"], 6);

  const json cfg = json::parse(read_text_file((dir_ / "out" / "config.json").string()));
  const json& q = cfg.at("quantization_config");
  EXPECT_EQ(q.at("format"), "pack-quantized") << q.dump();
  const io::Checkpoint a = io::Checkpoint::open_dir((dir_ / "student").string());
  const io::Checkpoint b = io::Checkpoint::open_dir((dir_ / "out").string());
  const io::CompressionConfig ca = io::read_compression_config(
      json::parse(read_text_file((dir_ / "student" / "config.json").string())), "student");
  const io::CompressionConfig cb = io::read_compression_config(cfg, "out");
  ASSERT_TRUE(cb.quantization.has_value());
  EXPECT_EQ(*cb.quantization, *ca.quantization);
  int64_t moved = 0, pruned = 0;
  for (const char* m : {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}) {
    const int64_t rows = 128, cols = std::string(m).ends_with("down_proj") ? 384 : 128;
    const io::StoredWeight sa = io::read_stored_weight(a, m, rows, cols, ca);
    const io::StoredWeight sb = io::read_stored_weight(b, m, rows, cols, cb);
    ASSERT_EQ(sb.kind, io::StoredWeight::Kind::kPackQuantized) << m;
    // The same grid (GPTQ's scales and zero points), new codes; pruned weights still 0.
    EXPECT_EQ(sb.scales, sa.scales) << m;
    EXPECT_EQ(sb.zeros, sa.zeros) << m;
    const std::vector<float> wa = io::dequantize_stored_weight(sa),
                             wb = io::dequantize_stored_weight(sb);
    for (size_t i = 0; i < wa.size(); ++i) {
      if (wa[i] == 0.0f) {
        ++pruned;
        ASSERT_EQ(wb[i], 0.0f) << m << "[" << i << "]";
      }
      moved += wa[i] != wb[i];
    }
  }
  EXPECT_GT(pruned, 128 * 128 / 2);
  EXPECT_GT(moved, 0);
  // The output is a model the runtime reads.
  const CliRun e = run("eval " + path("out") + " --data " + path("data.jsonl") +
                       " --max-windows 2 -t 2 --json");
  ASSERT_EQ(e.code, 0) << e.out;
  EXPECT_GT(json::parse(e.out.substr(e.out.find('{')))["ppl"].get<double>(), 1.0);
}

TEST_F(FinetuneCli, ClearErrors) {
  make_student();
  CliRun r;
  std::string why;
  if (!sparsa::train::cuda::available(&why)) {  // a build without CUDA, or no GPU here
    r = run(finetune("-o " + path("o") + " --device cuda"));
    EXPECT_EQ(r.code, 1);
    EXPECT_NE(r.out.find("finetune: --device cuda: " + why + " (or use --device cpu)"),
              std::string::npos)
        << r.out;
  }
  r = run(finetune("-o " + path("o") + " --device cuda --precision fp16"));
  EXPECT_EQ(r.code, 105) << r.out;  // CLI11's ValidationError: not one of bf16, fp32
  EXPECT_NE(r.out.find("--precision"), std::string::npos) << r.out;
  r = run("finetune " + path("student") + " --data " + path("data.jsonl") + " -r " +
          path("ft.yaml") + " -o " + path("o"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("modifier 'DistillationModifier' distils (kl or squarehead > 0): give "
                       "--teacher"),
            std::string::npos)
      << r.out;
  r = run("finetune " + path("student") + " --teacher '" + testing::tiny_model_dir() +
          "' --data " + path("data.jsonl") + " -r '" + testing::source_dir() +
          "/recipes/magnitude-50.yaml' -o " + path("o"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("no finetune stage"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir_ / "o"));
}

}  // namespace
}  // namespace sparsa
