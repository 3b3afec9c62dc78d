// Perplexity under the protocol of the project's references: tokenize each document without
// BOS, join documents with EOS, cut into non-overlapping windows of `ctx` tokens (the remainder
// is dropped), score every next-token prediction inside each window (ctx - 1 per window),
// ppl = exp(mean NLL).
//
//   auto stream = sparsa::tokenize_corpus(tokenizer, docs, eos_id);
//   sparsa::PerplexityResult r = sparsa::perplexity(model, stream, 512, pool);
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "sparsa/core/thread_pool.h"
#include "sparsa/model/llama.h"
#include "sparsa/runtime/tokenizer.h"

namespace sparsa {

/// Documents tokenized without special tokens, joined by `separator` (EOS).
std::vector<int32_t> tokenize_corpus(const Tokenizer& tokenizer,
                                     const std::vector<std::string>& documents, int32_t separator);

struct PerplexityResult {
  double ppl = 0;
  double mean_nll = 0;
  int64_t tokens_scored = 0;
  int64_t windows = 0;
  double seconds = 0;
};

/// Called after each window with (windows done, total windows, running ppl).
using PerplexityProgress = std::function<void(int64_t, int64_t, double)>;

/// kv_cache: the KV cache's element type (F32, BF16 or I8).
PerplexityResult perplexity(model::Model& model, const std::vector<int32_t>& tokens, int64_t ctx,
                            ThreadPool& pool, const PerplexityProgress& progress = {},
                            int64_t max_windows = 0, DType kv_cache = DType::F32);

}  // namespace sparsa
