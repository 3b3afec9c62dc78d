// Compressed checkpoints run on the packed kernels (formats::PackedWeight, kernels::linear): for
// every recipe's output the packed engine gives the logits of the dequantized reference path
// (LinearPath::kReference: every weight decoded to f32, the dense kernel), single-sequence and
// batched, prefill and decode; it reads the bytes of its packed layouts; and (with ../shared) its
// perplexity on `small` equals the reference path's. Also the random-weight format builder of
// `sparsa bench --shape`.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "sparsa/compress/pipeline.h"
#include "sparsa/core/error.h"
#include "sparsa/io/text_data.h"
#include "sparsa/kernels/packed_linear.h"
#include "sparsa/model/batch.h"
#include "sparsa/model/llama.h"
#include "sparsa/model/random_checkpoint.h"
#include "sparsa/runtime/bench.h"
#include "sparsa/runtime/perplexity.h"
#include "sparsa/runtime/tokenizer.h"
#include "test_util.h"

namespace sparsa {
namespace {

namespace fs = std::filesystem;

std::string temp_dir(const std::string& name) {
  const fs::path p =
      fs::temp_directory_path() / ("sparsa-packed-test-" + std::to_string(::getpid()) + "-" + name);
  fs::remove_all(p);
  return p.string();
}

// The recipes of compress_pipeline_test, each compressed once (8 windows of 64 tokens) for the
// whole suite, with the packed layout their down_proj gets.
struct RecipeCase {
  const char* recipe;
  const char* layout;  // model::Linear::describe() of layer 0's down_proj ([128, 384])
};

const RecipeCase kRecipes[] = {
    {"gptq-w4g128", "int4g128"},
    {"gptq-w4g128-actorder", "int4g128-actorder"},
    {"rtn-w4", "int4"},
    {"sparsegpt-50", "sparse-bf16"},
    {"wanda-50", "sparse-bf16"},
    {"magnitude-2of4", "sparse2:4-bf16"},
    {"sparsegpt-50-gptq-w4g128", "sparse-int4g128"},
    {"owl-sparsegpt-70", "sparse-bf16"},
    {"awq-w4g128", "int4g128"},
    {"smoothquant-w8a8", "int8"},
    {"palettize-3bit", "palette3r16"},
    {"svd-50", "u[48]bf16·vbf16"},
};

// Sets the packed decode kernels' input coding for one scope.
class DecodeInputScope {
 public:
  explicit DecodeInputScope(kernels::DecodeInput input) : saved_(kernels::decode_input()) {
    kernels::set_decode_input(input);
  }
  ~DecodeInputScope() { kernels::set_decode_input(saved_); }

 private:
  kernels::DecodeInput saved_;
};

class PackedModelTest : public ::testing::TestWithParam<RecipeCase> {
 protected:
  static void TearDownTestSuite() {
    for (const auto& [recipe, dir] : outputs()) fs::remove_all(dir);
    outputs().clear();
  }
  static std::map<std::string, std::string>& outputs() {
    static std::map<std::string, std::string> m;
    return m;
  }
  // The recipe's output on tiny, compressed on first use.
  static const std::string& compressed(const std::string& recipe) {
    auto it = outputs().find(recipe);
    if (it != outputs().end()) return it->second;
    compress::CompressOptions o;
    o.model_dir = testing::tiny_model_dir();
    o.recipe_path = testing::source_dir() + "/recipes/" + recipe + ".yaml";
    o.calibration_path = testing::fixtures_dir() + "/calibration.jsonl";
    o.output_dir = temp_dir(recipe);
    o.samples = 8;
    o.seq_len = 64;
    o.progress = false;
    ThreadPool pool(2);
    compress::compress_model(o, pool);
    return outputs().emplace(recipe, o.output_dir).first->second;
  }
};

std::vector<int32_t> test_tokens(int64_t n, int64_t vocab, int64_t salt) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    ids[static_cast<size_t>(i)] = static_cast<int32_t>((i * 997 + salt * 131 + 7) % vocab);
  return ids;
}

// max |a - b| / max |b|
double relative_max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return diff / scale;
}

// Logits of a 40-token prefill (all positions) and then 6 decode steps (one token each).
std::vector<float> prefill_and_decode_logits(model::Model& m, ThreadPool& pool) {
  const int64_t vocab = m.config().vocab_size;
  const std::vector<int32_t> ids = test_tokens(46, vocab, 1);
  model::KvCache cache(m.config(), 64);
  std::vector<float> out(static_cast<size_t>(46 * vocab));
  m.forward(std::span(ids).first(40), cache, out.data(), true, pool);
  for (int64_t t = 40; t < 46; ++t)
    m.forward(std::span(ids).subspan(static_cast<size_t>(t), 1), cache, out.data() + t * vocab,
              false, pool);
  return out;
}

// The relative tolerance between the two paths on f32 inputs: the same weights, summed in another
// order (the packed kernels expand codes block by block; act-order sums in stored column order;
// low-rank runs its two factors instead of U V).
constexpr double kTolerance = 2e-5;
// With the decode kernels' default int8 input coding (Q8 blocks of 128 columns), decode steps also
// carry the rounding of every layer's input: |Δy| <= Σ_k |W[r, k]| · s_block / 2 per layer.
constexpr double kInt8InputTolerance = 3e-2;

TEST_P(PackedModelTest, PackedLogitsEqualTheDequantizedReference) {
  const RecipeCase& rc = GetParam();
  const std::string& dir = compressed(rc.recipe);
  auto packed = model::Model::load(dir);
  auto ref = model::Model::load(dir, {.linear = model::LinearPath::kReference});
  ASSERT_EQ(packed->linear_path(), model::LinearPath::kPacked);
  ASSERT_EQ(ref->linear_path(), model::LinearPath::kReference);
  const model::Linear& down = packed->blocks()[0].down;
  EXPECT_EQ(down.describe(), rc.layout) << rc.recipe;
  EXPECT_EQ(ref->blocks()[0].down.describe(), "f32");
  for (const model::Block& b : packed->blocks())
    for (const model::Linear* l : {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down}) {
      EXPECT_NE(l->packed, nullptr) << l->name;
      EXPECT_EQ(l->owned, nullptr) << l->name << ": a packed layer holds decoded f32 weights";
    }

  ThreadPool pool(2);
  const int64_t vocab = packed->config().vocab_size;
  {
    const DecodeInputScope f32(kernels::DecodeInput::F32);
    const std::vector<float> a = prefill_and_decode_logits(*packed, pool);
    const std::vector<float> b = prefill_and_decode_logits(*ref, pool);
    EXPECT_LE(relative_max_diff(a, b), kTolerance) << rc.recipe;
  }
  {
    // The default engine: prefill (f32 input) as tight, the decode steps within the int8 input
    // rounding.
    const std::vector<float> a = prefill_and_decode_logits(*packed, pool);
    const std::vector<float> b = prefill_and_decode_logits(*ref, pool);
    const auto split = static_cast<std::ptrdiff_t>(40 * vocab);
    EXPECT_LE(relative_max_diff({a.begin(), a.begin() + split}, {b.begin(), b.begin() + split}),
              kTolerance)
        << rc.recipe;
    EXPECT_LE(relative_max_diff({a.begin() + split, a.end()}, {b.begin() + split, b.end()}),
              kInt8InputTolerance)
        << rc.recipe;
  }

  // Bytes per token: the packed layouts read less than the bf16 model, the f32 reference more.
  auto dense = model::Model::load(testing::tiny_model_dir());
  EXPECT_LT(packed->weight_bytes_per_token(), dense->weight_bytes_per_token()) << rc.recipe;
  EXPECT_GT(ref->weight_bytes_per_token(), dense->weight_bytes_per_token()) << rc.recipe;
}

// forward_batch on the packed model (two sequences, a prompt chunk and a decode token stacked)
// gives each sequence the reference path's single-sequence logits.
TEST_P(PackedModelTest, BatchedStepEqualsTheReference) {
  const RecipeCase& rc = GetParam();
  const std::string& dir = compressed(rc.recipe);
  auto packed = model::Model::load(dir);
  auto ref = model::Model::load(dir, {.linear = model::LinearPath::kReference});
  const io::ModelConfig& cfg = packed->config();
  const int64_t vocab = cfg.vocab_size;
  ThreadPool pool(2);
  const std::vector<int32_t> a = test_tokens(12, vocab, 2), b = test_tokens(5, vocab, 3);
  const DecodeInputScope f32(kernels::DecodeInput::F32);

  std::vector<float> ref_a(static_cast<size_t>(vocab)), ref_b(ref_a.size());
  model::KvCache ca(cfg, 32), cb(cfg, 32);
  ref->forward(a, ca, ref_a.data(), false, pool);
  ref->forward(std::span(b).first(4), cb, ref_b.data(), false, pool);
  ref->forward(std::span(b).subspan(4), cb, ref_b.data(), false, pool);

  model::KvCache pa(cfg, 32), pb(cfg, 32);
  std::vector<float> out_a(ref_a.size()), out_b(ref_a.size()), scratch(ref_a.size());
  packed->forward(std::span(b).first(4), pb, scratch.data(), false, pool);
  model::BatchWorkspace ws;
  const std::vector<model::BatchSequence> seqs = {{a, &pa, out_a.data()},
                                                  {std::span(b).subspan(4), &pb, out_b.data()}};
  model::forward_batch(*packed, seqs, ws, pool);
  EXPECT_LE(relative_max_diff(out_a, ref_a), kTolerance) << rc.recipe;
  EXPECT_LE(relative_max_diff(out_b, ref_b), kTolerance) << rc.recipe;
}

INSTANTIATE_TEST_SUITE_P(Recipes, PackedModelTest, ::testing::ValuesIn(kRecipes),
                         [](const auto& info) {
                           std::string s = info.param.recipe;
                           for (char& c : s)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return s;
                         });

// The packed bytes one decode step reads are those of the format: int4 codes (half a byte per
// weight) plus an f16 scale and a u8 zero point per group of 128 columns.
TEST(PackedModel, BytesPerTokenAreThoseOfThePackedLayout) {
  const std::string out = temp_dir("bytes");
  compress::CompressOptions o;
  o.model_dir = testing::tiny_model_dir();
  o.recipe_path = testing::source_dir() + "/recipes/gptq-w4g128.yaml";
  o.calibration_path = testing::fixtures_dir() + "/calibration.jsonl";
  o.output_dir = out;
  o.samples = 4;
  o.seq_len = 32;
  o.progress = false;
  ThreadPool pool(2);
  compress::compress_model(o, pool);
  auto m = model::Model::load(out);
  size_t expect = m->lm_head().bytes_per_token() + 128 * 2;  // bf16 lm_head; one embedding row
  for (const model::Block& b : m->blocks())
    for (const model::Linear* l : {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down}) {
      const int64_t rows = l->rows(), cols = l->cols();
      const size_t bytes = static_cast<size_t>(rows * cols / 2 + rows * (cols / 128) * 3);
      EXPECT_EQ(l->bytes_per_token(), bytes) << l->name;
      expect += bytes;
    }
  EXPECT_EQ(m->lm_head().bytes_per_token(), size_t{8192} * 128 * 2);
  EXPECT_EQ(m->weight_bytes_per_token(), expect);
  fs::remove_all(out);
}

TEST(PackedModel, EnvironmentForcesTheReferencePath) {
  ::setenv("SPARSA_REFERENCE_LINEAR", "1", 1);
  auto m = model::Model::load(testing::tiny_model_dir());
  ::unsetenv("SPARSA_REFERENCE_LINEAR");
  EXPECT_EQ(m->linear_path(), model::LinearPath::kReference);
  EXPECT_EQ(model::Model::load(testing::tiny_model_dir())->linear_path(),
            model::LinearPath::kPacked);
}

// A dense checkpoint's weights run from a copy in the panel layout, which holds exactly the
// mapped tensor's values (and counts the padded panel's bytes as read per token).
TEST(PackedModel, DenseWeightsRunFromAPanelCopy) {
  auto m = model::Model::load(testing::tiny_model_dir());
  std::vector<const model::Linear*> layers;
  for (const model::Block& b : m->blocks())
    for (const model::Linear* l : {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down})
      layers.push_back(l);
  layers.push_back(&m->lm_head());
  for (const model::Linear* l : layers) {
    ASSERT_NE(l->packed, nullptr);
    const formats::PackedView& v = l->packed->view();
    EXPECT_TRUE(v.panels) << l->name;
    EXPECT_NE(v.dense, l->weight.data) << l->name;
    EXPECT_EQ(l->packed->describe(), "bf16");
    ASSERT_EQ(l->weight.dtype, DType::BF16);
    const kernels::DenseWeight pw{v.dtype, v.rows, v.cols, v.dense, true};
    const auto* mapped = static_cast<const uint16_t*>(l->weight.data);
    const auto* copy = static_cast<const uint16_t*>(v.dense);
    int64_t mismatches = 0;
    for (int64_t r = 0; r < v.rows; ++r)
      for (int64_t c = 0; c < v.cols; ++c)
        mismatches += copy[kernels::weight_index(pw, r, c)] != mapped[r * v.cols + c];
    EXPECT_EQ(mismatches, 0) << l->name;
    EXPECT_EQ(l->packed->bytes(),
              static_cast<size_t>(kernels::panel_elements(v.rows, v.cols)) * 2) << l->name;
  }
}

// ---- the random-weight formats of `sparsa bench --shape` ---------------------------------------

TEST(BenchFormats, NamesAreParsed) {
  const BenchFormat a = parse_bench_format("sparse70-int4g128");
  EXPECT_EQ(a.values, BenchFormat::Values::kInt);
  EXPECT_EQ(a.bits, 4);
  EXPECT_EQ(a.group_size, 128);
  EXPECT_DOUBLE_EQ(a.sparsity, 0.7);
  const BenchFormat b = parse_bench_format("2of4-bf16");
  EXPECT_EQ(b.values, BenchFormat::Values::kDense);
  EXPECT_EQ(b.dtype, DType::BF16);
  EXPECT_EQ(b.nm_keep, 2);
  EXPECT_EQ(b.nm_m, 4);
  const BenchFormat c = parse_bench_format("int4");
  EXPECT_EQ(c.group_size, 0);
  EXPECT_EQ(parse_bench_format("sparse50-palette4").values, BenchFormat::Values::kPalette);
  for (const char* bad : {"int9g128", "int4g", "int4g128x", "palette1", "sparse0-bf16",
                          "sparse50-f32", "4of4-bf16", "bf8", "", "sparse50"}) {
    try {
      parse_bench_format(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("unknown format '" + std::string(bad) + "'"),
                std::string::npos)
          << e.what();
    }
  }
}

io::ModelConfig small_bench_shape() {
  return io::ModelConfig::from_json(nlohmann::json{{"model_type", "llama"},
                                                   {"vocab_size", 512},
                                                   {"hidden_size", 128},
                                                   {"intermediate_size", 256},
                                                   {"num_hidden_layers", 2},
                                                   {"num_attention_heads", 4},
                                                   {"num_key_value_heads", 2},
                                                   {"max_position_embeddings", 64}},
                                    "test");
}

// Every format builds a model that runs, with the packed layout and the bytes it should have.
TEST(BenchFormats, RandomModelsRunInEveryFormat) {
  const io::ModelConfig cfg = small_bench_shape();
  ThreadPool pool(2);
  const std::pair<const char*, const char*> cases[] = {
      {"bf16", "bf16"},
      {"f32", "f32"},
      {"int8g128", "int8g128"},
      {"int4g128", "int4g128"},
      {"int3g128", "int3g128"},
      {"int4", "int4"},
      {"sparse50-bf16", "sparse-bf16"},
      {"sparse90-int4g128", "sparse-int4g128"},
      {"2of4-int4g128", "sparse2:4-int4g128"},
      {"2of4-bf16", "sparse2:4-bf16"},
      {"palette3", "palette3"},
      {"sparse50-palette4", "sparse-palette4"},
  };
  std::map<std::string, size_t> bytes;
  for (const auto& [name, layout] : cases) {
    auto m = build_random_model(cfg, parse_bench_format(name), 1, pool);
    EXPECT_EQ(m->blocks()[0].down.describe(), layout) << name;
    EXPECT_EQ(m->lm_head().describe(),
              std::string(name) == "bf16" || std::string(name) == "f32" ? layout : "int8")
        << name;
    model::KvCache cache(cfg, 16);
    std::vector<float> logits(static_cast<size_t>(cfg.vocab_size));
    m->forward(test_tokens(9, cfg.vocab_size, 0), cache, logits.data(), false, pool);
    m->forward(test_tokens(1, cfg.vocab_size, 5), cache, logits.data(), false, pool);
    for (float v : logits) ASSERT_TRUE(std::isfinite(v)) << name;
    bytes[name] = m->weight_bytes_per_token();
  }
  EXPECT_LT(bytes["int4g128"], bytes["int8g128"]);
  EXPECT_LT(bytes["int3g128"], bytes["int4g128"]);
  EXPECT_LT(bytes["int8g128"], bytes["bf16"]);
  EXPECT_EQ(bytes["f32"] - bytes["bf16"], bytes["bf16"] - 128 * 2);  // all but the embedding row
  EXPECT_LT(bytes["sparse90-int4g128"], bytes["int4g128"]);
  EXPECT_LT(bytes["sparse50-bf16"], bytes["bf16"]);
}

// Several formats are measured in rounds that visit each in turn: every format decodes all the
// steps asked for (7 in rounds of 3, 3, 1), in the order given, with the ratios taken against
// int4g128 and bf16 of the same run; one round measures them one after the other.
TEST(BenchFormats, InterleavedRoundsDecodeEveryStepOfEveryFormat) {
  const io::ModelConfig cfg = small_bench_shape();
  ThreadPool pool(2);
  BenchOptions opt;
  opt.prompt_tokens = 8;
  opt.decode_tokens = 7;
  opt.repetitions = 2;
  opt.bandwidth_bytes = size_t{8} << 20;
  opt.rounds = 3;
  const std::vector<std::string> names = {"bf16", "int4g128", "sparse50-int4g128"};
  std::vector<std::string> seen;
  auto results = run_format_bench(cfg, names, pool, opt,
                                  [&](const FormatBenchResult& r) { seen.push_back(r.format); });
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(seen, names);
  for (size_t i = 0; i < results.size(); ++i) {
    const FormatBenchResult& r = results[i];
    EXPECT_EQ(r.format, names[i]);
    EXPECT_EQ(r.decode_rounds, 3) << r.format;
    EXPECT_EQ(r.bench.decode_tokens, 7) << r.format;
    EXPECT_GT(r.bench.decode_tokens_per_s, 0.0) << r.format;
    EXPECT_GT(r.bench.bandwidth_gb_per_s, 0.0) << r.format;
    EXPECT_NEAR(r.bench.decode_fraction_of_bound,
                r.bench.decode_tokens_per_s / r.bench.decode_bound_tokens_per_s, 1e-12);
  }
  EXPECT_DOUBLE_EQ(results[1].decode_speedup_vs_int4g128, 1.0);
  EXPECT_DOUBLE_EQ(results[0].prefill_fraction_of_bf16, 1.0);
  EXPECT_DOUBLE_EQ(results[2].decode_speedup_vs_int4g128,
                   results[2].bench.decode_tokens_per_s / results[1].bench.decode_tokens_per_s);
  EXPECT_LT(results[2].bench.weight_bytes_per_token, results[1].bench.weight_bytes_per_token);

  opt.rounds = 1;
  results = run_format_bench(cfg, {"int4g128", "palette3"}, pool, opt);
  ASSERT_EQ(results.size(), 2u);
  for (const FormatBenchResult& r : results) {
    EXPECT_EQ(r.decode_rounds, 1) << r.format;
    EXPECT_EQ(r.bench.decode_tokens, 7) << r.format;
  }
  EXPECT_TRUE(std::isnan(results[0].prefill_fraction_of_bf16));

  opt.rounds = 0;
  try {
    run_format_bench(cfg, {"int4g128"}, pool, opt);
    ADD_FAILURE() << "rounds = 0 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--rounds must be at least 1"), std::string::npos)
        << e.what();
  }
}

using testing::CliRun;
using testing::run_cli;

TEST(BenchFormats, CliRejectsUnknownFormatsAndShapes) {
  CliRun r = run_cli("bench --shape small-27m --formats bf16,int4g128,int5q");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("unknown format 'int5q'"), std::string::npos) << r.out;
  r = run_cli("bench --shape no-such-shape --formats bf16");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("unknown shape 'no-such-shape'"), std::string::npos) << r.out;
  r = run_cli("bench");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("give a model directory or --shape"), std::string::npos) << r.out;
}

// ---- perplexity on `small` (../shared)
// -----------------------------------------------------------

// Each recipe compressed with 8 calibration windows of 256 tokens (what is compared is the two
// engines on the same weights, not the compression's quality), then the perplexity of the first
// 16 windows of 512 tokens of valid.jsonl (8,176 predictions) on both paths.
TEST(PackedModelSmall, PerplexityEqualsTheReferencePathSlow) {
  SPARSA_REQUIRE_SHARED();
  const std::string shared = testing::shared_dir();
  ThreadPool pool(2);
  std::vector<int32_t> tokens;
  for (const char* recipe : {"gptq-w4g128", "sparsegpt-50-gptq-w4g128", "sparsegpt-2of4",
                             "palettize-3bit", "smoothquant-w8a8"}) {
    const std::string out = temp_dir(std::string("small-") + recipe);
    compress::CompressOptions o;
    o.model_dir = shared + "/models/small";
    o.recipe_path = testing::source_dir() + "/recipes/" + recipe + ".yaml";
    o.calibration_path = shared + "/data/train.jsonl";
    o.output_dir = out;
    o.samples = 8;
    o.seq_len = 256;
    o.progress = false;
    compress::compress_model(o, pool);
    auto packed = model::Model::load(out);
    auto ref = model::Model::load(out, {.linear = model::LinearPath::kReference});
    if (tokens.empty()) {
      const Tokenizer tok = Tokenizer::from_file(out + "/tokenizer.json");
      tokens = tokenize_corpus(tok, io::read_documents(shared + "/data/valid.jsonl"),
                               packed->config().eos_token_ids.at(0));
    }
    const PerplexityResult a = perplexity(*packed, tokens, 512, pool, {}, 16);
    const PerplexityResult b = perplexity(*ref, tokens, 512, pool, {}, 16);
    EXPECT_EQ(a.tokens_scored, 16 * 511);
    EXPECT_NEAR(a.ppl / b.ppl, 1.0, 1e-3)
        << recipe << ": packed " << a.ppl << ", reference " << b.ppl;
    EXPECT_LT(b.ppl, 100.0) << recipe;  // a sanity bound (dense small: 14.74 on all of valid)
    std::printf("%s (%s): packed ppl %.4f, reference %.4f\n", recipe,
                packed->blocks()[0].q.describe().c_str(), a.ppl, b.ppl);
    fs::remove_all(out);
  }
}

}  // namespace
}  // namespace sparsa
