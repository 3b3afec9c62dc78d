#include "sparsa/compress/matrix.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "sparsa/core/error.h"
#include "sparsa/kernels/linear.h"

#include <cblas.h>

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
  // XᵀX of the block is P Pᵀ with P = pending_ [c, n_pending] (row stride kBlock). Only the upper
  // triangle is formed, in column panels: panel [j0, j0 + jb) needs rows 0 .. j0 + jb, so the
  // f32 products cost half a full GEMM and a panel-sized buffer instead of a [c, c] one.
  constexpr int64_t kPanel = 256;
  panel_.resize(static_cast<size_t>(c * kPanel));
  for (int64_t j0 = 0; j0 < c; j0 += kPanel) {
    const int64_t jb = std::min(kPanel, c - j0);
    const int64_t m = j0 + jb;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(jb),
                static_cast<int>(n_pending_), 1.0f, pending_.data(), static_cast<int>(kBlock),
                pending_.data() + j0 * kBlock, static_cast<int>(kBlock), 0.0f, panel_.data(),
                static_cast<int>(jb));
    pool.parallel_for(m, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        // Row i of the panel holds columns j0 .. j0 + jb; keep j >= i.
        const int64_t first = std::max<int64_t>(0, i - j0);
        const float* src = panel_.data() + i * jb;
        double* dst = xtx_.data() + i * c + j0;
        for (int64_t jj = first; jj < jb; ++jj) dst[jj] += src[jj];
      }
    });
  }
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
      // Only the upper triangle is accumulated; H is mirrored from it (exactly symmetric).
      const int64_t a = std::min(i, j), b = std::max(i, j);
      h[static_cast<size_t>(i * c + j)] = xtx_[static_cast<size_t>(a * c + b)] * s;
    }
  return h;
}

std::vector<double> InputStats::mean_abs() const {
  std::vector<double> m(abs_);
  for (double& v : m) v /= static_cast<double>(std::max<int64_t>(tokens_, 1));
  return m;
}

}  // namespace sparsa::compress
