// Benchmarks of what one continuous-batching step costs in `sparsa serve`, apart from HTTP:
//   - BM_EngineDecode/B: one Engine::step with B running sequences, one decode token each
//     (counter tok_s: generated tokens per second). Decode is bound by the weight bytes read per
//     step, so B tokens should cost little more than one: every linear layer streams its weights
//     once for the whole batch, and only attention is per sequence.
//   - BM_Sample/T: Sampler::sample over the model's vocabulary at temperature T (0: greedy), the
//     per-token work the scheduler adds to every sequence of every step.
// Model: SPARSA_BENCH_MODEL (default ../shared/models/small, else models/tiny, relative to the
// working directory). Threads: SPARSA_BENCH_THREADS (default 2).
//   build/release/bench_serve --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "sparsa/runtime/engine.h"
#include "sparsa/runtime/sampler.h"

namespace sparsa {
namespace {

std::string model_dir() {
  if (const char* env = std::getenv("SPARSA_BENCH_MODEL")) return env;
  for (const char* d : {"../shared/models/small", "models/tiny"})
    if (std::filesystem::exists(std::filesystem::path(d) / "config.json")) return d;
  return "models/tiny";
}

int threads() {
  const char* env = std::getenv("SPARSA_BENCH_THREADS");
  return env != nullptr ? std::atoi(env) : 2;
}

constexpr int kMaxBatch = 16;
constexpr int64_t kPromptTokens = 16;

Engine& engine() {
  static std::unique_ptr<Engine> e = [] {
    EngineOptions o;
    o.max_sequences = kMaxBatch;
    o.threads = threads();
    o.context = 1024;
    return std::make_unique<Engine>(model::Model::load(model_dir()), o);
  }();
  return *e;
}

void BM_EngineDecode(benchmark::State& state) {
  Engine& e = engine();
  const int batch = static_cast<int>(state.range(0));
  const int64_t vocab = e.vocab_size();
  std::vector<int> slots;
  for (int i = 0; i < batch; ++i) slots.push_back(e.acquire());
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(batch));
  std::vector<int32_t> next(static_cast<size_t>(batch));
  std::vector<float> logits(static_cast<size_t>(batch * vocab));
  std::vector<Engine::Item> items;
  std::mt19937 rng(1);
  auto restart = [&] {
    items.clear();
    for (int i = 0; i < batch; ++i) {
      e.release(slots[static_cast<size_t>(i)]);
      slots[static_cast<size_t>(i)] = e.acquire();
      auto& p = prompts[static_cast<size_t>(i)];
      p.resize(kPromptTokens);
      for (int32_t& t : p) t = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
      items.push_back({slots[static_cast<size_t>(i)], p, logits.data() + i * vocab});
    }
    e.step(items);
    items.clear();
    for (int i = 0; i < batch; ++i)
      items.push_back({slots[static_cast<size_t>(i)],
                       std::span<const int32_t>(&next[static_cast<size_t>(i)], 1),
                       logits.data() + i * vocab});
  };
  restart();
  for (auto _ : state) {
    if (e.length(slots[0]) + 1 >= (state.range(1) > 0 ? state.range(1) : e.context())) {
      state.PauseTiming();
      restart();
      state.ResumeTiming();
    }
    for (int i = 0; i < batch; ++i)
      next[static_cast<size_t>(i)] = argmax(logits.data() + i * vocab, vocab);
    e.step(items);
  }
  for (int s : slots) e.release(s);
  state.counters["tok_s"] =
      benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Sample(benchmark::State& state) {
  const int64_t vocab = engine().vocab_size();
  std::mt19937 rng(2);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> logits(static_cast<size_t>(vocab));
  for (float& l : logits) l = dist(rng);
  std::vector<float> work(logits.size());
  SamplingParams p;
  p.temperature = static_cast<float>(state.range(0)) / 10.0f;
  p.seed = 7;
  Sampler sampler(p);
  for (auto _ : state) {
    work = logits;
    benchmark::DoNotOptimize(sampler.sample(work.data(), vocab, {}));
  }
}

// Arguments: sequences, and the length at which they restart (0: the engine's context; 80: a
// 16-token prompt and 64 new tokens, as the server's load test asks).
BENCHMARK(BM_EngineDecode)->ArgsProduct({{1, 2, 4, 8, 16}, {0, 80}})->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_Sample)->Arg(0)->Arg(8)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace sparsa

BENCHMARK_MAIN();
