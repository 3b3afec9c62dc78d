#include "sparsa/runtime/perplexity.h"

#include <chrono>
#include <cmath>
#include <span>

#include "sparsa/core/error.h"

namespace sparsa {

std::vector<int32_t> tokenize_corpus(const Tokenizer& tokenizer,
                                     const std::vector<std::string>& documents,
                                     int32_t separator) {
  std::vector<int32_t> out;
  for (size_t i = 0; i < documents.size(); ++i) {
    if (i > 0) out.push_back(separator);
    const std::vector<int32_t> ids = tokenizer.encode(documents[i], false);
    out.insert(out.end(), ids.begin(), ids.end());
  }
  return out;
}

PerplexityResult perplexity(model::Model& model, const std::vector<int32_t>& tokens, int64_t ctx,
                            ThreadPool& pool, const PerplexityProgress& progress,
                            int64_t max_windows, DType kv_cache) {
  const io::ModelConfig& cfg = model.config();
  SPARSA_CHECK(ctx >= 2, "the evaluation window must hold at least 2 tokens, got {}", ctx);
  SPARSA_CHECK(ctx <= cfg.max_context(), "the evaluation window ({}) exceeds the model's context ({})",
               ctx, cfg.max_context());
  int64_t windows = static_cast<int64_t>(tokens.size()) / ctx;
  SPARSA_CHECK(windows > 0, "the text has {} tokens, fewer than one window of {}", tokens.size(),
               ctx);
  if (max_windows > 0) windows = std::min(windows, max_windows);
  const int64_t vocab = cfg.vocab_size;
  std::vector<float> logits(static_cast<size_t>(ctx * vocab));
  model::KvCache cache(cfg, ctx, kv_cache);
  const auto start = std::chrono::steady_clock::now();
  double nll_sum = 0;
  int64_t scored = 0;
  for (int64_t w = 0; w < windows; ++w) {
    const std::span<const int32_t> win(tokens.data() + w * ctx, static_cast<size_t>(ctx));
    cache.clear();
    model.forward(win, cache, logits.data(), true, pool);
    std::vector<double> nll(static_cast<size_t>(ctx - 1));
    pool.parallel_for(ctx - 1, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* l = logits.data() + t * vocab;
        float m = l[0];
        for (int64_t i = 1; i < vocab; ++i) m = std::max(m, l[i]);
        double s = 0;
        for (int64_t i = 0; i < vocab; ++i) s += std::exp(l[i] - m);
        nll[static_cast<size_t>(t)] = std::log(s) + m - l[win[static_cast<size_t>(t + 1)]];
      }
    });
    for (double v : nll) nll_sum += v;
    scored += ctx - 1;
    if (progress) progress(w + 1, windows, std::exp(nll_sum / static_cast<double>(scored)));
  }
  PerplexityResult r;
  r.windows = windows;
  r.tokens_scored = scored;
  r.mean_nll = nll_sum / static_cast<double>(scored);
  r.ppl = std::exp(r.mean_nll);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

}  // namespace sparsa
