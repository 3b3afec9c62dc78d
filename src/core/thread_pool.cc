#include "sparsa/core/thread_pool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__)
#include <immintrin.h>
#define SPARSA_PAUSE() _mm_pause()
#else
#define SPARSA_PAUSE() ((void)0)
#endif

namespace sparsa {

namespace {
// How long a worker spins for the next job before it sleeps: long enough to cover the gap
// between two kernels of one decode step, short enough that an idle pool uses no CPU.
constexpr auto kSpin = std::chrono::microseconds(200);
// The task index that marks a job being published: no task can be claimed.
constexpr uint64_t kClosed = 0xffffffffu;
// Spinning threads read the clock once every this many pauses.
constexpr uint32_t kClockEvery = 64;
}  // namespace

int default_thread_count() {
  const unsigned n = std::thread::hardware_concurrency();
  return static_cast<int>(std::clamp(n, 1u, 64u));
}

ThreadPool::ThreadPool(int n_threads) {
  n_threads_ = n_threads > 0 ? n_threads : default_thread_count();
  workers_.reserve(static_cast<size_t>(n_threads_ - 1));
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // A closed generation: a worker that is between waking and claiming sees no task to run
    // (a stale copy of the last job must never be called) and returns on stop_.
    stop_.store(true, std::memory_order_relaxed);
    state_.store((((generation_ + 1) & 0xffffffffu) << 32) | kClosed, std::memory_order_release);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::drain(uint64_t gen, TaskFn fn, void* ctx, int64_t n_tasks, bool is_worker) {
  uint64_t s = state_.load(std::memory_order_relaxed);
  while ((s >> 32) == gen && static_cast<int64_t>(s & 0xffffffffu) < n_tasks) {
    if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel,
                                      std::memory_order_relaxed))
      continue;
    fn(ctx, static_cast<int64_t>(s & 0xffffffffu));
    if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == n_tasks && is_worker &&
        caller_waiting_.load(std::memory_order_seq_cst)) {
      std::lock_guard<std::mutex> lock(mutex_);
      done_cv_.notify_one();
    }
    s = state_.load(std::memory_order_relaxed);
  }
}

void ThreadPool::run_impl(int64_t n_tasks, TaskFn fn, void* ctx) {
  if (n_tasks <= 0) return;
  if (workers_.empty() || n_tasks == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t);
    return;
  }
  // Tasks are counted in 32 bits of state_; larger jobs run as batches.
  constexpr int64_t kMaxTasks = int64_t{1} << 31;
  if (n_tasks > kMaxTasks) {
    struct Batch {
      TaskFn fn;
      void* ctx;
      int64_t base;
    };
    for (int64_t base = 0; base < n_tasks; base += kMaxTasks) {
      Batch b{fn, ctx, base};
      run_impl(std::min(kMaxTasks, n_tasks - base),
               [](void* c, int64_t t) {
                 auto* b = static_cast<Batch*>(c);
                 b->fn(b->ctx, b->base + t);
               },
               &b);
    }
    return;
  }
  // Publish the job like a seqlock: close the new generation (no task can be claimed while the
  // index reads kClosed), write the job's fields, then open it. A worker that reads the fields
  // validates its copy against the generation before it claims anything.
  const uint64_t gen = ++generation_ & 0xffffffffu;
  state_.store((gen << 32) | kClosed, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  fn_.store(fn, std::memory_order_relaxed);
  ctx_.store(ctx, std::memory_order_relaxed);
  n_tasks_.store(n_tasks, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  // Open the job. Workers that are spinning see it without any lock; sleeping ones are woken.
  // The open store and the load of sleepers_ are sequentially consistent, as are a worker's
  // increment of sleepers_ and its check of state_ (under the mutex) before it waits: one of the
  // two sides always sees the other, so no wake-up is lost.
  state_.store(gen << 32, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    wake_.notify_all();
  }
  drain(gen, fn, ctx, n_tasks, false);
  // Wait until every task has completed (not for every worker to have woken: a worker that is
  // slow to wake simply finds nothing left to claim). Spin briefly, then sleep.
  if (done_.load(std::memory_order_acquire) == n_tasks) return;
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (uint32_t i = 1; done_.load(std::memory_order_acquire) != n_tasks; ++i) {
    SPARSA_PAUSE();
    if (i % kClockEvery == 0 && std::chrono::steady_clock::now() > deadline) {
      std::unique_lock<std::mutex> lock(mutex_);
      caller_waiting_.store(true, std::memory_order_seq_cst);
      done_cv_.wait(lock, [&] { return done_.load(std::memory_order_seq_cst) == n_tasks; });
      caller_waiting_.store(false, std::memory_order_relaxed);
      break;
    }
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    // Spin on the generation (reading the clock only now and then), then sleep until it moves.
    const auto deadline = std::chrono::steady_clock::now() + kSpin;
    for (uint32_t i = 1; (state_.load(std::memory_order_acquire) >> 32) == seen; ++i) {
      SPARSA_PAUSE();
      if (i % kClockEvery == 0 && std::chrono::steady_clock::now() > deadline) {
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock,
                     [&] { return (state_.load(std::memory_order_seq_cst) >> 32) != seen; });
        }
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        break;
      }
    }
    if (stop_.load(std::memory_order_acquire)) return;
    // Copy the job's fields and check that the generation did not move while they were read
    // (the caller's closing store is fenced before its field writes, so a copy that saw any
    // newer field also sees a newer generation and is retried).
    for (;;) {
      const uint64_t s1 = state_.load(std::memory_order_acquire);
      if ((s1 & 0xffffffffu) == kClosed) {
        if (stop_.load(std::memory_order_relaxed)) return;
        SPARSA_PAUSE();
        continue;
      }
      const TaskFn fn = fn_.load(std::memory_order_relaxed);
      void* const ctx = ctx_.load(std::memory_order_relaxed);
      const int64_t n = n_tasks_.load(std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_acquire);
      const uint64_t s2 = state_.load(std::memory_order_relaxed);
      if ((s2 >> 32) != (s1 >> 32) || (s2 & 0xffffffffu) == kClosed) continue;
      seen = s1 >> 32;
      drain(seen, fn, ctx, n, true);
      break;
    }
  }
}

}  // namespace sparsa
