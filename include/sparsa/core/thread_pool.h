// A fixed pool of worker threads that block when idle (after a short bounded spin), so that an
// idle engine costs no CPU and shared machines measure steadily.
//
//   sparsa::ThreadPool pool(2);                 // the calling thread counts as one of the 2
//   pool.parallel_for(rows, 16, [&](int64_t begin, int64_t end) { ... });
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace sparsa {

class ThreadPool {
 public:
  /// `n_threads` counts the caller; 0 picks the number of hardware threads.
  explicit ThreadPool(int n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  /// Runs fn(task) for every task in [0, n_tasks), spread over all threads (the caller too), and
  /// returns when all are done. Tasks are claimed dynamically. Not reentrant.
  template <typename F>
  void run(int64_t n_tasks, F&& fn) {
    using Fn = std::remove_reference_t<F>;
    run_impl(n_tasks, [](void* ctx, int64_t t) { (*static_cast<Fn*>(ctx))(t); },
             const_cast<void*>(static_cast<const void*>(&fn)));
  }

  /// Splits [0, n) into contiguous chunks of at least `grain` items (a few per thread) and
  /// calls fn(begin, end) for each.
  template <typename F>
  void parallel_for(int64_t n, int64_t grain, F&& fn) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, int64_t{n_threads_} * 4);
    if (chunks <= 1 || n_threads_ == 1) {
      fn(int64_t{0}, n);
      return;
    }
    if (chunks < n_threads_) chunks = std::min<int64_t>(n, n_threads_);
    const int64_t step = (n + chunks - 1) / chunks;
    chunks = (n + step - 1) / step;
    run(chunks, [&](int64_t c) { fn(c * step, std::min(n, (c + 1) * step)); });
  }

 private:
  using TaskFn = void (*)(void*, int64_t);
  void run_impl(int64_t n_tasks, TaskFn fn, void* ctx);
  void worker_loop();
  /// Claims and runs tasks of generation `gen` until none is left.
  void drain(uint64_t gen, TaskFn fn, void* ctx, int64_t n_tasks, bool is_worker);

  int n_threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_cv_;
  // The job's generation (high 32 bits) and the next unclaimed task (low 32 bits). A task is
  // claimed by a compare-and-swap that also checks the generation, so a worker that wakes late
  // never runs a task of a job that has already finished.
  // Each on its own cache line: the claim counter, the completion counter and the job's fields
  // move between cores at different moments of a job.
  alignas(64) std::atomic<uint64_t> state_{0};
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<int64_t> n_tasks_{0};
  std::atomic<TaskFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  uint64_t generation_ = 0;  // the caller's copy
  alignas(64) std::atomic<int> sleepers_{0};           // workers blocked on wake_
  std::atomic<bool> caller_waiting_{false};           // the caller blocked on done_cv_
  std::atomic<bool> stop_{false};
};

/// The number of threads to use when the user gives none: the hardware threads, at most 64.
int default_thread_count();

}  // namespace sparsa
