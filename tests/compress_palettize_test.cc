// K-means palettization: the eDKM unique table against brute force, the table's k-means against
// plain Lloyd over every weight, and the palettes' properties.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "sparsa/compress/palettize.h"
#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"

namespace sparsa::compress {
namespace {

Matrix random_weight(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 0.02f);
  Matrix w(rows, cols);
  for (float& v : w.data) v = n(rng);
  return w;
}

double weighted_error(const Matrix& a, const Matrix& b, const std::vector<double>& h) {
  double e = 0.0;
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t c = 0; c < a.cols; ++c) {
      const double d = static_cast<double>(a.at(r, c)) - b.at(r, c);
      e += (h.empty() ? 1.0 : h[c]) * d * d;
    }
  return e;
}

TEST(Palettize, UniqueTableMatchesBruteForce) {
  const Matrix w = random_weight(256, 256, 1);
  const UniqueTable t = unique_bf16_table(w, 0, w.rows);
  std::map<uint16_t, double> counts;
  for (float v : w.data) counts[f32_to_bf16(v)] += 1.0;
  ASSERT_EQ(t.bits.size(), counts.size());
  EXPECT_LE(t.bits.size(), 65536u);
  EXPECT_GT(t.bits.size(), 1000u);
  double total = 0.0;
  for (size_t i = 0; i < t.bits.size(); ++i) {
    EXPECT_EQ(t.weights[i], counts.at(t.bits[i]));
    EXPECT_EQ(t.values[i], bf16_to_f32(t.bits[i]));
    if (i > 0) {
      EXPECT_LE(t.values[i - 1], t.values[i]);
    }
    total += t.weights[i];
  }
  EXPECT_EQ(total, static_cast<double>(w.rows * w.cols));

  // With column importances the weights are their sums.
  std::vector<double> h(256);
  for (int64_t c = 0; c < 256; ++c) h[c] = 1.0 + static_cast<double>(c);
  const UniqueTable th = unique_bf16_table(w, 10, 20, h);
  std::map<uint16_t, double> sums;
  for (int64_t r = 10; r < 20; ++r)
    for (int64_t c = 0; c < 256; ++c) sums[f32_to_bf16(w.at(r, c))] += h[c];
  ASSERT_EQ(th.bits.size(), sums.size());
  for (size_t i = 0; i < th.bits.size(); ++i)
    EXPECT_NEAR(th.weights[i], sums.at(th.bits[i]), 1e-9 * sums.at(th.bits[i]));
}

TEST(Palettize, UniqueTableNeverExceedsBf16Range) {
  // Random finite bf16 patterns with random low f32 bits (which round away): every pattern shows
  // up, with far more distinct f32 values than the table can hold.
  Matrix w(512, 1024);
  std::mt19937 rng(2);
  for (float& v : w.data) {
    uint32_t hi;
    do hi = rng() & 0xffffu;
    while ((hi & 0x7f80u) == 0x7f80u);
    const uint32_t bits = (hi << 16) | (rng() & 0x7fffu);
    std::memcpy(&v, &bits, sizeof v);
  }
  const UniqueTable t = unique_bf16_table(w, 0, w.rows);
  EXPECT_LE(t.bits.size(), 65536u);
  EXPECT_GT(t.bits.size(), 65000u);
  double total = 0.0;
  for (double c : t.weights) total += c;
  EXPECT_EQ(total, static_cast<double>(w.data.size()));
}

// Plain weighted Lloyd over every (bf16-rounded) weight, nearest centroid by a linear scan.
std::vector<double> lloyd_on_raw(const std::vector<float>& v, std::vector<double> c, int iters,
                                 double* objective) {
  std::vector<int> a(v.size(), -1);
  for (int it = 0; it <= iters; ++it) {
    bool changed = false;
    for (size_t i = 0; i < v.size(); ++i) {
      int best = 0;
      for (int k = 1; k < static_cast<int>(c.size()); ++k)
        if (std::abs(v[i] - c[k]) < std::abs(v[i] - c[best])) best = k;
      changed |= a[i] != best;
      a[i] = best;
    }
    if (!changed || it == iters) break;
    std::vector<double> s(c.size()), n(c.size());
    for (size_t i = 0; i < v.size(); ++i) s[a[i]] += v[i], n[a[i]] += 1.0;
    for (size_t k = 0; k < c.size(); ++k)
      if (n[k] > 0) c[k] = s[k] / n[k];
  }
  *objective = 0.0;
  for (size_t i = 0; i < v.size(); ++i) *objective += (v[i] - c[a[i]]) * (v[i] - c[a[i]]);
  return c;
}

TEST(Palettize, TableKMeansEqualsLloydOnAllWeights) {
  const Matrix w = random_weight(64, 256, 3);
  const UniqueTable t = unique_bf16_table(w, 0, w.rows);
  const std::vector<double> init = kmeans_plus_plus(t.values, t.weights, 8, 7);
  ASSERT_EQ(init.size(), 8u);
  EXPECT_TRUE(std::is_sorted(init.begin(), init.end()));
  const KMeans1d km = kmeans_lloyd(t.values, t.weights, init, 200);
  EXPECT_TRUE(km.converged);

  std::vector<float> raw(w.data.size());
  for (size_t i = 0; i < raw.size(); ++i) raw[i] = bf16_to_f32(f32_to_bf16(w.data[i]));
  double raw_obj = 0.0;
  const std::vector<double> c = lloyd_on_raw(raw, init, 200, &raw_obj);
  for (size_t k = 0; k < c.size(); ++k) EXPECT_NEAR(km.centroids[k], c[k], 1e-9);
  EXPECT_NEAR(km.objective, raw_obj, 1e-9 * raw_obj);

  // palettize() fits the same table: its objective on the unrounded weights differs only by the
  // bf16 rounding of the fit.
  Matrix wp = w;
  PaletteOptions opts;
  opts.bits = 3;
  opts.seed = 7;
  const Palette p = palettize(wp, opts);
  EXPECT_NEAR(p.objective[0], km.objective, 1e-12);
  const double err = weighted_error(w, wp, {});
  EXPECT_NEAR(err, km.objective, 0.02 * km.objective);
}

TEST(Palettize, AtMostTwoToTheBitsValuesPerGroup) {
  Matrix w = random_weight(64, 128, 4);
  const Matrix w0 = w;
  PaletteOptions opts;
  opts.bits = 3;
  opts.group_rows = 16;
  const Palette p = palettize(w, opts);
  ASSERT_EQ(p.lut.size(), 4u * 8u);
  ASSERT_EQ(p.indices.size(), w.data.size());
  EXPECT_EQ(p.group_rows, 16);
  for (int64_t gi = 0; gi < 4; ++gi) {
    std::set<float> distinct;
    const float* lut = p.lut.data() + gi * 8;
    EXPECT_TRUE(std::is_sorted(lut, lut + 8));
    for (int64_t r = gi * 16; r < (gi + 1) * 16; ++r)
      for (int64_t c = 0; c < 128; ++c) {
        const uint8_t i = p.indices[r * 128 + c];
        ASSERT_LT(i, 8);
        EXPECT_EQ(w.at(r, c), lut[i]);
        distinct.insert(w.at(r, c));
        // Each weight sits on its nearest table entry.
        for (int k = 0; k < 8; ++k)
          EXPECT_LE(std::abs(w0.at(r, c) - lut[i]), std::abs(w0.at(r, c) - lut[k]) + 1e-7f);
      }
    EXPECT_LE(distinct.size(), 8u);
  }
}

TEST(Palettize, MoreBitsLessError) {
  const Matrix w0 = random_weight(128, 128, 5);
  double prev = 1e30;
  for (int bits : {2, 3, 4, 6}) {
    Matrix w = w0;
    PaletteOptions opts;
    opts.bits = bits;
    palettize(w, opts);
    const double e = weighted_error(w0, w, {});
    EXPECT_LT(e, prev) << bits << " bits";
    prev = e;
  }
  // Per-group palettes fit better than one per tensor.
  Matrix wt = w0, wg = w0;
  PaletteOptions opts;
  opts.bits = 3;
  palettize(wt, opts);
  opts.group_rows = 8;
  palettize(wg, opts);
  EXPECT_LT(weighted_error(w0, wg, {}), weighted_error(w0, wt, {}));
}

TEST(Palettize, HessianWeightingLowersWeightedError) {
  const Matrix w0 = random_weight(64, 256, 6);
  std::mt19937 rng(7);
  std::normal_distribution<double> n(0.0, 1.0);
  std::vector<double> h(256);
  for (double& v : h) v = std::exp(2.0 * n(rng));
  // Make the important columns hold the large weights, as salient channels do.
  Matrix w1 = w0;
  for (int64_t c = 0; c < 256; ++c)
    if (h[c] > 5.0)
      for (int64_t r = 0; r < 64; ++r) w1.at(r, c) *= 3.0f;
  Matrix plain = w1, weighted = w1;
  PaletteOptions opts;
  opts.bits = 3;
  palettize(plain, opts);
  palettize(weighted, opts, h);
  EXPECT_LT(weighted_error(w1, weighted, h), 0.9 * weighted_error(w1, plain, h));
  EXPECT_GT(weighted_error(w1, weighted, {}), weighted_error(w1, plain, {}));
}

TEST(Palettize, DeterministicGivenSeed) {
  const Matrix w0 = random_weight(32, 64, 8);
  PaletteOptions opts;
  opts.bits = 4;
  opts.group_rows = 8;
  opts.seed = 42;
  Matrix a = w0, b = w0;
  const Palette pa = palettize(a, opts), pb = palettize(b, opts);
  EXPECT_EQ(pa.lut, pb.lut);
  EXPECT_EQ(pa.indices, pb.indices);
  EXPECT_EQ(a.data, b.data);
}

TEST(Palettize, FewDistinctValuesAreKeptExactly) {
  Matrix w(4, 8);
  for (size_t i = 0; i < w.data.size(); ++i) w.data[i] = std::array{-0.5f, 0.25f, 1.0f}[i % 3];
  const Matrix w0 = w;
  PaletteOptions opts;
  opts.bits = 4;
  const Palette p = palettize(w, opts);
  EXPECT_EQ(w.data, w0.data);
  EXPECT_EQ(p.objective[0], 0.0);
}

TEST(Palettize, RejectsBadArguments) {
  Matrix w = random_weight(8, 16, 9);
  auto expect_error = [&](PaletteOptions o, std::vector<double> h, const std::string& needle) {
    Matrix c = w;
    try {
      palettize(c, o, h);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  PaletteOptions o;
  o.bits = 1;
  expect_error(o, {}, "bits = 1 is outside 2..8");
  o.bits = 9;
  expect_error(o, {}, "bits = 9 is outside 2..8");
  o = {};
  o.group_rows = 3;
  expect_error(o, {}, "group_rows 3 does not divide the 8 rows");
  expect_error({}, std::vector<double>(15, 1.0), "15 column importances for 16 columns");
  std::vector<double> neg(16, 1.0);
  neg[4] = -1.0;
  expect_error({}, neg, "not a finite non-negative");
  w.at(2, 3) = std::nanf("");
  expect_error({}, {}, "weight (2, 3)");
  EXPECT_THROW(unique_bf16_table(w, 4, 9), Error);
}

}  // namespace
}  // namespace sparsa::compress
