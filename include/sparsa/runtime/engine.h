// Engine: token ids in, logits out. Owns a loaded model, the thread pool that runs it, and one KV
// cache pool shared by all sequences: a fixed number of slots, each able to hold `context` tokens.
// A step runs any mix of sequences (prompt chunks and single decode tokens) as one batch.
//
//   sparsa::EngineOptions opt;  opt.max_sequences = 8;
//   sparsa::Engine engine(sparsa::model::Model::load("models/tiny"), opt);
//   int a = engine.acquire(), b = engine.acquire();
//   std::vector<float> la(engine.vocab_size()), lb(engine.vocab_size());
//   sparsa::Engine::Item items[] = {{a, prompt_a, la.data()}, {b, prompt_b, lb.data()}};
//   engine.step(items);          // one batched forward over both prompts
//   engine.release(a);
//
// Not thread-safe: one thread (the scheduler's) drives it.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "sparsa/core/thread_pool.h"
#include "sparsa/model/batch.h"
#include "sparsa/model/llama.h"

namespace sparsa {

struct EngineOptions {
  int max_sequences = 8;  // KV cache slots (sequences that can run at once)
  int64_t context = 0;    // tokens per slot; 0 or more than the model's: the model's context
  int threads = 0;        // 0: all hardware threads
  DType kv_cache = DType::F32;  // the KV caches' element type: F32, BF16 or I8 (model::KvCache)
};

class Engine {
 public:
  Engine(std::unique_ptr<model::Model> model, const EngineOptions& options);

  const model::Model& model() const { return *model_; }
  const io::ModelConfig& config() const { return model_->config(); }
  int64_t vocab_size() const { return model_->config().vocab_size; }
  /// Tokens one sequence can hold (prompt and generated together).
  int64_t context() const { return context_; }
  int max_sequences() const { return static_cast<int>(slots_.size()); }
  ThreadPool& pool() { return pool_; }

  /// Takes a free slot, emptied; -1 when every slot is in use.
  int acquire();
  void release(int slot);
  int free_slots() const { return static_cast<int>(free_.size()); }
  /// Tokens the slot holds so far.
  int64_t length(int slot) const;

  struct Item {
    int slot = -1;
    std::span<const int32_t> tokens;  // appended to the slot's sequence
    float* logits = nullptr;          // [vocab] of the last token, or nullptr
  };
  /// One batched forward over all items (distinct slots). Throws sparsa::Error on a bad item,
  /// before any slot is changed.
  void step(std::span<const Item> items);

 private:
  std::unique_ptr<model::Model> model_;
  ThreadPool pool_;
  int64_t context_ = 0;
  std::vector<std::unique_ptr<model::KvCache>> slots_;
  std::vector<bool> in_use_;
  std::vector<int> free_;
  model::BatchWorkspace ws_;
  std::vector<model::BatchSequence> batch_;
};

}  // namespace sparsa
