#include "sparsa/runtime/bench.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include "sparsa/core/cpu.h"
#include "sparsa/core/error.h"
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

BenchResult run_bench(model::Model& model, ThreadPool& pool, const BenchOptions& opt) {
  using Clock = std::chrono::steady_clock;
  const io::ModelConfig& cfg = model.config();
  SPARSA_CHECK(opt.prompt_tokens >= 1 && opt.decode_tokens >= 1,
               "bench needs at least one prompt token and one decode token");
  SPARSA_CHECK(opt.prompt_tokens + opt.decode_tokens <= cfg.max_context(),
               "bench: {} prompt + {} decode tokens exceed the model's context of {}",
               opt.prompt_tokens, opt.decode_tokens, cfg.max_context());
  BenchResult r;
  r.threads = pool.size();
  r.isa = std::string(isa_name(active_isa()));
  r.prompt_tokens = opt.prompt_tokens;
  r.decode_tokens = opt.decode_tokens;
  r.weight_bytes_per_token = model.weight_bytes_per_token();

  kernels::BandwidthProbe probe(pool, opt.bandwidth_bytes);
  std::vector<double> bw_samples;
  bw_samples.push_back(probe.sample());  // warms the probe's pages and the pool

  Rng rng(opt.seed);
  std::vector<int32_t> prompt(static_cast<size_t>(opt.prompt_tokens));
  for (auto& t : prompt) t = static_cast<int32_t>(rng.next() % static_cast<uint64_t>(cfg.vocab_size));
  std::vector<float> logits(static_cast<size_t>(cfg.vocab_size));
  model::KvCache cache(cfg, opt.prompt_tokens + opt.decode_tokens);

  std::vector<double> prefill_times;
  for (int rep = 0; rep < std::max(1, opt.repetitions); ++rep) {
    cache.clear();
    const auto t0 = Clock::now();
    model.forward(prompt, cache, logits.data(), false, pool);
    prefill_times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::vector<double> step_times;
  int32_t next = argmax(logits.data(), cfg.vocab_size);
  for (int64_t i = 0; i < opt.decode_tokens; ++i) {
    const int32_t one[1] = {next};
    const auto t0 = Clock::now();
    model.forward(one, cache, logits.data(), false, pool);
    step_times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    next = argmax(logits.data(), cfg.vocab_size);
    bw_samples.push_back(probe.sample());
  }
  bw_samples.erase(bw_samples.begin());
  const double bw = median(bw_samples);
  r.bandwidth_best_gb_per_s = *std::max_element(bw_samples.begin(), bw_samples.end()) / 1e9;

  const double prefill_s = median(prefill_times);
  const double step_s = median(step_times);
  r.prefill_tokens_per_s = static_cast<double>(opt.prompt_tokens) / prefill_s;
  r.decode_tokens_per_s = 1.0 / step_s;
  r.bandwidth_gb_per_s = bw / 1e9;
  r.decode_bound_tokens_per_s = bw / static_cast<double>(r.weight_bytes_per_token);
  r.decode_fraction_of_bound = r.decode_tokens_per_s / r.decode_bound_tokens_per_s;
  int64_t linear_params = cfg.vocab_size * cfg.hidden_size;
  for (const auto& b : model.blocks())
    for (const auto* l : {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down})
      linear_params += l->weight.rows * l->weight.cols;
  // lm_head runs for the last prompt token only.
  const double flops =
      2.0 * static_cast<double>(linear_params - cfg.vocab_size * cfg.hidden_size) *
          static_cast<double>(opt.prompt_tokens) +
      2.0 * static_cast<double>(cfg.vocab_size * cfg.hidden_size);
  r.prefill_gflop_per_s = flops / prefill_s / 1e9;
  return r;
}

}  // namespace sparsa
