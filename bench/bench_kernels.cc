// Micro-benchmarks of the CPU kernels, with the roofline each is measured against:
//   - decode matvec (1 token): bytes of weights streamed per second, and that as a fraction of
//     the read bandwidth probed just before (counter frac_bw); the weights cycle through copies
//     larger than the L3 cache, as a model's layers do;
//   - prefill GEMM and attention: FLOP/s (counter flops), against 2 FMA · 8 lanes · 2 per cycle
//     per core;
//   - the read-bandwidth probe itself (counter bw).
// Threads: SPARSA_BENCH_THREADS (default 2). ISA: SPARSA_FORCE_ISA.
//   bench_kernels --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "sparsa/core/aligned.h"
#include "sparsa/core/cpu.h"
#include "sparsa/core/dtype.h"
#include "sparsa/core/huge_pages.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::kernels {
namespace {

// Decode weights cycle through this many bytes of copies, 8× a 32 MiB L3.
constexpr size_t kStreamBytes = size_t{256} << 20;

ThreadPool& pool() {
  static ThreadPool p([] {
    const char* env = std::getenv("SPARSA_BENCH_THREADS");
    return env != nullptr ? std::atoi(env) : 2;
  }());
  return p;
}

// The roofline of decode, probed just before each decode benchmark: the memory bandwidth of a
// shared host changes over seconds (here between about 30 and 60 GB/s), so a probe taken once
// would not describe the state a later measurement ran in.
double read_bandwidth() { return measure_read_bandwidth(pool(), kStreamBytes, 3); }

// Cache-line aligned, as the engine's activations are.
AlignedVector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  AlignedVector<float> v(n);
  for (float& f : v) f = dist(rng);
  return v;
}

// `copies` weight matrices [rows, cols] of one dtype in one buffer, row-major or (panels) in the
// panel layout the engine runs dense weights in.
struct Weights {
  HugePageBuffer bytes;
  std::vector<DenseWeight> mats;

  Weights(DType dtype, int64_t rows, int64_t cols, size_t copies, bool panels = false) {
    const size_t n = static_cast<size_t>(rows * cols), es = dtype_size(dtype);
    const size_t stored = panels ? static_cast<size_t>(panel_elements(rows, cols)) : n;
    bytes = allocate_huge_pages(stored * es * copies);
    const AlignedVector<float> src = random_floats(n, 1);
    std::vector<uint8_t> row_major(n * es);
    for (size_t i = 0; i < n; ++i) {
      if (dtype == DType::F32) {
        reinterpret_cast<float*>(row_major.data())[i] = src[i];
      } else {
        reinterpret_cast<uint16_t*>(row_major.data())[i] =
            dtype == DType::BF16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
      }
    }
    for (size_t c = 0; c < copies; ++c) {
      uint8_t* base = bytes.get() + c * stored * es;
      if (panels) {
        to_panels(row_major.data(), rows, cols, es, base);
      } else {
        std::memcpy(base, row_major.data(), n * es);
      }
      mats.push_back({dtype, rows, cols, base, panels});
    }
  }
};

template <DType D, bool Panels = false>
void BM_Decode(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1), n = state.range(2);
  const size_t mat_bytes = static_cast<size_t>(rows * cols) * dtype_size(D);
  const size_t copies = std::max<size_t>(1, (kStreamBytes + mat_bytes - 1) / mat_bytes);
  const Weights w(D, rows, cols, copies, Panels);
  const AlignedVector<float> x = random_floats(static_cast<size_t>(n * cols), 2);
  AlignedVector<float> y(static_cast<size_t>(n * rows));
  const double bw = read_bandwidth();
  size_t i = 0;
  for (auto _ : state) {
    linear(w.mats[i], x.data(), cols, n, y.data(), rows, pool());
    if (++i == copies) i = 0;
    benchmark::DoNotOptimize(y.data());
  }
  const double bytes = static_cast<double>(state.iterations()) * static_cast<double>(mat_bytes);
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  state.counters["frac_bw"] = benchmark::Counter(bytes / bw, benchmark::Counter::kIsRate);
  state.counters["flops"] = benchmark::Counter(
      2.0 * static_cast<double>(state.iterations() * rows * cols * n), benchmark::Counter::kIsRate);
}

template <DType D, bool Panels = false>
void BM_Prefill(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1), n = state.range(2);
  const Weights w(D, rows, cols, 1, Panels);
  const AlignedVector<float> x = random_floats(static_cast<size_t>(n * cols), 2);
  AlignedVector<float> y(static_cast<size_t>(n * rows));
  for (auto _ : state) {
    linear(w.mats[0], x.data(), cols, n, y.data(), rows, pool());
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["flops"] = benchmark::Counter(
      2.0 * static_cast<double>(state.iterations() * rows * cols * n), benchmark::Counter::kIsRate);
}

// Arguments: heads, kv heads, head_dim, queries, cached positions, cache element bits (32: f32,
// 16: bf16, 8: int8 with a scale per key or value row of each kv head), and how many caches the
// iterations cycle through (one per layer of a model: with 22, a TinyLlama decode step's worth,
// the caches come from DRAM as in a real step).
void BM_Attention(benchmark::State& state) {
  AttentionShape s;
  s.n_heads = static_cast<int>(state.range(0));
  s.n_kv_heads = static_cast<int>(state.range(1));
  s.head_dim = static_cast<int>(state.range(2));
  s.n_q = state.range(3);
  s.pos0 = state.range(4);
  s.kv_dtype = state.range(5) == 16 ? DType::BF16 : state.range(5) == 8 ? DType::I8 : DType::F32;
  const int64_t copies = state.range(6);
  s.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const int64_t qw = int64_t{s.n_heads} * s.head_dim, kvw = int64_t{s.n_kv_heads} * s.head_dim;
  const int64_t n_keys = s.pos0 + s.n_q;
  const size_t elems = static_cast<size_t>(n_keys * kvw);
  const auto q = random_floats(static_cast<size_t>(s.n_q * qw), 1);
  std::vector<AlignedVector<float>> k32, v32;
  std::vector<AlignedVector<uint16_t>> k16, v16;
  std::vector<AlignedVector<int8_t>> k8, v8;
  std::vector<AlignedVector<float>> ks, vs;  // int8: [n_kv_heads][n_keys]
  s.ld_scales = n_keys;
  for (int64_t c = 0; c < copies; ++c) {
    auto k = random_floats(elems, static_cast<uint32_t>(2 + 2 * c));
    auto v = random_floats(elems, static_cast<uint32_t>(3 + 2 * c));
    if (s.kv_dtype == DType::I8) {
      // The values are uniform in [-1, 1]: scales near 1/127, codes over the whole range.
      k8.emplace_back(elems);
      v8.emplace_back(elems);
      ks.emplace_back(static_cast<size_t>(s.n_kv_heads * n_keys), 1.0f / 127);
      vs.emplace_back(static_cast<size_t>(s.n_kv_heads * n_keys), 1.0f / 127);
      for (size_t i = 0; i < elems; ++i) {
        k8.back()[i] = static_cast<int8_t>(std::lround(k[i] * 127));
        v8.back()[i] = static_cast<int8_t>(std::lround(v[i] * 127));
      }
    } else if (s.kv_dtype == DType::BF16) {
      k16.emplace_back(elems);
      v16.emplace_back(elems);
      for (size_t i = 0; i < elems; ++i) {
        k16.back()[i] = f32_to_bf16(k[i]);
        v16.back()[i] = f32_to_bf16(v[i]);
      }
    } else {
      k32.push_back(std::move(k));
      v32.push_back(std::move(v));
    }
  }
  std::vector<float> out(static_cast<size_t>(s.n_q * qw));
  int64_t c = 0;
  for (auto _ : state) {
    const void* k;
    const void* v;
    if (s.kv_dtype == DType::I8) {
      k = k8[c].data();
      v = v8[c].data();
      s.k_scales = ks[c].data();
      s.v_scales = vs[c].data();
    } else if (s.kv_dtype == DType::BF16) {
      k = k16[c].data();
      v = v16[c].data();
    } else {
      k = k32[c].data();
      v = v32[c].data();
    }
    attention(s, q.data(), qw, k, v, kvw, out.data(), qw, pool());
    benchmark::DoNotOptimize(out.data());
    c = c + 1 == copies ? 0 : c + 1;
  }
  // Useful work only: q·k and p·v over each query's causal prefix.
  double pairs = 0.0;
  for (int64_t i = 0; i < s.n_q; ++i) pairs += static_cast<double>(s.pos0 + i + 1);
  const double it = static_cast<double>(state.iterations());
  state.counters["flops"] =
      benchmark::Counter(4.0 * pairs * static_cast<double>(qw) * it, benchmark::Counter::kIsRate);
  const double scale_bytes = s.kv_dtype == DType::I8 ? 2.0 * n_keys * s.n_kv_heads * 4 : 0.0;
  state.SetBytesProcessed(static_cast<int64_t>(
      (2.0 * n_keys * kvw * static_cast<double>(dtype_size(s.kv_dtype)) + scale_bytes) * it));
}

void BM_ReadBandwidth(benchmark::State& state) {
  double bw = 0.0;
  for (auto _ : state) bw = std::max(bw, measure_read_bandwidth(pool(), size_t{1} << 30, 3));
  state.counters["bw"] = bw;
  state.counters["threads"] = pool().size();
  state.SetLabel(std::string(isa_name(active_isa())));
}

// TinyLlama-1.1B: q/o, k/v, gate/up, down, lm_head.
#define TINYLLAMA_SHAPES(n)   \
  Args({2048, 2048, n})       \
      ->Args({256, 2048, n})  \
      ->Args({5632, 2048, n}) \
      ->Args({2048, 5632, n}) \
      ->Args({32000, 2048, n})
// The 'small' test model: q/o, k/v, gate/up, down, lm_head.
#define SMALL_SHAPES(n)      \
  Args({512, 512, n})        \
      ->Args({256, 512, n})  \
      ->Args({1024, 512, n}) \
      ->Args({512, 1024, n}) \
      ->Args({8192, 512, n})

BENCHMARK(BM_ReadBandwidth)->Iterations(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Decode<DType::BF16>)->TINYLLAMA_SHAPES(1)->UseRealTime();
BENCHMARK(BM_Decode<DType::F16>)->TINYLLAMA_SHAPES(1)->UseRealTime();
BENCHMARK(BM_Decode<DType::F32>)->TINYLLAMA_SHAPES(1)->UseRealTime();
BENCHMARK(BM_Decode<DType::BF16>)->Args({2048, 2048, 4})->Args({2048, 2048, 8})->UseRealTime();
// A batch of 8 sequences of the server's load test (the 'small' model): W streamed from memory
// (BM_Decode), and one copy of W that stays in cache (BM_Prefill, same kernel at 8 tokens).
BENCHMARK(BM_Decode<DType::BF16>)->SMALL_SHAPES(8)->UseRealTime();
BENCHMARK(BM_Prefill<DType::BF16>)->SMALL_SHAPES(8)->UseRealTime();
// Around the token count where dense decode tiles hand over to the GEMM (kDenseDecodeMaxTokens).
BENCHMARK(BM_Decode<DType::BF16>)
    ->Args({1024, 512, 12})
    ->Args({1024, 512, 16})
    ->Args({1024, 512, 24})
    ->Args({1024, 512, 32})
    ->UseRealTime();
BENCHMARK(BM_Prefill<DType::BF16>)->SMALL_SHAPES(512)->Unit(benchmark::kMillisecond)->UseRealTime();
// The same in the panel layout (what Model::load runs dense weights in).
BENCHMARK(BM_Decode<DType::BF16, true>)->TINYLLAMA_SHAPES(1)->UseRealTime();
BENCHMARK(BM_Decode<DType::BF16, true>)->SMALL_SHAPES(8)->UseRealTime();
BENCHMARK(BM_Decode<DType::BF16, true>)->Args({1024, 512, 16})->UseRealTime();
BENCHMARK(BM_Prefill<DType::BF16, true>)->SMALL_SHAPES(8)->UseRealTime();
BENCHMARK(BM_Prefill<DType::BF16, true>)
    ->SMALL_SHAPES(512)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_Prefill<DType::BF16, true>)
    ->TINYLLAMA_SHAPES(512)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_Prefill<DType::BF16>)
    ->TINYLLAMA_SHAPES(512)
    ->Args({2048, 2048, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_Prefill<DType::F32>)
    ->Args({2048, 2048, 512})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
// Decode at the end of a 2048-token context, and a 512-token prefill; TinyLlama and 'small'.
BENCHMARK(BM_Attention)
    ->Args({32, 4, 64, 1, 2047, 32, 1})
    ->Args({32, 4, 64, 1, 2047, 16, 1})
    ->Args({32, 4, 64, 1, 2047, 8, 1})
    ->Args({32, 4, 64, 1, 2047, 32, 22})
    ->Args({32, 4, 64, 1, 2047, 16, 22})
    ->Args({32, 4, 64, 1, 2047, 8, 22})
    ->Args({32, 4, 64, 1, 639, 32, 22})
    ->Args({32, 4, 64, 1, 639, 16, 22})
    ->Args({32, 4, 64, 1, 639, 8, 22})
    ->Args({8, 4, 64, 1, 511, 32, 1})
    ->Args({8, 4, 64, 1, 48, 32, 1})
    ->Args({8, 4, 64, 1, 48, 16, 1})
    ->Args({8, 4, 64, 1, 48, 8, 1})
    ->Args({32, 4, 64, 512, 0, 32, 1})
    ->Args({32, 4, 64, 512, 0, 16, 1})
    ->Args({32, 4, 64, 512, 0, 8, 1})
    ->Args({8, 4, 64, 512, 0, 32, 1})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace
}  // namespace sparsa::kernels

BENCHMARK_MAIN();
