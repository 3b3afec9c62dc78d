// GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
// Pre-trained Transformers"; reference IST-DASLab/gptq gptq.py fasterquant). Quantizes W one input
// column at a time (in order of decreasing H_jj with act_order) and, after each, moves the
// not-yet-quantized columns of every row by the Optimal Brain Surgeon update
// δ = −(w_j − q_j) / [H⁻¹]_jj · [H⁻¹]_j,: that minimises the growth of the layer-wise error
// ‖WX − ŴX‖² = ½ N ΔH Δᵀ. Rows are independent and share H⁻¹; the row H⁻¹_j,j: of the remaining
// columns is the row of the upper Cholesky factor U of H⁻¹ (scaled by U_jj), so U is computed once.
// Updates inside a block of block_size columns are applied at once (rank-1 per column); the rest
// of W gets them lazily, one GEMM per block. Time: O(cols³) for the factorization (2/3 cols³,
// f64) plus rows · cols² for the updates (f32 GEMM) and rows · cols · block_size for the
// in-block sweeps. Memory: H in f64 (consumed and factored in place) and U in f32, [cols, cols]
// each, plus the codes and one [rows, block_size] error panel.
#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <numeric>

#include "sparsa/compress/quantize.h"
#include "sparsa/core/error.h"

namespace sparsa::compress {

namespace {

// new[i][j] = old[perm[i]][perm[j]] for a [n, n] row-major matrix, in place (one row of scratch):
// columns within each row, then the rows along the permutation's cycles.
template <typename T>
void permute_symmetric(std::vector<T>& a, int64_t n, const std::vector<int64_t>& perm) {
  std::vector<T> tmp(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    T* row = a.data() + i * n;
    for (int64_t j = 0; j < n; ++j) tmp[j] = row[perm[j]];
    std::copy(tmp.begin(), tmp.end(), row);
  }
  std::vector<uint8_t> done(static_cast<size_t>(n), 0);
  for (int64_t s = 0; s < n; ++s) {
    if (done[s] || perm[s] == s) continue;
    std::copy_n(a.data() + s * n, n, tmp.data());
    int64_t i = s;
    while (true) {
      done[i] = 1;
      const int64_t next = perm[i];
      if (next == s) {
        std::copy(tmp.begin(), tmp.end(), a.data() + i * n);
        break;
      }
      std::copy_n(a.data() + next * n, n, a.data() + i * n);
      i = next;
    }
  }
}

// Columns of each row of a [rows, cols] matrix reordered: new[r][j] = old[r][perm[j]].
template <typename T>
void permute_columns(T* a, int64_t rows, int64_t cols, const std::vector<int64_t>& perm) {
  std::vector<T> tmp(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    T* row = a + r * cols;
    for (int64_t j = 0; j < cols; ++j) tmp[j] = row[perm[j]];
    std::copy(tmp.begin(), tmp.end(), row);
  }
}

// The inverse: new[r][perm[j]] = old[r][j].
template <typename T>
void unpermute_columns(T* a, int64_t rows, int64_t cols, const std::vector<int64_t>& perm) {
  std::vector<T> tmp(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    T* row = a + r * cols;
    for (int64_t j = 0; j < cols; ++j) tmp[perm[j]] = row[j];
    std::copy(tmp.begin(), tmp.end(), row);
  }
}

}  // namespace

std::vector<uint8_t> fix_dead_columns(std::vector<double>& hessian, int64_t cols) {
  std::vector<uint8_t> dead(static_cast<size_t>(cols), 0);
  for (int64_t j = 0; j < cols; ++j) {
    double& d = hessian[j * cols + j];
    if (d == 0.0) {
      d = 1.0;
      dead[j] = 1;
    }
  }
  return dead;
}

void inverse_hessian_factor(std::vector<double>& h, int64_t n, double damp) {
  SPARSA_CHECK(h.size() == static_cast<size_t>(n * n), "the Hessian has {} entries, not {}x{}",
               h.size(), n, n);
  double mean = 0.0;
  for (int64_t j = 0; j < n; ++j) mean += h[j * n + j];
  mean /= static_cast<double>(n);
  for (int64_t j = 0; j < n; ++j) h[j * n + j] += damp * mean;
  // The reference takes cholesky(cholesky_inverse(cholesky(H)), upper): three O(n³) passes and an
  // explicit inverse. The same U comes from one factorization and one triangular inverse: with J
  // the reversal, JHJ = L̃L̃ᵀ (L̃ lower) gives H = (JL̃J)(JL̃J)ᵀ with JL̃J upper, so
  // H⁻¹ = UᵀU with U = J L̃⁻¹ J upper with a positive diagonal, which is the Cholesky factor.
  // Reversing the flat row-major array is JHJ. LAPACK runs column-major on the same memory,
  // which is the transpose: its upper triangle R = L̃ᵀ is our lower triangle L̃.
  std::reverse(h.begin(), h.end());
  const lapack_int ln = static_cast<lapack_int>(n);
  lapack_int info = LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', ln, h.data(), ln);
  SPARSA_CHECK(info == 0,
               "the Hessian is not positive definite after damping by {} x mean(diag H) (Cholesky "
               "factorization failed, LAPACK info {}); increase the dampening fraction",
               damp, info);
  info = LAPACKE_dtrtri(LAPACK_COL_MAJOR, 'U', 'N', ln, h.data(), ln);
  SPARSA_CHECK(info == 0, "the Cholesky factor of the damped Hessian is singular (LAPACK info {})",
               info);
  for (int64_t i = 0; i < n; ++i) std::fill_n(h.data() + i * n + i + 1, n - i - 1, 0.0);
  std::reverse(h.begin(), h.end());
}

QuantResult gptq_quantize(Matrix& w, std::vector<double> hessian, const QuantSpec& spec,
                          const GptqOptions& opts, const Mask* keep, ThreadPool* pool) {
  constexpr const char* kFn = "gptq_quantize";
  const int64_t rows = w.rows, cols = w.cols;
  SPARSA_CHECK(rows > 0 && cols > 0 && w.data.size() == static_cast<size_t>(rows * cols),
               "{}: the weight matrix is empty or its data does not match {}x{}", kFn, rows, cols);
  check_quant_spec(spec, cols, kFn);
  SPARSA_CHECK(hessian.size() == static_cast<size_t>(cols * cols),
               "{}: the Hessian has {} entries, expected {}x{} for {} input columns", kFn,
               hessian.size(), cols, cols, cols);
  SPARSA_CHECK(opts.block_size >= 1, "{}: block_size = {} must be positive", kFn, opts.block_size);
  SPARSA_CHECK(std::isfinite(opts.damp) && opts.damp >= 0.0, "{}: damp = {} must be >= 0", kFn,
               opts.damp);
  std::vector<uint8_t> km;  // [rows, cols] keep flags in processing order; empty: dense
  if (keep != nullptr && !keep->empty()) {
    SPARSA_CHECK(keep->size() == w.data.size(), "{}: the mask has {} entries, the weights {}", kFn,
                 keep->size(), w.data.size());
    km = *keep;
    for (size_t i = 0; i < km.size(); ++i)
      if (km[i] == 0) w.data[i] = 0.0f;
  }
  const bool grouped = spec.group_size > 0;
  const int64_t gs = grouped ? spec.group_size : cols, n_groups = cols / gs;
  const float maxq = static_cast<float>((1 << spec.bits) - 1);

  QuantResult res;
  res.bits = spec.bits;
  res.group_size = spec.group_size;
  res.symmetric = spec.symmetric;
  res.scales.resize(static_cast<size_t>(rows * n_groups));
  res.zeros.resize(static_cast<size_t>(rows * n_groups));
  res.codes.resize(static_cast<size_t>(rows * cols));
  res.g_idx.resize(static_cast<size_t>(cols));

  // Per channel, the reference finds the grid once, on W before dead columns are zeroed.
  std::vector<QuantGrid> grid(static_cast<size_t>(rows));  // [rows], the current group's grid
  if (!grouped) {
    for (int64_t r = 0; r < rows; ++r) {
      grid[r] = find_quant_grid(w.row(r), cols, spec.bits, spec.symmetric);
      res.scales[r] = grid[r].scale;
      res.zeros[r] = static_cast<int32_t>(grid[r].zero);
    }
  }
  const std::vector<uint8_t> dead = fix_dead_columns(hessian, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      if (dead[j]) w.at(r, j) = 0.0f;

  std::vector<int64_t> perm(static_cast<size_t>(cols));  // processing position → column
  std::iota(perm.begin(), perm.end(), int64_t{0});
  if (spec.act_order) {
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
      return hessian[a * cols + a] > hessian[b * cols + b];
    });
    permute_symmetric(hessian, cols, perm);
    permute_columns(w.data.data(), rows, cols, perm);
    if (!km.empty()) permute_columns(km.data(), rows, cols, perm);
  }
  for (int64_t j = 0; j < cols; ++j) res.g_idx[perm[j]] = static_cast<int32_t>(j / gs);

  try {
    inverse_hessian_factor(hessian, cols, opts.damp);
  } catch (const Error& e) {
    fail("{}: {}", kFn, e.what());
  }
  std::vector<float> u(hessian.begin(), hessian.end());  // [cols, cols], H⁻¹ = UᵀU
  std::vector<double>().swap(hessian);

  const int64_t bs = std::min(opts.block_size, cols);
  std::vector<float> err(static_cast<size_t>(rows * bs));  // [rows, count], (w − q) / U_jj
  for (int64_t i1 = 0; i1 < cols; i1 += bs) {
    const int64_t i2 = std::min(i1 + bs, cols), count = i2 - i1;
    auto sweep = [&](int64_t r0, int64_t r1) {
      std::vector<float> w1(static_cast<size_t>(count));  // [count], this row of the block
      for (int64_t r = r0; r < r1; ++r) {
        float* wr = w.row(r);  // keeps the block's starting values until the sweep ends
        const uint8_t* kr = km.empty() ? nullptr : km.data() + r * cols;
        uint8_t* code = res.codes.data() + r * cols;
        float* er = err.data() + r * count;
        QuantGrid& g = grid[r];
        std::copy(wr + i1, wr + i2, w1.begin());
        for (int64_t i = 0; i < count; ++i) {
          const int64_t c = i1 + i;
          if (grouped && c % gs == 0) {
            // As the reference: the grid of the group comes from W as of the block's start (the
            // lazy W), not from the in-block updated values.
            g = find_quant_grid(wr + c, gs, spec.bits, spec.symmetric,
                                kr != nullptr ? kr + c : nullptr);
            res.scales[r * n_groups + c / gs] = g.scale;
            res.zeros[r * n_groups + c / gs] = static_cast<int32_t>(g.zero);
          }
          float cd, q;
          if (kr != nullptr && kr[c] == 0) {
            cd = g.zero;
            q = 0.0f;
          } else {
            cd = quant_code(w1[i], g, maxq);
            q = dequant_code(cd, g);
          }
          code[c] = static_cast<uint8_t>(cd);
          const float e = (w1[i] - q) / u[c * cols + c];
          const float* urow = u.data() + c * cols + i1;  // U[c, i1:i2]
          for (int64_t j = i + 1; j < count; ++j) w1[j] -= e * urow[j];
          er[i] = e;
          w1[i] = q;
        }
        std::copy(w1.begin(), w1.end(), wr + i1);
      }
    };
    if (pool != nullptr)
      pool->parallel_for(rows, 16, sweep);
    else
      sweep(0, rows);
    if (i2 < cols) {
      // W[:, i2:] −= Err1 · U[i1:i2, i2:]
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows),
                  static_cast<int>(cols - i2), static_cast<int>(count), -1.0f, err.data(),
                  static_cast<int>(count), u.data() + i1 * cols + i2, static_cast<int>(cols), 1.0f,
                  w.data.data() + i2, static_cast<int>(cols));
    }
  }
  if (spec.act_order) {
    unpermute_columns(w.data.data(), rows, cols, perm);
    unpermute_columns(res.codes.data(), rows, cols, perm);
  }
  return res;
}

}  // namespace sparsa::compress
