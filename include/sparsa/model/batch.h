// One decoder step over several independent sequences at once: every sequence brings its own
// new tokens (a prompt chunk or one decode token) and its own KV cache, all their tokens are
// stacked into one activation matrix so that each linear layer runs once for the whole batch,
// and attention runs per sequence over its own cache.
//
//   sparsa::model::BatchWorkspace ws;
//   std::vector<sparsa::model::BatchSequence> seqs = {
//       {prompt_ids, &cache_a, logits_a.data()},   // prefill of a new request
//       {{&next_b, 1}, &cache_b, logits_b.data()}, // one decode step of a running one
//   };
//   sparsa::model::forward_batch(*model, seqs, ws, pool);
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "sparsa/core/thread_pool.h"
#include "sparsa/model/llama.h"

namespace sparsa::model {

struct BatchSequence {
  std::span<const int32_t> tokens;  // new tokens, at positions cache->size() ...
  KvCache* cache = nullptr;         // appended to (its size grows by tokens.size())
  float* logits = nullptr;          // [vocab] of the last token, or nullptr for none
};

/// Activations of a batched step; grown on demand and reused across calls.
struct BatchWorkspace {
  AlignedVector<float> x, xn, q, k, v, attn, gate, up, cos, sin, logits;
  LinearScratch linear;  // W8A8 and low-rank intermediates
  std::vector<int64_t> pos;  // position of every stacked token
};

/// Runs one step of every sequence in `seqs` (each non-empty; distinct caches). Equivalent to
/// calling model.forward(seq.tokens, *seq.cache, seq.logits, false, pool) for each sequence, up
/// to the rounding of the kernels (which may pick another path for a different token count).
/// Throws sparsa::Error when a sequence does not fit in its cache or names a bad token id; then
/// no cache has been modified.
void forward_batch(const Model& model, std::span<const BatchSequence> seqs, BatchWorkspace& ws,
                   ThreadPool& pool);

}  // namespace sparsa::model
