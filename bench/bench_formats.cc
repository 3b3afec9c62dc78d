// Micro-benchmarks of the packed-weight kernels (sparsa/kernels/packed_linear.h) at TinyLlama
// shapes (and its 32000 × 2048 lm_head for int8), per format:
//   - decode (1 or 8 tokens; input coded as int8 or f32, see kernels::DecodeInput): GB/s of
//     packed weight streamed (bytes_per_second), and that as a fraction of the read bandwidth
//     probed inside the same benchmark, just before and after the timed loop (counter frac_bw,
//     the roofline: a decode step cannot read its weight faster; bw_probe is the probe's mean).
//     The weights cycle through copies totalling more than 256 MiB, so they come from DRAM as a
//     model's layers do. Counter bits_per_weight: packed bytes · 8 / (rows · cols);
//     us_per_token: the time of one call divided by its tokens.
//   - prefill (512 tokens): counter flops (2 · rows · cols · tokens per second).
// Threads: SPARSA_BENCH_THREADS (default 2). ISA: SPARSA_FORCE_ISA. SPARSA_BENCH_HOT=1 decodes
// one copy of the weight again and again, from the caches: the kernel's compute rate, without
// the memory's limit (frac_bw above 1 means a kernel that could outrun DRAM).
//   bench_formats --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//   bench_formats --benchmark_filter='Decode/int4g128/.*/t1/int8$'
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "sparsa/compress/palettize.h"
#include "sparsa/compress/prune.h"
#include "sparsa/compress/quantize.h"
#include "sparsa/core/cpu.h"
#include "sparsa/core/dtype.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/formats/packed_weight.h"
#include "sparsa/kernels/linear.h"
#include "sparsa/kernels/packed_linear.h"

namespace sparsa {
namespace {

using compress::Matrix;
using formats::PackedWeight;

constexpr size_t kStreamBytes = size_t{256} << 20;

ThreadPool& pool() {
  static ThreadPool p([] {
    const char* env = std::getenv("SPARSA_BENCH_THREADS");
    return env != nullptr ? std::atoi(env) : 2;
  }());
  return p;
}

kernels::BandwidthProbe& probe() {
  static kernels::BandwidthProbe p(pool(), kStreamBytes);
  return p;
}

Matrix random_matrix(int64_t rows, int64_t cols) {
  std::mt19937 rng(static_cast<uint32_t>(rows * 31 + cols));
  std::normal_distribution<float> dist(0.0f, 0.02f);
  Matrix w(rows, cols);
  for (float& f : w.data) f = dist(rng);
  return w;
}

std::vector<float> random_input(size_t n) {
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& f : v) f = dist(rng);
  return v;
}

PackedWeight quantized(Matrix w, int bits, const compress::Mask* keep) {
  const compress::QuantResult q =
      compress::rtn_quantize(w, {.bits = bits, .group_size = 128}, keep);
  return formats::pack_quantized(q, keep);
}

PackedWeight palettized(Matrix w, int bits, const compress::Mask* keep) {
  compress::PaletteOptions opts;
  opts.bits = bits;
  opts.max_iters = 10;
  const compress::Palette p = compress::palettize(w, opts);
  return formats::pack_palette(p, w.cols, keep);
}

compress::Mask mask(const Matrix& w, compress::SparsityPattern pattern) {
  Matrix copy = w;
  return compress::magnitude_prune(copy, pattern);
}

// The formats measured, by name.
const std::map<std::string, std::function<PackedWeight(const Matrix&)>>& formats_table() {
  static const std::map<std::string, std::function<PackedWeight(const Matrix&)>> t = {
      {"bf16",
       [](const Matrix& w) {
         std::vector<uint16_t> h(w.data.size());
         for (size_t i = 0; i < h.size(); ++i) h[i] = f32_to_bf16(w.data[i]);
         return formats::pack_dense(DType::BF16, w.rows, w.cols, h.data(), true);
       }},
      {"int8g128", [](const Matrix& w) { return quantized(w, 8, nullptr); }},
      {"int4g128", [](const Matrix& w) { return quantized(w, 4, nullptr); }},
      {"int3g128", [](const Matrix& w) { return quantized(w, 3, nullptr); }},
      {"sparse50-int4g128",
       [](const Matrix& w) {
         const auto k = mask(w, {.sparsity = 0.5});
         return quantized(w, 4, &k);
       }},
      {"sparse70-int4g128",
       [](const Matrix& w) {
         const auto k = mask(w, {.sparsity = 0.7});
         return quantized(w, 4, &k);
       }},
      {"sparse90-int4g128",
       [](const Matrix& w) {
         const auto k = mask(w, {.sparsity = 0.9});
         return quantized(w, 4, &k);
       }},
      {"2of4-int4g128",
       [](const Matrix& w) {
         const auto k = mask(w, {.n = 2, .m = 4});
         return quantized(w, 4, &k);
       }},
      {"sparse50-bf16",
       [](const Matrix& w) {
         return formats::pack_sparse(w, mask(w, {.sparsity = 0.5}), formats::ValueFormat{});
       }},
      {"int2g128", [](const Matrix& w) { return quantized(w, 2, nullptr); }},
      {"sparse50-int8g128",
       [](const Matrix& w) {
         const auto k = mask(w, {.sparsity = 0.5});
         return quantized(w, 8, &k);
       }},
      {"palette3", [](const Matrix& w) { return palettized(w, 3, nullptr); }},
      {"palette4", [](const Matrix& w) { return palettized(w, 4, nullptr); }},
      {"sparse50-palette3",
       [](const Matrix& w) {
         const auto k = mask(w, {.sparsity = 0.5});
         return palettized(w, 3, &k);
       }},
  };
  return t;
}

void BM_Decode(benchmark::State& state, const std::string& name, int64_t rows, int64_t cols,
               int64_t n_tokens, kernels::DecodeInput input) {
  const PackedWeight first = formats_table().at(name)(random_matrix(rows, cols));
  const bool hot = std::getenv("SPARSA_BENCH_HOT") != nullptr &&
                   std::string(std::getenv("SPARSA_BENCH_HOT")) == "1";
  const size_t copies = hot ? 1 : (kStreamBytes + first.bytes() - 1) / first.bytes() + 1;
  std::vector<PackedWeight> ws;
  ws.reserve(copies);
  for (size_t c = 0; c < copies; ++c) ws.push_back(first.clone());
  const std::vector<float> x = random_input(static_cast<size_t>(cols * n_tokens));
  std::vector<float> y(static_cast<size_t>(rows * n_tokens));
  const Isa isa = active_isa();
  const double bw_before = probe().sample();
  size_t i = 0;
  for (auto _ : state) {
    kernels::linear_isa(isa, input, ws[i], x.data(), cols, n_tokens, y.data(), rows, pool());
    if (++i == copies) i = 0;
    benchmark::DoNotOptimize(y.data());
  }
  const double bw = 0.5 * (bw_before + probe().sample());
  const double bytes = static_cast<double>(state.iterations()) * static_cast<double>(first.bytes());
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  state.counters["frac_bw"] = benchmark::Counter(bytes / bw, benchmark::Counter::kIsRate);
  state.counters["bw_probe"] = bw;
  state.counters["bits_per_weight"] = 8.0 * static_cast<double>(first.bytes()) /
                                      static_cast<double>(rows * cols);
  state.counters["us_per_token"] = benchmark::Counter(
      1e-6 * static_cast<double>(state.iterations() * n_tokens),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  const bool q8 = input == kernels::DecodeInput::Int8 && kernels::decode_quantizes_input(first, isa);
  state.SetLabel(first.describe() + (q8 ? " int8-input" : " f32-input"));
}

void BM_Prefill(benchmark::State& state, const std::string& name, int64_t rows, int64_t cols) {
  constexpr int64_t kTokens = 512;
  const PackedWeight w = formats_table().at(name)(random_matrix(rows, cols));
  const std::vector<float> x = random_input(static_cast<size_t>(kTokens * cols));
  std::vector<float> y(static_cast<size_t>(kTokens * rows));
  for (auto _ : state) {
    kernels::linear(w, x.data(), cols, kTokens, y.data(), rows, pool());
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["flops"] = benchmark::Counter(
      2.0 * static_cast<double>(state.iterations() * rows * cols * kTokens),
      benchmark::Counter::kIsRate);
  state.SetLabel(w.describe());
}

// TinyLlama-1.1B: q/o, gate/up, down.
constexpr int64_t kShapes[][2] = {{2048, 2048}, {5632, 2048}, {2048, 5632}};

void register_decode(const std::string& name, int64_t rows, int64_t cols) {
  for (int64_t n : {1, 8})
    for (kernels::DecodeInput in : {kernels::DecodeInput::Int8, kernels::DecodeInput::F32})
      benchmark::RegisterBenchmark(
          ("Decode/" + name + "/" + std::to_string(rows) + "x" + std::to_string(cols) + "/t" +
           std::to_string(n) + (in == kernels::DecodeInput::Int8 ? "/int8" : "/f32"))
              .c_str(),
          [name, rows, cols, n, in](benchmark::State& st) {
            BM_Decode(st, name, rows, cols, n, in);
          })
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
}

void register_all() {
  for (const auto& [name, make] : formats_table()) {
    for (const auto& s : kShapes) register_decode(name, s[0], s[1]);
    benchmark::RegisterBenchmark(("Prefill512/" + name + "/5632x2048").c_str(),
                                 [name = name](benchmark::State& st) {
                                   BM_Prefill(st, name, 5632, 2048);
                                 })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  // The lm_head of a 32000-token vocabulary.
  for (const char* name : {"bf16", "int8g128"}) register_decode(name, 32000, 2048);
}

}  // namespace
}  // namespace sparsa

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  sparsa::register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
