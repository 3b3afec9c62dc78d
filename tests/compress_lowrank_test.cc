// Low-rank factorization: Eckart–Young for the plain SVD, the whitened (SVD-LLM) error identity
// ‖(W − Ŵ) Xᵀ‖² = Σ_{i>=r} σ_i(W·S)², the rank selectors and argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "sparsa/compress/lowrank.h"
#include "sparsa/core/error.h"

namespace sparsa::compress {
namespace {

Matrix random_matrix(int64_t rows, int64_t cols, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, stddev);
  Matrix w(rows, cols);
  for (float& v : w.data) v = n(rng);
  return w;
}

// Correlated inputs with a few outlier channels: x = z · M, M [cols, cols].
Matrix correlated_inputs(int64_t tokens, int64_t cols, uint32_t seed) {
  const Matrix z = random_matrix(tokens, cols, seed);
  Matrix m = random_matrix(cols, cols, seed + 1, 0.3f);
  for (int64_t j = 0; j < cols; ++j) m.at(j, j) += 1.0f;
  for (int64_t j = 2; j < cols; j += 17)
    for (int64_t i = 0; i < cols; ++i) m.at(i, j) *= 20.0f;
  Matrix x(tokens, cols);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < cols; ++j) {
      double s = 0.0;
      for (int64_t i = 0; i < cols; ++i) s += static_cast<double>(z.at(t, i)) * m.at(i, j);
      x.at(t, j) = static_cast<float>(s);
    }
  return x;
}

std::vector<double> gram(const Matrix& x) {  // XᵀX [cols, cols]
  std::vector<double> g(static_cast<size_t>(x.cols * x.cols), 0.0);
  for (int64_t t = 0; t < x.rows; ++t)
    for (int64_t i = 0; i < x.cols; ++i)
      for (int64_t j = 0; j < x.cols; ++j)
        g[i * x.cols + j] += static_cast<double>(x.at(t, i)) * x.at(t, j);
  return g;
}

double frob2(const Matrix& a, const Matrix& b) {
  double e = 0.0;
  for (size_t i = 0; i < a.data.size(); ++i) {
    const double d = static_cast<double>(a.data[i]) - b.data[i];
    e += d * d;
  }
  return e;
}

double output_error(const Matrix& w, const Matrix& wh, const Matrix& x) {  // ‖(W − Ŵ) Xᵀ‖²
  double e = 0.0;
  for (int64_t t = 0; t < x.rows; ++t)
    for (int64_t r = 0; r < w.rows; ++r) {
      double s = 0.0;
      for (int64_t j = 0; j < w.cols; ++j)
        s += (static_cast<double>(w.at(r, j)) - wh.at(r, j)) * x.at(t, j);
      e += s * s;
    }
  return e;
}

double tail(const std::vector<double>& sigma, int64_t r) {
  double s = 0.0;
  for (size_t i = static_cast<size_t>(r); i < sigma.size(); ++i) s += sigma[i] * sigma[i];
  return s;
}

TEST(LowRank, FullRankReproducesW) {
  const Matrix w0 = random_matrix(48, 80, 1);
  Matrix w = w0;
  const LowRank f = svd_factorize(w, RankTarget::rank(48));
  EXPECT_EQ(f.rank, 48);
  EXPECT_LT(frob2(w, w0), 1e-9 * frob2(w0, Matrix(48, 80)));

  const Matrix x = correlated_inputs(200, 80, 2);
  Matrix w2 = w0;
  const LowRank g = svd_llm_factorize(w2, gram(x), RankTarget::rank(48));
  EXPECT_EQ(g.u.rows, 48);
  EXPECT_EQ(g.v.cols, 80);
  EXPECT_LT(frob2(w2, w0), 1e-8 * frob2(w0, Matrix(48, 80)));
}

TEST(LowRank, PlainErrorIsTheTailSingularValues) {
  const Matrix w0 = random_matrix(96, 64, 3);
  Matrix w = w0;
  const LowRank f = svd_factorize(w, RankTarget::rank(10));
  ASSERT_EQ(f.sigma.size(), 64u);
  EXPECT_TRUE(std::is_sorted(f.sigma.rbegin(), f.sigma.rend()));
  const double total = frob2(w0, Matrix(96, 64));
  EXPECT_NEAR(tail(f.sigma, 0), total, 1e-5 * total);
  const double e = frob2(w, w0);
  EXPECT_NEAR(e, tail(f.sigma, 10), 1e-4 * e);
  ASSERT_EQ(f.u.rows, 96);
  ASSERT_EQ(f.u.cols, 10);
  ASSERT_EQ(f.v.rows, 10);
  // U has orthonormal columns; U·V is what W now holds.
  for (int64_t a = 0; a < 10; ++a)
    for (int64_t b = 0; b < 10; ++b) {
      double d = 0.0;
      for (int64_t i = 0; i < 96; ++i) d += static_cast<double>(f.u.at(i, a)) * f.u.at(i, b);
      EXPECT_NEAR(d, a == b ? 1.0 : 0.0, 1e-5);
    }
  for (int64_t i = 0; i < 96; i += 7)
    for (int64_t j = 0; j < 64; j += 5) {
      double s = 0.0;
      for (int64_t k = 0; k < 10; ++k) s += static_cast<double>(f.u.at(i, k)) * f.v.at(k, j);
      EXPECT_NEAR(w.at(i, j), s, 1e-5);
    }
}

TEST(LowRank, WhitenedPreservesOutputsBetter) {
  const int64_t rows = 72, cols = 64, r = 16;
  const Matrix w0 = random_matrix(rows, cols, 4);
  const Matrix x = correlated_inputs(256, cols, 5);
  const std::vector<double> xtx = gram(x);
  Matrix plain = w0, white = w0;
  svd_factorize(plain, RankTarget::rank(r));
  const LowRank g = svd_llm_factorize(white, xtx, RankTarget::rank(r));
  const double ep = output_error(w0, plain, x), ew = output_error(w0, white, x);
  EXPECT_LT(ew, 0.7 * ep) << ew << " vs " << ep;
  // Each dropped singular value of W·S costs exactly its square in ‖(W − Ŵ) Xᵀ‖².
  EXPECT_NEAR(ew, tail(g.sigma, r), 1e-3 * ew);

  // Any positive multiple of XᵀX (e.g. the Hessian 2/N XᵀX) gives the same factorization.
  std::vector<double> h = xtx;
  for (double& v : h) v *= 2.0 / 256.0;
  Matrix white2 = w0;
  svd_llm_factorize(white2, h, RankTarget::rank(r));
  EXPECT_LT(frob2(white, white2), 1e-8 * frob2(w0, Matrix(rows, cols)));
}

TEST(LowRank, SingularInputsAreDamped) {
  const Matrix w0 = random_matrix(40, 64, 6);
  const Matrix x = correlated_inputs(24, 64, 7);  // 24 tokens: XᵀX has rank 24 < 64
  Matrix plain = w0, white = w0;
  svd_factorize(plain, RankTarget::rank(8));
  svd_llm_factorize(white, gram(x), RankTarget::rank(8));
  for (float v : white.data) ASSERT_TRUE(std::isfinite(v));
  EXPECT_LT(output_error(w0, white, x), output_error(w0, plain, x));
}

TEST(LowRank, RankSelectors) {
  EXPECT_EQ(rank_for_param_fraction(5632, 2048, 0.5), 750);  // 0.5·5632·2048/7680 = 750.9
  EXPECT_EQ(rank_for_param_fraction(64, 64, 1.0), 32);
  const std::vector<double> sigma = {4.0, 2.0, 1.0, 1.0};  // energies 16, 4, 1, 1 of 22
  EXPECT_EQ(rank_for_energy(sigma, 16.0 / 22.0), 1);
  EXPECT_EQ(rank_for_energy(sigma, 0.75), 2);
  EXPECT_EQ(rank_for_energy(sigma, 0.96), 4);
  EXPECT_EQ(rank_for_energy(sigma, 1.0), 4);

  const Matrix w0 = random_matrix(64, 48, 8);
  Matrix w = w0;
  const LowRank f = svd_factorize(w, RankTarget::param_fraction(0.5));
  EXPECT_EQ(f.rank, 13);  // floor(0.5·64·48/112) = 13
  EXPECT_LE(f.rank * (64 + 48), 64 * 48 / 2);

  for (double e : {0.5, 0.8, 0.95}) {
    Matrix we = w0;
    const LowRank g = svd_factorize(we, RankTarget::energy(e));
    const double total = tail(g.sigma, 0);
    EXPECT_GE(total - tail(g.sigma, g.rank), e * total);
    EXPECT_LT(total - tail(g.sigma, g.rank - 1), e * total);
    // W_r itself keeps that energy: ‖W_r‖² = Σ_{i<r} σ_i².
    EXPECT_GE(frob2(we, Matrix(64, 48)), e * total * (1.0 - 1e-5));
  }
}

TEST(LowRank, RejectsBadArguments) {
  Matrix w = random_matrix(8, 6, 9);
  auto expect_error = [&](RankTarget t, const std::string& needle) {
    Matrix c = w;
    try {
      svd_factorize(c, t);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(RankTarget::rank(0), "rank 0 is outside 1..6");
  expect_error(RankTarget::rank(7), "rank 7 is outside 1..6");
  expect_error(RankTarget::param_fraction(0.0), "fraction 0 is outside (0, 1]");
  expect_error(RankTarget::param_fraction(1.5), "fraction 1.5 is outside (0, 1]");
  expect_error(RankTarget::param_fraction(0.05), "leaves no rank");
  expect_error(RankTarget::energy(0.0), "energy fraction 0 is outside (0, 1]");
  Matrix c = w;
  EXPECT_THROW(svd_llm_factorize(c, std::vector<double>(25, 1.0), RankTarget::rank(2)), Error);
  EXPECT_THROW(svd_llm_factorize(c, std::vector<double>(36, 0.0), RankTarget::rank(2)), Error);
}

}  // namespace
}  // namespace sparsa::compress
