#include "sparsa/core/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <set>
#include <random>
#include <thread>
#include <vector>

namespace sparsa {
namespace {

// Many jobs back to back with varying task counts, so that late-waking workers meet jobs of
// other sizes: every task of every job runs exactly once, and run() returns only after all.
TEST(ThreadPool, EveryTaskRunsExactlyOnceAcrossJobsOfVaryingSize) {
  for (int threads : {2, 3, 5}) {
    ThreadPool pool(threads);
    std::mt19937 rng(threads);
    std::vector<std::atomic<int>> hits(64);
    for (int job = 0; job < 4000; ++job) {
      const int64_t n = 1 + static_cast<int64_t>(rng() % 64);
      for (int64_t i = 0; i < n; ++i) hits[i].store(0, std::memory_order_relaxed);
      pool.run(n, [&](int64_t t) {
        if (t % 7 == 0) std::this_thread::yield();
        hits[t].fetch_add(1, std::memory_order_relaxed);
      });
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(hits[i].load(), 1) << "job " << job << " task " << i << " of " << n;
      // Now and then let the workers fall asleep, so the next job has to wake them.
      if (job % 500 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
}

// Pools created and destroyed while workers may still be waking for their last job: a late
// worker must never run a task of a job whose caller has returned (its closure is gone).
TEST(ThreadPool, ShortLivedPoolsNeverRunAStaleTask) {
  for (int p = 0; p < 100; ++p) {
    ThreadPool pool(3);
    for (int job = 0; job < 40; ++job) {
      const int64_t n = 1 + job % 7;
      std::vector<int> hits(static_cast<size_t>(n), 0);
      pool.run(n, [&hits](int64_t t) { ++hits[static_cast<size_t>(t)]; });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[static_cast<size_t>(i)], 1);
    }
  }
}

TEST(ThreadPool, ParallelForCoversTheRangeWithDisjointChunks) {
  ThreadPool pool(4);
  for (int64_t n : {1, 2, 7, 64, 1000, 4097}) {
    std::vector<int> seen(static_cast<size_t>(n), 0);
    pool.parallel_for(n, 3, [&](int64_t b, int64_t e) {
      ASSERT_LT(b, e);
      for (int64_t i = b; i < e; ++i) ++seen[i];
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[i], 1) << "n=" << n << " i=" << i;
  }
}

TEST(ThreadPool, IdlePoolWakesForTheNextJob) {
  ThreadPool pool(2);
  std::atomic<int> count{0};
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // workers are asleep by now
    pool.run(16, [&](int64_t) { count.fetch_add(1); });
  }
  EXPECT_EQ(count.load(), 80);
}

// Both sleeping paths: the worker sleeps between jobs (idle far longer than its spin) and must be
// woken for the next one; the caller finishes its task first and sleeps until the worker's slow
// task completes, and must be woken by it. Each job's two tasks wait for each other, so they can
// only finish if both threads take part.
TEST(ThreadPool, SleepingWorkerAndCallerAreBothWoken) {
  ThreadPool pool(2);
  for (int i = 0; i < 10; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::atomic<int> started{0};
    std::mutex m;
    std::set<std::thread::id> ids;
    pool.run(2, [&](int64_t t) {
      {
        std::lock_guard<std::mutex> lock(m);
        ids.insert(std::this_thread::get_id());
      }
      started.fetch_add(1);
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (started.load() < 2 && std::chrono::steady_clock::now() < give_up)
        std::this_thread::yield();
      if (t == 1) std::this_thread::sleep_for(std::chrono::milliseconds(3));
    });
    ASSERT_EQ(started.load(), 2);
    EXPECT_EQ(ids.size(), 2u) << "job " << i << " ran on one thread: the worker was not woken";
  }
}

}  // namespace
}  // namespace sparsa
