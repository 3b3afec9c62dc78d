// measure_read_bandwidth(): the roofline that the decode kernels are measured against.

#include <algorithm>
#include <chrono>
#include <memory>
#include <vector>

#include "kernels/kernels_internal.h"
#include "sparsa/core/error.h"
#include "sparsa/core/huge_pages.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::kernels {

namespace {

volatile float g_sink = 0.0f;  // keeps the sums, and so the reads, observable


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

struct BandwidthProbe::Buffer {
  HugePageBuffer bytes;
  float* data = nullptr;  // bytes, as floats
  int64_t n = 0;
  int64_t tasks = 0;
  int64_t step = 0;
  std::vector<float> sums;

  void slice(int64_t t, int64_t& begin, int64_t& len) const {
    begin = std::min(n, t * step);
    len = t == tasks - 1 ? n - begin : std::min(step, n - begin);
  }
};

BandwidthProbe::BandwidthProbe(ThreadPool& pool, size_t bytes) : pool_(pool) {
  SPARSA_CHECK(bytes >= (size_t{1} << 20),
               "bandwidth probe: needs at least 1 MiB (got {} bytes)", bytes);
  buf_ = std::make_unique<Buffer>();
  Buffer& b = *buf_;
  b.n = static_cast<int64_t>((bytes / sizeof(float) + 1023) / 1024 * 1024);
  b.bytes = allocate_huge_pages(static_cast<size_t>(b.n) * sizeof(float));
  b.data = reinterpret_cast<float*>(b.bytes.get());
  // Slices of whole cache lines, several per thread, claimed dynamically.
  b.tasks = int64_t{8} * pool.size();
  b.step = (b.n + b.tasks - 1) / b.tasks / 16 * 16;
  b.sums.assign(static_cast<size_t>(b.tasks), 0.0f);
  pool.run(b.tasks, [&](int64_t t) {
    int64_t begin, len;
    b.slice(t, begin, len);
    std::fill(b.data + begin, b.data + begin + len, 1.0f);
  });
}

BandwidthProbe::~BandwidthProbe() = default;

size_t BandwidthProbe::bytes() const { return static_cast<size_t>(buf_->n) * sizeof(float); }

double BandwidthProbe::sample() {
  Buffer& b = *buf_;
  const StreamSumFn sum = stream_sum_for(active_isa());
  const auto t0 = std::chrono::steady_clock::now();
  pool_.run(b.tasks, [&](int64_t t) {
    int64_t begin, len;
    b.slice(t, begin, len);
    b.sums[static_cast<size_t>(t)] = sum(b.data + begin, len);
  });
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float total = 0.0f;
  for (float v : b.sums) total += v;
  g_sink = total;
  return static_cast<double>(bytes()) / sec;
}

double measure_read_bandwidth(ThreadPool& pool, size_t bytes, int reps) {
  SPARSA_CHECK(bytes >= (size_t{1} << 20) && reps >= 1,
               "measure_read_bandwidth: needs at least 1 MiB and one repetition (got {} bytes, "
               "{} reps)",
               bytes, reps);
  BandwidthProbe probe(pool, bytes);
  double best = 0.0;
  for (int r = 0; r < reps; ++r) best = std::max(best, probe.sample());
  return best;
}

}  // namespace sparsa::kernels
