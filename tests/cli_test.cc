// The `sparsa` command line: its contract forms, and clear errors (non-zero exit, a message that
// names the file and the problem) for bad models and inputs.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "sparsa/core/mapped_file.h"
#include "test_util.h"

namespace sparsa {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

using testing::CliRun;

CliRun run(const std::string& args) { return testing::run_cli(args); }

std::string quote(const std::string& s) { return "'" + s + "'"; }

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("sparsa_cli_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A copy of the tiny model that a test may damage.
  std::string copy_tiny() {
    const fs::path d = dir_ / "model";
    fs::create_directories(d);
    for (const auto& e : fs::directory_iterator(testing::tiny_model_dir()))
      fs::copy_file(e.path(), d / e.path().filename());
    return d.string();
  }
  void write(const fs::path& p, const std::string& text) { std::ofstream(p) << text; }

  fs::path dir_;
};

TEST_F(CliTest, GenerateStreamsTheReferenceGreedyText) {
  const json ref = json::parse(read_text_file(testing::fixtures_dir() + "/tiny.json"));
  const auto& p = ref["prompts"][0];
  const CliRun r = run("generate " + quote(testing::tiny_model_dir()) + " -p " +
                    quote(p["text"].get<std::string>()) + " -n 32 --ignore-eos --threads 2");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.rfind(p["greedy_text"].get<std::string>() + "\n", 0), 0u) << r.out;
  EXPECT_NE(r.out.find("tokens/s"), std::string::npos);
}

TEST_F(CliTest, GenerateJsonWithSamplingIsReproducible) {
  const std::string args = "generate " + quote(testing::tiny_model_dir()) +
                           " -p 'Memory barriers' -n 20 --temperature 0.8 --top-p 0.9 --top-k 40 "
                           "--seed 5 --json";
  const CliRun a = run(args), b = run(args);
  ASSERT_EQ(a.code, 0) << a.out;
  const json ja = json::parse(a.out), jb = json::parse(b.out);
  EXPECT_EQ(ja["ids"], jb["ids"]);
  EXPECT_LE(ja["completion_tokens"].get<int>(), 20);
}

TEST_F(CliTest, EvalPlainTextAndJsonLines) {
  const fs::path txt = dir_ / "doc.txt";
  std::string text;
  for (int i = 0; i < 40; ++i) text += "The kernel scheduler decides which task runs next. ";
  write(txt, text);
  CliRun r = run("eval " + quote(testing::tiny_model_dir()) + " --data " + quote(txt.string()) +
              " --ctx 64 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  const json j = json::parse(r.out.substr(r.out.find('{')));
  EXPECT_GT(j["ppl"].get<double>(), 1.0);
  EXPECT_EQ(j["tokens"].get<int64_t>() % 63, 0);
  const fs::path bad = dir_ / "bad.jsonl";
  write(bad, "{\"text\": \"ok\"}\n{\"txt\": 3}\n");
  r = run("eval " + quote(testing::tiny_model_dir()) + " --data " + quote(bad.string()));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("bad.jsonl:2: missing string field \"text\""), std::string::npos) << r.out;
}

TEST_F(CliTest, InspectListsTensors) {
  const CliRun r = run("inspect " + quote(testing::tiny_model_dir()) + " --json");
  ASSERT_EQ(r.code, 0) << r.out;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["architecture"], "llama");
  EXPECT_EQ(j["tensors"].get<int>(), 21);
  EXPECT_EQ(j["parameters"].get<int64_t>(), 2491008);
  EXPECT_EQ(j["bytes_by_dtype"]["BF16"].get<int64_t>(), 2 * 2491008);
}

TEST_F(CliTest, BenchReportsTheContractKeys) {
  const CliRun r = run("bench " + quote(testing::tiny_model_dir()) +
                    " --threads 2 --prompt-tokens 16 --decode-tokens 4 --repetitions 1 "
                    "--bandwidth-mb 64 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  const json j = json::parse(r.out);
  for (const char* key : {"prefill_tokens_per_s", "decode_tokens_per_s", "weight_bytes_per_token",
                          "bandwidth_gb_per_s", "decode_fraction_of_bound"})
    EXPECT_GT(j[key].get<double>(), 0.0) << key;
  // Every linear weight of tiny in bf16 (2 layers of q, k, v, o, gate, up, down, and lm_head),
  // plus one embedding row.
  const int64_t per_layer = 128 * 128 * 2 + 64 * 128 * 2 + 384 * 128 * 3;
  EXPECT_EQ(j["weight_bytes_per_token"].get<int64_t>(), 2 * (2 * per_layer + 8192 * 128) + 2 * 128);
  // f32 keys and values of 2 layers x 64 kv features, over 16 + (4 + 1) / 2 positions on average.
  EXPECT_EQ(j["kv_bytes_per_token"].get<int64_t>(), static_cast<int64_t>(2 * 2 * 64 * 4 * 18.5));
  EXPECT_EQ(j["weights_in"], "mmap");
}

TEST_F(CliTest, NoMmapReadsTheWeightsAndGivesTheSameText) {
  const std::string gen = "generate " + quote(testing::tiny_model_dir()) +
                          " -p 'Once upon a time' -n 12 --threads 2 --json";
  const CliRun mapped = run(gen);
  const CliRun read = run(gen + " --no-mmap");
  ASSERT_EQ(mapped.code, 0) << mapped.out;
  ASSERT_EQ(read.code, 0) << read.out;
  EXPECT_EQ(json::parse(read.out)["ids"], json::parse(mapped.out)["ids"]);
  const CliRun b = run("bench " + quote(testing::tiny_model_dir()) +
                       " --no-mmap --threads 1 --prompt-tokens 4 --decode-tokens 2 "
                       "--repetitions 1 --bandwidth-mb 16 --json");
  ASSERT_EQ(b.code, 0) << b.out;
  EXPECT_EQ(json::parse(b.out)["weights_in"], "read (huge pages)");
}

// --kv-cache bf16: tiny's greedy text is unchanged, bench counts two bytes per cached element, and
// any other type is refused.
TEST_F(CliTest, Bf16KvCacheOnGenerateAndBench) {
  const json ref = json::parse(read_text_file(testing::fixtures_dir() + "/tiny.json"));
  const auto& p = ref["prompts"][0];
  CliRun r = run("generate " + quote(testing::tiny_model_dir()) + " -p " +
                 quote(p["text"].get<std::string>()) +
                 " -n 32 --ignore-eos --threads 2 --kv-cache bf16");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.rfind(p["greedy_text"].get<std::string>() + "\n", 0), 0u) << r.out;
  r = run("bench " + quote(testing::tiny_model_dir()) +
          " --threads 1 --prompt-tokens 16 --decode-tokens 4 --repetitions 1 --bandwidth-mb 16 "
          "--kv-cache bf16 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["kv_cache"], "bf16");
  EXPECT_EQ(j["kv_bytes_per_token"].get<int64_t>(), static_cast<int64_t>(2 * 2 * 64 * 2 * 18.5));
  r = run("generate " + quote(testing::tiny_model_dir()) + " -p hi --kv-cache f16");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("--kv-cache: f16 not in {f32,bf16,int8}"), std::string::npos) << r.out;
}

// --kv-cache int8: tiny's greedy text is unchanged, bench counts one byte per cached element plus
// a 4-byte scale per token and kv head for keys and for values, and the other commands take it.
TEST_F(CliTest, Int8KvCacheOnGenerateBenchAndEval) {
  const json ref = json::parse(read_text_file(testing::fixtures_dir() + "/tiny.json"));
  const auto& p = ref["prompts"][0];
  CliRun r =
      run("generate " + quote(testing::tiny_model_dir()) + " -p " +
          quote(p["text"].get<std::string>()) + " -n 32 --ignore-eos --threads 2 --kv-cache int8");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.rfind(p["greedy_text"].get<std::string>() + "\n", 0), 0u) << r.out;
  r = run("bench " + quote(testing::tiny_model_dir()) +
          " --threads 1 --prompt-tokens 16 --decode-tokens 4 --repetitions 1 --bandwidth-mb 16 "
          "--kv-cache int8 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["kv_cache"], "int8");
  // tiny: 2 layers × 2 kv heads × (32 codes + a 4-byte scale) for keys and for values, times
  // 16 + (4 + 1) / 2 = 18.5 positions on average.
  EXPECT_EQ(j["kv_bytes_per_token"].get<int64_t>(),
            static_cast<int64_t>(2 * 2 * 2 * (32 + 4) * 18.5));
  // eval: the same windows, a perplexity near the f32 cache's but not equal to it.
  const fs::path txt = dir_ / "doc.txt";
  std::string text;
  for (int i = 0; i < 20; ++i) text += "Memory barriers order the loads and stores of a core. ";
  write(txt, text);
  const std::string eval = "eval " + quote(testing::tiny_model_dir()) + " --data " +
                           quote(txt.string()) + " --ctx 64 --threads 2 --json";
  const CliRun e32 = run(eval), e8 = run(eval + " --kv-cache int8");
  ASSERT_EQ(e32.code, 0) << e32.out;
  ASSERT_EQ(e8.code, 0) << e8.out;
  const json j32 = json::parse(e32.out.substr(e32.out.find('{')));
  const json j8 = json::parse(e8.out.substr(e8.out.find('{')));
  EXPECT_EQ(j8["tokens"], j32["tokens"]);
  EXPECT_NEAR(j8["ppl"].get<double>() / j32["ppl"].get<double>(), 1.0, 1e-2);
  EXPECT_NE(j8["ppl"].get<double>(), j32["ppl"].get<double>());
  r = run("generate " + quote(testing::tiny_model_dir()) + " -p hi --kv-cache q8");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("--kv-cache: q8 not in {f32,bf16,int8}"), std::string::npos) << r.out;
}

TEST_F(CliTest, InitRandomWritesALoadableCheckpoint) {
  const std::string out = (dir_ / "rand").string();
  CliRun r = run("init-random --hidden 64 --layers 2 --heads 4 --kv-heads 2 --ffn 96 --vocab 300 "
              "--context 128 -o " + quote(out));
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("inspect " + quote(out) + " --json");
  ASSERT_EQ(r.code, 0) << r.out;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["config"]["num_hidden_layers"], 2);
  EXPECT_EQ(j["config"]["num_key_value_heads"], 2);
  r = run("bench " + quote(out) + " --threads 1 --prompt-tokens 8 --decode-tokens 2 "
          "--repetitions 1 --bandwidth-mb 16 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("init-random --shape no-such-model -o " + quote(out));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("unknown shape 'no-such-model'"), std::string::npos) << r.out;
}

// Each bad input: a non-zero exit and a message naming the file and what is wrong.
TEST_F(CliTest, UnknownArchitecture) {
  const std::string m = copy_tiny();
  std::string cfg = read_text_file(m + "/config.json");
  cfg.replace(cfg.find("\"llama\""), 7, "\"falcon\"");
  write(fs::path(m) / "config.json", cfg);
  const CliRun r = run("generate " + quote(m) + " -p hi");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("config.json: unknown architecture 'falcon'"), std::string::npos) << r.out;
}

TEST_F(CliTest, MalformedConfigJson) {
  const std::string m = copy_tiny();
  write(fs::path(m) / "config.json", "{\"model_type\": \"llama\",");
  const CliRun r = run("inspect " + quote(m));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("config.json: malformed JSON"), std::string::npos) << r.out;
}

TEST_F(CliTest, MalformedTokenizerJson) {
  const std::string m = copy_tiny();
  write(fs::path(m) / "tokenizer.json", "[1, 2");
  const CliRun r = run("generate " + quote(m) + " -p hi");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("tokenizer.json"), std::string::npos) << r.out;
}

TEST_F(CliTest, TruncatedWeights) {
  const std::string m = copy_tiny();
  fs::resize_file(fs::path(m) / "model.safetensors", 3'000'000);
  const CliRun r = run("generate " + quote(m) + " -p hi");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("model.safetensors"), std::string::npos) << r.out;
}

TEST_F(CliTest, MissingTensorAndWrongShape) {
  const std::string m = copy_tiny();
  std::string cfg = read_text_file(m + "/config.json");
  cfg.replace(cfg.find("\"num_hidden_layers\": 2"), 22, "\"num_hidden_layers\": 3");
  write(fs::path(m) / "config.json", cfg);
  CliRun r = run("generate " + quote(m) + " -p hi");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("model.layers.2.input_layernorm.weight"), std::string::npos) << r.out;
  cfg.replace(cfg.find("\"num_hidden_layers\": 3"), 22, "\"num_hidden_layers\": 2");
  cfg.replace(cfg.find("\"intermediate_size\": 384"), 24, "\"intermediate_size\": 256");
  write(fs::path(m) / "config.json", cfg);
  r = run("generate " + quote(m) + " -p hi");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("has shape [384, 128]; the config implies [256, 128]"), std::string::npos)
      << r.out;
}

TEST_F(CliTest, MissingShard) {
  const std::string m = copy_tiny();
  fs::rename(fs::path(m) / "model.safetensors", fs::path(m) / "model-00001-of-00002.safetensors");
  write(fs::path(m) / "model.safetensors.index.json",
        R"({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                           "lm_head.weight": "model-00002-of-00002.safetensors"}})");
  const CliRun r = run("inspect " + quote(m));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("model-00002-of-00002.safetensors"), std::string::npos) << r.out;
}

TEST_F(CliTest, PromptLongerThanContext) {
  std::string prompt;
  for (int i = 0; i < 1100; ++i) prompt += " word";
  const CliRun r = run("generate " + quote(testing::tiny_model_dir()) + " -p " + quote(prompt));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("but the model's context is 1024 tokens"), std::string::npos) << r.out;
}

TEST_F(CliTest, MissingModelDirectoryAndBadOptions) {
  CliRun r = run("generate /nonexistent/model -p hi");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("/nonexistent/model: not a model directory"), std::string::npos) << r.out;
  r = run("generate " + quote(testing::tiny_model_dir()) + " -p hi --top-p 0");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("top_p must be in (0, 1]"), std::string::npos) << r.out;
  r = run("frobnicate");
  EXPECT_NE(r.code, 0);
}

}  // namespace
}  // namespace sparsa
