// Low-rank factorization by truncated SVD, plain (Eckart–Young) or activation-whitened (SVD-LLM,
// Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
// Model Compression"): with S the Cholesky factor of XᵀX, ‖(W − Ŵ) Xᵀ‖_F = ‖(W − Ŵ) S‖_F, so
// truncating the SVD of W·S and mapping back by S⁻¹ gives the rank-r Ŵ that best preserves the
// layer's outputs on the calibration inputs, each dropped singular value costing exactly its
// square. LAPACK's divide-and-conquer SVD (gesdd; f32 for the plain case, f64 for the whitened one,
// where S may be ill-conditioned) dominates: O(rows · cols · min(rows, cols)) time and about
// 3 · rows · cols values of memory; whitening adds a Cholesky factorization, O(cols³), and two
// triangular products.
#include "sparsa/compress/lowrank.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>

#include "sparsa/core/error.h"

namespace sparsa::compress {

namespace {

void check_target(const RankTarget& t, int64_t rows, int64_t cols, const char* fn) {
  SPARSA_CHECK(rows > 0 && cols > 0, "{}: the matrix is empty ({} x {})", fn, rows, cols);
  const int64_t k = std::min(rows, cols);
  switch (t.kind) {
    case RankTarget::Kind::kRank:
      SPARSA_CHECK(
          t.value >= 1.0 && t.value <= static_cast<double>(k) && t.value == std::floor(t.value),
          "{}: rank {} is outside 1..{} (min of {} x {})", fn, t.value, k, rows, cols);
      break;
    case RankTarget::Kind::kParamFraction:
      rank_for_param_fraction(rows, cols, t.value);
      break;
    case RankTarget::Kind::kEnergy:
      SPARSA_CHECK(t.value > 0.0 && t.value <= 1.0, "{}: energy fraction {} is outside (0, 1]", fn,
                   t.value);
      break;
  }
}

int64_t choose_rank(const RankTarget& t, int64_t rows, int64_t cols,
                    std::span<const double> sigma) {
  switch (t.kind) {
    case RankTarget::Kind::kRank:
      return static_cast<int64_t>(t.value);
    case RankTarget::Kind::kParamFraction:
      return rank_for_param_fraction(rows, cols, t.value);
    case RankTarget::Kind::kEnergy:
      return rank_for_energy(sigma, t.value);
  }
  return 0;
}

}  // namespace

int64_t rank_for_param_fraction(int64_t rows, int64_t cols, double rho) {
  SPARSA_CHECK(rho > 0.0 && rho <= 1.0, "rank_for_param_fraction: fraction {} is outside (0, 1]",
               rho);
  SPARSA_CHECK(rows > 0 && cols > 0, "rank_for_param_fraction: empty matrix ({} x {})", rows, cols);
  const double r = std::floor(rho * static_cast<double>(rows) * static_cast<double>(cols) /
                              static_cast<double>(rows + cols));
  SPARSA_CHECK(r >= 1.0,
               "rank_for_param_fraction: keeping {} of the {} x {} parameters leaves no rank", rho,
               rows, cols);
  return std::min(static_cast<int64_t>(r), std::min(rows, cols));
}

int64_t rank_for_energy(std::span<const double> sigma, double e) {
  SPARSA_CHECK(e > 0.0 && e <= 1.0, "rank_for_energy: energy fraction {} is outside (0, 1]", e);
  SPARSA_CHECK(!sigma.empty(), "rank_for_energy: no singular values");
  double total = 0.0;
  for (double s : sigma) total += s * s;
  double kept = 0.0;
  for (size_t r = 0; r < sigma.size(); ++r) {
    kept += sigma[r] * sigma[r];
    if (kept >= e * total) return static_cast<int64_t>(r + 1);
  }
  return static_cast<int64_t>(sigma.size());
}

LowRank svd_factorize(Matrix& w, const RankTarget& target) {
  constexpr const char* kFn = "svd_factorize";
  const int64_t m = w.rows, n = w.cols, k = std::min(m, n);
  check_target(target, m, n, kFn);
  for (float v : w.data)
    SPARSA_CHECK(std::isfinite(v), "{}: the matrix has a non-finite value", kFn);
  std::vector<float> a = w.data;                      // [m, n], destroyed by gesdd
  std::vector<float> s(static_cast<size_t>(k));       // [k]
  std::vector<float> u(static_cast<size_t>(m * k));   // [m, k]
  std::vector<float> vt(static_cast<size_t>(k * n));  // [k, n]
  const lapack_int info =
      LAPACKE_sgesdd(LAPACK_ROW_MAJOR, 'S', static_cast<lapack_int>(m), static_cast<lapack_int>(n),
                     a.data(), static_cast<lapack_int>(n), s.data(), u.data(),
                     static_cast<lapack_int>(k), vt.data(), static_cast<lapack_int>(n));
  SPARSA_CHECK(info == 0, "{}: LAPACK sgesdd failed on the {} x {} matrix (info {})", kFn, m, n,
               info);
  LowRank f;
  f.sigma.assign(s.begin(), s.end());
  const int64_t r = choose_rank(target, m, n, f.sigma);
  f.rank = r;
  f.u = Matrix(m, r);
  f.v = Matrix(r, n);
  for (int64_t i = 0; i < m; ++i) std::copy_n(u.data() + i * k, r, f.u.row(i));
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < n; ++j) f.v.at(i, j) = s[i] * vt[i * n + j];
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(r), 1.0f, f.u.data.data(), static_cast<int>(r), f.v.data.data(),
              static_cast<int>(n), 0.0f, w.data.data(), static_cast<int>(n));
  return f;
}

LowRank svd_llm_factorize(Matrix& w, std::span<const double> xtx, const RankTarget& target) {
  constexpr const char* kFn = "svd_llm_factorize";
  const int64_t m = w.rows, n = w.cols, k = std::min(m, n);
  check_target(target, m, n, kFn);
  SPARSA_CHECK(static_cast<int64_t>(xtx.size()) == n * n,
               "{}: XᵀX has {} entries, expected {} x {} for the layer's {} input columns", kFn,
               xtx.size(), n, n, n);
  for (float v : w.data)
    SPARSA_CHECK(std::isfinite(v), "{}: the matrix has a non-finite value", kFn);
  double mean_diag = 0.0;
  for (int64_t i = 0; i < n; ++i) mean_diag += xtx[i * n + i];
  mean_diag /= static_cast<double>(n);
  SPARSA_CHECK(std::isfinite(mean_diag) && mean_diag > 0.0,
               "{}: XᵀX has no positive diagonal (mean {}): no calibration inputs?", kFn,
               mean_diag);

  // S: lower Cholesky factor of XᵀX + λ I, [n, n].
  std::vector<double> sf(static_cast<size_t>(n * n));
  double damp = 0.0;
  for (;;) {
    std::copy(xtx.begin(), xtx.end(), sf.begin());
    for (int64_t i = 0; i < n; ++i) sf[i * n + i] += damp * mean_diag;
    if (LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 'L', static_cast<lapack_int>(n), sf.data(),
                       static_cast<lapack_int>(n)) == 0)
      break;
    damp = damp == 0.0 ? 1e-6 : damp * 10.0;
    SPARSA_CHECK(damp <= 1.0, "{}: XᵀX is not positive definite even with damping 1 · mean(diag)",
                 kFn);
  }
  for (int64_t i = 0; i < n; ++i)
    std::fill(sf.begin() + i * n + i + 1, sf.begin() + (i + 1) * n, 0.0);

  std::vector<double> a(w.data.begin(), w.data.end());  // [m, n], W·S, destroyed by gesdd
  cblas_dtrmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit,
              static_cast<int>(m), static_cast<int>(n), 1.0, sf.data(), static_cast<int>(n),
              a.data(), static_cast<int>(n));
  std::vector<double> s(static_cast<size_t>(k));       // [k]
  std::vector<double> u(static_cast<size_t>(m * k));   // [m, k]
  std::vector<double> vt(static_cast<size_t>(k * n));  // [k, n]
  const lapack_int info =
      LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'S', static_cast<lapack_int>(m), static_cast<lapack_int>(n),
                     a.data(), static_cast<lapack_int>(n), s.data(), u.data(),
                     static_cast<lapack_int>(k), vt.data(), static_cast<lapack_int>(n));
  SPARSA_CHECK(info == 0, "{}: LAPACK dgesdd failed on the {} x {} matrix (info {})", kFn, m, n,
               info);
  LowRank f;
  f.sigma = s;
  const int64_t r = choose_rank(target, m, n, f.sigma);
  f.rank = r;
  // V = Σ_r V_rᵀ S⁻¹: scale the leading rows of Vᵀ, then solve V S = Σ_r V_rᵀ.
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < n; ++j) vt[i * n + j] *= s[i];
  cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit,
              static_cast<int>(r), static_cast<int>(n), 1.0, sf.data(), static_cast<int>(n),
              vt.data(), static_cast<int>(n));
  f.u = Matrix(m, r);
  f.v = Matrix(r, n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < r; ++j) f.u.at(i, j) = static_cast<float>(u[i * k + j]);
  for (int64_t i = 0; i < r * n; ++i) f.v.data[i] = static_cast<float>(vt[i]);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(r), 1.0, u.data(), static_cast<int>(k), vt.data(),
              static_cast<int>(n), 0.0, a.data(), static_cast<int>(n));
  std::transform(a.begin(), a.end(), w.data.begin(),
                 [](double v) { return static_cast<float>(v); });
  return f;
}

}  // namespace sparsa::compress
