#include "sparsa/runtime/generator.h"

#include <algorithm>
#include <chrono>

#include "sparsa/core/error.h"

namespace sparsa {

std::string StopStringFilter::push(std::string_view text) {
  if (stopped_) return {};
  held_.append(text);
  size_t cut = std::string::npos;
  for (const std::string& s : stops_) {
    if (s.empty()) continue;
    const size_t at = held_.find(s);
    if (at != std::string::npos) cut = std::min(cut, at);
  }
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, cut);
    held_.clear();
    return out;
  }
  // Keep the longest suffix of held_ that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& s : stops_)
    for (size_t len = std::min(s.size() - (s.empty() ? 0 : 1), held_.size()); len > keep; --len)
      if (held_.compare(held_.size() - len, len, s, 0, len) == 0) {
        keep = len;
        break;
      }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopStringFilter::flush() {
  std::string out;
  if (!stopped_) out.swap(held_);
  held_.clear();
  return out;
}

GenerateResult generate_ids(model::Model& model, const Tokenizer& tokenizer,
                            std::vector<int32_t> prompt_ids, const GenerateOptions& options,
                            ThreadPool& pool, const TextCallback& on_text) {
  using Clock = std::chrono::steady_clock;
  const io::ModelConfig& cfg = model.config();
  SPARSA_CHECK(!prompt_ids.empty(), "the prompt is empty (no tokens to start from)");
  SPARSA_CHECK(options.max_tokens >= 0, "max_tokens must be non-negative, got {}",
               options.max_tokens);
  const int64_t ctx = cfg.max_context();
  SPARSA_CHECK(static_cast<int64_t>(prompt_ids.size()) < ctx,
               "the prompt has {} tokens, but the model's context is {} tokens",
               prompt_ids.size(), ctx);
  GenerateResult r;
  r.prompt_ids = prompt_ids;
  r.finish_reason = "length";
  const int64_t budget =
      std::min<int64_t>(options.max_tokens, ctx - static_cast<int64_t>(prompt_ids.size()));
  model::KvCache cache(cfg, static_cast<int64_t>(prompt_ids.size()) + std::max<int64_t>(budget, 1),
                       options.kv_cache);
  Sampler sampler(options.sampling);
  StreamDecoder stream(tokenizer);
  StopStringFilter filter(options.stop);
  std::vector<float> logits(static_cast<size_t>(cfg.vocab_size));
  std::vector<int32_t> history = prompt_ids;

  bool keep_going = true;
  auto emit = [&](const std::string& piece) {
    if (piece.empty()) return;
    r.text += piece;
    if (on_text && !on_text(piece)) keep_going = false;
  };

  const auto t0 = Clock::now();
  if (budget > 0) model.forward(prompt_ids, cache, logits.data(), false, pool);
  const auto t1 = Clock::now();
  r.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  for (int64_t step = 0; step < budget && keep_going; ++step) {
    const int32_t next = sampler.sample(logits.data(), cfg.vocab_size, history);
    if (options.stop_at_eos &&
        std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), next) !=
            cfg.eos_token_ids.end()) {
      r.finish_reason = "stop";
      break;
    }
    r.ids.push_back(next);
    history.push_back(next);
    emit(filter.push(stream.push(next)));
    if (filter.stopped()) {
      r.finish_reason = "stop";
      break;
    }
    if (step + 1 < budget) {
      const int32_t one[1] = {next};
      model.forward(one, cache, logits.data(), false, pool);
    }
  }
  if (!filter.stopped()) {
    emit(filter.push(stream.flush()));
    emit(filter.flush());
  }
  r.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return r;
}

GenerateResult generate(model::Model& model, const Tokenizer& tokenizer, std::string_view prompt,
                        const GenerateOptions& options, ThreadPool& pool,
                        const TextCallback& on_text) {
  return generate_ids(model, tokenizer, tokenizer.encode(prompt, options.add_special_tokens),
                      options, pool, on_text);
}

}  // namespace sparsa
