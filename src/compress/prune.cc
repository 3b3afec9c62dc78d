// Score-based pruning without weight updates, and OWL. Magnitude pruning drops the weights of
// smallest |W| (one threshold over the matrix, or the n lowest of every m input columns). Wanda
// (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models";
// locuslab/wanda) scores |W_ij| · ‖X_j‖, so a small weight on a large input survives, and ranks
// each output row alone. OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity";
// luuyin/OWL) gives layers with more outlier scores (> m × mean) a lower sparsity, keeping the
// mean at the target. Time: O(rows · cols) expected (selection by nth_element). Memory: the
// [rows, cols] mask plus one f32 score per weight ranked together.
#include "sparsa/compress/prune.h"

#include <algorithm>
#include <cmath>

#include "sparsa/core/error.h"

namespace sparsa::compress {

namespace {

// floor(sparsity · n), guarded against products like 0.57 · 100 = 56.999999999999993.
int64_t prune_count(double sparsity, int64_t n) {
  return static_cast<int64_t>(std::floor(sparsity * static_cast<double>(n) + 1e-9));
}

void check_matrix(const Matrix& w, const char* fn) {
  SPARSA_CHECK(w.rows > 0 && w.cols > 0 && w.data.size() == static_cast<size_t>(w.rows * w.cols),
               "{}: the weight matrix is empty or its data does not match {}x{}", fn, w.rows,
               w.cols);
}

void check_norms(const std::vector<double>& sq, int64_t cols, const char* fn) {
  SPARSA_CHECK(sq.size() == static_cast<size_t>(cols),
               "{}: {} squared column norms given for {} input columns", fn, sq.size(), cols);
  for (double v : sq)
    SPARSA_CHECK(v >= 0.0, "{}: a squared column norm is negative or NaN ({})", fn, v);
}

// score [rows, cols] → keep [rows, cols] under the pattern: per row (per_row) or over the whole
// matrix for unstructured, per row and group of m columns for N:M.
Mask select_mask(const std::vector<float>& score, int64_t rows, int64_t cols,
                 const SparsityPattern& p, bool per_row) {
  Mask keep(static_cast<size_t>(rows * cols));
  std::vector<float> scratch;
  if (p.structured()) {
    for (int64_t i = 0; i < rows * cols; i += p.m)
      prune_lowest(score.data() + i, p.m, p.n, keep.data() + i, scratch);
  } else if (per_row) {
    const int64_t k = prune_count(p.sparsity, cols);
    for (int64_t r = 0; r < rows; ++r)
      prune_lowest(score.data() + r * cols, cols, k, keep.data() + r * cols, scratch);
  } else {
    prune_lowest(score.data(), rows * cols, prune_count(p.sparsity, rows * cols), keep.data(),
                 scratch);
  }
  return keep;
}

void apply_mask(Matrix& w, const Mask& keep) {
  for (size_t i = 0; i < keep.size(); ++i)
    if (keep[i] == 0) w.data[i] = 0.0f;
}

}  // namespace

void check_sparsity_pattern(const SparsityPattern& p, int64_t cols, const char* fn) {
  if (p.m == 0) {
    SPARSA_CHECK(p.n == 0, "{}: n = {} without m (N:M needs both; 0:0 is unstructured)", fn, p.n);
    SPARSA_CHECK(p.sparsity >= 0.0 && p.sparsity < 1.0, "{}: sparsity {} is outside [0, 1)", fn,
                 p.sparsity);
    return;
  }
  SPARSA_CHECK(p.m > 0 && p.n > 0 && p.n < p.m,
               "{}: N:M pattern {}:{} needs 0 < n < m (n of every m columns pruned)", fn, p.n, p.m);
  SPARSA_CHECK(cols % p.m == 0, "{}: m = {} does not divide the {} input columns", fn, p.m, cols);
}

void prune_lowest(const float* score, int64_t n, int64_t n_prune, uint8_t* keep,
                  std::vector<float>& scratch) {
  if (n_prune <= 0) {
    std::fill_n(keep, n, uint8_t{1});
    return;
  }
  if (n_prune >= n) {
    std::fill_n(keep, n, uint8_t{0});
    return;
  }
  scratch.assign(score, score + n);
  std::nth_element(scratch.begin(), scratch.begin() + (n_prune - 1), scratch.end());
  const float t = scratch[n_prune - 1];  // the n_prune-th lowest score
  int64_t below = 0;
  for (int64_t i = 0; i < n; ++i) below += score[i] < t;
  int64_t ties = n_prune - below;  // entries equal to t still to prune, lowest index first
  for (int64_t i = 0; i < n; ++i) {
    if (score[i] < t) {
      keep[i] = 0;
    } else if (score[i] == t && ties > 0) {
      keep[i] = 0;
      --ties;
    } else {
      keep[i] = 1;
    }
  }
}

Mask magnitude_prune(Matrix& w, const SparsityPattern& pattern) {
  constexpr const char* kFn = "magnitude_prune";
  check_matrix(w, kFn);
  check_sparsity_pattern(pattern, w.cols, kFn);
  std::vector<float> score(w.data.size());  // [rows, cols], |W|
  for (size_t i = 0; i < score.size(); ++i) score[i] = std::abs(w.data[i]);
  Mask keep = select_mask(score, w.rows, w.cols, pattern, /*per_row=*/false);
  apply_mask(w, keep);
  return keep;
}

Mask wanda_prune(Matrix& w, const std::vector<double>& sq_col_norms,
                 const SparsityPattern& pattern) {
  constexpr const char* kFn = "wanda_prune";
  check_matrix(w, kFn);
  check_sparsity_pattern(pattern, w.cols, kFn);
  check_norms(sq_col_norms, w.cols, kFn);
  std::vector<float> norm(static_cast<size_t>(w.cols));  // [cols], ‖X_j‖
  for (int64_t j = 0; j < w.cols; ++j) norm[j] = static_cast<float>(std::sqrt(sq_col_norms[j]));
  std::vector<float> score(w.data.size());  // [rows, cols], |W_ij| · ‖X_j‖
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t j = 0; j < w.cols; ++j) score[r * w.cols + j] = std::abs(w.at(r, j)) * norm[j];
  Mask keep = select_mask(score, w.rows, w.cols, pattern, /*per_row=*/true);
  apply_mask(w, keep);
  return keep;
}

double layer_outlier_ratio(std::span<const Matrix* const> ws,
                           std::span<const std::vector<double>* const> sq_col_norms, double m) {
  constexpr const char* kFn = "outlier_ratio";
  SPARSA_CHECK(!ws.empty() && ws.size() == sq_col_norms.size(),
               "{}: {} matrices and {} norm vectors given", kFn, ws.size(), sq_col_norms.size());
  SPARSA_CHECK(m > 0.0, "{}: the outlier multiple m = {} must be positive", kFn, m);
  double sum = 0.0;
  int64_t count = 0;
  std::vector<std::vector<double>> norms(ws.size());
  for (size_t i = 0; i < ws.size(); ++i) {
    SPARSA_CHECK(ws[i] != nullptr && sq_col_norms[i] != nullptr, "{}: a null input", kFn);
    check_matrix(*ws[i], kFn);
    check_norms(*sq_col_norms[i], ws[i]->cols, kFn);
    norms[i].resize(sq_col_norms[i]->size());
    for (size_t j = 0; j < norms[i].size(); ++j) norms[i][j] = std::sqrt((*sq_col_norms[i])[j]);
    for (int64_t r = 0; r < ws[i]->rows; ++r)
      for (int64_t j = 0; j < ws[i]->cols; ++j) sum += std::abs(ws[i]->at(r, j)) * norms[i][j];
    count += ws[i]->rows * ws[i]->cols;
  }
  const double threshold = m * sum / static_cast<double>(count);
  int64_t outliers = 0;
  for (size_t i = 0; i < ws.size(); ++i)
    for (int64_t r = 0; r < ws[i]->rows; ++r)
      for (int64_t j = 0; j < ws[i]->cols; ++j)
        outliers += std::abs(ws[i]->at(r, j)) * norms[i][j] > threshold;
  return static_cast<double>(outliers) / static_cast<double>(count);
}

double outlier_ratio(const Matrix& w, const std::vector<double>& sq_col_norms, double m) {
  const Matrix* const ws[] = {&w};
  const std::vector<double>* const ns[] = {&sq_col_norms};
  return layer_outlier_ratio(ws, ns, m);
}

std::vector<double> owl_layer_sparsities(const std::vector<double>& ratios, double target,
                                         double lambda) {
  constexpr const char* kFn = "owl_layer_sparsities";
  SPARSA_CHECK(!ratios.empty(), "{}: no layer outlier ratios given", kFn);
  SPARSA_CHECK(target >= 0.0 && target < 1.0, "{}: target sparsity {} is outside [0, 1)", kFn,
               target);
  SPARSA_CHECK(lambda >= 0.0 && std::isfinite(lambda), "{}: lambda = {} must be >= 0", kFn, lambda);
  const auto [lo, hi] = std::minmax_element(ratios.begin(), ratios.end());
  const double min = *lo, max = *hi;
  SPARSA_CHECK(std::isfinite(min) && std::isfinite(max), "{}: an outlier ratio is not finite", kFn);
  const size_t n = ratios.size();
  std::vector<double> density(n, 1.0 - target);
  if (max > min) {
    double mean = 0.0;
    for (size_t i = 0; i < n; ++i) {
      density[i] = (ratios[i] - min) / (max - min) * 2.0 * lambda;
      mean += density[i];
    }
    mean /= static_cast<double>(n);
    for (double& d : density) d += (1.0 - target) - mean;
  }
  std::vector<double> sparsity(n);
  for (size_t i = 0; i < n; ++i) {
    sparsity[i] = 1.0 - density[i];
    if (sparsity[i] <= 0.0) sparsity[i] = 0.01;
    SPARSA_CHECK(sparsity[i] < 1.0,
                 "{}: layer {} would get sparsity {:.4f} >= 1 (target {}, lambda {}); lower lambda",
                 kFn, i, sparsity[i], target, lambda);
  }
  return sparsity;
}

}  // namespace sparsa::compress
