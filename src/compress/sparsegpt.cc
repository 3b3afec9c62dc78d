// SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
// in One-Shot"; reference IST-DASLab/sparsegpt sparsegpt.py fasterprune). GPTQ's column-by-column
// Optimal Brain Surgeon sweep with pruning as the "rounding": at the start of each block of
// block_size columns, the weights of lowest w² / [H⁻¹]_jj² in the block (all rows together) are
// chosen for pruning (for N:M, per row and group of m columns when the sweep reaches the group),
// then each column is set to its pruned (and optionally quantized) value and its error
// (w − q) / U_jj is spread over the later columns through U, the upper Cholesky factor of H⁻¹:
// in the block at once, beyond it by one GEMM per block. Time: O(cols³) for the factorization
// (2/3 cols³, f64) plus rows · cols² for the lazy updates (f32 GEMM) and rows · cols · block_size
// for the sweeps. Memory: H in f64 (consumed, factored in place), U in f32 [cols, cols], the mask
// [rows, cols] and [rows, block_size] panels of errors and scores.
#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "sparsa/compress/prune.h"
#include "sparsa/core/error.h"

namespace sparsa::compress {

Mask sparsegpt_prune(Matrix& w, std::vector<double> hessian, const SparsityPattern& pattern,
                     const SparseGptOptions& opts, QuantResult* quant_out, ThreadPool* pool) {
  constexpr const char* kFn = "sparsegpt_prune";
  const int64_t rows = w.rows, cols = w.cols;
  SPARSA_CHECK(rows > 0 && cols > 0 && w.data.size() == static_cast<size_t>(rows * cols),
               "{}: the weight matrix is empty or its data does not match {}x{}", kFn, rows, cols);
  check_sparsity_pattern(pattern, cols, kFn);
  SPARSA_CHECK(hessian.size() == static_cast<size_t>(cols * cols),
               "{}: the Hessian has {} entries, expected {}x{} for {} input columns", kFn,
               hessian.size(), cols, cols, cols);
  SPARSA_CHECK(opts.block_size >= 1, "{}: block_size = {} must be positive", kFn, opts.block_size);
  SPARSA_CHECK(!pattern.structured() || opts.block_size % pattern.m == 0,
               "{}: block_size {} is not a multiple of m = {}", kFn, opts.block_size, pattern.m);
  SPARSA_CHECK(std::isfinite(opts.damp) && opts.damp >= 0.0, "{}: damp = {} must be >= 0", kFn,
               opts.damp);
  const bool quant = opts.quant.has_value();
  const QuantSpec spec = opts.quant.value_or(QuantSpec{});
  if (quant) {
    check_quant_spec(spec, cols, kFn);
    SPARSA_CHECK(!spec.act_order, "{}: act_order is not supported with joint quantization", kFn);
  }
  const bool grouped = quant && spec.group_size > 0;
  const int64_t gs = grouped ? spec.group_size : cols, n_groups = cols / gs;
  const float maxq = static_cast<float>((1 << spec.bits) - 1);

  QuantResult res;
  std::vector<QuantGrid> grid(static_cast<size_t>(quant ? rows : 0));  // [rows], current group
  if (quant) {
    res.bits = spec.bits;
    res.group_size = spec.group_size;
    res.symmetric = spec.symmetric;
    res.scales.resize(static_cast<size_t>(rows * n_groups));
    res.zeros.resize(static_cast<size_t>(rows * n_groups));
    res.codes.resize(static_cast<size_t>(rows * cols));
    res.g_idx.resize(static_cast<size_t>(cols));
    for (int64_t c = 0; c < cols; ++c) res.g_idx[c] = static_cast<int32_t>(c / gs);
    if (!grouped) {
      // As the reference: one grid per row from the unpruned W, before dead columns are zeroed.
      for (int64_t r = 0; r < rows; ++r) {
        grid[r] = find_quant_grid(w.row(r), cols, spec.bits, spec.symmetric);
        res.scales[r] = grid[r].scale;
        res.zeros[r] = static_cast<int32_t>(grid[r].zero);
      }
    }
  }

  const std::vector<uint8_t> dead = fix_dead_columns(hessian, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      if (dead[j]) w.at(r, j) = 0.0f;
  try {
    inverse_hessian_factor(hessian, cols, opts.damp);
  } catch (const Error& e) {
    fail("{}: {}", kFn, e.what());
  }
  std::vector<float> u(hessian.begin(), hessian.end());  // [cols, cols], H⁻¹ = UᵀU
  std::vector<double>().swap(hessian);

  Mask keep(static_cast<size_t>(rows * cols), 1);  // [rows, cols]
  const int64_t bs = std::min(opts.block_size, cols);
  std::vector<float> err(static_cast<size_t>(rows * bs));  // [rows, count], (w − q) / U_jj
  std::vector<float> score, scratch;                       // [rows, count], w² / U_jj²
  Mask block_keep;                                         // [rows, count]
  for (int64_t i1 = 0; i1 < cols; i1 += bs) {
    const int64_t i2 = std::min(i1 + bs, cols), count = i2 - i1;
    if (!pattern.structured()) {
      score.resize(static_cast<size_t>(rows * count));
      block_keep.resize(score.size());
      for (int64_t r = 0; r < rows; ++r) {
        const float* wr = w.row(r) + i1;
        for (int64_t j = 0; j < count; ++j) {
          const float d = u[(i1 + j) * cols + i1 + j];
          score[r * count + j] = wr[j] * wr[j] / (d * d);
        }
      }
      prune_lowest(score.data(), rows * count,
                   static_cast<int64_t>(
                       std::floor(pattern.sparsity * static_cast<double>(rows * count) + 1e-9)),
                   block_keep.data(), scratch);
      for (int64_t r = 0; r < rows; ++r)
        std::copy_n(block_keep.data() + r * count, count, keep.data() + r * cols + i1);
    }
    auto sweep = [&](int64_t r0, int64_t r1) {
      std::vector<float> w1(static_cast<size_t>(count));  // [count], this row of the block
      std::vector<float> nm_score(static_cast<size_t>(std::max(pattern.m, 1))), nm_scratch;
      for (int64_t r = r0; r < r1; ++r) {
        float* wr = w.row(r);  // keeps the block's starting values until the sweep ends
        uint8_t* kr = keep.data() + r * cols;
        float* er = err.data() + r * count;
        std::copy(wr + i1, wr + i2, w1.begin());
        for (int64_t i = 0; i < count; ++i) {
          const int64_t c = i1 + i;
          if (pattern.structured() && c % pattern.m == 0) {
            for (int j = 0; j < pattern.m; ++j) {
              const float d = u[(c + j) * cols + c + j];
              nm_score[j] = w1[i + j] * w1[i + j] / (d * d);
            }
            prune_lowest(nm_score.data(), pattern.m, pattern.n, kr + c, nm_scratch);
          }
          float q = kr[c] != 0 ? w1[i] : 0.0f;
          if (quant) {
            QuantGrid& g = grid[r];
            if (grouped && c % gs == 0) {
              g = find_quant_grid(wr + c, gs, spec.bits, spec.symmetric);
              res.scales[r * n_groups + c / gs] = g.scale;
              res.zeros[r * n_groups + c / gs] = static_cast<int32_t>(g.zero);
            }
            const float cd = quant_code(q, g, maxq);  // the zero point for pruned weights
            res.codes[r * cols + c] = static_cast<uint8_t>(cd);
            q = dequant_code(cd, g);
          }
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
  if (quant && quant_out != nullptr) *quant_out = std::move(res);
  return keep;
}

}  // namespace sparsa::compress
