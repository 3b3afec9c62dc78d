// Speed of a loaded model against the machine's memory-bandwidth bound, measured in one run.
//
// Decoding one token reads every weight once, so decode tokens/s can be at most
// bandwidth / weight bytes per token; `decode_fraction_of_bound` says how close we come.
// The bandwidth is probed between decode steps (one full read of a buffer much larger than the
// caches after each step), so that bound and decode see the same moments of a shared machine;
// both are medians.
//
//   sparsa::BenchResult r = sparsa::run_bench(model, pool, {});
#pragma once

#include <cstdint>
#include <string>

#include "sparsa/core/thread_pool.h"
#include "sparsa/model/llama.h"

namespace sparsa {

struct BenchOptions {
  int64_t prompt_tokens = 128;
  int64_t decode_tokens = 32;
  int repetitions = 3;  // prefill repetitions; the median is reported
  size_t bandwidth_bytes = size_t{256} << 20;  // probe buffer: 8x a 32 MiB L3
  uint64_t seed = 1;
};

struct BenchResult {
  int threads = 0;
  std::string isa;
  int64_t prompt_tokens = 0;
  int64_t decode_tokens = 0;
  double prefill_tokens_per_s = 0;
  double decode_tokens_per_s = 0;  // from the median time per decoded token
  size_t weight_bytes_per_token = 0;
  double bandwidth_gb_per_s = 0;       // median of the probes interleaved with decode steps
  double bandwidth_best_gb_per_s = 0;  // the best single probe of the run
  double decode_bound_tokens_per_s = 0;
  double decode_fraction_of_bound = 0;
  double prefill_gflop_per_s = 0;  // 2 x parameters in linear layers x tokens / time
};

BenchResult run_bench(model::Model& model, ThreadPool& pool, const BenchOptions& options);

}  // namespace sparsa
