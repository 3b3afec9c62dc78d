// The sequential (layer-by-layer) calibration pipeline: see pipeline.h.
//
// Per decoder layer:
//   1. its seven linear layers are read from the checkpoint into f32 matrices;
//   2. pass 1 runs every calibration window through the dense layer, with a hook gathering the
//      statistics of the four distinct linear inputs (attention input → q/k/v, attention output
//      → o, MLP input → gate/up, MLP hidden → down): XᵀX, column norms, min/max, and, when AWQ
//      needs them, a strided sample of the inputs;
//   3. the recipe's modifiers run in order over the linears they target;
//   4. weights that are stored in the model's float dtype are rounded to it, so the layer in
//      memory is exactly what a reload decodes;
//   5. pass 2 recomputes the windows with the compressed layer, in place: they are the next
//      layer's inputs;
//   6. the layer's tensors are written as one safetensors shard and everything is freed.
// The whole checkpoint is written into a temporary directory that is fsynced and renamed into
// place at the end.
#include "sparsa/compress/pipeline.h"

#include <cblas.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "sparsa/compress/awq.h"
#include "sparsa/compress/lowrank.h"
#include "sparsa/compress/matrix.h"
#include "sparsa/compress/palettize.h"
#include "sparsa/compress/prune.h"
#include "sparsa/compress/quantize.h"
#include "sparsa/compress/recipe.h"
#include "sparsa/compress/smoothquant.h"
#include "sparsa/compress/structured.h"
#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/core/progress.h"
#include "sparsa/io/compressed_tensors.h"
#include "sparsa/io/model_config.h"
#include "sparsa/io/safetensors.h"
#include "sparsa/io/text_data.h"
#include "sparsa/kernels/linear.h"
#include "sparsa/model/llama.h"
#include "sparsa/runtime/perplexity.h"
#include "sparsa/runtime/tokenizer.h"

namespace sparsa::compress {

namespace fs = std::filesystem;

size_t rss_anon_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("RssAnon:", 0) == 0) {
      size_t kb = 0;
      std::sscanf(line.c_str() + 8, "%zu", &kb);
      return kb * 1024;
    }
  }
  return 0;
}

namespace {

// The four distinct inputs of a Llama block's linear layers.
enum Input { kAttnIn = 0, kAttnOut = 1, kMlpIn = 2, kMlpHidden = 3, kInputs = 4 };

struct Slot {
  const char* tag;     // block_forward's hook name
  const char* suffix;  // module name after "model.layers.N."
  Input input;
};
constexpr Slot kSlots[7] = {
    {"q", "self_attn.q_proj", kAttnIn}, {"k", "self_attn.k_proj", kAttnIn},
    {"v", "self_attn.v_proj", kAttnIn}, {"o", "self_attn.o_proj", kAttnOut},
    {"gate", "mlp.gate_proj", kMlpIn},  {"up", "mlp.up_proj", kMlpIn},
    {"down", "mlp.down_proj", kMlpHidden}};

// Which input a hook call brings; -1 for k, v and up, whose input q and gate already brought.
int input_of_tag(const char* tag) {
  if (std::strcmp(tag, "q") == 0) return kAttnIn;
  if (std::strcmp(tag, "o") == 0) return kAttnOut;
  if (std::strcmp(tag, "gate") == 0) return kMlpIn;
  if (std::strcmp(tag, "down") == 0) return kMlpHidden;
  return -1;
}

// Tokens of each input kept as a sample for AWQ's searches.
constexpr int64_t kSampleTokens = 2048;

float round_to(DType dt, float v) {
  switch (dt) {
    case DType::BF16:
      return bf16_to_f32(f32_to_bf16(v));
    case DType::F16:
      return f16_to_f32(f32_to_f16(v));
    default:
      return v;
  }
}

void round_all(DType dt, std::vector<float>& v) {
  for (float& x : v) x = round_to(dt, x);
}

std::vector<uint8_t> encode(const float* v, size_t n, DType dt) {
  std::vector<uint8_t> out(n * dtype_size(dt));
  if (dt == DType::F32) {
    std::memcpy(out.data(), v, n * sizeof(float));
  } else {
    for (size_t i = 0; i < n; ++i) {
      const uint16_t h = dt == DType::BF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

std::vector<float> to_f32(const io::TensorView& t) {
  const size_t n = static_cast<size_t>(t.numel());
  std::vector<float> out(n);
  SPARSA_CHECK(t.dtype == DType::F32 || t.dtype == DType::BF16 || t.dtype == DType::F16,
               "{}: tensor '{}' has dtype {}; expected a float type", t.file, t.name,
               dtype_name(t.dtype));
  for (size_t i = 0; i < n; ++i) {
    if (t.dtype == DType::F32) {
      std::memcpy(&out[i], t.data + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      out[i] = t.dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
  return out;
}

// Σ_r a_r H a_rᵀ over the rows of a [rows, cols] (f32) with H [cols, cols] (f64). H is taken in
// f32 column panels so that one f32 GEMM per panel covers every row; the sum is kept in f64.
double quad_form_sum(const float* a, int64_t rows, int64_t cols, const std::vector<double>& h) {
  constexpr int64_t kPanel = 256;
  std::vector<float> hp(static_cast<size_t>(cols * kPanel)), m(static_cast<size_t>(rows * kPanel));
  double total = 0.0;
  for (int64_t j0 = 0; j0 < cols; j0 += kPanel) {
    const int64_t jb = std::min(kPanel, cols - j0);
    for (int64_t i = 0; i < cols; ++i)
      for (int64_t j = 0; j < jb; ++j)
        hp[static_cast<size_t>(i * jb + j)] = static_cast<float>(h[static_cast<size_t>(i * cols + j0 + j)]);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows),
                static_cast<int>(jb), static_cast<int>(cols), 1.0f, a, static_cast<int>(cols),
                hp.data(), static_cast<int>(jb), 0.0f, m.data(), static_cast<int>(jb));
    for (int64_t r = 0; r < rows; ++r) {
      double row = 0.0;
      for (int64_t j = 0; j < jb; ++j)
        row += static_cast<double>(a[r * cols + j0 + j]) * m[static_cast<size_t>(r * jb + j)];
      total += row;
    }
  }
  return total;
}

QuantSpec to_spec(const QuantScheme& s, bool act_order) {
  QuantSpec q;
  q.bits = s.bits;
  q.symmetric = s.symmetric;
  q.group_size = s.group_size;
  q.act_order = act_order;
  return q;
}

SparsityPattern to_pattern(double sparsity, const MaskStructure& m) {
  if (m.unstructured()) return SparsityPattern{sparsity};
  return SparsityPattern{0.0, m.n, m.m};
}

// One linear layer in the making.
struct Work {
  std::string module;  // model.layers.3.mlp.down_proj
  Input input = kAttnIn;
  Matrix w;            // current values
  Matrix original;     // the values before the passes (rescaled with w by smoothing)
  const io::TensorView* source = nullptr;  // the original tensor, while w is unchanged
  std::vector<float> bias;
  Mask keep;           // empty: dense
  MaskStructure structure;
  std::optional<QuantResult> quant;
  bool w8a8 = false;
  std::optional<Palette> palette;
  std::optional<LowRank> low_rank;
  bool changed = false;
  // Structured pruning: w has fewer rows or columns than the dense [dense_rows, dense_cols];
  // structured_error is ‖WX − ŴX − b‖² / ‖WX‖² over the inputs the layer had when its rows or
  // columns were removed (Ŵ: the removed ones zero; b: the compensating bias, if any).
  int64_t dense_rows = 0, dense_cols = 0;
  bool structured = false;
  bool bias_changed = false;
  double structured_error = 0.0;
};

// Statistics of one input of the layer.
struct InputData {
  InputStats stats;
  std::vector<double> h;  // H = 2/N XᵀX once taken
  Matrix sample;          // [<= kSampleTokens, cols] when wanted
  int64_t sample_rows = 0;

  const std::vector<double>& hessian(ThreadPool& pool) {
    if (h.empty()) {
      h = stats.hessian(pool);
      stats.drop_hessian();
    }
    return h;
  }
  // The input is divided by s (smoothing): H_ij / (s_i s_j), ‖X_j‖² / s_j², samples X_j / s_j.
  void rescale(std::span<const float> s, ThreadPool& pool) {
    const int64_t c = static_cast<int64_t>(s.size());
    hessian(pool);
    for (int64_t i = 0; i < c; ++i)
      for (int64_t j = 0; j < c; ++j) h[i * c + j] /= static_cast<double>(s[i]) * s[j];
    if (sample_rows > 0) divide_columns_by_scales(sample, s);
  }
};

// Where the quantization scheme of every quantized linear must agree (one config group).
struct QuantKey {
  int bits = 0;
  int64_t group_size = 0;
  bool symmetric = false;
  bool act_order = false;
  bool w8a8 = false;
  bool operator==(const QuantKey&) const = default;
};

class OutputDir {
 public:
  OutputDir(const std::string& out, bool overwrite) : out_(out) {
    SPARSA_CHECK(!out.empty(), "compress: no output directory given");
    if (fs::exists(out_)) {
      SPARSA_CHECK(overwrite,
                   "compress: output directory '{}' already exists (choose another or pass "
                   "--overwrite)",
                   out);
    }
    tmp_ = out_;
    tmp_ += ".partial-" + std::to_string(::getpid());
    fs::remove_all(tmp_);
    fs::create_directories(tmp_);
  }
  ~OutputDir() {
    if (!committed_) {
      std::error_code ec;
      fs::remove_all(tmp_, ec);
    }
  }
  std::string path(const std::string& name) const { return (tmp_ / name).string(); }

  void commit() {
    fsync_dir(tmp_);
    if (fs::exists(out_)) {
      fs::path old = out_;
      old += ".old-" + std::to_string(::getpid());
      fs::rename(out_, old);
      fs::rename(tmp_, out_);
      fs::remove_all(old);
    } else {
      fs::rename(tmp_, out_);
    }
    fsync_dir(out_.has_parent_path() ? out_.parent_path() : fs::path("."));
    committed_ = true;
  }

 private:
  static void fsync_dir(const fs::path& d) {
    const int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
  }
  fs::path out_, tmp_;
  bool committed_ = false;
};

std::string shard_name(int64_t i, int64_t n) {
  return fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, n);
}

// Collects one shard's tensors (owning their bytes) and writes them.
struct Shard {
  std::vector<io::TensorData> tensors;
  std::vector<std::vector<uint8_t>> buffers;

  void add(const std::string& name, DType dt, std::vector<int64_t> shape,
           std::vector<uint8_t> bytes) {
    buffers.push_back(std::move(bytes));
    io::TensorData t;
    t.spec.name = name;
    t.spec.dtype = dt;
    t.spec.shape = std::move(shape);
    t.data = buffers.back().data();
    SPARSA_CHECK(buffers.back().size() == t.spec.nbytes(),
                 "compress: internal size mismatch writing '{}'", name);
    tensors.push_back(std::move(t));
  }
  template <class T>
  void add_array(const std::string& name, DType dt, std::vector<int64_t> shape,
                 const std::vector<T>& v) {
    std::vector<uint8_t> b(v.size() * sizeof(T));
    if (!b.empty()) std::memcpy(b.data(), v.data(), b.size());
    add(name, dt, std::move(shape), std::move(b));
  }
  void add_view(const io::TensorView& t) {
    add(t.name, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes));
  }
  size_t bytes_of(const std::string& prefix) const {
    size_t total = 0;
    for (const auto& t : tensors)
      if (t.spec.name.rfind(prefix + ".", 0) == 0 && t.spec.name != prefix + ".bias")
        total += t.spec.nbytes();
    return total;
  }
  void write(const std::string& path, std::map<std::string, std::string>& weight_map,
             const std::string& file) {
    for (const auto& t : tensors) weight_map[t.spec.name] = file;
    io::write_safetensors(path, tensors, {{"format", "pt"}});
    tensors.clear();
    buffers.clear();
  }
};

}  // namespace

CompressReport compress_model(const CompressOptions& opt, ThreadPool& pool) {
  using Clock = std::chrono::steady_clock;
  const auto t_start = Clock::now();
  CompressReport report;
  auto sample_rss = [&] { report.peak_rss_anon_bytes = std::max(report.peak_rss_anon_bytes, rss_anon_bytes()); };

  // ---- inputs, all validated before any work -----------------------------------------------
  const Recipe recipe = Recipe::from_file(opt.recipe_path);
  const io::ModelConfig cfg = io::ModelConfig::from_dir(opt.model_dir);
  const io::Checkpoint ck = io::Checkpoint::open_dir(opt.model_dir);
  const std::string config_path = opt.model_dir + "/config.json";
  nlohmann::json config_json = nlohmann::json::parse(read_text_file(config_path));
  {
    const io::CompressionConfig existing = io::read_compression_config(config_json, config_path);
    SPARSA_CHECK(!existing.quantization && !existing.sparsity && !existing.sparsa,
                 "compress: {} is already compressed; start from a dense model", opt.model_dir);
  }
  const int64_t samples = opt.samples > 0 ? opt.samples : recipe.calibration.samples;
  const int64_t seq_len = opt.seq_len > 0 ? opt.seq_len : recipe.calibration.seq_len;
  SPARSA_CHECK(seq_len >= 2 && seq_len <= cfg.max_context(),
               "compress: calibration sequence length {} is outside 2..{} (the model's context)",
               seq_len, cfg.max_context());
  if (const Stage* ft = recipe.finetune_stage())
    throw Error(fmt::format("{}: stage '{}' is a fine-tuning stage (run_type: finetune); "
                            "`sparsa compress` runs one-shot stages only: use `sparsa finetune`",
                            recipe.source, ft->name));
  // Structured pruning changes the shapes every later modifier sees, and the saved config has
  // one head count and one intermediate size: it comes first and covers every layer.
  const StructuredPruningArgs* structured = nullptr;
  int64_t groups_removed = 0, channels_removed = 0;
  bool structured_then_more = false;
  {
    const std::vector<const Modifier*> mods = recipe.modifiers();
    for (size_t i = 0; i < mods.size(); ++i) {
      const Modifier* m = mods[i];
      if (m->type() != ModifierType::kStructuredPruning) continue;
      SPARSA_CHECK(i == 0,
                   "{}: modifier 'StructuredPruningModifier' must be the recipe's first modifier "
                   "(it changes the shapes the other modifiers work on)",
                   recipe.source);
      structured = &std::get<StructuredPruningArgs>(m->args);
      structured_then_more = mods.size() > 1;
      const std::string where = fmt::format("{}: stage '{}', modifier 'StructuredPruningModifier'",
                                            recipe.source, recipe.stages.front().name);
      const StructuredPruningArgs& a = *structured;
      groups_removed = structured_prune_count(a.head_sparsity, cfg.num_kv_heads);
      channels_removed = structured_prune_count(a.mlp_sparsity, cfg.intermediate_size);
      SPARSA_CHECK(a.head_sparsity == 0 || groups_removed > 0,
                   "{}, field 'head_sparsity': {} removes "
                   "no whole KV-head group of {} (heads go in groups of {} query heads per KV "
                   "head); give at least {}",
                   where, a.head_sparsity, cfg.num_kv_heads,
                   cfg.num_heads / cfg.num_kv_heads, 1.0 / static_cast<double>(cfg.num_kv_heads));
      SPARSA_CHECK(a.mlp_sparsity == 0 || channels_removed > 0,
                   "{}, field 'mlp_sparsity': {} removes no "
                   "channel of {}",
                   where, a.mlp_sparsity, cfg.intermediate_size);
      SPARSA_CHECK(!a.bias_compensation || cfg.model_type == "llama",
                   "{}, field 'bias_compensation': needs "
                   "model_type llama (the only one of {} with o_proj and down_proj biases)",
                   where, "llama, mistral, qwen2");
      for (int64_t l = 0; l < cfg.num_layers; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".";
        auto check_covered = [&](std::initializer_list<const char*> suffixes, bool pruned,
                                 const char* what) {
          for (const char* suffix : suffixes) {
            SPARSA_CHECK(!pruned || m->applies_to(p + suffix),
                         "{}, field 'targets': {} are "
                         "pruned, but {}{} is not targeted (a standard config has one shape for "
                         "every layer)",
                         where, what, p, suffix);
          }
        };
        check_covered({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.o_proj"},
                      groups_removed > 0, "attention heads");
        check_covered({"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}, channels_removed > 0,
                      "MLP channels");
      }
    }
  }
  OutputDir out(opt.output_dir, opt.overwrite);

  const int64_t h = cfg.hidden_size, qdim = cfg.num_heads * cfg.head_dim,
                kvw = cfg.num_kv_heads * cfg.head_dim, ffn = cfg.intermediate_size;
  const int64_t input_cols[kInputs] = {h, qdim, h, ffn};
  const io::TensorView& embed = ck.get("model.embed_tokens.weight");
  SPARSA_CHECK(embed.shape == (std::vector<int64_t>{cfg.vocab_size, h}),
               "{}: model.embed_tokens.weight does not have shape [{}, {}]", embed.file,
               cfg.vocab_size, h);
  const DType dt = embed.dtype;

  // ---- calibration tokens: documents without BOS joined by EOS, the first windows ----------
  SPARSA_CHECK(!cfg.eos_token_ids.empty(), "{}: no eos_token_id to join calibration documents",
               config_path);
  const Tokenizer tokenizer = Tokenizer::from_file(opt.model_dir + "/tokenizer.json");
  std::vector<int32_t> tokens =
      tokenize_corpus(tokenizer, io::read_documents(opt.calibration_path), cfg.eos_token_ids[0]);
  const int64_t windows = std::min<int64_t>(samples, static_cast<int64_t>(tokens.size()) / seq_len);
  SPARSA_CHECK(windows >= 1, "compress: {} holds {} tokens, fewer than one window of {}",
               opt.calibration_path, tokens.size(), seq_len);
  tokens.resize(static_cast<size_t>(windows * seq_len));
  const int64_t n_tokens = windows * seq_len;
  report.calibration_tokens = n_tokens;
  report.probe_tokens.assign(tokens.begin(), tokens.begin() + seq_len);

  auto embed_tokens = [&](std::vector<float>& x) {
    x.resize(static_cast<size_t>(n_tokens * h));
    const std::vector<float> dummy;
    for (int64_t t = 0; t < n_tokens; ++t) {
      const uint8_t* row = embed.data + static_cast<size_t>(tokens[t]) * h * dtype_size(dt);
      io::TensorView v = embed;
      v.shape = {h};
      v.data = row;
      v.nbytes = static_cast<size_t>(h) * dtype_size(dt);
      const std::vector<float> f = to_f32(v);
      std::copy(f.begin(), f.end(), x.begin() + t * h);
    }
  };

  bool want_samples = false, any_owl = false, all_24 = true, any_pruning = false;
  for (const Modifier* m : recipe.modifiers()) {
    if (m->type() == ModifierType::kAWQ) want_samples = true;
    if (const auto* a = std::get_if<WandaPruningArgs>(&m->args)) {
      any_owl |= a->owl.has_value();
      any_pruning = true;
      all_24 &= a->mask_structure == MaskStructure{2, 4};
    }
    if (const auto* a = std::get_if<SparseGPTArgs>(&m->args)) {
      any_owl |= a->owl.has_value();
      any_pruning = true;
      all_24 &= a->mask_structure == MaskStructure{2, 4};
    }
    if (const auto* a = std::get_if<MagnitudePruningArgs>(&m->args)) {
      any_pruning = true;
      all_24 &= a->mask_structure == MaskStructure{2, 4};
    }
  }
  const bool use_24 = any_pruning && all_24;

  const std::vector<float> inv_freq = model::rope_inverse_frequencies(cfg);
  std::vector<float> kc(static_cast<size_t>(seq_len * kvw)), vc(kc.size());
  model::BlockWorkspace ws;
  std::vector<float> window(static_cast<size_t>(seq_len * h));

  auto layer_prefix = [](int64_t l) { return "model.layers." + std::to_string(l) + "."; };
  auto load_matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    const io::TensorView& t = ck.get(name);
    SPARSA_CHECK(t.shape == (std::vector<int64_t>{rows, cols}),
                 "{}: tensor '{}' does not have the shape [{}, {}] the config implies", t.file,
                 name, rows, cols);
    Matrix m(rows, cols);
    m.data = to_f32(t);
    return m;
  };
  auto load_block = [&](int64_t l, std::vector<Work>& work, std::vector<float>& attn_norm,
                        std::vector<float>& mlp_norm) {
    const std::string p = layer_prefix(l);
    const int64_t rows[7] = {qdim, kvw, kvw, h, ffn, ffn, h};
    const int64_t cols[7] = {h, h, h, qdim, h, h, ffn};
    const bool has_bias[7] = {cfg.attention_bias, cfg.attention_bias, cfg.attention_bias,
                              cfg.o_bias,         cfg.mlp_bias,       cfg.mlp_bias,
                              cfg.mlp_bias};
    work.assign(7, Work{});
    for (int i = 0; i < 7; ++i) {
      Work& wk = work[i];
      wk.module = p + kSlots[i].suffix;
      wk.input = kSlots[i].input;
      wk.w = load_matrix(wk.module + ".weight", rows[i], cols[i]);
      wk.dense_rows = rows[i];
      wk.dense_cols = cols[i];
      wk.source = &ck.get(wk.module + ".weight");
      if (has_bias[i]) wk.bias = to_f32(ck.get(wk.module + ".bias"));
    }
    attn_norm = to_f32(ck.get(p + "input_layernorm.weight"));
    mlp_norm = to_f32(ck.get(p + "post_attention_layernorm.weight"));
    SPARSA_CHECK(static_cast<int64_t>(attn_norm.size()) == h &&
                     static_cast<int64_t>(mlp_norm.size()) == h,
                 "{}: layer {} norms do not have {} entries", opt.model_dir, l, h);
  };
  // A model::Block over the work's matrices (or the original tensors where unchanged).
  auto make_block = [&](const std::vector<Work>& work, const std::vector<float>& attn_norm,
                        const std::vector<float>& mlp_norm) {
    model::Block b;
    b.attn_norm = attn_norm;
    b.mlp_norm = mlp_norm;
    model::Linear* ls[7] = {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down};
    for (int i = 0; i < 7; ++i) {
      const Work& wk = work[i];
      ls[i]->name = wk.module;
      ls[i]->bias = wk.bias;
      ls[i]->input_bits = wk.w8a8 ? 8 : 0;
      if (!wk.changed && !wk.structured && wk.source != nullptr) {
        ls[i]->weight = kernels::DenseWeight{wk.source->dtype, wk.w.rows, wk.w.cols, wk.source->data};
      } else {
        ls[i]->weight = kernels::DenseWeight{DType::F32, wk.w.rows, wk.w.cols, wk.w.data.data()};
      }
    }
    return b;
  };

  // ---- OWL: per-layer outlier ratios of the dense model, layer by layer ---------------------
  std::vector<double> owl_ratios;
  std::vector<float> x;
  if (any_owl) {
    double owl_m = 5.0;
    for (const Modifier* m : recipe.modifiers()) {
      if (const auto* a = std::get_if<WandaPruningArgs>(&m->args); a && a->owl) owl_m = a->owl->m;
      if (const auto* a = std::get_if<SparseGPTArgs>(&m->args); a && a->owl) owl_m = a->owl->m;
    }
    embed_tokens(x);
    Progress prog("owl ratios", cfg.num_layers, "layer", opt.progress);
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      std::vector<Work> work;
      std::vector<float> an, mn;
      load_block(l, work, an, mn);
      InputStats stats[kInputs];
      for (int i = 0; i < kInputs; ++i) stats[i] = InputStats(input_cols[i], false);
      const model::Block b = make_block(work, an, mn);
      model::LinearInputHook hook = [&](int64_t, const char* tag, const float* in, int64_t n) {
        const int which = input_of_tag(tag);
        if (which >= 0) stats[which].accumulate(in, n, input_cols[which], pool);
      };
      for (int64_t wi = 0; wi < windows; ++wi)
        model::block_forward(cfg, b, l, inv_freq, x.data() + wi * seq_len * h, seq_len, 0,
                             kc.data(), vc.data(), ws, hook, pool);
      std::vector<const Matrix*> ms;
      std::vector<const std::vector<double>*> norms;
      for (const Work& wk : work) {
        ms.push_back(&wk.w);
        norms.push_back(&stats[wk.input].sq_norms());
      }
      owl_ratios.push_back(layer_outlier_ratio(ms, norms, owl_m));
      sample_rss();
      prog.advance(1);
    }
    prog.finish();
  }

  // ---- the sequential pass -------------------------------------------------------------------
  embed_tokens(x);
  const int64_t n_shards = cfg.num_layers + 1;
  std::map<std::string, std::string> weight_map;
  std::optional<QuantKey> quant_key;
  std::set<std::string> quantized_modules, pruned_modules, palettized_modules, low_rank_modules;
  int palette_bits = 0;
  int64_t palette_group_rows = 0;
  std::string low_rank_method;
  double zeros_total = 0, weights_total = 0, bytes_total = 0;

  // Structured pruning re-gathers the statistics after removing heads (for the MLP's scores) and
  // after all its removals (for the modifiers after it).
  const int64_t extra_passes =
      (groups_removed > 0 && channels_removed > 0 ? 1 : 0) + (structured_then_more ? 1 : 0);
  Progress prog("compress", cfg.num_layers * ((2 + extra_passes) * windows + 1), "step",
                opt.progress);
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const auto t_layer = Clock::now();
    std::vector<Work> work;
    std::vector<float> attn_norm, mlp_norm;
    load_block(l, work, attn_norm, mlp_norm);
    bool attn_norm_changed = false, mlp_norm_changed = false;

    // Pass 1: statistics of the layer's inputs, under config c (the dense layer's, or the
    // structurally pruned one's); with moments, also each input's per-column mean and variance.
    InputData in[kInputs];
    ChannelMoments moments[kInputs];
    const int64_t stride = std::max<int64_t>(1, n_tokens / kSampleTokens);
    auto gather = [&](const io::ModelConfig& c, bool with_moments) {
      const int64_t cols_of[kInputs] = {h, c.num_heads * c.head_dim, h, c.intermediate_size};
      for (int i = 0; i < kInputs; ++i) {
        in[i] = InputData{};
        in[i].stats = InputStats(cols_of[i], true);
        if (want_samples) in[i].sample = Matrix(std::min(kSampleTokens, n_tokens), cols_of[i]);
        moments[i] = with_moments ? ChannelMoments(cols_of[i]) : ChannelMoments();
      }
      const model::Block b = make_block(work, attn_norm, mlp_norm);
      int64_t window_index = 0;
      model::LinearInputHook hook = [&](int64_t, const char* tag, const float* xin, int64_t n) {
        const int which = input_of_tag(tag);
        if (which < 0) return;
        InputData& d = in[which];
        const int64_t cols = cols_of[which];
        d.stats.accumulate(xin, n, cols, pool);
        if (with_moments) moments[which].accumulate(xin, n, cols);
        if (want_samples) {
          for (int64_t t = 0; t < n; ++t) {
            const int64_t g = window_index * seq_len + t;
            if (g % stride != 0 || d.sample_rows >= d.sample.rows) continue;
            std::copy(xin + t * cols, xin + (t + 1) * cols, d.sample.row(d.sample_rows++));
          }
        }
      };
      for (int64_t wi = 0; wi < windows; ++wi) {
        window_index = wi;
        std::copy(x.begin() + wi * seq_len * h, x.begin() + (wi + 1) * seq_len * h,
                  window.begin());
        model::block_forward(c, b, l, inv_freq, window.data(), seq_len, 0, kc.data(),
                             vc.data(), ws, hook, pool);
        prog.advance(1);
      }
      for (InputData& d : in) {
        d.sample.rows = d.sample_rows;
        d.sample.data.resize(static_cast<size_t>(d.sample_rows * d.sample.cols));
      }
      sample_rss();
    };
    gather(cfg, structured != nullptr);
    for (Work& wk : work) wk.original = wk.w;

    // Structured pruning: whole GQA groups of heads, then MLP channels scored on the inputs
    // they see once the heads are gone; every layer keeps the same number (lcfg's shape).
    io::ModelConfig lcfg = cfg;
    if (structured != nullptr) {
      const StructuredPruningArgs& a = *structured;
      const ChannelScore score = a.importance == Importance::kActivation    ? ChannelScore::kActivation
                                 : a.importance == Importance::kFluctuation ? ChannelScore::kFluctuation
                                                                            : ChannelScore::kMagnitude;
      // ‖WX − ŴX − b‖² / ‖WX‖² over this input, Ŵ being W with the removed rows or columns zero:
      // with H = 2/N XᵀX and mean μ, (N/2)·[tr(ΔW H ΔWᵀ) − 4 bᵀΔWμ + 2‖b‖²] over (N/2)·tr(W H Wᵀ).
      auto removal_error = [&](const Matrix& w, const std::vector<int64_t>& kept, bool kept_rows,
                               Input input, const std::vector<float>& b) {
        const std::vector<double>& hh = in[input].hessian(pool);
        Matrix delta = w;
        std::vector<uint8_t> keep(static_cast<size_t>(kept_rows ? w.rows : w.cols), 0);
        for (int64_t k : kept) keep[static_cast<size_t>(k)] = 1;
        for (int64_t r = 0; r < w.rows; ++r)
          for (int64_t c = 0; c < w.cols; ++c)
            if (keep[static_cast<size_t>(kept_rows ? r : c)]) delta.at(r, c) = 0.0f;
        double num = quad_form_sum(delta.data.data(), w.rows, w.cols, hh);
        if (!b.empty()) {
          const std::vector<double> mu = moments[input].mean();
          for (int64_t r = 0; r < w.rows; ++r) {
            double dmu = 0.0;
            for (int64_t c = 0; c < w.cols; ++c) dmu += static_cast<double>(delta.at(r, c)) * mu[c];
            num += -4.0 * b[r] * dmu + 2.0 * static_cast<double>(b[r]) * b[r];
          }
        }
        const double den = quad_form_sum(w.data.data(), w.rows, w.cols, hh);
        return den > 0 ? std::max(0.0, num) / den : 0.0;
      };
      // Slices a bias to the kept outputs; with compensation, a missing bias becomes zeros (the
      // config's attention_bias / mlp_bias then covers the whole block).
      auto slice_bias = [&](Work& wk, const std::vector<int64_t>& kept_rows) {
        if (!wk.bias.empty()) wk.bias = select(wk.bias, kept_rows);
        if (wk.bias.empty() && a.bias_compensation) wk.bias.assign(kept_rows.size(), 0.0f);
        wk.bias_changed = true;
      };
      auto compensate = [&](Work& wk, const std::vector<float>& b) {
        if (wk.bias.empty()) wk.bias.assign(static_cast<size_t>(wk.w.rows), 0.0f);
        for (size_t r = 0; r < b.size(); ++r) wk.bias[r] += b[r];
        round_all(dt, wk.bias);
        wk.bias_changed = true;
      };
      if (groups_removed > 0) {
        const HeadLayout layout{cfg.num_heads, cfg.num_kv_heads, cfg.head_dim};
        Work &q = work[0], &k = work[1], &v = work[2], &o = work[3];
        std::vector<double> channel = output_channel_scores(
            o.w, score, in[kAttnOut].stats.sq_norms(),
            score == ChannelScore::kFluctuation ? moments[kAttnOut].variance()
                                                : std::vector<double>{});
        if (score == ChannelScore::kMagnitude) {
          const std::vector<double> qr = row_abs_sums(q.w);
          for (size_t i = 0; i < channel.size(); ++i) channel[i] += qr[i];
        }
        std::vector<double> groups = sum_groups(channel, layout.group() * layout.head_dim);
        if (score == ChannelScore::kMagnitude) {
          const std::vector<double> kr = sum_groups(row_abs_sums(k.w), layout.head_dim);
          const std::vector<double> vr = sum_groups(row_abs_sums(v.w), layout.head_dim);
          for (size_t g = 0; g < groups.size(); ++g) groups[g] += kr[g] + vr[g];
        }
        const std::vector<int64_t> kept = keep_highest(groups, cfg.num_kv_heads - groups_removed);
        const std::vector<int64_t> qc = kept_query_channels(layout, kept);
        const std::vector<int64_t> kvc = kept_kv_channels(layout, kept);
        std::vector<float> b;
        if (a.bias_compensation) {
          b = removed_channel_bias(o.w, qc, moments[kAttnOut].mean());
          round_all(dt, b);
        }
        q.structured_error = removal_error(q.w, qc, true, kAttnIn, {});
        k.structured_error = removal_error(k.w, kvc, true, kAttnIn, {});
        v.structured_error = removal_error(v.w, kvc, true, kAttnIn, {});
        o.structured_error = removal_error(o.w, qc, false, kAttnOut, b);
        prune_kv_groups(q.w, k.w, v.w, o.w, layout, kept);
        slice_bias(q, qc);
        slice_bias(k, kvc);
        slice_bias(v, kvc);
        if (a.bias_compensation) compensate(o, b);
        for (Work* wk : {&q, &k, &v, &o}) wk->structured = true;
        lcfg.num_kv_heads = static_cast<int64_t>(kept.size());
        lcfg.num_heads = lcfg.num_kv_heads * layout.group();
        if (a.bias_compensation) lcfg.attention_bias = lcfg.o_bias = true;
        if (channels_removed > 0) gather(lcfg, true);
      }
      if (channels_removed > 0) {
        Work &gate = work[4], &up = work[5], &down = work[6];
        std::vector<double> channel = output_channel_scores(
            down.w, score, in[kMlpHidden].stats.sq_norms(),
            score == ChannelScore::kFluctuation ? moments[kMlpHidden].variance()
                                                : std::vector<double>{});
        if (score == ChannelScore::kMagnitude) {
          const std::vector<double> gr = row_abs_sums(gate.w), ur = row_abs_sums(up.w);
          for (size_t i = 0; i < channel.size(); ++i) channel[i] += gr[i] + ur[i];
        }
        const std::vector<int64_t> kept =
            keep_highest(channel, cfg.intermediate_size - channels_removed);
        std::vector<float> b;
        if (a.bias_compensation) {
          b = removed_channel_bias(down.w, kept, moments[kMlpHidden].mean());
          round_all(dt, b);
        }
        gate.structured_error = removal_error(gate.w, kept, true, kMlpIn, {});
        up.structured_error = removal_error(up.w, kept, true, kMlpIn, {});
        down.structured_error = removal_error(down.w, kept, false, kMlpHidden, b);
        prune_mlp_channels(gate.w, up.w, down.w, kept);
        slice_bias(gate, kept);
        slice_bias(up, kept);
        if (a.bias_compensation) compensate(down, b);
        for (Work* wk : {&gate, &up, &down}) wk->structured = true;
        lcfg.intermediate_size = static_cast<int64_t>(kept.size());
        if (a.bias_compensation) lcfg.mlp_bias = true;
      }
      if (structured_then_more) gather(lcfg, false);
      for (Work& wk : work) wk.original = wk.w;
    }

    // The modifiers, in recipe order.
    auto find_work = [&](const std::string& pattern_target) -> std::vector<Work*> {
      std::vector<Work*> r;
      for (Work& wk : work)
        if (matches({pattern_target}, wk.module)) r.push_back(&wk);
      return r;
    };
    auto smooth = [&](const std::string& smooth_pattern, std::vector<Work*> balance,
                      std::span<const float> s) {
      // Fold 1/s into the producer of the balance layers' input.
      const std::string p = layer_prefix(l);
      if (matches({smooth_pattern}, p + "input_layernorm")) {
        divide_by_scales(attn_norm, s);
        attn_norm_changed = true;
      } else if (matches({smooth_pattern}, p + "post_attention_layernorm")) {
        divide_by_scales(mlp_norm, s);
        mlp_norm_changed = true;
      } else {
        std::vector<Work*> prev = find_work(smooth_pattern);
        SPARSA_CHECK(prev.size() == 1, "{}: smooth layer '{}' matches {} modules in layer {}",
                     recipe.source, smooth_pattern, prev.size(), l);
        SPARSA_CHECK(prev[0]->w.rows == static_cast<int64_t>(s.size()),
                     "{}: smooth layer {} has {} outputs, its balance layers {} inputs",
                     recipe.source, prev[0]->module, prev[0]->w.rows, s.size());
        divide_rows_by_scales(prev[0]->w, s);
        divide_rows_by_scales(prev[0]->original, s);
        prev[0]->changed = true;
      }
      for (Work* wk : balance) {
        Matrix* one[1] = {&wk->original};
        scale_input_channels(one, s);
      }
      in[balance[0]->input].rescale(s, pool);
    };
    // The default smoothing mappings of a Llama block (llm-compressor's / llm-awq's).
    auto resolve_mappings = [&](std::vector<LayerMapping> mappings, bool with_v_o) {
      if (mappings.empty()) {
        mappings.push_back({"re:.*input_layernorm$", {"re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"}});
        if (with_v_o && cfg.num_heads == cfg.num_kv_heads)
          mappings.push_back({"re:.*v_proj$", {"re:.*o_proj$"}});
        mappings.push_back({"re:.*post_attention_layernorm$", {"re:.*gate_proj$", "re:.*up_proj$"}});
        if (with_v_o) mappings.push_back({"re:.*up_proj$", {"re:.*down_proj$"}});
      }
      std::vector<std::pair<std::string, std::vector<Work*>>> out_maps;
      for (const LayerMapping& m : mappings) {
        std::vector<Work*> bal;
        for (const std::string& pat : m.balance_layers)
          for (Work* wk : find_work(pat)) bal.push_back(wk);
        if (bal.empty()) continue;
        for (Work* wk : bal)
          SPARSA_CHECK(wk->input == bal[0]->input,
                       "{}: balance layers {} and {} of one mapping do not share an input",
                       recipe.source, bal[0]->module, wk->module);
        out_maps.emplace_back(m.smooth_layer, std::move(bal));
      }
      return out_maps;
    };
    auto set_quant = [&](Work& wk, QuantResult q, bool w8a8, bool act_order = false) {
      const QuantKey key{q.bits, q.group_size, q.symmetric, act_order, w8a8};
      if (!quant_key) quant_key = key;
      SPARSA_CHECK(*quant_key == key,
                   "{}: {} would be quantized with a different scheme than the layers before "
                   "it; one checkpoint holds one quantization scheme",
                   recipe.source, wk.module);
      wk.quant = std::move(q);
      wk.w8a8 = w8a8;
      wk.changed = true;
      quantized_modules.insert(wk.module);
    };

    for (const Modifier* m : recipe.modifiers()) {
      const ModifierType type = m->type();
      if (type == ModifierType::kStructuredPruning) continue;  // done above
      if (type == ModifierType::kSmoothQuant) {
        const auto& a = std::get<SmoothQuantArgs>(m->args);
        for (auto& [smooth_pat, bal] : resolve_mappings(a.mappings, false)) {
          std::vector<Matrix*> ms;
          for (Work* wk : bal) ms.push_back(&wk->w);
          const std::vector<float> s = smoothquant_scales(
              ms, activation_absmax(in[bal[0]->input].stats),
              static_cast<float>(a.smoothing_strength));
          scale_input_channels(ms, s);
          for (Work* wk : bal) wk->changed = true;
          smooth(smooth_pat, bal, s);
        }
        continue;
      }
      if (type == ModifierType::kAWQ) {
        const auto& a = std::get<AWQArgs>(m->args);
        AwqOptions o;
        o.bits = a.scheme.bits;
        o.group_size = a.scheme.group_size;
        o.symmetric = a.scheme.symmetric;
        o.n_grid = a.n_grid;
        for (auto& [smooth_pat, bal] : resolve_mappings(a.mappings, true)) {
          std::vector<Matrix*> ms;
          for (Work* wk : bal) ms.push_back(&wk->w);
          // llm-awq clips every layer but q_proj and k_proj, whose errors the softmax amplifies.
          AwqOptions oo = o;
          oo.clip = false;
          const AwqResult r = awq_scale_and_clip(ms, in[bal[0]->input].sample, oo);
          for (Work* wk : bal) wk->changed = true;
          smooth(smooth_pat, bal, r.scales);
          if (a.apply_clip)
            for (Work* wk : bal) {
              const std::string& mod = wk->module;
              if (mod.ends_with("q_proj") || mod.ends_with("k_proj")) continue;
              awq_search_clip(wk->w, in[wk->input].sample, o);
            }
        }
        for (Work& wk : work) {
          if (!m->applies_to(wk.module)) continue;
          set_quant(wk, rtn_quantize(wk.w, to_spec(a.scheme, false), wk.keep.empty() ? nullptr : &wk.keep), false);
        }
        continue;
      }
      for (Work& wk : work) {
        if (!m->applies_to(wk.module)) continue;
        const Mask* keep = wk.keep.empty() ? nullptr : &wk.keep;
        InputData& d = in[wk.input];
        switch (type) {
          case ModifierType::kMagnitudePruning: {
            const auto& a = std::get<MagnitudePruningArgs>(m->args);
            wk.keep = magnitude_prune(wk.w, to_pattern(a.sparsity, a.mask_structure));
            wk.structure = a.mask_structure;
            pruned_modules.insert(wk.module);
            break;
          }
          case ModifierType::kWandaPruning: {
            const auto& a = std::get<WandaPruningArgs>(m->args);
            const double s = a.owl ? owl_layer_sparsities(owl_ratios, a.sparsity, a.owl->lambda)[l]
                                   : a.sparsity;
            wk.keep = wanda_prune(wk.w, d.stats.sq_norms(), to_pattern(s, a.mask_structure));
            wk.structure = a.mask_structure;
            pruned_modules.insert(wk.module);
            break;
          }
          case ModifierType::kSparseGPT: {
            const auto& a = std::get<SparseGPTArgs>(m->args);
            const double s = a.owl ? owl_layer_sparsities(owl_ratios, a.sparsity, a.owl->lambda)[l]
                                   : a.sparsity;
            SparseGptOptions o;
            o.block_size = a.block_size;
            o.damp = a.dampening_frac;
            if (a.quantize) o.quant = to_spec(*a.quantize, false);
            QuantResult q;
            wk.keep = sparsegpt_prune(wk.w, d.hessian(pool), to_pattern(s, a.mask_structure), o,
                                      a.quantize ? &q : nullptr, &pool);
            wk.structure = a.mask_structure;
            pruned_modules.insert(wk.module);
            if (a.quantize) set_quant(wk, std::move(q), false);
            break;
          }
          case ModifierType::kQuantization: {
            const auto& a = std::get<QuantizationArgs>(m->args);
            const bool w8a8 = a.scheme.input_activation_bits == 8;
            SPARSA_CHECK(!w8a8 || (a.scheme.bits == 8 && a.scheme.symmetric &&
                                   a.scheme.per_channel()),
                         "{}: modifier '{}': W8A8 needs 8-bit symmetric per-channel weights",
                         recipe.source, m->name());
            set_quant(wk, rtn_quantize(wk.w, to_spec(a.scheme, false), keep), w8a8);
            break;
          }
          case ModifierType::kGPTQ: {
            const auto& a = std::get<GPTQArgs>(m->args);
            GptqOptions o;
            o.block_size = a.block_size;
            o.damp = a.dampening_frac;
            const bool w8a8 = a.scheme.input_activation_bits == 8;
            set_quant(wk,
                      gptq_quantize(wk.w, d.hessian(pool),
                                    to_spec(a.scheme, a.scheme.actorder != ActOrder::kNone), o,
                                    keep, &pool),
                      w8a8, a.scheme.actorder != ActOrder::kNone);
            break;
          }
          case ModifierType::kPalettization: {
            const auto& a = std::get<PalettizationArgs>(m->args);
            SPARSA_CHECK(wk.keep.empty() && !wk.quant,
                         "{}: {}: palettizing a pruned or quantized layer is not supported",
                         recipe.source, wk.module);
            PaletteOptions o;
            o.bits = a.bits;
            o.group_rows = a.granularity == PaletteGranularity::kPerGroupedChannel ? a.group_size : 0;
            std::vector<double> importance;
            if (a.weight == PaletteWeighting::kHessian) {
              const std::vector<double>& hh = d.hessian(pool);
              const int64_t c = wk.w.cols;
              importance.resize(static_cast<size_t>(c));
              for (int64_t j = 0; j < c; ++j) importance[j] = hh[j * c + j];
            }
            Palette p = palettize(wk.w, o, importance);
            // The palette is stored in the model's dtype: round it and re-read the weights.
            round_all(dt, p.lut);
            const int64_t k = int64_t{1} << p.bits;
            const int64_t gr = p.group_rows > 0 ? p.group_rows : wk.w.rows;
            for (int64_t r = 0; r < wk.w.rows; ++r)
              for (int64_t c = 0; c < wk.w.cols; ++c)
                wk.w.at(r, c) = p.lut[(r / gr) * k + p.indices[r * wk.w.cols + c]];
            palette_bits = p.bits;
            palette_group_rows = p.group_rows >= wk.w.rows ? 0 : p.group_rows;
            wk.palette = std::move(p);
            wk.changed = true;
            palettized_modules.insert(wk.module);
            break;
          }
          case ModifierType::kLowRank: {
            const auto& a = std::get<LowRankArgs>(m->args);
            SPARSA_CHECK(wk.keep.empty() && !wk.quant,
                         "{}: {}: factorizing a pruned or quantized layer is not supported",
                         recipe.source, wk.module);
            RankTarget t;
            if (a.rank_fraction > 0)
              t = RankTarget::rank(std::max<int64_t>(
                  1, std::llround(a.rank_fraction *
                                  static_cast<double>(std::min(wk.w.rows, wk.w.cols)))));
            else if (a.param_fraction > 0)
              t = RankTarget::param_fraction(a.param_fraction);
            else
              t = RankTarget::energy(a.energy);
            LowRank lr = a.method == LowRankMethod::kSvdWhitened
                             ? svd_llm_factorize(wk.w, d.hessian(pool), t)
                             : svd_factorize(wk.w, t);
            round_all(dt, lr.u.data);
            round_all(dt, lr.v.data);
            wk.w.data = io::low_rank_product(lr.u.data.data(), lr.v.data.data(), wk.w.rows,
                                             lr.rank, wk.w.cols);
            low_rank_method = a.method == LowRankMethod::kSvdWhitened ? "svd_whitened" : "svd";
            wk.low_rank = std::move(lr);
            wk.changed = true;
            low_rank_modules.insert(wk.module);
            break;
          }
          default:
            break;
        }
        if (!wk.keep.empty()) wk.changed = true;
        sample_rss();
      }
    }

    // Weights stored in the model's float dtype are rounded to it now.
    for (Work& wk : work)
      if (wk.changed && !wk.quant && !wk.palette && !wk.low_rank) round_all(dt, wk.w.data);
    if (attn_norm_changed) round_all(dt, attn_norm);
    if (mlp_norm_changed) round_all(dt, mlp_norm);

    // Reconstruction errors ‖WX − ŴX‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ).
    std::vector<double> rel_error(7, 0.0);
    for (int i = 0; i < 7; ++i) {
      Work& wk = work[i];
      if (!wk.changed) {
        rel_error[i] = wk.structured_error;  // the later passes' error otherwise
        continue;
      }
      const std::vector<double>& hh = in[wk.input].hessian(pool);
      std::vector<float> delta(wk.w.data.size());
      for (size_t j = 0; j < delta.size(); ++j) delta[j] = wk.original.data[j] - wk.w.data[j];
      const double num = quad_form_sum(delta.data(), wk.w.rows, wk.w.cols, hh);
      const double den = quad_form_sum(wk.original.data.data(), wk.w.rows, wk.w.cols, hh);
      rel_error[i] = den > 0 ? num / den : 0.0;
    }
    sample_rss();
    for (InputData& d : in) d = InputData{};
    for (Work& wk : work) wk.original = Matrix{};

    // Pass 2: the compressed layer's outputs feed the next layer.
    {
      const model::Block b = make_block(work, attn_norm, mlp_norm);
      for (int64_t wi = 0; wi < windows; ++wi) {
        model::block_forward(lcfg, b, l, inv_freq, x.data() + wi * seq_len * h, seq_len, 0,
                             kc.data(), vc.data(), ws, {}, pool);
        prog.advance(1);
      }
    }

    // Write the layer.
    Shard shard;
    const std::string p = layer_prefix(l);
    for (int i = 0; i < 7; ++i) {
      Work& wk = work[i];
      const int64_t rows = wk.w.rows, cols = wk.w.cols;
      const std::string& mod = wk.module;
      LinearReport lr;
      lr.name = mod;
      lr.rows = rows;
      lr.cols = cols;
      if (wk.quant && wk.w8a8) {
        const QuantResult& q = *wk.quant;
        std::vector<int8_t> qi(q.codes.size());
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c)
            qi[r * cols + c] = static_cast<int8_t>(q.codes[r * cols + c] - q.zeros[r]);
        shard.add_array(mod + ".weight", DType::I8, {rows, cols}, qi);
        shard.add_array(mod + ".weight_scale", DType::F32, {rows, 1}, q.scales);
        lr.format = "int-quantized";
      } else if (wk.quant) {
        const QuantResult& q = *wk.quant;
        const int64_t ng = q.n_groups();
        shard.add_array(mod + ".weight_packed", DType::I32, {rows, io::packed_words(cols, q.bits)},
                        io::pack_quantized(q.codes, rows, cols, q.bits));
        shard.add_array(mod + ".weight_scale", DType::F32, {rows, ng}, q.scales);
        if (!q.symmetric) {
          std::vector<uint8_t> z(q.zeros.size());
          for (size_t j = 0; j < z.size(); ++j) z[j] = static_cast<uint8_t>(q.zeros[j]);
          shard.add_array(mod + ".weight_zero_point", DType::I32,
                          {io::packed_words(rows, q.bits), ng},
                          io::pack_zero_points(z, rows, ng, q.bits));
        }
        if (quant_key->act_order)
          shard.add_array(mod + ".weight_g_idx", DType::I32, {cols}, q.g_idx);
        shard.add_array(mod + ".weight_shape", DType::I64, {2}, std::vector<int64_t>{rows, cols});
        lr.format = "pack-quantized";
      } else if (wk.palette) {
        const Palette& pal = *wk.palette;
        const int64_t k = int64_t{1} << pal.bits;
        const int64_t n_pal = static_cast<int64_t>(pal.lut.size()) / k;
        shard.add(mod + ".weight_palette", dt, {n_pal, k}, encode(pal.lut.data(), pal.lut.size(), dt));
        shard.add_array(mod + ".weight_indices_packed", DType::I32,
                        {rows, io::packed_words(cols, pal.bits)},
                        io::pack_quantized(pal.indices, rows, cols, pal.bits));
        shard.add_array(mod + ".weight_shape", DType::I64, {2}, std::vector<int64_t>{rows, cols});
        lr.format = "sparsa-palettized";
      } else if (wk.low_rank) {
        const LowRank& f = *wk.low_rank;
        shard.add(mod + ".weight_u", dt, {rows, f.rank}, encode(f.u.data.data(), f.u.data.size(), dt));
        shard.add(mod + ".weight_v", dt, {f.rank, cols}, encode(f.v.data.data(), f.v.data.size(), dt));
        lr.format = "sparsa-low-rank";
      } else if (!wk.keep.empty()) {
        const std::vector<uint8_t> dense = encode(wk.w.data.data(), wk.w.data.size(), dt);
        if (use_24) {
          io::Sparse24Bitmask s = io::sparse_24_bitmask_compress(dense.data(), rows, cols, dt);
          shard.add(mod + ".compressed", dt, {rows, cols / 2}, std::move(s.compressed));
          shard.add(mod + ".bitmask", DType::U8, {rows, io::bitmask_row_bytes(cols)}, std::move(s.bitmask));
          shard.add_array(mod + ".shape", DType::I64, {2, 1}, std::vector<int64_t>{rows, cols});
          lr.format = "sparse-24-bitmask";
        } else {
          io::SparseBitmask s = io::sparse_bitmask_compress(dense.data(), rows, cols, dt);
          shard.add(mod + ".compressed", dt, {s.nnz}, std::move(s.compressed));
          shard.add(mod + ".bitmask", DType::U8, {rows, io::bitmask_row_bytes(cols)}, std::move(s.bitmask));
          shard.add_array(mod + ".row_offsets", DType::I64, {rows}, s.row_offsets);
          shard.add_array(mod + ".shape", DType::I64, {2}, std::vector<int64_t>{rows, cols});
          lr.format = "sparse-bitmask";
        }
      } else if (wk.changed || wk.structured) {
        shard.add(mod + ".weight", dt, {rows, cols}, encode(wk.w.data.data(), wk.w.data.size(), dt));
        lr.format = "dense";
      } else {
        shard.add_view(*wk.source);
        lr.format = "dense";
      }
      if (wk.bias_changed && !wk.bias.empty()) {
        shard.add(mod + ".bias", dt, {static_cast<int64_t>(wk.bias.size())},
                  encode(wk.bias.data(), wk.bias.size(), dt));
      } else if (!wk.bias.empty()) {
        shard.add_view(ck.get(mod + ".bias"));
      }
      // Against the dense shape: structurally removed weights count as pruned.
      const int64_t dense = wk.dense_rows * wk.dense_cols;
      int64_t zeros = dense - rows * cols;
      for (float v : wk.w.data) zeros += v == 0.0f;
      lr.rows = wk.dense_rows;
      lr.cols = wk.dense_cols;
      lr.sparsity = static_cast<double>(zeros) / static_cast<double>(dense);
      lr.bytes = shard.bytes_of(mod);
      lr.bits_per_weight = static_cast<double>(lr.bytes) * 8.0 / static_cast<double>(dense);
      lr.relative_error = rel_error[i];
      zeros_total += static_cast<double>(zeros);
      weights_total += static_cast<double>(dense);
      bytes_total += static_cast<double>(lr.bytes);
      report.linears.push_back(std::move(lr));
    }
    auto add_norm = [&](const std::string& name, const std::vector<float>& v, bool changed) {
      if (changed) {
        shard.add(name, dt, {h}, encode(v.data(), v.size(), dt));
      } else {
        shard.add_view(ck.get(name));
      }
    };
    add_norm(p + "input_layernorm.weight", attn_norm, attn_norm_changed);
    add_norm(p + "post_attention_layernorm.weight", mlp_norm, mlp_norm_changed);
    const std::string file = shard_name(l, n_shards);
    sample_rss();
    shard.write(out.path(file), weight_map, file);
    report.layer_seconds.push_back(std::chrono::duration<double>(Clock::now() - t_layer).count());
    prog.advance(1, fmt::format("layer {} done", l));
  }
  prog.finish();

  // Embeddings, final norm and lm_head as they were.
  {
    Shard shard;
    for (const std::string& name : ck.names())
      if (name.rfind("model.layers.", 0) != 0) shard.add_view(ck.get(name));
    const std::string file = shard_name(cfg.num_layers, n_shards);
    shard.write(out.path(file), weight_map, file);
  }

  if (opt.keep_probe_logits) {
    // The compressed model's logits on the first window, as Model::forward computes them.
    const std::vector<float> final_norm = to_f32(ck.get("model.norm.weight"));
    std::vector<float> xn(static_cast<size_t>(seq_len * h));
    model::rms_norm(x.data(), final_norm.data(), static_cast<float>(cfg.rms_norm_eps), seq_len, h,
                    xn.data());
    const io::TensorView* head = ck.find("lm_head.weight");
    if (cfg.tie_word_embeddings && head == nullptr) head = &embed;
    SPARSA_CHECK(head != nullptr, "{}: no lm_head.weight", opt.model_dir);
    report.probe_logits.resize(static_cast<size_t>(seq_len * cfg.vocab_size));
    kernels::linear(kernels::DenseWeight{head->dtype, cfg.vocab_size, h, head->data}, xn.data(), h,
                    seq_len, report.probe_logits.data(), cfg.vocab_size, pool);
  }

  // config.json with the compression blocks, the index, the recipe, the tokenizer files.
  io::CompressionConfig cc;
  auto others = [&](const std::set<std::string>& chosen) {
    std::vector<std::string> ignore = {"lm_head"};
    for (const LinearReport& lr : report.linears)
      if (!chosen.count(lr.name)) ignore.push_back(lr.name);
    return ignore;
  };
  if (quant_key) {
    io::QuantizationConfig q;
    q.bits = quant_key->bits;
    q.group_size = quant_key->group_size;
    q.symmetric = quant_key->symmetric;
    q.actorder = quant_key->act_order ? io::ActOrder::kGroup : io::ActOrder::kNone;
    q.input_activation_bits = quant_key->w8a8 ? 8 : 0;
    q.ignore = others(quantized_modules);
    cc.quantization = q;
  }
  if (!pruned_modules.empty()) {
    io::SparsityConfig s;
    s.format = quant_key ? "dense" : (use_24 ? "sparse-24-bitmask" : "sparse-bitmask");
    s.structure = use_24 ? "2:4" : "unstructured";
    s.global_sparsity = weights_total > 0 ? zeros_total / weights_total : 0.0;
    s.ignore = others(pruned_modules);
    cc.sparsity = s;
  }
  if (!palettized_modules.empty() || !low_rank_modules.empty()) {
    io::SparsaConfig s;
    std::set<std::string> both = palettized_modules;
    both.insert(low_rank_modules.begin(), low_rank_modules.end());
    if (!palettized_modules.empty()) {
      io::SparsaGroup g;
      g.format = io::SparsaFormat::kPalettized;
      g.targets.assign(palettized_modules.begin(), palettized_modules.end());
      g.bits = palette_bits;
      g.palette_group_rows = palette_group_rows;
      s.groups.push_back(g);
    }
    if (!low_rank_modules.empty()) {
      io::SparsaGroup g;
      g.format = io::SparsaFormat::kLowRank;
      g.targets.assign(low_rank_modules.begin(), low_rank_modules.end());
      g.method = low_rank_method;
      s.groups.push_back(g);
    }
    s.ignore = others(both);
    cc.sparsa = s;
  }
  io::write_compression_config(cc, config_json);
  if (structured != nullptr) {
    // The pruned model is a plain dense one of smaller shape; head_dim no longer follows from
    // hidden_size / num_attention_heads, so it is written out.
    config_json["num_attention_heads"] = cfg.num_heads / cfg.num_kv_heads * (cfg.num_kv_heads - groups_removed);
    config_json["num_key_value_heads"] = cfg.num_kv_heads - groups_removed;
    config_json["intermediate_size"] = cfg.intermediate_size - channels_removed;
    config_json["head_dim"] = cfg.head_dim;
    if (structured->bias_compensation && groups_removed > 0) config_json["attention_bias"] = true;
    if (structured->bias_compensation && channels_removed > 0) config_json["mlp_bias"] = true;
  }
  const std::string config_text = config_json.dump(2) + "\n";
  write_file_atomic(out.path("config.json"), config_text.data(), config_text.size());

  nlohmann::json index;
  size_t total_size = 0;
  std::set<std::string> files;
  for (const auto& [name, file] : weight_map) files.insert(file);
  for (const std::string& f : files) total_size += fs::file_size(out.path(f));
  index["metadata"] = {{"total_size", total_size}};
  index["weight_map"] = weight_map;
  const std::string index_text = index.dump(2) + "\n";
  write_file_atomic(out.path("model.safetensors.index.json"), index_text.data(), index_text.size());

  const std::string recipe_text = recipe.to_yaml();
  write_file_atomic(out.path("recipe.yaml"), recipe_text.data(), recipe_text.size());
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "generation_config.json", "chat_template.jinja"}) {
    const std::string src = opt.model_dir + "/" + name;
    if (!fs::exists(src)) continue;
    const std::string text = read_text_file(src);
    write_file_atomic(out.path(name), text.data(), text.size());
  }
  out.commit();

  for (const auto& entry : fs::directory_iterator(opt.output_dir))
    if (entry.is_regular_file()) report.output_bytes += entry.file_size();
  report.total_sparsity = weights_total > 0 ? zeros_total / weights_total : 0.0;
  report.total_bits_per_weight = weights_total > 0 ? bytes_total * 8.0 / weights_total : 0.0;
  report.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  sample_rss();
  return report;
}

}  // namespace sparsa::compress
