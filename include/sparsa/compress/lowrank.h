// Low-rank factorization W ≈ U·V of a linear layer W [rows, cols], U [rows, r], V [r, cols]: the
// layer becomes two thinner ones, x ↦ U (V x), with r (rows + cols) parameters instead of
// rows · cols.
//
//   LowRank f = svd_factorize(w, RankTarget::param_fraction(0.5));   // truncated SVD of W
//   std::vector<double> h = stats.hessian(pool);                      // ∝ XᵀX [cols, cols]
//   LowRank g = svd_llm_factorize(w2, h, RankTarget::energy(0.9));    // SVD-LLM, whitened
//   // w and w2 now hold U·V; f.u, f.v are the factors.
//
// How the rank is chosen (RankTarget):
//   rank(r)             r itself, 1 <= r <= min(rows, cols);
//   param_fraction(ρ)   the fraction ρ ∈ (0, 1] of the dense parameters kept:
//                       r = floor(ρ · rows · cols / (rows + cols)), so "50%" halves the layer's
//                       size (and its matrix-vector cost), not its rank;
//   energy(e)           the smallest r with Σ_{i<r} σ_i² >= e · Σ_i σ_i², e ∈ (0, 1], over the
//                       singular values of the matrix factored (W, or W·S when whitened).
// The singular values go into V: U has orthonormal columns, V = Σ_r V_rᵀ (· S⁻¹ when whitened).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "sparsa/compress/matrix.h"

namespace sparsa::compress {

struct RankTarget {
  enum class Kind { kRank, kParamFraction, kEnergy };
  Kind kind = Kind::kRank;
  double value = 0.0;

  static RankTarget rank(int64_t r) { return {Kind::kRank, static_cast<double>(r)}; }
  static RankTarget param_fraction(double rho) { return {Kind::kParamFraction, rho}; }
  static RankTarget energy(double e) { return {Kind::kEnergy, e}; }
};

/// The rank that keeps the fraction rho of the rows · cols parameters (see above).
int64_t rank_for_param_fraction(int64_t rows, int64_t cols, double rho);
/// The smallest rank whose leading singular values (descending) keep the fraction e of Σσ².
int64_t rank_for_energy(std::span<const double> sigma, double e);

struct LowRank {
  int64_t rank = 0;
  Matrix u;                   // [rows, rank]
  Matrix v;                   // [rank, cols]
  std::vector<double> sigma;  // [min(rows, cols)], all singular values of W (or W·S), descending
};

/// Truncated SVD (Eckart–Young: the best rank-r approximation in the Frobenius norm). W ← U·V.
LowRank svd_factorize(Matrix& w, const RankTarget& target);

/// SVD-LLM (Wang et al. 2024): minimises ‖(W − U V) Xᵀ‖_F instead of ‖W − U V‖_F. xtx is XᵀX
/// [cols, cols] or any positive multiple of it (InputStats::hessian); S is its Cholesky factor
/// (XᵀX = S Sᵀ), W·S = U Σ Vᵀ is truncated and V = Σ_r V_rᵀ S⁻¹. When XᵀX is not positive definite,
/// damp · mean(diag) is added to its diagonal, damp growing ×10 from 1e-6 until the Cholesky
/// factorization succeeds. W ← U·V.
LowRank svd_llm_factorize(Matrix& w, std::span<const double> xtx, const RankTarget& target);

}  // namespace sparsa::compress
