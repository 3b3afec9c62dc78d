#include "sparsa/runtime/bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "sparsa/compress/palettize.h"
#include "sparsa/compress/prune.h"
#include "sparsa/compress/quantize.h"
#include "sparsa/core/cpu.h"
#include "sparsa/core/error.h"
#include "sparsa/formats/packed_weight.h"
#include "sparsa/kernels/linear.h"
#include "sparsa/runtime/sampler.h"

namespace sparsa {

namespace {
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
}  // namespace

namespace {

// One model's measurements, step by step: prefill() any number of times (each from an empty
// cache), then decode(n) any number of times, every decode step followed by one bandwidth probe;
// result() summarizes. run_bench runs one session straight through; run_format_bench interleaves
// the sessions of several formats, so that each format sees the same moments of a shared machine.
class BenchSession {
 public:
  BenchSession(model::Model& model, ThreadPool& pool, kernels::BandwidthProbe& probe,
               const BenchOptions& opt)
      : model_(model),
        pool_(pool),
        probe_(probe),
        opt_(opt),
        cache_(model.config(), opt.prompt_tokens + opt.decode_tokens, opt.kv_cache),
        logits_(static_cast<size_t>(model.config().vocab_size)) {
    const io::ModelConfig& cfg = model.config();
    SPARSA_CHECK(opt.prompt_tokens >= 1 && opt.decode_tokens >= 1,
                 "bench needs at least one prompt token and one decode token");
    SPARSA_CHECK(opt.prompt_tokens + opt.decode_tokens <= cfg.max_context(),
                 "bench: {} prompt + {} decode tokens exceed the model's context of {}",
                 opt.prompt_tokens, opt.decode_tokens, cfg.max_context());
    Rng rng(opt.seed);
    prompt_.resize(static_cast<size_t>(opt.prompt_tokens));
    for (auto& t : prompt_)
      t = static_cast<int32_t>(rng.next() % static_cast<uint64_t>(cfg.vocab_size));
  }

  void prefill() {
    cache_.clear();
    const auto t0 = Clock::now();
    model_.forward(prompt_, cache_, logits_.data(), false, pool_);
    prefill_times_.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    next_ = argmax(logits_.data(), model_.config().vocab_size);
    decoded_ = 0;
    step_times_.clear();
    bw_samples_.clear();
  }

  // Up to `steps` more decode steps (never past opt.decode_tokens since the last prefill).
  void decode(int64_t steps) {
    for (int64_t i = 0; i < steps && decoded_ < opt_.decode_tokens; ++i, ++decoded_) {
      const int32_t one[1] = {next_};
      const auto t0 = Clock::now();
      model_.forward(one, cache_, logits_.data(), false, pool_);
      step_times_.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      next_ = argmax(logits_.data(), model_.config().vocab_size);
      bw_samples_.push_back(probe_.sample());
    }
  }

  BenchResult result() const {
    SPARSA_CHECK(!prefill_times_.empty() && !step_times_.empty(),
                 "bench: a session was summarized before it ran");
    const io::ModelConfig& cfg = model_.config();
    BenchResult r;
    r.threads = pool_.size();
    r.isa = std::string(isa_name(active_isa()));
    r.prompt_tokens = opt_.prompt_tokens;
    r.decode_tokens = static_cast<int64_t>(step_times_.size());
    r.weight_bytes_per_token = model_.weight_bytes_per_token();
    const double bw = median(bw_samples_);
    r.bandwidth_best_gb_per_s = *std::max_element(bw_samples_.begin(), bw_samples_.end()) / 1e9;
    const double prefill_s = median(prefill_times_);
    const double step_s = median(step_times_);
    r.prefill_tokens_per_s = static_cast<double>(opt_.prompt_tokens) / prefill_s;
    r.decode_tokens_per_s = 1.0 / step_s;
    r.bandwidth_gb_per_s = bw / 1e9;
    // Step i (0-based) attends over prompt_tokens + i + 1 positions of keys and values per layer.
    const double kv_row_bytes =
        static_cast<double>(model::KvCache::bytes_per_token(cfg, opt_.kv_cache));
    const double mean_positions = static_cast<double>(opt_.prompt_tokens) +
                                  0.5 * static_cast<double>(r.decode_tokens + 1);
    r.kv_bytes_per_token = static_cast<size_t>(kv_row_bytes * mean_positions);
    r.decode_bound_tokens_per_s =
        bw / static_cast<double>(r.weight_bytes_per_token + r.kv_bytes_per_token);
    r.decode_fraction_of_bound = r.decode_tokens_per_s / r.decode_bound_tokens_per_s;
    int64_t linear_params = cfg.vocab_size * cfg.hidden_size;
    for (const auto& b : model_.blocks())
      for (const auto* l : {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down})
        linear_params += l->rows() * l->cols();
    // lm_head runs for the last prompt token only.
    const double flops =
        2.0 * static_cast<double>(linear_params - cfg.vocab_size * cfg.hidden_size) *
            static_cast<double>(opt_.prompt_tokens) +
        2.0 * static_cast<double>(cfg.vocab_size * cfg.hidden_size);
    r.prefill_gflop_per_s = flops / prefill_s / 1e9;
    return r;
  }

 private:
  using Clock = std::chrono::steady_clock;
  model::Model& model_;
  ThreadPool& pool_;
  kernels::BandwidthProbe& probe_;
  const BenchOptions& opt_;
  model::KvCache cache_;
  std::vector<float> logits_;
  std::vector<int32_t> prompt_;
  int32_t next_ = 0;
  int64_t decoded_ = 0;
  std::vector<double> prefill_times_, step_times_, bw_samples_;
};

// The prefill repetitions, then the decode steps in `rounds` rounds; each repetition and each
// round visits every session in turn.
void measure(const std::vector<BenchSession*>& sessions, const BenchOptions& opt, int rounds) {
  for (int rep = 0; rep < std::max(1, opt.repetitions); ++rep)
    for (BenchSession* s : sessions) s->prefill();
  const int64_t per_round = (opt.decode_tokens + rounds - 1) / rounds;
  for (int round = 0; round < rounds; ++round)
    for (BenchSession* s : sessions) s->decode(per_round);
}

}  // namespace

BenchResult run_bench(model::Model& model, ThreadPool& pool, const BenchOptions& opt) {
  kernels::BandwidthProbe probe(pool, opt.bandwidth_bytes);
  probe.sample();  // warms the probe's pages and the pool
  BenchSession s(model, pool, probe, opt);
  measure({&s}, opt, 1);
  return s.result();
}

}  // namespace sparsa

// ---- formats compared on random weights
// ----------------------------------------------------------

namespace sparsa {

namespace {

bool take_prefix(std::string_view& s, std::string_view p) {
  if (s.substr(0, p.size()) != p) return false;
  s.remove_prefix(p.size());
  return true;
}

bool take_int(std::string_view& s, int64_t& v) {
  size_t i = 0;
  v = 0;
  while (i < s.size() && i < 9 && s[i] >= '0' && s[i] <= '9') v = v * 10 + (s[i++] - '0');
  if (i == 0) return false;
  s.remove_prefix(i);
  return true;
}

// Normal(0, stddev) values rounded to bf16: Irwin–Hall (4 uniforms), as write_random_checkpoint.
void fill_random_bf16(float* out, int64_t n, uint64_t seed, double stddev) {
  Rng rng(seed);
  const double k = std::sqrt(3.0) * stddev / 65536.0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t r = rng.next();
    const double sum =
        static_cast<double>((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48));
    out[i] = bf16_to_f32(f32_to_bf16(static_cast<float>((sum - 2.0 * 65536.0) * k)));
  }
}

uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (a * 16 + b + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::shared_ptr<const formats::PackedWeight> share(formats::PackedWeight w) {
  return std::make_shared<const formats::PackedWeight>(std::move(w));
}

// Float weights in the panel layout, as Model::load runs a checkpoint's.
formats::PackedWeight pack_float(const compress::Matrix& w, DType dtype) {
  if (dtype == DType::F32)
    return formats::pack_dense(DType::F32, w.rows, w.cols, w.data.data(), true, true);
  std::vector<uint16_t> h(w.data.size());
  for (size_t i = 0; i < h.size(); ++i)
    h[i] = dtype == DType::BF16 ? f32_to_bf16(w.data[i]) : f32_to_f16(w.data[i]);
  return formats::pack_dense(dtype, w.rows, w.cols, h.data(), true, true);
}

// One random [rows, cols] weight in format f: pruned by magnitude, then quantized (RTN) or
// palettized, then packed.
formats::PackedWeight random_weight(const BenchFormat& f, int64_t rows, int64_t cols,
                                    uint64_t seed) {
  compress::Matrix w(rows, cols);
  fill_random_bf16(w.data.data(), rows * cols, seed, 0.02);
  compress::Mask keep;
  if (f.sparsity > 0) {
    keep = compress::magnitude_prune(w, {.sparsity = f.sparsity});
  } else if (f.nm_m > 0) {
    keep = compress::magnitude_prune(w, {.n = f.nm_m - f.nm_keep, .m = f.nm_m});
  }
  const compress::Mask* kp = keep.empty() ? nullptr : &keep;
  switch (f.values) {
    case BenchFormat::Values::kDense:
      if (kp != nullptr) return formats::pack_sparse(w, keep, formats::ValueFormat{});
      return pack_float(w, f.dtype);
    case BenchFormat::Values::kInt: {
      const compress::QuantResult q = compress::rtn_quantize(
          w, {.bits = f.bits, .symmetric = false, .group_size = f.group_size}, kp);
      return formats::pack_quantized(q, kp);
    }
    case BenchFormat::Values::kPalette: {
      const compress::Palette p = compress::palettize(w, {.bits = f.bits, .group_rows = 0});
      return formats::pack_palette(p, cols, kp);
    }
  }
  fail("bench: format '{}' has no values", f.name);
}

}  // namespace

BenchFormat parse_bench_format(const std::string& name) {
  auto bad = [&](const std::string& why) {
    fail(
        "bench: unknown format '{}': {}. Formats: bf16, f16, f32, int<b>g<G>, int<b> (per "
        "channel), palette<b> (b in 2..8), sparse<P>-<values>, <n>of<m>-<values> with values "
        "bf16, int<b>[g<G>] or palette<b> (e.g. int4g128, sparse50-int4g128, 2of4-bf16, "
        "palette3)",
        name, why);
  };
  BenchFormat f;
  f.name = name;
  std::string_view s = name;
  int64_t v = 0;
  bool sparse = false;
  if (take_prefix(s, "sparse")) {
    if (!take_int(s, v) || !take_prefix(s, "-")) bad("expected sparse<percent>-<values>");
    if (v < 1 || v > 99) bad("the sparsity must be 1..99 percent");
    f.sparsity = static_cast<double>(v) / 100.0;
    sparse = true;
  } else if (!s.empty() && s[0] >= '0' && s[0] <= '9') {
    int64_t m = 0;
    if (!take_int(s, v) || !take_prefix(s, "of") || !take_int(s, m) || !take_prefix(s, "-"))
      bad("expected <n>of<m>-<values>");
    if (v < 1 || v >= m || m > 64) bad("N:M needs 0 < n < m <= 64");
    f.nm_keep = static_cast<int>(v);
    f.nm_m = static_cast<int>(m);
    sparse = true;
  }
  if (s == "bf16" || s == "f16" || s == "f32") {
    f.values = BenchFormat::Values::kDense;
    f.dtype = s == "bf16" ? DType::BF16 : (s == "f16" ? DType::F16 : DType::F32);
    if (sparse && f.dtype != DType::BF16) bad("sparse float weights are stored as bf16");
  } else if (take_prefix(s, "int")) {
    if (!take_int(s, v) || v < 2 || v > 8) bad("int<b> needs b in 2..8");
    f.values = BenchFormat::Values::kInt;
    f.bits = static_cast<int>(v);
    if (take_prefix(s, "g") && (!take_int(s, f.group_size) || f.group_size < 1))
      bad("int<b>g<G> needs a positive group size");
    if (!s.empty()) bad("unexpected '" + std::string(s) + "'");
  } else if (take_prefix(s, "palette")) {
    if (!take_int(s, v) || v < 2 || v > 8) bad("palette<b> needs b in 2..8");
    if (!s.empty()) bad("unexpected '" + std::string(s) + "'");
    f.values = BenchFormat::Values::kPalette;
    f.bits = static_cast<int>(v);
  } else {
    bad("expected bf16, f16, f32, int<b>..., or palette<b>");
  }
  return f;
}

std::unique_ptr<model::Model> build_random_model(const io::ModelConfig& c, const BenchFormat& f,
                                                 uint64_t seed, ThreadPool& pool) {
  const int64_t h = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  const int64_t ffn = c.intermediate_size;
  if (f.group_size > 0)
    for (int64_t cols : {h, q, ffn})
      SPARSA_CHECK(cols % f.group_size == 0,
                   "bench: format '{}': group size {} does not divide {} input columns", f.name,
                   f.group_size, cols);
  if (f.nm_m > 0)
    for (int64_t cols : {h, q, ffn})
      SPARSA_CHECK(cols % f.nm_m == 0, "bench: format '{}': {} does not divide {} input columns",
                   f.name, f.nm_m, cols);
  struct Slot {
    int64_t rows, cols;
    bool bias;
  };
  const Slot slots[7] = {{q, h, c.attention_bias},  {kv, h, c.attention_bias},
                         {kv, h, c.attention_bias}, {h, q, c.o_bias},
                         {ffn, h, c.mlp_bias},      {ffn, h, c.mlp_bias},
                         {h, ffn, c.mlp_bias}};
  std::vector<model::Block> blocks(static_cast<size_t>(c.num_layers));
  model::Linear lm_head;
  lm_head.name = "lm_head";
  auto linear_of = [&](int64_t task) -> model::Linear& {
    if (task == c.num_layers * 7) return lm_head;
    model::Block& b = blocks[static_cast<size_t>(task / 7)];
    model::Linear* ls[7] = {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down};
    return *ls[task % 7];
  };
  // Largest matrices first (lm_head, then each layer's), claimed dynamically by the threads.
  pool.run(c.num_layers * 7 + 1, [&](int64_t i) {
    const int64_t task = i == 0 ? c.num_layers * 7 : i - 1;
    model::Linear& l = linear_of(task);
    const uint64_t s =
        mix_seed(seed, static_cast<uint64_t>(task / 7), static_cast<uint64_t>(task % 7));
    if (task == c.num_layers * 7) {
      compress::Matrix w(c.vocab_size, h);
      fill_random_bf16(w.data.data(), c.vocab_size * h, s, 0.02);
      if (f.values == BenchFormat::Values::kDense && f.sparsity == 0 && f.nm_m == 0) {
        l.packed = share(pack_float(w, f.dtype));
      } else {
        const compress::QuantResult qr =
            compress::rtn_quantize(w, {.bits = 8, .symmetric = true, .group_size = 0});
        l.packed = share(formats::pack_quantized(qr));
      }
      return;
    }
    const Slot& sl = slots[task % 7];
    l.name = "model.layers." + std::to_string(task / 7) + "." + std::to_string(task % 7);
    l.format = f.name;
    l.packed = share(random_weight(f, sl.rows, sl.cols, s));
    if (sl.bias) l.bias.assign(static_cast<size_t>(sl.rows), 0.0f);
  });
  for (model::Block& b : blocks) {
    b.attn_norm.assign(static_cast<size_t>(h), 1.0f);
    b.mlp_norm.assign(static_cast<size_t>(h), 1.0f);
  }
  auto embed = std::make_shared<std::vector<uint16_t>>(static_cast<size_t>(c.vocab_size * h));
  {
    std::vector<float> row(static_cast<size_t>(h));
    for (int64_t r = 0; r < c.vocab_size; ++r) {
      fill_random_bf16(row.data(), h, mix_seed(seed, 1u << 20, static_cast<uint64_t>(r)), 0.02);
      for (int64_t j = 0; j < h; ++j)
        (*embed)[static_cast<size_t>(r * h + j)] = f32_to_bf16(row[static_cast<size_t>(j)]);
    }
  }
  io::TensorView ev;
  ev.name = "model.embed_tokens.weight";
  ev.dtype = DType::BF16;
  ev.shape = {c.vocab_size, h};
  ev.data = reinterpret_cast<const uint8_t*>(embed->data());
  ev.nbytes = embed->size() * sizeof(uint16_t);
  ev.file = "(random)";
  return model::Model::from_parts(c, std::move(ev), std::move(blocks),
                                  std::vector<float>(static_cast<size_t>(h), 1.0f),
                                  std::move(lm_head), std::move(embed));
}

namespace {

// Bytes a format's model takes in memory, roughly (for deciding whether all fit at once).
double approx_model_bytes(const io::ModelConfig& c, const BenchFormat& f) {
  const double h = static_cast<double>(c.hidden_size);
  const double q = static_cast<double>(c.num_heads * c.head_dim);
  const double kv = static_cast<double>(c.num_kv_heads * c.head_dim);
  const double linear = static_cast<double>(c.num_layers) *
                        (2.0 * q * h + 2.0 * kv * h + 3.0 * static_cast<double>(c.intermediate_size) * h);
  const double vocab = static_cast<double>(c.vocab_size) * h;
  const double kept = f.nm_m > 0 ? static_cast<double>(f.nm_keep) / f.nm_m : 1.0 - f.sparsity;
  const bool sparse = kept < 1.0;
  double bits = 0;
  switch (f.values) {
    case BenchFormat::Values::kDense: bits = 8.0 * static_cast<double>(dtype_size(f.dtype)); break;
    case BenchFormat::Values::kInt:
      // + an f16 scale and a u8 zero point per group
      bits = f.bits + (f.group_size > 0 ? 24.0 / static_cast<double>(f.group_size) : 0.0);
      break;
    case BenchFormat::Values::kPalette: bits = f.bits; break;
  }
  const double weight_bits = bits * kept + (sparse ? 1.0 : 0.0);
  const bool dense = f.values == BenchFormat::Values::kDense && !sparse;
  const double lm_head = dense ? vocab * static_cast<double>(dtype_size(f.dtype)) : vocab;
  return linear * weight_bits / 8.0 + lm_head + 2.0 * vocab;  // + the bf16 embedding
}

// MemAvailable of /proc/meminfo in bytes; 0 when unknown.
double available_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  double kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024.0;
  return 0;
}

}  // namespace

std::vector<FormatBenchResult> run_format_bench(
    const io::ModelConfig& config, const std::vector<std::string>& names, ThreadPool& pool,
    const BenchOptions& options, const std::function<void(const FormatBenchResult&)>& on_result) {
  using Clock = std::chrono::steady_clock;
  SPARSA_CHECK(!names.empty(), "bench: no formats given");
  SPARSA_CHECK(options.rounds >= 1, "bench: --rounds must be at least 1, got {}", options.rounds);
  std::vector<BenchFormat> fmts;
  for (const std::string& n : names) fmts.push_back(parse_bench_format(n));
  std::vector<FormatBenchResult> results(fmts.size());
  kernels::BandwidthProbe probe(pool, options.bandwidth_bytes);
  probe.sample();  // warms the probe's pages and the pool

  const auto build = [&](size_t i) {
    FormatBenchResult& r = results[i];
    r.format = fmts[i].name;
    const auto t0 = Clock::now();
    std::unique_ptr<model::Model> m = build_random_model(config, fmts[i], options.seed, pool);
    r.build_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    r.layout = m->blocks().at(0).gate.describe();
    return m;
  };
  // Interleaved when every model fits in memory at once (with room to spare): prefill
  // repetitions and decode rounds visit the formats in turn, so that a drift of the shared
  // machine's bandwidth or clock between formats shows in every format alike. Otherwise each
  // format is built, measured and freed on its own.
  double need = 0;
  for (const BenchFormat& f : fmts) need += approx_model_bytes(config, f);
  const double avail = available_memory_bytes();
  const bool together = fmts.size() > 1 && options.rounds > 1 && (avail == 0 || need < 0.6 * avail);
  // Formats [i0, i1) built, measured together in `rounds` rounds, and freed.
  const auto run = [&](size_t i0, size_t i1, int rounds) {
    std::vector<std::unique_ptr<model::Model>> models;
    std::vector<std::unique_ptr<BenchSession>> sessions;
    std::vector<BenchSession*> ptrs;
    for (size_t i = i0; i < i1; ++i) {
      models.push_back(build(i));
      sessions.push_back(std::make_unique<BenchSession>(*models.back(), pool, probe, options));
      ptrs.push_back(sessions.back().get());
    }
    measure(ptrs, options, rounds);
    for (size_t i = i0; i < i1; ++i) {
      results[i].bench = sessions[i - i0]->result();
      results[i].decode_rounds = rounds;
      if (on_result) on_result(results[i]);
    }
  };
  if (together) {
    run(0, fmts.size(), options.rounds);
  } else {
    for (size_t i = 0; i < fmts.size(); ++i) run(i, i + 1, 1);
  }
  const auto find = [&](const char* name) -> const FormatBenchResult* {
    for (const FormatBenchResult& r : results)
      if (r.format == name) return &r;
    return nullptr;
  };
  const FormatBenchResult* int4 = find("int4g128");
  const FormatBenchResult* bf16 = find("bf16");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (FormatBenchResult& r : results) {
    r.decode_speedup_vs_int4g128 =
        int4 ? r.bench.decode_tokens_per_s / int4->bench.decode_tokens_per_s : nan;
    r.prefill_fraction_of_bf16 =
        bf16 ? r.bench.prefill_tokens_per_s / bf16->bench.prefill_tokens_per_s : nan;
  }
  return results;
}

}  // namespace sparsa
