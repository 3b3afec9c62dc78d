// Text generation over a loaded model: prefill the prompt, then decode one token at a time,
// streaming text as it becomes complete, until EOS, a stop string or the token limit.
//
//   sparsa::GenerateOptions opt;  opt.max_tokens = 64;  opt.stop = {"\n\n"};
//   auto r = sparsa::generate(model, tokenizer, "The kernel", opt, pool,
//                             [](std::string_view piece) { std::cout << piece; return true; });
//   r.finish_reason  // "stop" or "length"
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "sparsa/core/thread_pool.h"
#include "sparsa/model/llama.h"
#include "sparsa/runtime/sampler.h"
#include "sparsa/runtime/tokenizer.h"

namespace sparsa {

struct GenerateOptions {
  int64_t max_tokens = 128;
  SamplingParams sampling;
  std::vector<std::string> stop;  // stop strings; the text ends before the first match
  bool stop_at_eos = true;
  bool add_special_tokens = true;  // BOS per the tokenizer's template
  DType kv_cache = DType::F32;     // the KV cache's element type: F32, BF16 or I8
};

struct GenerateResult {
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> ids;  // generated ids
  std::string text;          // generated text, cut before a stop string
  std::string finish_reason;  // "stop" (EOS or stop string) or "length"
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

/// Called with each newly complete piece of text; return false to stop early.
using TextCallback = std::function<bool(std::string_view piece)>;

/// Generates from token ids (the caller tokenized).
GenerateResult generate_ids(model::Model& model, const Tokenizer& tokenizer,
                            std::vector<int32_t> prompt_ids, const GenerateOptions& options,
                            ThreadPool& pool, const TextCallback& on_text = {});

GenerateResult generate(model::Model& model, const Tokenizer& tokenizer, std::string_view prompt,
                        const GenerateOptions& options, ThreadPool& pool,
                        const TextCallback& on_text = {});

/// Holds back streamed text that could still turn out to begin a stop string.
class StopStringFilter {
 public:
  explicit StopStringFilter(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  /// Feeds newly decoded text; returns what can be released now. Sets stopped() when a stop
  /// string appeared (text from it on is dropped).
  std::string push(std::string_view text);
  /// Releases the held-back text at the end of generation.
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace sparsa
