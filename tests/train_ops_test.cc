// Every training op's backward against central finite differences of its forward, on small
// odd shapes (grouped-query attention with fewer kv heads than query heads included).
#include "sparsa/train/ops.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

namespace sparsa::train {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float s = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, s);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// ‖numeric − analytic‖ / ‖numeric‖ for d loss / d x, the numeric one by central differences.
double grad_error(std::vector<float>& x, const std::vector<float>& analytic,
                  const std::function<double()>& loss, float eps) {
  double num2 = 0, diff2 = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const float keep = x[i];
    x[i] = keep + eps;
    const double lp = loss();
    x[i] = keep - eps;
    const double lm = loss();
    x[i] = keep;
    const double g = (lp - lm) / (2.0 * eps);
    num2 += g * g;
    diff2 += (g - analytic[i]) * (g - analytic[i]);
  }
  EXPECT_GT(num2, 0.0) << "the test's loss does not depend on this input";
  return std::sqrt(diff2 / std::max(num2, 1e-30));
}

constexpr double kTol = 3e-3;

TEST(TrainOps, RmsNormBackwardMatchesFiniteDifferences) {
  ThreadPool pool(2);
  const int64_t n = 5, c = 13;
  std::vector<float> x = randn(n * c, 1), w = randn(c, 2), r = randn(n * c, 3);
  std::vector<float> out(n * c), rstd(n);
  auto loss = [&] {
    ops::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), n, c, 1e-5f, pool);
    return dot(out, r);
  };
  loss();
  std::vector<float> dx(n * c, 0.5f), dw(c, -0.25f);  // backward accumulates: start off zero
  ops::rmsnorm_backward(dx.data(), dw.data(), r.data(), x.data(), w.data(), rstd.data(), n, c,
                        pool);
  for (float& v : dx) v -= 0.5f;
  for (float& v : dw) v += 0.25f;
  EXPECT_LT(grad_error(x, dx, loss, 1e-2f), kTol);
  EXPECT_LT(grad_error(w, dw, loss, 1e-2f), kTol);
}

TEST(TrainOps, MatmulBackwardMatchesFiniteDifferences) {
  for (int threads : {1, 3}) {
    ThreadPool pool(threads);
    const int64_t n = 7, c = 19, oc = 37;
    std::vector<float> x = randn(n * c, 4), w = randn(oc * c, 5), b = randn(oc, 6),
                       r = randn(n * oc, 7);
    std::vector<float> out(n * oc);
    auto loss = [&] {
      ops::matmul_forward(out.data(), x.data(), w.data(), b.data(), n, c, oc, pool);
      return dot(out, r);
    };
    std::vector<float> dx(n * c, 0.0f), dw(oc * c, 0.0f), db(oc, 0.0f);
    ops::matmul_backward(dx.data(), dw.data(), db.data(), r.data(), x.data(), w.data(), n, c, oc,
                         pool);
    EXPECT_LT(grad_error(x, dx, loss, 1e-2f), kTol);
    EXPECT_LT(grad_error(w, dw, loss, 1e-2f), kTol);
    EXPECT_LT(grad_error(b, db, loss, 1e-2f), kTol);
    // Accumulates: a second backward doubles the gradient.
    std::vector<float> dw2 = dw;
    ops::matmul_backward(nullptr, dw2.data(), nullptr, r.data(), x.data(), w.data(), n, c, oc,
                         pool);
    for (size_t i = 0; i < dw.size(); ++i) EXPECT_NEAR(dw2[i], 2 * dw[i], 1e-4f * (1 + std::abs(dw[i])));
  }
}

TEST(TrainOps, RopeBackwardIsTheInverseRotationAndMatchesFiniteDifferences) {
  ThreadPool pool(2);
  const int64_t b = 2, t = 5, heads = 3, hd = 6, half = hd / 2;
  std::vector<float> inv = {1.0f, 0.1f, 0.01f}, cs(t * half), sn(t * half);
  ops::rope_tables(cs.data(), sn.data(), inv.data(), t, half);
  std::vector<float> x = randn(b * t * heads * hd, 8), r = randn(x.size(), 9);
  std::vector<float> y;
  auto loss = [&] {
    y = x;
    ops::rope_forward(y.data(), cs.data(), sn.data(), b, t, heads, hd, pool);
    return dot(y, r);
  };
  std::vector<float> dx = r;
  ops::rope_backward(dx.data(), cs.data(), sn.data(), b, t, heads, hd, pool);
  EXPECT_LT(grad_error(x, dx, loss, 1e-2f), kTol);
  // Position 0 is not rotated.
  loss();
  for (int64_t i = 0; i < heads * hd; ++i) EXPECT_EQ(y[i], x[i]);
}

TEST(TrainOps, GroupedQueryAttentionBackwardMatchesFiniteDifferences) {
  ThreadPool pool(2);
  const ops::AttentionShape s{2, 5, 4, 2, 6};  // 4 query heads share 2 kv heads
  const int64_t qn = s.batch * s.seq * s.n_heads * s.head_dim;
  const int64_t kn = s.batch * s.seq * s.n_kv_heads * s.head_dim;
  std::vector<float> q = randn(qn, 10), k = randn(kn, 11), v = randn(kn, 12), r = randn(qn, 13);
  std::vector<float> out(qn), att(s.batch * s.n_heads * s.seq * s.seq);
  auto loss = [&] {
    ops::attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), s, pool);
    return dot(out, r);
  };
  loss();
  // Causal: probabilities sum to 1 over the past, 0 above the diagonal.
  for (int64_t row = 0; row < s.batch * s.n_heads * s.seq; ++row) {
    const int64_t t = row % s.seq;
    double sum = 0;
    for (int64_t u = 0; u < s.seq; ++u) {
      if (u > t) {
        EXPECT_EQ(att[row * s.seq + u], 0.0f);
      }
      sum += att[row * s.seq + u];
    }
    EXPECT_NEAR(sum, 1.0, 1e-5);
  }
  std::vector<float> dq(qn, 0.0f), dk(kn, 0.0f), dv(kn, 0.0f);
  ops::attention_backward(dq.data(), dk.data(), dv.data(), r.data(), att.data(), q.data(),
                          k.data(), v.data(), s, pool);
  EXPECT_LT(grad_error(q, dq, loss, 1e-2f), kTol);
  EXPECT_LT(grad_error(k, dk, loss, 1e-2f), kTol);
  EXPECT_LT(grad_error(v, dv, loss, 1e-2f), kTol);
}

TEST(TrainOps, SwigluBackwardMatchesFiniteDifferences) {
  ThreadPool pool(2);
  const int64_t n = 23;
  std::vector<float> g = randn(n, 14, 2.0f), u = randn(n, 15), r = randn(n, 16), out(n);
  auto loss = [&] {
    ops::swiglu_forward(out.data(), g.data(), u.data(), n, pool);
    return dot(out, r);
  };
  std::vector<float> dg(n, 0.0f), du(n, 0.0f);
  ops::swiglu_backward(dg.data(), du.data(), r.data(), g.data(), u.data(), n, pool);
  EXPECT_LT(grad_error(g, dg, loss, 1e-2f), kTol);
  EXPECT_LT(grad_error(u, du, loss, 1e-2f), kTol);
}

TEST(TrainOps, EmbeddingBackwardSumsRepeatedTokens) {
  const int64_t vocab = 6, c = 5, n = 7;
  std::vector<int32_t> ids = {3, 1, 3, 5, 0, 3, 1};
  std::vector<float> table = randn(vocab * c, 17), r = randn(n * c, 18), out(n * c);
  auto loss = [&] {
    ops::embedding_forward(out.data(), ids.data(), table.data(), n, c);
    return dot(out, r);
  };
  std::vector<float> dt(vocab * c, 0.0f);
  ops::embedding_backward(dt.data(), r.data(), ids.data(), n, c);
  EXPECT_LT(grad_error(table, dt, loss, 1e-2f), kTol);
  for (int64_t i = 0; i < c; ++i) EXPECT_EQ(dt[2 * c + i], 0.0f);  // token 2 never appears
}

TEST(TrainOps, CrossEntropyMatchesFiniteDifferencesAndIgnoresNegativeTargets) {
  ThreadPool pool(2);
  const int64_t n = 4, v = 11;
  std::vector<float> z = randn(n * v, 19, 2.0f);
  std::vector<int32_t> y = {3, -1, 10, 0};
  auto loss = [&] { return ops::cross_entropy(nullptr, z.data(), y.data(), n, v, 1.0f, pool); };
  std::vector<float> dz(n * v, 0.0f);
  const double l = ops::cross_entropy(dz.data(), z.data(), y.data(), n, v, 1.0f, pool);
  // Reference: mean over the three scored rows of logsumexp − z[y], in f64.
  double ref = 0;
  for (int64_t t : {0, 2, 3}) {
    double s = 0;
    for (int64_t i = 0; i < v; ++i) s += std::exp(static_cast<double>(z[t * v + i]));
    ref += std::log(s) - z[t * v + y[t]];
  }
  EXPECT_NEAR(l, ref / 3, 1e-6);
  EXPECT_LT(grad_error(z, dz, loss, 1e-2f), kTol);
  for (int64_t i = 0; i < v; ++i) EXPECT_EQ(dz[1 * v + i], 0.0f);
}

TEST(TrainOps, KlDistillationMatchesFiniteDifferencesAndIsZeroAtTheTeacher) {
  ThreadPool pool(2);
  const int64_t n = 3, v = 9;
  std::vector<float> s = randn(n * v, 20, 2.0f), t = randn(n * v, 21, 2.0f);
  for (float temp : {1.0f, 2.5f}) {
    auto loss = [&] { return ops::kl_distillation(nullptr, s.data(), t.data(), n, v, temp, 1.0f, pool); };
    std::vector<float> ds(n * v, 0.0f);
    const double l = ops::kl_distillation(ds.data(), s.data(), t.data(), n, v, temp, 1.0f, pool);
    // Reference in f64: T² · mean_rows Σ p (log p − log q).
    double ref = 0;
    for (int64_t r = 0; r < n; ++r) {
      double zs = 0, zt = 0;
      for (int64_t i = 0; i < v; ++i) {
        zs += std::exp(static_cast<double>(s[r * v + i]) / temp);
        zt += std::exp(static_cast<double>(t[r * v + i]) / temp);
      }
      for (int64_t i = 0; i < v; ++i) {
        const double lp = t[r * v + i] / static_cast<double>(temp) - std::log(zt);
        const double lq = s[r * v + i] / static_cast<double>(temp) - std::log(zs);
        ref += std::exp(lp) * (lp - lq);
      }
    }
    ref *= static_cast<double>(temp) * temp / n;
    EXPECT_NEAR(l, ref, 1e-5 * ref);
    EXPECT_LT(grad_error(s, ds, loss, 1e-2f), kTol);
    EXPECT_NEAR(ops::kl_distillation(nullptr, t.data(), t.data(), n, v, temp, 1.0f, pool), 0.0, 1e-6);
  }
}

TEST(TrainOps, SquareHeadIsNormalizedByTheTeacherAndMatchesFiniteDifferences) {
  ThreadPool pool(2);
  const int64_t n = 37;
  std::vector<float> s = randn(n, 22), t = randn(n, 23);
  auto loss = [&] { return ops::squarehead(nullptr, s.data(), t.data(), n, 1.0f, pool); };
  std::vector<float> ds(n, 0.0f);
  const double l = ops::squarehead(ds.data(), s.data(), t.data(), n, 1.0f, pool);
  double se = 0, st = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(s[i]) - t[i];
    se += d * d;
    st += static_cast<double>(t[i]) * t[i];
  }
  EXPECT_NEAR(l, se / st, 1e-9);
  EXPECT_LT(grad_error(s, ds, loss, 1e-2f), kTol);
  // Scale invariance: features and teacher scaled together give the same loss.
  std::vector<float> s3 = s, t3 = t;
  for (float& x : s3) x *= 3;
  for (float& x : t3) x *= 3;
  EXPECT_NEAR(ops::squarehead(nullptr, s3.data(), t3.data(), n, 1.0f, pool), l, 1e-6);
}

TEST(TrainOps, AdamWFollowsTheDecoupledUpdate) {
  ThreadPool pool(2);
  const int64_t n = 50;
  std::vector<float> w = randn(n, 24), g = randn(n, 25), m = randn(n, 26, 0.1f), v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = 0.01f * (1 + i % 3);
  const std::vector<float> w0 = w, m0 = m, v0 = v;
  ops::AdamW o{.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f, .weight_decay = 0.1f};
  ops::adamw_update(w.data(), g.data(), m.data(), v.data(), n, o, 3, pool);
  for (int64_t i = 0; i < n; ++i) {
    const double mi = 0.9 * m0[i] + 0.1 * g[i], vi = 0.99 * v0[i] + 0.01 * g[i] * g[i];
    const double mh = mi / (1 - std::pow(0.9, 3)), vh = vi / (1 - std::pow(0.99, 3));
    const double wi = w0[i] - 1e-2 * (mh / (std::sqrt(vh) + 1e-8) + 0.1 * w0[i]);
    EXPECT_NEAR(w[i], wi, 1e-5);
    EXPECT_NEAR(m[i], mi, 1e-6);
    EXPECT_NEAR(v[i], vi, 1e-6);
  }
}

TEST(TrainOps, SumOfSquaresAndMask) {
  ThreadPool pool(3);
  std::vector<float> g = randn(40000, 27);
  double ref = 0;
  for (float x : g) ref += static_cast<double>(x) * x;
  EXPECT_NEAR(ops::sum_of_squares(g.data(), 40000, pool), ref, 1e-9 * ref);
  std::vector<uint8_t> keep(g.size());
  for (size_t i = 0; i < keep.size(); ++i) keep[i] = i % 3 != 0;
  ops::apply_mask(g.data(), keep.data(), 40000, pool);
  for (size_t i = 0; i < keep.size(); i += 3) EXPECT_EQ(g[i], 0.0f);
  EXPECT_NE(g[1], 0.0f);
}

}  // namespace
}  // namespace sparsa::train
