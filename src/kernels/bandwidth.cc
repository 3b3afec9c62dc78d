// measure_read_bandwidth(): the roofline that the decode kernels are measured against.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <new>
#include <vector>

#include "kernels/kernels_internal.h"
#include "sparsa/core/error.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::kernels {

namespace {

volatile float g_sink = 0.0f;  // keeps the sums, and so the reads, observable

constexpr size_t kAlign = size_t{2} << 20;  // huge-page aligned, so that THP can back it

struct AlignedDelete {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t{kAlign}); }
};

StreamSumFn stream_sum_for(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return &avx512::stream_sum;
    case Isa::Avx2:
      return &avx2::stream_sum;
    case Isa::Generic:
      break;
  }
  return &generic::stream_sum;
}

}  // namespace

double measure_read_bandwidth(ThreadPool& pool, size_t bytes, int reps) {
  SPARSA_CHECK(bytes >= (size_t{1} << 20) && reps >= 1,
               "measure_read_bandwidth: needs at least 1 MiB and one repetition (got {} bytes, "
               "{} reps)",
               bytes, reps);
  const size_t n = (bytes / sizeof(float) + 1023) / 1024 * 1024;
  const size_t alloc = (n * sizeof(float) + kAlign - 1) / kAlign * kAlign;
  std::unique_ptr<float, AlignedDelete> buf(
      static_cast<float*>(::operator new[](alloc, std::align_val_t{kAlign})));
  madvise(buf.get(), alloc, MADV_HUGEPAGE);

  // Slices of whole cache lines, several per thread, claimed dynamically.
  const int64_t tasks = int64_t{8} * pool.size();
  const int64_t step = (static_cast<int64_t>(n) + tasks - 1) / tasks / 16 * 16;
  const int64_t total = static_cast<int64_t>(n);
  auto slice = [&](int64_t t, int64_t& begin, int64_t& len) {
    begin = std::min(total, t * step);
    len = t == tasks - 1 ? total - begin : std::min(step, total - begin);
  };
  pool.run(tasks, [&](int64_t t) {
    int64_t begin, len;
    slice(t, begin, len);
    std::fill(buf.get() + begin, buf.get() + begin + len, 1.0f);
  });

  const StreamSumFn sum = stream_sum_for(active_isa());
  std::vector<float> sums(static_cast<size_t>(tasks));
  double best = 0.0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.run(tasks, [&](int64_t t) {
      int64_t begin, len;
      slice(t, begin, len);
      sums[static_cast<size_t>(t)] = sum(buf.get() + begin, len);
    });
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(n * sizeof(float)) / sec);
  }
  float total_sum = 0.0f;
  for (float s : sums) total_sum += s;
  g_sink = total_sum;
  return best;
}

}  // namespace sparsa::kernels
