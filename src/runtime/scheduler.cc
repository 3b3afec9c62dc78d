#include "sparsa/runtime/scheduler.h"

#include <algorithm>
#include <cmath>

namespace sparsa {

namespace {
using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}
}  // namespace

LatencyHistogram::LatencyHistogram()
    : bounds{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60},
      counts(bounds.size() + 1, 0) {}

void LatencyHistogram::observe(double seconds) {
  const size_t b = static_cast<size_t>(
      std::lower_bound(bounds.begin(), bounds.end(), seconds) - bounds.begin());
  ++counts[b];
  ++count;
  sum += seconds;
}

struct Scheduler::Sequence {
  Id id = 0;
  SequenceParams p;
  SequenceCallbacks cb;
  std::unique_ptr<Sampler> sampler;
  int slot = -1;
  int64_t prefilled = 0;  // prompt tokens already in the KV cache
  int64_t budget = 0;     // tokens it may generate
  int64_t generated = 0;
  int32_t pending = -1;  // the sampled token that the next step feeds
  std::vector<int32_t> history;
  std::vector<float> logits;
  Clock::time_point submitted, last_token;
};

Scheduler::Scheduler(Engine& engine, const SchedulerOptions& options)
    : engine_(engine), options_(options) {
  SPARSA_CHECK(options_.max_queue >= 0, "the queue size must be non-negative, got {}",
               options_.max_queue);
  SPARSA_CHECK(options_.prefill_tokens >= 1, "prefill tokens per step must be positive, got {}",
               options_.prefill_tokens);
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void Scheduler::validate(const SequenceParams& p) const {
  SPARSA_CHECK(!p.prompt.empty(), "the prompt is empty (no tokens to start from)");
  SPARSA_CHECK(static_cast<int64_t>(p.prompt.size()) < engine_.context(),
               "the prompt has {} tokens, but the context is {} tokens", p.prompt.size(),
               engine_.context());
  for (int32_t id : p.prompt)
    SPARSA_CHECK(id >= 0 && id < engine_.vocab_size(),
                 "token id {} is outside the vocabulary ({})", id, engine_.vocab_size());
  SPARSA_CHECK(p.max_tokens >= 0, "max_tokens must be non-negative, got {}", p.max_tokens);
  SPARSA_CHECK(p.top_logprobs >= -1 && p.top_logprobs <= 20,
               "top_logprobs must be in [0, 20], got {}", p.top_logprobs);
  p.sampling.validate();
}

Scheduler::Id Scheduler::submit(SequenceParams params, SequenceCallbacks callbacks) {
  std::vector<std::pair<SequenceParams, SequenceCallbacks>> one;
  one.emplace_back(std::move(params), std::move(callbacks));
  return submit_group(std::move(one)).at(0);
}

std::vector<Scheduler::Id> Scheduler::submit_group(
    std::vector<std::pair<SequenceParams, SequenceCallbacks>> group) {
  std::vector<std::unique_ptr<Sequence>> seqs;
  for (auto& [p, cb] : group) {
    validate(p);
    auto s = std::make_unique<Sequence>();
    s->sampler = std::make_unique<Sampler>(p.sampling);
    s->budget = std::min<int64_t>(p.max_tokens,
                                  engine_.context() - static_cast<int64_t>(p.prompt.size()));
    s->history = p.prompt;
    s->p = std::move(p);
    s->cb = std::move(cb);
    s->submitted = Clock::now();
    seqs.push_back(std::move(s));
  }
  std::vector<Id> ids;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (static_cast<int64_t>(queue_.size() + seqs.size()) > options_.max_queue)
      throw QueueFull(fmt::format("the server is busy: {} requests are already waiting (the "
                                  "queue holds {}); retry later",
                                  queue_.size(), options_.max_queue));
    for (auto& s : seqs) {
      s->id = next_id_++;
      ids.push_back(s->id);
      queue_.push_back(std::move(s));
    }
    stats_.submitted += ids.size();
    stats_.queued = static_cast<int64_t>(queue_.size());
  }
  wake_.notify_all();
  return ids;
}

void Scheduler::cancel(Id id) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    cancel_requests_.push_back(id);
  }
  wake_.notify_all();
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void Scheduler::finish(Sequence& s, std::string reason, std::string error,
                       std::vector<std::pair<SequenceCallbacks, SequenceEnd>>& ends) {
  if (s.slot >= 0) {
    engine_.release(s.slot);
    s.slot = -1;
  }
  SequenceEnd e;
  e.finish_reason = std::move(reason);
  e.error = std::move(error);
  e.prompt_tokens = static_cast<int64_t>(s.p.prompt.size());
  e.completion_tokens = s.generated;
  ends.emplace_back(std::move(s.cb), std::move(e));
}

// The next token of `s` from its logits (left by the step), with the log-probabilities asked for.
// Touches only `s`, so that sequences can be sampled in parallel.
int32_t Scheduler::sample_token(Sequence& s, int64_t vocab, TokenInfo& info) {
  thread_local std::vector<float> raw;
  thread_local std::vector<std::pair<float, int32_t>> ranked;
  double log_z = 0;
  if (s.p.top_logprobs >= 0) {
    raw.assign(s.logits.begin(), s.logits.end());
    const float mx = *std::max_element(raw.begin(), raw.end());
    double z = 0;
    for (float l : raw) z += std::exp(static_cast<double>(l) - mx);
    log_z = mx + std::log(z);
    if (s.p.top_logprobs > 0) {
      ranked.resize(raw.size());
      for (size_t t = 0; t < raw.size(); ++t) ranked[t] = {raw[t], static_cast<int32_t>(t)};
      const size_t k = std::min(ranked.size(), static_cast<size_t>(s.p.top_logprobs));
      std::partial_sort(ranked.begin(), ranked.begin() + static_cast<ptrdiff_t>(k), ranked.end(),
                        [](const auto& a, const auto& b) {
                          return a.first > b.first || (a.first == b.first && a.second < b.second);
                        });
      for (size_t t = 0; t < k; ++t)
        info.top.emplace_back(ranked[t].second, static_cast<float>(ranked[t].first - log_z));
    }
  }
  const int32_t next = s.sampler->sample(s.logits.data(), vocab, s.history);
  if (s.p.top_logprobs >= 0) info.logprob = static_cast<float>(raw[static_cast<size_t>(next)] - log_z);
  return next;
}

void Scheduler::loop() {
  const int64_t vocab = engine_.vocab_size();
  const std::vector<int32_t>& eos = engine_.config().eos_token_ids;
  std::vector<Engine::Item> items;
  std::vector<Sequence*> item_seq;
  struct Sampled {
    Sequence* seq;
    TokenInfo info;
    int32_t next;
    std::string error;
  };
  std::vector<Sampled> sampled;
  std::vector<std::pair<SequenceCallbacks, SequenceEnd>> ends;
  std::vector<double> ttft, itl;
  auto run_ends = [&] {
    for (auto& [cb, e] : ends)
      if (cb.on_end) cb.on_end(e);
    ends.clear();
  };
  // Finished sequences have given their slot back.
  auto drop_finished = [&] {
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [](const auto& s) { return s->slot < 0; }),
                   running_.end());
  };

  for (;;) {
    uint64_t n_cancelled = 0;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] {
        return stop_ || !queue_.empty() || !running_.empty() || !cancel_requests_.empty();
      });
      if (stop_) break;
      for (Id id : cancel_requests_) {
        auto q = std::find_if(queue_.begin(), queue_.end(), [id](const auto& s) { return s->id == id; });
        if (q != queue_.end()) {
          finish(**q, "cancelled", "", ends);
          queue_.erase(q);
          ++n_cancelled;
          continue;
        }
        auto r = std::find_if(running_.begin(), running_.end(), [id](const auto& s) { return s->id == id; });
        if (r != running_.end()) {
          finish(**r, "cancelled", "", ends);
          running_.erase(r);
          ++n_cancelled;
        }
      }
      cancel_requests_.clear();
      while (!queue_.empty() && engine_.free_slots() > 0) {
        std::unique_ptr<Sequence> s = std::move(queue_.front());
        queue_.pop_front();
        if (s->budget <= 0) {
          finish(*s, "length", "", ends);
          continue;
        }
        s->slot = engine_.acquire();
        s->logits.resize(static_cast<size_t>(vocab));
        running_.push_back(std::move(s));
      }
      stats_.cancelled += n_cancelled;
      stats_.finished += ends.size();
      stats_.queued = static_cast<int64_t>(queue_.size());
      stats_.running = static_cast<int64_t>(running_.size());
    }
    run_ends();
    if (running_.empty()) continue;

    // Decode tokens of every running sequence first, then prompt chunks within the budget.
    items.clear();
    item_seq.clear();
    for (auto& s : running_)
      if (s->prefilled == static_cast<int64_t>(s->p.prompt.size())) {
        items.push_back({s->slot, std::span<const int32_t>(&s->pending, 1), s->logits.data()});
        item_seq.push_back(s.get());
      }
    int64_t budget = options_.prefill_tokens;
    int64_t prompt_tokens = 0;
    for (auto& s : running_) {
      const int64_t left = static_cast<int64_t>(s->p.prompt.size()) - s->prefilled;
      if (left == 0) continue;
      const int64_t chunk = std::min(left, budget);
      if (chunk <= 0) break;
      items.push_back({s->slot,
                       std::span<const int32_t>(s->p.prompt.data() + s->prefilled,
                                                static_cast<size_t>(chunk)),
                       chunk == left ? s->logits.data() : nullptr});
      item_seq.push_back(s.get());
      budget -= chunk;
      prompt_tokens += chunk;
    }

    try {
      engine_.step(items);
    } catch (const std::exception& e) {
      // Validation makes this unreachable in practice; fail the batch rather than the process.
      for (Sequence* s : item_seq) finish(*s, "error", e.what(), ends);
      drop_finished();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        stats_.finished += ends.size();
        stats_.running = static_cast<int64_t>(running_.size());
      }
      run_ends();
      continue;
    }

    // Sampling (and the log-probabilities) of each sequence is independent of the others and,
    // over a vocabulary of thousands, costs as much as a share of the batched step: it runs on
    // the engine's threads, one task per sequence. Reporting stays on this thread, in order.
    sampled.clear();
    for (size_t i = 0; i < items.size(); ++i) {
      Sequence& s = *item_seq[i];
      if (s.prefilled < static_cast<int64_t>(s.p.prompt.size()))
        s.prefilled += static_cast<int64_t>(items[i].tokens.size());
      if (items[i].logits != nullptr) sampled.push_back({&s, {}, -1, {}});
    }
    auto sample_one = [&](int64_t k) {
      Sampled& o = sampled[static_cast<size_t>(k)];
      try {
        o.next = sample_token(*o.seq, vocab, o.info);
      } catch (const std::exception& e) {
        o.error = e.what();
      }
    };
    if (sampled.size() > 1) engine_.pool().run(static_cast<int64_t>(sampled.size()), sample_one);
    else if (!sampled.empty()) sample_one(0);

    uint64_t generated = 0;
    const auto now = Clock::now();
    for (Sampled& o : sampled) {
      Sequence& s = *o.seq;
      if (!o.error.empty()) {
        finish(s, "error", o.error, ends);
        continue;
      }
      TokenInfo& info = o.info;
      const int32_t next = o.next;
      if (s.generated == 0) ttft.push_back(seconds_between(s.submitted, now));
      else itl.push_back(seconds_between(s.last_token, now));
      s.last_token = now;
      if (s.p.stop_at_eos && std::find(eos.begin(), eos.end(), next) != eos.end()) {
        finish(s, "stop", "", ends);
        continue;
      }
      ++s.generated;
      ++generated;
      s.history.push_back(next);
      info.id = next;
      bool keep = true;
      try {
        keep = !s.cb.on_token || s.cb.on_token(info);
      } catch (const std::exception& e) {
        finish(s, "error", e.what(), ends);
        continue;
      }
      if (!keep) finish(s, "stop", "", ends);
      else if (s.generated >= s.budget) finish(s, "length", "", ends);
      else s.pending = next;
    }
    drop_finished();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++stats_.steps;
      stats_.prompt_tokens += static_cast<uint64_t>(prompt_tokens);
      stats_.generated_tokens += generated;
      stats_.finished += ends.size();
      stats_.running = static_cast<int64_t>(running_.size());
      for (double t : ttft) stats_.time_to_first_token.observe(t);
      for (double t : itl) stats_.inter_token_latency.observe(t);
    }
    ttft.clear();
    itl.clear();
    run_ends();
  }

  // Shutting down: every sequence still known ends as cancelled.
  std::deque<std::unique_ptr<Sequence>> queued;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queued.swap(queue_);
  }
  for (auto& s : queued) finish(*s, "cancelled", "", ends);
  for (auto& s : running_) finish(*s, "cancelled", "", ends);
  running_.clear();
  run_ends();
}

}  // namespace sparsa
