// Speed of a loaded model against the machine's memory-bandwidth bound, measured in one run.
//
// Decoding one token reads every weight once and the whole KV cache of the sequence (f32 keys and
// values of every layer, at the context the step runs at), so decode tokens/s can be at most
// bandwidth / (weight bytes + KV-cache bytes per token); `decode_fraction_of_bound` says how close
// we come. The KV-cache bytes are averaged over the decode steps (prompt + 1 .. prompt + decode
// positions).
// The bandwidth is probed between decode steps (one full read of a buffer much larger than the
// caches after each step), so that bound and decode see the same moments of a shared machine;
// both are medians.
//
//   sparsa::BenchResult r = sparsa::run_bench(model, pool, {});
//
// Formats compared on one model shape, each built data-free from random weights in memory, and
// measured in rounds that visit every format in turn (sparsa bench --shape tinyllama-1.1b
// --formats bf16,int4g128,2of4-int4g128):
//
//   auto results = sparsa::run_format_bench(sparsa::model::named_shape("tinyllama-1.1b"),
//                                           {"bf16", "int4g128"}, pool, opt);
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "sparsa/core/thread_pool.h"
#include "sparsa/model/llama.h"

namespace sparsa {

struct BenchOptions {
  int64_t prompt_tokens = 128;
  int64_t decode_tokens = 32;
  int repetitions = 3;                         // prefill repetitions; the median is reported
  // run_format_bench: the decode steps of every format are split into this many rounds, and
  // each round (like each prefill repetition) visits every format in turn; 1 = one format after
  // the other.
  int rounds = 4;
  size_t bandwidth_bytes = size_t{256} << 20;  // probe buffer: 8x a 32 MiB L3
  uint64_t seed = 1;
  DType kv_cache = DType::F32;  // the KV cache's element type: F32, BF16 or I8
};

struct BenchResult {
  int threads = 0;
  std::string isa;
  int64_t prompt_tokens = 0;
  int64_t decode_tokens = 0;
  double prefill_tokens_per_s = 0;
  double decode_tokens_per_s = 0;  // from the median time per decoded token
  size_t weight_bytes_per_token = 0;
  size_t kv_bytes_per_token = 0;  // mean over the decode steps of the KV cache read
  double bandwidth_gb_per_s = 0;       // median of the probes interleaved with decode steps
  double bandwidth_best_gb_per_s = 0;  // the best single probe of the run
  double decode_bound_tokens_per_s = 0;
  double decode_fraction_of_bound = 0;
  double prefill_gflop_per_s = 0;  // 2 x parameters in linear layers x tokens / time
};

BenchResult run_bench(model::Model& model, ThreadPool& pool, const BenchOptions& options);

/// A weight format of the random-model benchmark, by name:
///   bf16 | f16 | f32                    dense
///   int<b>g<G> | int<b>                 round-to-nearest, b in 2..8, groups of G input columns
///                                       or one scale per output channel (asymmetric)
///   palette<b>                          k-means on the unique bf16 values, one table per matrix
///   sparse<P>-<values>                  P% of each matrix pruned by magnitude, values bf16,
///                                       int<b>[g<G>] (quantized after pruning) or palette<b>
///   <n>of<m>-<values>                   n kept of every m input columns (2of4: 2:4), by magnitude
/// Every format except the dense ones runs lm_head in int8 per output channel (symmetric RTN);
/// the dense ones keep lm_head in their own dtype.
struct BenchFormat {
  enum class Values : uint8_t { kDense, kInt, kPalette };
  std::string name;
  Values values = Values::kDense;
  DType dtype = DType::BF16;  // kDense
  int bits = 0;               // kInt, kPalette
  int64_t group_size = 0;     // kInt: 0 = per output channel
  double sparsity = 0.0;      // unstructured magnitude pruning
  int nm_keep = 0, nm_m = 0;  // N:M pruning: nm_keep of every nm_m kept
};

/// Parses a format name; throws sparsa::Error naming it and the accepted forms.
BenchFormat parse_bench_format(const std::string& name);

/// A model of `config`'s shape with random N(0, 0.02) bf16 weights (norms 1, biases 0) converted
/// to `format` and packed (formats::PackedWeight), built in memory with the pool's threads.
std::unique_ptr<model::Model> build_random_model(const io::ModelConfig& config,
                                                 const BenchFormat& format, uint64_t seed,
                                                 ThreadPool& pool);

struct FormatBenchResult {
  std::string format;
  std::string layout;  // the packed layout of one MLP weight, e.g. "sparse2:4-int4g128"
  double build_seconds = 0;
  int decode_rounds = 1;  // rounds its decode steps were split into (BenchOptions::rounds)
  BenchResult bench;
  /// decode tokens/s over int4g128's, and prefill tokens/s over bf16's, in the same run;
  /// NaN when that format is not in the list.
  double decode_speedup_vs_int4g128 = 0;
  double prefill_fraction_of_bf16 = 0;
};

/// Builds and benchmarks every format. When all fit in memory at once (estimated, against
/// MemAvailable) they are built first and measured in interleaved rounds (BenchOptions::rounds);
/// otherwise each is built, measured and freed in turn. Every name is parsed first, so a bad one
/// fails before anything is built. `on_result` (may be empty) sees each result as it comes,
/// before the ratios are known.
std::vector<FormatBenchResult> run_format_bench(
    const io::ModelConfig& config, const std::vector<std::string>& formats, ThreadPool& pool,
    const BenchOptions& options,
    const std::function<void(const FormatBenchResult&)>& on_result = {});

}  // namespace sparsa
