// Time of the calibrated one-shot passes on TinyLlama's MLP shapes (5632×2048 and 2048×5632),
// with an AR(1) covariance H_ij = 0.9^|i−j| standing in for a calibration Hessian: positive
// definite and far from diagonal. Threads: SPARSA_BENCH_THREADS (default 2).
//   bench_compress --benchmark_repetitions=3
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <vector>

#include "sparsa/compress/matrix.h"
#include "sparsa/compress/prune.h"
#include "sparsa/compress/quantize.h"
#include "sparsa/core/thread_pool.h"

namespace sparsa::compress {
namespace {

int bench_threads() {
  const char* env = std::getenv("SPARSA_BENCH_THREADS");
  return env ? std::atoi(env) : 2;
}

Matrix random_weight(int64_t rows, int64_t cols) {
  Matrix w(rows, cols);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  for (float& v : w.data) v = nd(rng);
  return w;
}

std::vector<double> ar1_hessian(int64_t cols) {
  std::vector<double> h(static_cast<size_t>(cols * cols));
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < cols; ++j) h[i * cols + j] = std::pow(0.9, std::abs(i - j));
  return h;
}

// range(0): rows, range(1): cols, range(2): 0 = 50% unstructured, 1 = 2:4.
void BM_SparseGpt(benchmark::State& state) {
  ThreadPool pool(bench_threads());
  const Matrix w0 = random_weight(state.range(0), state.range(1));
  const std::vector<double> h0 = ar1_hessian(state.range(1));
  const SparsityPattern pat = state.range(2) ? SparsityPattern{0.0, 2, 4} : SparsityPattern{0.5};
  for (auto _ : state) {
    state.PauseTiming();
    Matrix w = w0;
    std::vector<double> h = h0;
    state.ResumeTiming();
    sparsegpt_prune(w, std::move(h), pat, {}, nullptr, &pool);
    benchmark::DoNotOptimize(w.data.data());
  }
}
BENCHMARK(BM_SparseGpt)
    ->Args({5632, 2048, 0})
    ->Args({2048, 5632, 0})
    ->Args({5632, 2048, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_GptqW4G128(benchmark::State& state) {
  ThreadPool pool(bench_threads());
  const Matrix w0 = random_weight(state.range(0), state.range(1));
  const std::vector<double> h0 = ar1_hessian(state.range(1));
  for (auto _ : state) {
    state.PauseTiming();
    Matrix w = w0;
    std::vector<double> h = h0;
    state.ResumeTiming();
    auto q = gptq_quantize(w, std::move(h), {4, false, 128, false}, {}, nullptr, &pool);
    benchmark::DoNotOptimize(q);
  }
}
BENCHMARK(BM_GptqW4G128)
    ->Args({5632, 2048})
    ->Args({2048, 5632})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace sparsa::compress

BENCHMARK_MAIN();
