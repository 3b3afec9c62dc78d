// One-shot pruning of a linear layer's weights: magnitude, Wanda (Sun et al. 2023), SparseGPT
// (Frantar & Alistarh 2023), unstructured or N:M, and OWL's non-uniform layer sparsities (Yin et
// al. 2023). Each pruner zeroes the pruned weights of w in place and returns the mask it chose.
//
//   using namespace sparsa::compress;
//   Mask keep = wanda_prune(w, stats.sq_norms(), {.sparsity = 0.5});
//   Mask keep24 = sparsegpt_prune(w, stats.hessian(pool), {.n = 2, .m = 4}, {}, nullptr, &pool);
//   // joint pruning and 4-bit quantization, as the reference SparseGPT's --wbits 4:
//   SparseGptOptions o;
//   o.quant = QuantSpec{.bits = 4, .group_size = 0};
//   QuantResult q;
//   sparsegpt_prune(w, stats.hessian(pool), {.sparsity = 0.5}, o, &q, &pool);
//
//   // OWL: per decoder layer, the outlier ratio of all its projections, then one sparsity each
//   std::vector<double> ratios = ...;   // layer_outlier_ratio(...) for every layer
//   std::vector<double> s = owl_layer_sparsities(ratios, 0.7);  // mean 0.7, ±0.08
//
// Masks are [rows, cols] keep flags (1 = kept). The counts are exact: unstructured prunes
// floor(sparsity · n) of the n weights it ranks together (all of W for magnitude, each row for
// Wanda, each block of block_size columns for SparseGPT), ties going to the lower index; N:M
// prunes exactly n of every m consecutive input columns of each row. (The reference magnitude and
// SparseGPT code prune `score <= sorted[k]`, one weight more per ranking, plus ties.)
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "sparsa/compress/matrix.h"
#include "sparsa/compress/quantize.h"
#include "sparsa/core/thread_pool.h"

namespace sparsa::compress {

/// Unstructured at `sparsity` (in [0, 1)) when m == 0; otherwise N:M, pruning n (0 < n < m) of
/// every m consecutive input columns, and `sparsity` is not read (it is n / m).
struct SparsityPattern {
  double sparsity = 0.0;
  int n = 0;
  int m = 0;

  bool structured() const { return m > 0; }
  double fraction() const { return m > 0 ? static_cast<double>(n) / m : sparsity; }
};

/// Throws sparsa::Error unless the pattern is valid for `cols` input columns (sparsity in [0, 1),
/// 0 < n < m, m dividing cols); `fn` names the caller.
void check_sparsity_pattern(const SparsityPattern& p, int64_t cols, const char* fn);

/// Magnitude pruning: unstructured with one threshold on |W| over the whole matrix; N:M by the
/// lowest |W| of each group.
Mask magnitude_prune(Matrix& w, const SparsityPattern& pattern);

/// Wanda (Sun et al. 2023, locuslab/wanda): score |W_ij| · ‖X_j‖ with ‖X_j‖² = sq_col_norms[j]
/// (InputStats::sq_norms); unstructured prunes the lowest-scored fraction of each output row.
Mask wanda_prune(Matrix& w, const std::vector<double>& sq_col_norms,
                 const SparsityPattern& pattern);

struct SparseGptOptions {
  int64_t block_size = 128;  // columns per mask choice and lazy batch update (a multiple of m)
  double damp = 0.01;        // H += damp · mean(diag H) · I
  /// Quantize the kept weights during pruning (the reference's --wbits): per channel, the grid is
  /// found once on the unpruned W, as there; per group, at each group's first column from W as
  /// of the block's start, as GPTQ does. act_order is not supported.
  std::optional<QuantSpec> quant = std::nullopt;
};

/// SparseGPT (Frantar & Alistarh 2023, IST-DASLab/sparsegpt sparsegpt.py fasterprune): per block
/// of block_size columns, prunes the weights of lowest w² / [H⁻¹]_jj² and moves the remaining
/// columns to compensate (the OBS update of GPTQ). `hessian` [cols, cols] (H = 2/N XᵀX) is
/// consumed. w becomes the pruned (and, with opts.quant, dequantized) weights; with opts.quant
/// and quant_out, the codes go to *quant_out (pruned weights have the zero-point code). Throws
/// sparsa::Error when H + damping is not positive definite.
Mask sparsegpt_prune(Matrix& w, std::vector<double> hessian, const SparsityPattern& pattern,
                     const SparseGptOptions& opts = {}, QuantResult* quant_out = nullptr,
                     ThreadPool* pool = nullptr);

/// OWL's layer outlier ratio (Yin et al. 2023, luuyin/OWL check_outlier_mean): the fraction of
/// Wanda scores |W_ij| · ‖X_j‖ above m × their mean.
double outlier_ratio(const Matrix& w, const std::vector<double>& sq_col_norms, double m = 5.0);

/// The same over all the matrices of one decoder layer taken together, as OWL scores a layer:
/// one mean over all of their scores. sq_col_norms[i] belongs to ws[i].
double layer_outlier_ratio(std::span<const Matrix* const> ws,
                           std::span<const std::vector<double>* const> sq_col_norms,
                           double m = 5.0);

/// OWL's per-layer sparsities: the outlier ratios min-max normalised to [0, 2·lambda], shifted so
/// that their mean is the target density 1 − target; sparsity = 1 − density (a sparsity <= 0
/// becomes 0.01, as the reference). Equal ratios give every layer the target. Throws when a
/// layer would reach sparsity 1 (lower lambda).
std::vector<double> owl_layer_sparsities(const std::vector<double>& outlier_ratios, double target,
                                         double lambda = 0.08);

/// Building block of the pruners: keep[i] = 0 for the n_prune lowest of score[0, n) (ties: lower
/// index first), 1 for the rest. scratch is reused between calls.
void prune_lowest(const float* score, int64_t n, int64_t n_prune, uint8_t* keep,
                  std::vector<float>& scratch);

}  // namespace sparsa::compress
