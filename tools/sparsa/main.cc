// sparsa: command-line front end. Thin: every command calls the library and formats its result.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "sparsa/compress/pipeline.h"
#include "sparsa/core/cpu.h"
#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/core/progress.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/io/text_data.h"
#include "sparsa/model/llama.h"
#include "sparsa/model/random_checkpoint.h"
#include "sparsa/runtime/bench.h"
#include "sparsa/runtime/generator.h"
#include "sparsa/runtime/perplexity.h"
#include "sparsa/runtime/tokenizer.h"

#ifdef SPARSA_HAVE_SERVER
void add_serve_command(CLI::App& app);  // tools/sparsa/serve.cc
#endif
void add_finetune_command(CLI::App& app);  // tools/sparsa/finetune.cc

// --no-mmap's help, on generate, eval, bench and serve (tools/sparsa/serve.cc).
extern const char* const kNoMmapHelp;
const char* const kNoMmapHelp =
    "read the weight files into huge-page memory instead of mapping them (adds the files' size "
    "in RAM: the weights run from copies converted at load either way)";

// --kv-cache's help and its parser, on generate, eval, bench and serve.
extern const char* const kKvCacheHelp;
const char* const kKvCacheHelp =
    "element type of the KV cache: f32 (exact), bf16 (half the memory and half of attention's "
    "reads; keys and values rounded to bf16) or int8 (about a quarter: each token's keys and "
    "values quantized per kv head, symmetric int8 with one f32 scale)";
sparsa::DType parse_kv_cache(const std::string& name) {
  if (name == "f32") return sparsa::DType::F32;
  if (name == "bf16") return sparsa::DType::BF16;
  if (name == "int8") return sparsa::DType::I8;
  throw sparsa::Error("--kv-cache: expected f32, bf16 or int8, got '" + name + "'");
}

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

sparsa::Tokenizer load_tokenizer(const std::string& dir) {
  const std::string path = (fs::path(dir) / "tokenizer.json").string();
  SPARSA_CHECK(fs::exists(path), "{}: missing tokenizer.json", dir);
  return sparsa::Tokenizer::from_file(path);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

struct GenerateArgs {
  std::string model, prompt;
  int64_t max_tokens = 128;
  float temperature = 0.0f, top_p = 1.0f, min_p = 0.0f, repeat_penalty = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  int threads = 0;
  std::vector<std::string> stop;
  bool ignore_eos = false, no_bos = false, json = false;
};

// --no-mmap on generate, eval and bench: read the weight files into huge-page-backed memory.
bool g_no_mmap = false;
// --kv-cache on generate, eval and bench.
std::string g_kv_cache = "f32";

sparsa::model::LoadOptions load_options() {
  sparsa::model::LoadOptions o;
  o.file_access = g_no_mmap ? sparsa::FileAccess::kRead : sparsa::FileAccess::kMap;
  return o;
}

int cmd_generate(const GenerateArgs& a) {
  sparsa::ThreadPool pool(a.threads);
  auto model = sparsa::model::Model::load(a.model, load_options());
  const sparsa::Tokenizer tok = load_tokenizer(a.model);
  sparsa::GenerateOptions opt;
  opt.max_tokens = a.max_tokens;
  opt.sampling.temperature = a.temperature;
  opt.sampling.top_p = a.top_p;
  opt.sampling.top_k = a.top_k;
  opt.sampling.min_p = a.min_p;
  opt.sampling.repetition_penalty = a.repeat_penalty;
  opt.sampling.seed = a.seed;
  opt.stop = a.stop;
  opt.stop_at_eos = !a.ignore_eos;
  opt.add_special_tokens = !a.no_bos;
  opt.kv_cache = parse_kv_cache(g_kv_cache);
  const auto r = sparsa::generate(*model, tok, a.prompt, opt, pool, [&](std::string_view piece) {
    if (!a.json) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
    return true;
  });
  const double decode_tps =
      r.decode_seconds > 0 ? static_cast<double>(r.ids.size()) / r.decode_seconds : 0;
  if (a.json) {
    std::cout << json{{"text", r.text},
                      {"prompt_ids", r.prompt_ids},
                      {"ids", r.ids},
                      {"finish_reason", r.finish_reason},
                      {"prompt_tokens", r.prompt_ids.size()},
                      {"completion_tokens", r.ids.size()},
                      {"prefill_seconds", r.prefill_seconds},
                      {"decode_tokens_per_s", decode_tps}}
                     .dump()
              << "\n";
  } else {
    std::cout << "\n" << std::flush;
    std::fprintf(stderr, "[%zu prompt tokens in %.3f s; %zu tokens at %.2f tokens/s; %s]\n",
                 r.prompt_ids.size(), r.prefill_seconds, r.ids.size(), decode_tps,
                 r.finish_reason.c_str());
  }
  return 0;
}

int cmd_eval(const std::string& model_dir, const std::string& data, int64_t ctx, int threads,
             int64_t max_windows, bool as_json) {
  sparsa::ThreadPool pool(threads);
  auto model = sparsa::model::Model::load(model_dir, load_options());
  const sparsa::Tokenizer tok = load_tokenizer(model_dir);
  const auto& cfg = model->config();
  SPARSA_CHECK(!cfg.eos_token_ids.empty(), "{}: the config names no eos_token_id to join documents",
               model_dir);
  const auto docs = sparsa::io::read_documents(data);
  const auto tokens = sparsa::tokenize_corpus(tok, docs, cfg.eos_token_ids[0]);
  int64_t total = static_cast<int64_t>(tokens.size()) / ctx;
  if (max_windows > 0) total = std::min(total, max_windows);
  sparsa::Progress bar("eval", total, "windows");
  const auto r = sparsa::perplexity(*model, tokens, ctx, pool,
                                    [&](int64_t, int64_t, double ppl) {
                                      bar.advance(1, fmt::format("ppl {:.4f}", ppl));
                                    },
                                    max_windows, parse_kv_cache(g_kv_cache));
  bar.finish();
  if (as_json) {
    std::cout << json{{"ppl", r.ppl},
                      {"mean_nll", r.mean_nll},
                      {"tokens", r.tokens_scored},
                      {"windows", r.windows},
                      {"ctx", ctx},
                      {"documents", docs.size()},
                      {"seconds", r.seconds},
                      {"tokens_per_s", static_cast<double>(r.windows * ctx) / r.seconds}}
                     .dump()
              << "\n";
  } else {
    std::cout << fmt::format("perplexity {:.4f} over {} tokens ({} windows of {}), {:.1f} s\n",
                             r.ppl, r.tokens_scored, r.windows, ctx, r.seconds);
  }
  return 0;
}

struct CompressArgs {
  std::string model, recipe, calib, out;
  int64_t samples = -1, seq_len = -1;
  int threads = 0;
  bool json = false, overwrite = false;
};

int cmd_compress(const CompressArgs& a) {
  sparsa::ThreadPool pool(a.threads);
  sparsa::compress::CompressOptions o;
  o.model_dir = a.model;
  o.recipe_path = a.recipe;
  o.calibration_path = a.calib;
  o.output_dir = a.out;
  o.samples = a.samples;
  o.seq_len = a.seq_len;
  o.overwrite = a.overwrite;
  const sparsa::compress::CompressReport r = sparsa::compress::compress_model(o, pool);
  double err_sum = 0;
  int n_err = 0;
  for (const auto& l : r.linears)
    if (l.relative_error > 0) err_sum += l.relative_error, ++n_err;
  const double mean_err = n_err ? err_sum / n_err : 0.0;
  std::vector<double> ls = r.layer_seconds;
  std::sort(ls.begin(), ls.end());
  const double median_layer = ls.empty() ? 0.0 : ls[ls.size() / 2];
  if (a.json) {
    json linears = json::array();
    for (const auto& l : r.linears)
      linears.push_back({{"name", l.name},
                         {"shape", {l.rows, l.cols}},
                         {"format", l.format},
                         {"sparsity", l.sparsity},
                         {"bits_per_weight", l.bits_per_weight},
                         {"bytes", l.bytes},
                         {"relative_error", l.relative_error}});
    std::cout << json{{"output", a.out},
                      {"calibration_tokens", r.calibration_tokens},
                      {"seconds", r.seconds},
                      {"layer_seconds", r.layer_seconds},
                      {"peak_rss_anon_bytes", r.peak_rss_anon_bytes},
                      {"output_bytes", r.output_bytes},
                      {"sparsity", r.total_sparsity},
                      {"bits_per_weight", r.total_bits_per_weight},
                      {"mean_relative_error", mean_err},
                      {"linears", linears}}
                     .dump()
              << "\n";
    return 0;
  }
  std::cout << fmt::format("{:<34} {:>12} {:>18} {:>8} {:>6} {:>11} {:>10}\n", "tensor", "shape",
                           "format", "sparsity", "bits", "bytes", "rel.error");
  for (const auto& l : r.linears)
    std::cout << fmt::format("{:<34} {:>12} {:>18} {:>7.1f}% {:>6.2f} {:>11} {:>10.3e}\n", l.name,
                             fmt::format("{}x{}", l.rows, l.cols), l.format, 100 * l.sparsity,
                             l.bits_per_weight, l.bytes, l.relative_error);
  std::cout << fmt::format(
      "total: {:.1f}% sparse, {:.2f} bits per weight over the compressed layers; mean relative "
      "error {:.3e}\n{} calibration tokens; {:.1f} s ({:.2f} s per layer, median); peak RssAnon "
      "{:.0f} MB; wrote {} ({:.1f} MB)\n",
      100 * r.total_sparsity, r.total_bits_per_weight, mean_err, r.calibration_tokens, r.seconds,
      median_layer, static_cast<double>(r.peak_rss_anon_bytes) / 1e6, a.out,
      static_cast<double>(r.output_bytes) / 1e6);
  return 0;
}

int cmd_inspect(const std::string& model_dir, bool as_json) {
  const auto cfg = sparsa::io::ModelConfig::from_dir(model_dir);
  const auto ck = sparsa::io::Checkpoint::open_dir(model_dir);
  const std::string config_path = model_dir + "/config.json";
  const json config_json = json::parse(sparsa::read_text_file(config_path));
  json compression = json::object();
  for (const char* key : {"quantization_config", "sparsa_config"})
    if (config_json.contains(key)) compression[key] = config_json[key];
  // Validates them (and names the field at fault).
  (void)sparsa::io::read_compression_config(config_json, config_path);
  json tensors = json::array();
  size_t total = 0;
  int64_t params = 0;
  std::map<std::string, size_t> by_dtype;
  for (const auto& name : ck.names()) {
    const auto& t = ck.get(name);
    tensors.push_back({{"name", name},
                       {"dtype", sparsa::dtype_name(t.dtype)},
                       {"shape", t.shape},
                       {"bytes", t.nbytes},
                       {"file", fs::path(t.file).filename().string()}});
    total += t.nbytes;
    params += t.numel();
    by_dtype[std::string(sparsa::dtype_name(t.dtype))] += t.nbytes;
  }
  const json summary = {{"model", model_dir},
                        {"architecture", cfg.model_type},
                        {"config", cfg.to_json()},
                        {"files", ck.files().size()},
                        {"tensors", tensors.size()},
                        {"parameters", params},
                        {"bytes", total},
                        {"bytes_by_dtype", by_dtype},
                        {"compression", compression}};
  if (as_json) {
    json out = summary;
    out["tensor_list"] = tensors;
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::cout << fmt::format(
      "{}: {} ({} layers, hidden {}, ffn {}, heads {}/{} kv, head_dim {}, vocab {}, context {}, "
      "rope theta {} {}, {} embeddings)\n",
      model_dir, cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size,
      cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.max_context(),
      cfg.rope_theta, cfg.rope_scaling.type, cfg.tie_word_embeddings ? "tied" : "separate");
  std::cout << fmt::format("{:<52} {:>6} {:>16} {:>12}\n", "tensor", "dtype", "shape", "bytes");
  for (const auto& t : tensors)
    std::cout << fmt::format("{:<52} {:>6} {:>16} {:>12}\n", t["name"].get<std::string>(),
                             t["dtype"].get<std::string>(),
                             shape_str(t["shape"].get<std::vector<int64_t>>()),
                             t["bytes"].get<size_t>());
  if (!compression.empty()) std::cout << "compression: " << compression.dump() << "\n";
  std::cout << fmt::format("{} tensors in {} file(s), {} parameters, {:.2f} MB\n", tensors.size(),
                           ck.files().size(), params, static_cast<double>(total) / 1e6);
  return 0;
}

json bench_result_json(const sparsa::BenchResult& r) {
  return {{"threads", r.threads},
          {"isa", r.isa},
          {"prompt_tokens", r.prompt_tokens},
          {"decode_tokens", r.decode_tokens},
          {"prefill_tokens_per_s", r.prefill_tokens_per_s},
          {"prefill_gflop_per_s", r.prefill_gflop_per_s},
          {"decode_tokens_per_s", r.decode_tokens_per_s},
          {"weight_bytes_per_token", r.weight_bytes_per_token},
          {"kv_cache", g_kv_cache},
          {"kv_bytes_per_token", r.kv_bytes_per_token},
          {"bandwidth_gb_per_s", r.bandwidth_gb_per_s},
          {"bandwidth_best_gb_per_s", r.bandwidth_best_gb_per_s},
          {"decode_bound_tokens_per_s", r.decode_bound_tokens_per_s},
          {"decode_fraction_of_bound", r.decode_fraction_of_bound}};
}

// sparsa bench --shape NAME --formats a,b,...: random weights of a known shape in each format.
int cmd_bench_formats(const std::string& shape, const std::string& format_list, int threads,
                      const sparsa::BenchOptions& opt, bool as_json) {
  std::vector<std::string> names;
  for (size_t b = 0; b <= format_list.size();) {
    const size_t e = std::min(format_list.find(',', b), format_list.size());
    if (e > b) names.push_back(format_list.substr(b, e - b));
    b = e + 1;
  }
  for (const auto& n : names) sparsa::parse_bench_format(n);  // bad names fail before any work
  const sparsa::io::ModelConfig cfg = sparsa::model::named_shape(shape);
  sparsa::ThreadPool pool(threads);
  const auto results = sparsa::run_format_bench(
      cfg, names, pool, opt, [](const sparsa::FormatBenchResult& r) {
        std::fprintf(stderr, "%-20s %-26s built in %5.1f s, decode %.2f tokens/s\n",
                     r.format.c_str(), r.layout.c_str(), r.build_seconds,
                     r.bench.decode_tokens_per_s);
      });
  const auto ratio = [](double v) { return std::isnan(v) ? json(nullptr) : json(v); };
  if (as_json) {
    json list = json::array();
    for (const auto& r : results) {
      json j = {{"format", r.format}, {"shape", shape}, {"layout", r.layout},
                {"build_seconds", r.build_seconds}, {"decode_rounds", r.decode_rounds}};
      j.update(bench_result_json(r.bench));
      j["decode_speedup_vs_int4g128"] = ratio(r.decode_speedup_vs_int4g128);
      j["prefill_fraction_of_bf16"] = ratio(r.prefill_fraction_of_bf16);
      list.push_back(j);
    }
    std::cout << list.dump() << "\n";
    return 0;
  }
  const auto opt_ratio = [](double v) {
    return std::isnan(v) ? std::string("-") : fmt::format("{:.2f}", v);
  };
  std::cout << fmt::format("{}: {} prompt tokens, {} decode tokens, {} threads ({})\n", shape,
                           opt.prompt_tokens, opt.decode_tokens, pool.size(),
                           results.empty() ? "" : results[0].bench.isa);
  std::cout << fmt::format("{:<20} {:<24} {:>9} {:>10} {:>9} {:>9} {:>8} {:>7} {:>9} {:>9}\n",
                           "format", "layout", "MB/token", "prefill/s", "decode/s", "bound/s",
                           "GB/s", "bound%", "vs int4", "pf/bf16");
  for (const auto& r : results)
    std::cout << fmt::format(
        "{:<20} {:<24} {:>9.1f} {:>10.1f} {:>9.2f} {:>9.2f} {:>8.2f} {:>6.1f}% {:>9} {:>9}\n",
        r.format, r.layout, static_cast<double>(r.bench.weight_bytes_per_token) / 1e6,
        r.bench.prefill_tokens_per_s, r.bench.decode_tokens_per_s,
        r.bench.decode_bound_tokens_per_s, r.bench.bandwidth_gb_per_s,
        100 * r.bench.decode_fraction_of_bound, opt_ratio(r.decode_speedup_vs_int4g128),
        opt_ratio(r.prefill_fraction_of_bf16));
  return 0;
}

int cmd_bench(const std::string& model_dir, int threads, const sparsa::BenchOptions& opt,
              bool as_json) {
  sparsa::ThreadPool pool(threads);
  const auto t0 = std::chrono::steady_clock::now();
  auto model = sparsa::model::Model::load(model_dir, load_options());
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto r = sparsa::run_bench(*model, pool, opt);
  const sparsa::model::Linear& q0 = model->blocks()[0].q;
  json j = {{"model", model_dir},
            {"format", q0.format == "dense"
                           ? "dense-" + std::string(sparsa::dtype_name(q0.weight.dtype))
                           : q0.describe()},
            {"load_seconds", load_s},
            {"weights_in", g_no_mmap ? "read (huge pages)" : "mmap"}};
  j.update(bench_result_json(r));
  if (as_json) {
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::cout << fmt::format(
      "model        {}\nthreads      {} ({})\nprefill      {:.1f} tokens/s ({} tokens, {:.1f} "
      "GFLOP/s)\ndecode       {:.2f} tokens/s\nweights      {:.1f} MB read per token (+ {:.2f} MB of KV cache)\n"
      "bandwidth    {:.2f} GB/s (median of probes between decode steps; best {:.2f}) -> bound {:.2f} tokens/s\nfraction     {:.1f}% of the "
      "bandwidth bound\n",
      model_dir, r.threads, r.isa, r.prefill_tokens_per_s, r.prompt_tokens,
      r.prefill_gflop_per_s, r.decode_tokens_per_s,
      static_cast<double>(r.weight_bytes_per_token) / 1e6,
      static_cast<double>(r.kv_bytes_per_token) / 1e6, r.bandwidth_gb_per_s, r.bandwidth_best_gb_per_s,
      r.decode_bound_tokens_per_s, 100 * r.decode_fraction_of_bound);
  return 0;
}

struct InitArgs {
  std::string shape, out, dtype = "bf16", model_type = "llama";
  uint64_t seed = 0;
  int64_t hidden = 0, layers = 0, heads = 0, kv_heads = 0, ffn = 0, vocab = 32000, head_dim = 0,
          context = 2048;
  bool tied = false;
};

int cmd_init_random(const InitArgs& a) {
  sparsa::io::ModelConfig cfg;
  if (!a.shape.empty()) {
    cfg = sparsa::model::named_shape(a.shape);
  } else {
    SPARSA_CHECK(a.hidden > 0 && a.layers > 0 && a.heads > 0 && a.ffn > 0,
                 "init-random: give --shape NAME, or --hidden, --layers, --heads and --ffn");
    json j = {{"model_type", a.model_type},     {"vocab_size", a.vocab},
              {"hidden_size", a.hidden},        {"intermediate_size", a.ffn},
              {"num_hidden_layers", a.layers},  {"num_attention_heads", a.heads},
              {"num_key_value_heads", a.kv_heads > 0 ? a.kv_heads : a.heads},
              {"max_position_embeddings", a.context}, {"tie_word_embeddings", a.tied},
              {"bos_token_id", 1},              {"eos_token_id", 2}};
    if (a.head_dim > 0) j["head_dim"] = a.head_dim;
    cfg = sparsa::io::ModelConfig::from_json(j, "init-random");
  }
  sparsa::model::RandomCheckpointOptions opt;
  opt.seed = a.seed;
  const auto dt = sparsa::parse_dtype(a.dtype == "bf16" ? "BF16" : a.dtype == "f16" ? "F16" : a.dtype == "f32" ? "F32" : "?");
  SPARSA_CHECK(dt.has_value(), "init-random: --dtype must be bf16, f16 or f32, not '{}'", a.dtype);
  opt.dtype = *dt;
  sparsa::model::write_random_checkpoint(cfg, a.out, opt);
  std::cout << fmt::format("wrote {} ({} parameters, {})\n", a.out, cfg.parameter_count(), a.dtype);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"sparsa: make language models smaller and faster, and run them fast"};
  app.require_subcommand(1);
  std::string isa;
  app.add_option("--isa", isa, "kernel ISA to use: generic, avx2, avx512 (default: best)");

  GenerateArgs g;
  auto* gen = app.add_subcommand("generate", "generate text from a prompt, streamed to stdout");
  gen->add_option("model", g.model, "model directory")->required();
  gen->add_option("-p,--prompt", g.prompt, "prompt text")->required();
  gen->add_option("-n,--max-tokens", g.max_tokens, "tokens to generate at most")->capture_default_str();
  gen->add_option("--temperature", g.temperature, "0 = greedy")->capture_default_str();
  gen->add_option("--top-p", g.top_p)->capture_default_str();
  gen->add_option("--top-k", g.top_k, "0 = off")->capture_default_str();
  gen->add_option("--min-p", g.min_p)->capture_default_str();
  gen->add_option("--repeat-penalty", g.repeat_penalty)->capture_default_str();
  gen->add_option("--seed", g.seed)->capture_default_str();
  gen->add_option("--stop", g.stop, "stop string (repeatable)");
  gen->add_option("-t,--threads", g.threads, "threads (default: all cores)");
  gen->add_flag("--ignore-eos", g.ignore_eos, "keep going after EOS");
  gen->add_flag("--no-bos", g.no_bos, "do not add the tokenizer's special tokens");
  gen->add_flag("--json", g.json, "print one JSON object instead of streaming");
  gen->add_flag("--no-mmap", g_no_mmap, kNoMmapHelp);
  gen->add_option("--kv-cache", g_kv_cache, kKvCacheHelp)
      ->check(CLI::IsMember({"f32", "bf16", "int8"}))
      ->capture_default_str();

  std::string eval_model, eval_data;
  int64_t ctx = 512, max_windows = 0;
  int eval_threads = 0;
  bool eval_json = false;
  auto* ev = app.add_subcommand("eval", "perplexity of a JSON-lines or plain-text file");
  ev->add_option("model", eval_model, "model directory")->required();
  ev->add_option("--data", eval_data, "JSON lines ({\"text\": ...}) or plain text")->required();
  ev->add_option("--ctx", ctx, "window length")->capture_default_str();
  ev->add_option("--max-windows", max_windows, "evaluate at most this many windows (0 = all)");
  ev->add_option("-t,--threads", eval_threads, "threads (default: all cores)");
  ev->add_flag("--json", eval_json, "print one JSON object");
  ev->add_flag("--no-mmap", g_no_mmap, kNoMmapHelp);
  ev->add_option("--kv-cache", g_kv_cache, kKvCacheHelp)
      ->check(CLI::IsMember({"f32", "bf16", "int8"}))
      ->capture_default_str();

  std::string insp_model;
  bool insp_json = false;
  auto* insp = app.add_subcommand("inspect", "architecture, tensors, dtypes and bytes of a model");
  insp->add_option("model", insp_model, "model directory")->required();
  insp->add_flag("--json", insp_json, "print JSON");

  std::string bench_model;
  int bench_threads = 0;
  bool bench_json = false;
  sparsa::BenchOptions bopt;
  std::string bench_shape, bench_formats = "bf16,int4g128,sparse50-int4g128,sparse70-int4g128,"
                                            "2of4-int4g128,palette3";
  auto* bench = app.add_subcommand("bench", "prefill and decode speed against the bandwidth bound");
  bench->add_option("model", bench_model, "model directory (or --shape)");
  bench->add_option("--shape", bench_shape,
                    "random weights of a known shape (tinyllama-1.1b, ...) in each of --formats");
  bench->add_option("--formats", bench_formats,
                    "with --shape: comma-separated formats (bf16, int4g128, sparse50-int4g128, "
                    "2of4-int4g128, palette3, ...)")
      ->capture_default_str();
  bench->add_option("-t,--threads", bench_threads, "threads (default: all cores)");
  bench->add_option("--prompt-tokens", bopt.prompt_tokens)->capture_default_str();
  bench->add_option("--decode-tokens", bopt.decode_tokens)->capture_default_str();
  bench->add_option("--repetitions", bopt.repetitions, "prefill repetitions")->capture_default_str();
  bench->add_option("--rounds", bopt.rounds,
                    "with --shape: decode rounds that visit every format in turn (1: one format "
                    "after the other)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  size_t bw_mb = bopt.bandwidth_bytes >> 20;
  bench->add_option("--bandwidth-mb", bw_mb, "buffer size of the bandwidth probe (MiB)")
      ->capture_default_str();
  bench->add_flag("--json", bench_json, "print one JSON object");
  bench->add_flag("--no-mmap", g_no_mmap, kNoMmapHelp);
  bench->add_option("--kv-cache", g_kv_cache, kKvCacheHelp)
      ->check(CLI::IsMember({"f32", "bf16", "int8"}))
      ->capture_default_str();

  InitArgs ia;
  auto* init = app.add_subcommand("init-random", "write a random-weight checkpoint of a known shape");
  init->add_option("--shape", ia.shape, "tinyllama-1.1b, llama-3.2-1b, llama-3-8b, qwen2-0.5b, mistral-7b, small-27m");
  init->add_option("-o,--output", ia.out, "output directory")->required();
  init->add_option("--seed", ia.seed)->capture_default_str();
  init->add_option("--dtype", ia.dtype, "bf16, f16 or f32")->capture_default_str();
  init->add_option("--arch", ia.model_type, "llama, mistral or qwen2 (explicit dimensions)");
  init->add_option("--hidden", ia.hidden);
  init->add_option("--layers", ia.layers);
  init->add_option("--heads", ia.heads);
  init->add_option("--kv-heads", ia.kv_heads);
  init->add_option("--ffn", ia.ffn);
  init->add_option("--vocab", ia.vocab)->capture_default_str();
  init->add_option("--head-dim", ia.head_dim);
  init->add_option("--context", ia.context)->capture_default_str();
  init->add_flag("--tied", ia.tied, "tie lm_head to the embeddings");
  CompressArgs ca;
  auto* comp = app.add_subcommand("compress", "one-shot compression of a model by a YAML recipe");
  comp->add_option("model", ca.model, "dense model directory")->required();
  comp->add_option("-r,--recipe", ca.recipe, "recipe YAML (see recipes/)")->required();
  comp->add_option("--calib", ca.calib, "calibration text: JSON lines or plain text")->required();
  comp->add_option("-o,--output", ca.out, "output directory")->required();
  comp->add_option("--samples", ca.samples, "calibration windows (default: the recipe's, 128)");
  comp->add_option("--seq-len", ca.seq_len, "tokens per window (default: the recipe's, 512)");
  comp->add_option("-t,--threads", ca.threads, "threads (default: all cores)");
  comp->add_flag("--overwrite", ca.overwrite, "replace the output directory if it exists");
  comp->add_flag("--json", ca.json, "print one JSON object");
#ifdef SPARSA_HAVE_SERVER
  add_serve_command(app);
#endif
  add_finetune_command(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (!isa.empty()) sparsa::set_active_isa(sparsa::parse_isa(isa));
    if (*gen) return cmd_generate(g);
    if (*ev) return cmd_eval(eval_model, eval_data, ctx, eval_threads, max_windows, eval_json);
    if (*insp) return cmd_inspect(insp_model, insp_json);
    bopt.bandwidth_bytes = bw_mb << 20;
    bopt.kv_cache = parse_kv_cache(g_kv_cache);
    if (*bench && !bench_shape.empty()) {
      SPARSA_CHECK(bench_model.empty(), "bench: give a model directory or --shape, not both");
      if (bench->count("--prompt-tokens") == 0) bopt.prompt_tokens = 512;
      return cmd_bench_formats(bench_shape, bench_formats, bench_threads, bopt, bench_json);
    }
    if (*bench) {
      SPARSA_CHECK(!bench_model.empty(), "bench: give a model directory or --shape NAME");
      return cmd_bench(bench_model, bench_threads, bopt, bench_json);
    }
    if (*init) return cmd_init_random(ia);
    if (*comp) return cmd_compress(ca);
  } catch (const sparsa::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
