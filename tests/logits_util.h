// Logits of a token sequence through a model, for tests that compare two models' outputs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "sparsa/core/thread_pool.h"
#include "sparsa/model/llama.h"

namespace sparsa::testing {

/// Every position's logits of `ids` from an empty cache: ids.size() rows of vocab_size.
inline std::vector<float> all_logits(model::Model& m, std::span<const int32_t> ids,
                                     ThreadPool& pool) {
  const auto n = static_cast<int64_t>(ids.size());
  model::KvCache cache(m.config(), n);
  std::vector<float> logits(static_cast<size_t>(n * m.config().vocab_size));
  m.forward(ids, cache, logits.data(), true, pool);
  return logits;
}

/// How many entries differ between two equally long logit arrays (bit-identity checks).
inline size_t count_differing(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  size_t differ = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) differ += a[i] != b[i];
  return differ;
}

}  // namespace sparsa::testing
