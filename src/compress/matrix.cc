#include "sparsa/compress/matrix.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "sparsa/core/error.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::compress {

InputStats::InputStats(int64_t cols, bool with_hessian)
    : cols_(cols),
      sq_(static_cast<size_t>(cols)),
      abs_(static_cast<size_t>(cols)),
      min_(static_cast<size_t>(cols), std::numeric_limits<float>::infinity()),
      max_(static_cast<size_t>(cols), -std::numeric_limits<float>::infinity()) {
  if (with_hessian) {
    xtx_.assign(static_cast<size_t>(cols * cols), 0.0);
    pending_.assign(static_cast<size_t>(cols * kBlock), 0.0f);
  }
}

void InputStats::flush(ThreadPool& pool) {
  if (n_pending_ == 0) return;
  const int64_t c = cols_;
  // XᵀX of the block = Pᵀ-rows dotted with each other: P [c, kBlock] is both the weight matrix
  // and the batch of "tokens" of one GEMM, giving [c, c].
  std::vector<float> prod(static_cast<size_t>(c * c));
  const kernels::DenseWeight w{DType::F32, c, n_pending_, pending_.data()};
  if (n_pending_ < kBlock) {
    // Compact the rows to the pending length so the GEMM sees a dense [c, n_pending] matrix.
    for (int64_t j = 1; j < c; ++j)
      std::copy_n(pending_.data() + j * kBlock, n_pending_, pending_.data() + j * n_pending_);
  }
  kernels::linear(w, pending_.data(), n_pending_, c, prod.data(), c, pool);
  pool.parallel_for(c, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b * c; i < e * c; ++i) xtx_[static_cast<size_t>(i)] += prod[static_cast<size_t>(i)];
  });
  n_pending_ = 0;
}

void InputStats::accumulate(const float* x, int64_t n, int64_t ld, ThreadPool& pool) {
  SPARSA_CHECK(ld >= cols_, "InputStats: row stride {} is less than {} columns", ld, cols_);
  const int64_t c = cols_;
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * ld;
    for (int64_t j = 0; j < c; ++j) {
      const double v = xt[j];
      sq_[static_cast<size_t>(j)] += v * v;
      abs_[static_cast<size_t>(j)] += std::abs(v);
      min_[static_cast<size_t>(j)] = std::min(min_[static_cast<size_t>(j)], xt[j]);
      max_[static_cast<size_t>(j)] = std::max(max_[static_cast<size_t>(j)], xt[j]);
    }
    if (!xtx_.empty()) {
      for (int64_t j = 0; j < c; ++j) pending_[static_cast<size_t>(j * kBlock + n_pending_)] = xt[j];
      if (++n_pending_ == kBlock) flush(pool);
    }
  }
  tokens_ += n;
}

std::vector<double> InputStats::hessian(ThreadPool& pool) {
  SPARSA_CHECK(!xtx_.empty(), "InputStats: no Hessian was gathered");
  SPARSA_CHECK(tokens_ > 0, "InputStats: no calibration tokens were seen");
  flush(pool);
  const int64_t c = cols_;
  std::vector<double> h(static_cast<size_t>(c * c));
  const double s = 2.0 / static_cast<double>(tokens_);
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j < c; ++j) {
      // Average the two triangles so H is exactly symmetric.
      const double v = 0.5 * (xtx_[static_cast<size_t>(i * c + j)] + xtx_[static_cast<size_t>(j * c + i)]);
      h[static_cast<size_t>(i * c + j)] = v * s;
    }
  return h;
}

std::vector<double> InputStats::mean_abs() const {
  std::vector<double> m(abs_);
  for (double& v : m) v /= static_cast<double>(std::max<int64_t>(tokens_, 1));
  return m;
}

}  // namespace sparsa::compress
