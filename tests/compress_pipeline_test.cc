// The sequential compression pipeline end to end: every output format reloads to exactly the
// model that was compressed in memory, the tensors follow the compressed-tensors conventions,
// bad inputs are refused, and (with ../shared) SparseGPT and GPTQ on `small` reach the
// reference implementations' perplexity.
#include "sparsa/compress/pipeline.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/io/safetensors.h"
#include "sparsa/io/text_data.h"
#include "sparsa/model/llama.h"
#include "sparsa/runtime/perplexity.h"
#include "sparsa/runtime/tokenizer.h"
#include "logits_util.h"
#include "test_util.h"

namespace sparsa::compress {
namespace {

namespace fs = std::filesystem;

std::string temp_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("sparsa-compress-test-" + std::to_string(::getpid()) + "-" + name);
  fs::remove_all(p);
  return p.string();
}

CompressOptions tiny_options(const std::string& recipe, const std::string& out) {
  CompressOptions o;
  o.model_dir = testing::tiny_model_dir();
  o.recipe_path = testing::source_dir() + "/recipes/" + recipe + ".yaml";
  o.calibration_path = testing::fixtures_dir() + "/calibration.jsonl";
  o.output_dir = out;
  o.samples = 8;
  o.seq_len = 64;
  o.progress = false;
  o.keep_probe_logits = true;
  return o;
}

class ReloadTest : public ::testing::TestWithParam<std::pair<const char*, const char*>> {};

// The compressed model in memory (its logits on the first calibration window, computed by the
// pipeline) and the checkpoint it wrote, reloaded, give bit-identical logits.
TEST_P(ReloadTest, ReloadedCheckpointGivesBitIdenticalLogits) {
  const auto [recipe, format] = GetParam();
  const std::string out = temp_dir(recipe);
  ThreadPool pool(2);
  const CompressReport r = compress_model(tiny_options(recipe, out), pool);
  ASSERT_EQ(r.linears.size(), 7u * 2u);  // tiny: 2 layers
  for (const LinearReport& l : r.linears) {
    EXPECT_EQ(l.format, format) << l.name;
    EXPECT_GT(l.relative_error, 0.0) << l.name;
    EXPECT_LT(l.relative_error, 1.0) << l.name;  // 1: no better than all-zero weights
  }
  // The dequantized reference path: the same f32 weights and kernels as the pipeline (the packed
  // engine sums in another order for act-order and low-rank weights; packed_model_test.cc).
  auto model = model::Model::load(out, {.linear = model::LinearPath::kReference});
  const std::vector<float> logits = testing::all_logits(*model, r.probe_tokens, pool);
  const size_t differ = testing::count_differing(logits, r.probe_logits);
  EXPECT_EQ(differ, 0u) << recipe << ": " << differ << " of " << logits.size() << " logits differ";
  // The uncompressed model's logits differ: the test would notice a pipeline that did nothing.
  auto dense = model::Model::load(testing::tiny_model_dir());
  EXPECT_NE(testing::all_logits(*dense, r.probe_tokens, pool), logits);
  EXPECT_TRUE(fs::exists(out + "/recipe.yaml"));
  EXPECT_TRUE(fs::exists(out + "/tokenizer.json"));
  fs::remove_all(out);
}

INSTANTIATE_TEST_SUITE_P(
    Formats, ReloadTest,
    ::testing::Values(std::pair{"gptq-w4g128", "pack-quantized"},
                      std::pair{"gptq-w4g128-actorder", "pack-quantized"},
                      std::pair{"rtn-w4", "pack-quantized"},
                      std::pair{"sparsegpt-50", "sparse-bitmask"},
                      std::pair{"wanda-50", "sparse-bitmask"},
                      std::pair{"magnitude-2of4", "sparse-24-bitmask"},
                      std::pair{"sparsegpt-50-gptq-w4g128", "pack-quantized"},
                      std::pair{"owl-sparsegpt-70", "sparse-bitmask"},
                      std::pair{"awq-w4g128", "pack-quantized"},
                      std::pair{"smoothquant-w8a8", "int-quantized"},
                      std::pair{"palettize-3bit", "sparsa-palettized"},
                      std::pair{"svd-50", "sparsa-low-rank"}),
    [](const auto& info) {
      std::string s = info.param.first;
      for (char& c : s)
        if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
      return s;
    });

const io::TensorView& tensor(const io::Checkpoint& ck, const std::string& name) {
  const io::TensorView* t = ck.find(name);
  if (t == nullptr) throw Error("missing tensor " + name);
  return *t;
}

TEST(CompressOutput, PackQuantizedTensorsFollowTheConventions) {
  const std::string out = temp_dir("layout-q");
  ThreadPool pool(2);
  compress_model(tiny_options("sparsegpt-50-gptq-w4g128", out), pool);
  const io::Checkpoint ck = io::Checkpoint::open_dir(out);
  const std::string m = "model.layers.1.mlp.down_proj";  // [128, 384]
  const io::TensorView& packed = tensor(ck, m + ".weight_packed");
  EXPECT_EQ(packed.dtype, DType::I32);
  EXPECT_EQ(packed.shape, (std::vector<int64_t>{128, 384 / 8}));
  const io::TensorView& scale = tensor(ck, m + ".weight_scale");
  EXPECT_EQ(scale.shape, (std::vector<int64_t>{128, 3}));
  const io::TensorView& zp = tensor(ck, m + ".weight_zero_point");
  EXPECT_EQ(zp.dtype, DType::I32);
  EXPECT_EQ(zp.shape, (std::vector<int64_t>{128 / 8, 3}));
  const io::TensorView& shape = tensor(ck, m + ".weight_shape");
  EXPECT_EQ(shape.dtype, DType::I64);
  EXPECT_EQ(shape.shape, (std::vector<int64_t>{2}));
  EXPECT_EQ(ck.find(m + ".weight"), nullptr);
  EXPECT_EQ(ck.find(m + ".weight_g_idx"), nullptr);  // no act-order: groups are c / 128
  // Untouched tensors are copied as they were.
  EXPECT_EQ(tensor(ck, "lm_head.weight").dtype, DType::BF16);
  EXPECT_EQ(tensor(ck, "model.layers.0.input_layernorm.weight").dtype, DType::BF16);

  const auto config = nlohmann::json::parse(read_text_file(out + "/config.json"));
  const auto& q = config.at("quantization_config");
  EXPECT_EQ(q.at("quant_method"), "compressed-tensors");
  EXPECT_EQ(q.at("format"), "pack-quantized");
  EXPECT_EQ(q.at("quantization_status"), "compressed");
  const auto& w = q.at("config_groups").at("group_0").at("weights");
  EXPECT_EQ(w.at("num_bits"), 4);
  EXPECT_EQ(w.at("group_size"), 128);
  EXPECT_EQ(w.at("symmetric"), false);
  EXPECT_EQ(w.at("strategy"), "group");
  EXPECT_NE(std::find(q.at("ignore").begin(), q.at("ignore").end(), "lm_head"), q.at("ignore").end());
  const auto& s = q.at("sparsity_config");
  EXPECT_EQ(s.at("format"), "dense");  // the zeros live inside weight_packed
  EXPECT_NEAR(s.at("global_sparsity").get<double>(), 0.5, 0.01);
  const auto index = nlohmann::json::parse(read_text_file(out + "/model.safetensors.index.json"));
  EXPECT_EQ(index.at("weight_map").at(m + ".weight_packed"), "model-00002-of-00003.safetensors");
  fs::remove_all(out);
}

TEST(CompressOutput, SparseBitmaskTensorsFollowTheConventions) {
  const std::string out = temp_dir("layout-s");
  ThreadPool pool(2);
  compress_model(tiny_options("sparsegpt-50", out), pool);
  const io::Checkpoint ck = io::Checkpoint::open_dir(out);
  const std::string m = "model.layers.0.self_attn.q_proj";  // [128, 128]
  const io::TensorView& comp = tensor(ck, m + ".compressed");
  EXPECT_EQ(comp.dtype, DType::BF16);
  EXPECT_EQ(comp.shape, (std::vector<int64_t>{128 * 128 / 2}));
  const io::TensorView& mask = tensor(ck, m + ".bitmask");
  EXPECT_EQ(mask.dtype, DType::U8);
  EXPECT_EQ(mask.shape, (std::vector<int64_t>{128, 16}));
  const io::TensorView& off = tensor(ck, m + ".row_offsets");
  EXPECT_EQ(off.dtype, DType::I64);
  EXPECT_EQ(off.shape, (std::vector<int64_t>{128}));
  EXPECT_EQ(tensor(ck, m + ".shape").shape, (std::vector<int64_t>{2}));
  int bits = 0;
  for (size_t i = 0; i < mask.nbytes; ++i) bits += __builtin_popcount(mask.data[i]);
  EXPECT_EQ(bits, 128 * 128 / 2);
  const auto config = nlohmann::json::parse(read_text_file(out + "/config.json"));
  const auto& q = config.at("quantization_config");
  EXPECT_FALSE(q.contains("config_groups"));
  EXPECT_EQ(q.at("sparsity_config").at("format"), "sparse-bitmask");
  EXPECT_EQ(q.at("sparsity_config").at("sparsity_structure"), "unstructured");
  fs::remove_all(out);
}

void expect_error(const CompressOptions& o, const std::string& fragment) {
  ThreadPool pool(2);
  try {
    compress_model(o, pool);
    ADD_FAILURE() << "no error; expected one containing '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(CompressErrors, BadInputsAreRefusedAndNothingIsLeftBehind) {
  const std::string out = temp_dir("errors");
  CompressOptions o = tiny_options("gptq-w4g128", out);
  o.calibration_path = "/nonexistent/calib.jsonl";
  expect_error(o, "/nonexistent/calib.jsonl");
  EXPECT_FALSE(fs::exists(out));
  for (const auto& entry : fs::directory_iterator(fs::temp_directory_path()))
    EXPECT_EQ(entry.path().string().find(out + ".partial"), std::string::npos) << entry.path();

  o = tiny_options("no-such-recipe", out);
  expect_error(o, "no-such-recipe.yaml");

  o = tiny_options("gptq-w4g128", out);
  o.seq_len = 100000;
  expect_error(o, "calibration sequence length 100000");

  // A recipe with a fine-tuning stage belongs to `sparsa finetune`.
  o = tiny_options("finetune-squarehead", out);
  expect_error(o, "use `sparsa finetune`");
  EXPECT_FALSE(fs::exists(out));

  fs::create_directories(out);
  { std::ofstream(out + "/keep.txt") << "user data"; }
  o = tiny_options("gptq-w4g128", out);
  expect_error(o, "already exists");
  EXPECT_TRUE(fs::exists(out + "/keep.txt"));
  fs::remove_all(out);

  // A compressed model is not compressed again.
  ThreadPool pool(2);
  compress_model(tiny_options("rtn-w4g128", out), pool);
  CompressOptions again = tiny_options("rtn-w4g128", out + "-again");
  again.model_dir = out;
  expect_error(again, "already compressed");
  fs::remove_all(out);
}

// The peer protocol (../shared/reference/peer-compression.json) on `small`: 128 windows of 512
// tokens from train.jsonl, valid.jsonl perplexity at ctx 512, at most 1.02 × the reference
// implementation's.
void check_small(const std::string& recipe, const std::string& peer_key) {
  const std::string shared = testing::shared_dir();
  const auto peer = nlohmann::json::parse(read_text_file(shared + "/reference/peer-compression.json"));
  const double bar = 1.02 * peer.at("valid_ppl").at(peer_key).get<double>();
  const std::string out = temp_dir("small-" + recipe);
  CompressOptions o;
  o.model_dir = shared + "/models/small";
  o.recipe_path = testing::source_dir() + "/recipes/" + recipe + ".yaml";
  o.calibration_path = shared + "/data/train.jsonl";
  o.output_dir = out;
  o.progress = false;
  ThreadPool pool(2);
  const CompressReport r = compress_model(o, pool);
  EXPECT_EQ(r.calibration_tokens, 128 * 512);
  auto model = model::Model::load(out);
  const Tokenizer tok = Tokenizer::from_file(out + "/tokenizer.json");
  const auto tokens = tokenize_corpus(tok, io::read_documents(shared + "/data/valid.jsonl"),
                                      model->config().eos_token_ids.at(0));
  const double ppl = perplexity(*model, tokens, 512, pool).ppl;
  EXPECT_LE(ppl, bar) << recipe << ": valid ppl " << ppl << ", bar " << bar;
  std::printf("%s: valid ppl %.4f (bar %.4f)\n", recipe.c_str(), ppl, bar);
  fs::remove_all(out);
}

TEST(CompressSmall, SparseGpt50WithinPeerBarSlow) {
  SPARSA_REQUIRE_SHARED();
  check_small("sparsegpt-50", "sparsegpt_50");
}

TEST(CompressSmall, GptqW4G128WithinPeerBarSlow) {
  SPARSA_REQUIRE_SHARED();
  check_small("gptq-w4g128", "gptq_w4g128");
}

}  // namespace
}  // namespace sparsa::compress
