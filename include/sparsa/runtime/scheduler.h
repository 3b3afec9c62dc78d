// Continuous batching over an Engine. Sequences wait in a bounded queue, take a KV slot when one
// is free, and from then on take part in every step: a step stacks one decode token of every
// running sequence with prompt chunks of newly admitted ones (at most `prefill_tokens` per step),
// runs them as one batch, samples each sequence's next token and reports it. A sequence leaves
// the batch (and frees its slot) at the step it finishes or is cancelled.
//
//   sparsa::Scheduler sched(engine, {});
//   sparsa::SequenceParams p;  p.prompt = ids;  p.max_tokens = 32;
//   sparsa::SequenceCallbacks cb;
//   cb.on_token = [](const sparsa::TokenInfo& t) { ...; return true; };   // false: stop here
//   cb.on_end = [](const sparsa::SequenceEnd& e) { ... e.finish_reason ... };
//   auto id = sched.submit(std::move(p), std::move(cb));
//
// Callbacks run on the scheduler's thread, which also runs the model: they must be quick and
// must not call back into the scheduler.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "sparsa/core/error.h"
#include "sparsa/runtime/engine.h"
#include "sparsa/runtime/sampler.h"

namespace sparsa {

struct SequenceParams {
  std::vector<int32_t> prompt;  // at least one token, shorter than the engine's context
  int64_t max_tokens = 16;      // generated tokens at most (also capped by the context)
  SamplingParams sampling;
  bool stop_at_eos = true;  // the model's EOS ids end the sequence (not reported as tokens)
  int top_logprobs = -1;    // -1: no log-probabilities; 0: the chosen token's; k: also the k best
};

struct TokenInfo {
  int32_t id = 0;
  float logprob = 0;  // log-softmax of the model's logits (before sampling adjustments)
  std::vector<std::pair<int32_t, float>> top;  // the top_logprobs best, best first
};

struct SequenceEnd {
  std::string finish_reason;  // "stop", "length", "cancelled" or "error"
  std::string error;          // the message when "error"
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

struct SequenceCallbacks {
  std::function<bool(const TokenInfo&)> on_token;  // return false to finish ("stop")
  std::function<void(const SequenceEnd&)> on_end;  // exactly once per submitted sequence
};

/// Thrown by submit() when the queue is full (the server answers 429).
class QueueFull : public Error {
 public:
  using Error::Error;
};

struct SchedulerOptions {
  int max_queue = 64;           // sequences waiting for a slot at most
  int64_t prefill_tokens = 256;  // prompt tokens per step at most (beside the decode tokens)
};

/// Fixed-bucket histogram in seconds (Prometheus style: cumulative counts per upper bound).
struct LatencyHistogram {
  std::vector<double> bounds;   // upper bounds, ascending
  std::vector<uint64_t> counts;  // per bucket (not cumulative); the last is +Inf
  uint64_t count = 0;
  double sum = 0;
  LatencyHistogram();
  void observe(double seconds);
};

struct SchedulerStats {
  int64_t queued = 0;   // waiting for a slot
  int64_t running = 0;  // holding a slot
  uint64_t submitted = 0, finished = 0, cancelled = 0;
  uint64_t prompt_tokens = 0, generated_tokens = 0, steps = 0;
  LatencyHistogram time_to_first_token, inter_token_latency;
};

class Scheduler {
 public:
  using Id = uint64_t;
  Scheduler(Engine& engine, const SchedulerOptions& options);
  ~Scheduler();  // finishes every sequence still known as "cancelled", then stops the thread
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  /// Queues one sequence. Throws sparsa::Error on invalid parameters (empty prompt, a prompt
  /// that does not fit in the context, bad sampling values) and QueueFull when the queue is full.
  Id submit(SequenceParams params, SequenceCallbacks callbacks);
  /// Queues several sequences together: all of them, or none (QueueFull / Error).
  std::vector<Id> submit_group(std::vector<std::pair<SequenceParams, SequenceCallbacks>> group);
  /// Finishes the sequence as "cancelled" at the next step boundary, freeing its slot. Unknown
  /// or finished ids are ignored.
  void cancel(Id id);

  SchedulerStats stats() const;
  const Engine& engine() const { return engine_; }
  int64_t context() const { return engine_.context(); }

 private:
  struct Sequence;
  void loop();
  void validate(const SequenceParams& p) const;
  static int32_t sample_token(Sequence& s, int64_t vocab, TokenInfo& info);
  void finish(Sequence& s, std::string reason, std::string error,
              std::vector<std::pair<SequenceCallbacks, SequenceEnd>>& ends);

  Engine& engine_;
  SchedulerOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  Id next_id_ = 1;
  std::deque<std::unique_ptr<Sequence>> queue_;
  std::vector<std::unique_ptr<Sequence>> running_;  // owned by the loop thread
  std::vector<Id> cancel_requests_;
  SchedulerStats stats_;
  std::atomic<int64_t> running_count_{0};
  std::thread thread_;
};

}  // namespace sparsa
