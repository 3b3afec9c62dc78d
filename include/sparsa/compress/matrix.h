// The objects every compression algorithm works on: a weight matrix in f32 and the statistics of
// the activations that multiply it.
//
//   sparsa::compress::Matrix w(rows, cols);           // W [out_features, in_features], row-major
//   sparsa::compress::InputStats stats(cols);
//   stats.accumulate(x, n_tokens);                     // x [n_tokens, cols]
//   const std::vector<double>& h = stats.hessian();    // H = 2/N Σ x xᵀ  [cols, cols]
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "sparsa/core/thread_pool.h"

namespace sparsa::compress {

/// A dense row-major f32 matrix [rows, cols].
struct Matrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> data;

  Matrix() = default;
  Matrix(int64_t r, int64_t c) : rows(r), cols(c), data(static_cast<size_t>(r * c)) {}
  float* row(int64_t r) { return data.data() + r * cols; }
  const float* row(int64_t r) const { return data.data() + r * cols; }
  float& at(int64_t r, int64_t c) { return data[static_cast<size_t>(r * cols + c)]; }
  float at(int64_t r, int64_t c) const { return data[static_cast<size_t>(r * cols + c)]; }
};

/// Which weights survive pruning: keep[r * cols + c] != 0. Empty means "all kept".
using Mask = std::vector<uint8_t>;

/// Statistics of a linear layer's inputs gathered over calibration tokens, all in f64:
/// the Hessian of the layer-wise squared error H = (2 / N) Σ_t x_t x_tᵀ (the convention of the
/// GPTQ / SparseGPT reference code), the squared column norms Σ_t x_tj² (Wanda), and the
/// per-column min / max / mean |x| (AWQ, SmoothQuant).
class InputStats {
 public:
  InputStats() = default;
  explicit InputStats(int64_t cols, bool with_hessian = true);

  /// x: [n_tokens, cols] with row stride ld (>= cols). XᵀX (its upper triangle) is formed by f32
  /// GEMMs over blocks of kBlock tokens and summed across blocks in f64.
  void accumulate(const float* x, int64_t n_tokens, int64_t ld, ThreadPool& pool);
  static constexpr int64_t kBlock = 1024;

  int64_t cols() const { return cols_; }
  int64_t tokens() const { return tokens_; }
  bool has_hessian() const { return !xtx_.empty(); }
  /// H = 2/N XᵀX, [cols, cols] row-major (flushes pending tokens first).
  std::vector<double> hessian(ThreadPool& pool);
  /// Frees XᵀX (after hessian() was taken); the per-column statistics stay.
  void drop_hessian() {
    std::vector<double>().swap(xtx_);
    std::vector<float>().swap(pending_);
    std::vector<float>().swap(panel_);
    n_pending_ = 0;
  }
  /// Σ_t x_tj² per column (the squared L2 norm Wanda uses).
  const std::vector<double>& sq_norms() const { return sq_; }
  const std::vector<float>& col_min() const { return min_; }
  const std::vector<float>& col_max() const { return max_; }
  /// mean_t |x_tj| per column.
  std::vector<double> mean_abs() const;

 private:
  int64_t cols_ = 0;
  int64_t tokens_ = 0;
  void flush(ThreadPool& pool);
  std::vector<double> xtx_;      // [cols, cols], upper triangle (j >= i) accumulated
  std::vector<float> pending_;   // [cols, kBlock]: the tokens not yet in xtx_, transposed
  std::vector<float> panel_;     // [cols, 256]: one column panel of a block's XᵀX
  int64_t n_pending_ = 0;
  std::vector<double> sq_, abs_;
  std::vector<float> min_, max_;
};

}  // namespace sparsa::compress
