#include "sparsa/runtime/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "sparsa/core/error.h"
#include "sparsa/runtime/generator.h"

namespace sparsa {
namespace {

std::vector<float> logits_of(std::vector<double> probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(static_cast<float>(std::log(p)));
  return l;
}

std::vector<double> frequencies(SamplingParams p, const std::vector<float>& logits, int draws) {
  Sampler s(p);
  std::vector<double> f(logits.size());
  for (int i = 0; i < draws; ++i) {
    std::vector<float> l = logits;
    f[static_cast<size_t>(s.sample(l.data(), static_cast<int64_t>(l.size()), {}))] += 1.0 / draws;
  }
  return f;
}

TEST(Sampler, GreedyIsArgmax) {
  std::vector<float> l = {0.1f, 2.0f, -1.0f, 2.0f};
  Sampler s({});
  EXPECT_EQ(s.sample(l.data(), 4, {}), 1);  // first of the tied maxima
}

TEST(Sampler, TemperatureOneFollowsTheDistribution) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 7;
  const auto f = frequencies(p, logits_of({0.5, 0.3, 0.15, 0.05}), 40000);
  EXPECT_NEAR(f[0], 0.5, 0.01);
  EXPECT_NEAR(f[1], 0.3, 0.01);
  EXPECT_NEAR(f[2], 0.15, 0.01);
  EXPECT_NEAR(f[3], 0.05, 0.005);
}

TEST(Sampler, TopKTopPAndMinPCutTheTail) {
  const auto l = logits_of({0.5, 0.3, 0.15, 0.05});
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 2;
  auto f = frequencies(p, l, 20000);
  EXPECT_EQ(f[2] + f[3], 0.0);
  EXPECT_NEAR(f[0], 0.5 / 0.8, 0.015);
  p = {};
  p.temperature = 1.0f;
  p.top_p = 0.7f;  // 0.5 + 0.3 reaches 0.7
  f = frequencies(p, l, 20000);
  EXPECT_EQ(f[2] + f[3], 0.0);
  p = {};
  p.temperature = 1.0f;
  p.min_p = 0.25f;  // keeps p >= 0.125
  f = frequencies(p, l, 20000);
  EXPECT_GT(f[2], 0.0);
  EXPECT_EQ(f[3], 0.0);
}

TEST(Sampler, SameSeedSameTokens) {
  SamplingParams p;
  p.temperature = 0.9f;
  p.seed = 123;
  const auto l = logits_of({0.2, 0.2, 0.2, 0.2, 0.2});
  Sampler a(p), b(p);
  for (int i = 0; i < 50; ++i) {
    auto la = l, lb = l;
    EXPECT_EQ(a.sample(la.data(), 5, {}), b.sample(lb.data(), 5, {}));
  }
}

TEST(Sampler, RepetitionPenaltyDiscouragesSeenTokens) {
  std::vector<float> l = {2.0f, 1.9f, -1.0f};
  SamplingParams p;
  p.repetition_penalty = 1.5f;
  Sampler s(p);
  const std::vector<int32_t> history = {0};
  EXPECT_EQ(s.sample(l.data(), 3, history), 1);
  EXPECT_FLOAT_EQ(l[0], 2.0f / 1.5f);
}

// The draw over a whole vocabulary, written plainly: candidates ordered by a comparison sort
// (largest first, ties by smaller id), softmax in double, top-p, then the inverse-CDF walk.
int32_t reference_draw(const std::vector<float>& logits, const SamplingParams& p, Rng& rng) {
  std::vector<std::pair<float, int32_t>> c;
  for (size_t i = 0; i < logits.size(); ++i)
    c.emplace_back(logits[i] / p.temperature, static_cast<int32_t>(i));
  std::sort(c.begin(), c.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < c.size()) c.resize(static_cast<size_t>(p.top_k));
  std::vector<double> prob(c.size());
  double sum = 0;
  for (size_t i = 0; i < c.size(); ++i) sum += prob[i] = std::exp(c[i].first - c[0].first);
  for (double& x : prob) x /= sum;
  size_t n = c.size();
  if (p.top_p < 1.0f) {
    double cum = 0;
    size_t keep = 0;
    while (keep < n) {
      cum += prob[keep++];
      if (cum >= p.top_p) break;
    }
    n = keep;
  }
  if (p.min_p > 0.0f) {
    size_t keep = 1;
    while (keep < n && prob[keep] >= prob[0] * p.min_p) ++keep;
    n = keep;
  }
  double total = 0;
  for (size_t i = 0; i < n; ++i) total += prob[i];
  double r = rng.uniform() * total;
  for (size_t i = 0; i < n; ++i) {
    r -= prob[i];
    if (r < 0) return c[i].second;
  }
  return c[n - 1].second;
}

TEST(Sampler, LargeVocabularyDrawsAsAComparisonSortWould) {
  // 8192 logits with many exact ties, both zeros and values spread over a wide range: the sort
  // used for large vocabularies must give the same order (hence the same tokens) as the plain one.
  std::mt19937 gen(5);
  std::normal_distribution<float> dist(0.0f, 4.0f);
  std::vector<float> logits(8192);
  for (size_t i = 0; i < logits.size(); ++i) {
    if (i % 7 == 0) logits[i] = 0.0f;
    else if (i % 11 == 0) logits[i] = -0.0f;
    else if (i % 5 == 0) logits[i] = 1.5f;
    else logits[i] = std::round(dist(gen) * 8.0f) / 8.0f;
  }
  // The draw builds only as much of the sorted order as it reaches: cover the cut-offs that
  // stop it early (top-k, top-p, min-p) and a temperature so high that the distribution is
  // nearly flat and most draws walk deep into the order. Temperature alone walks only the first
  // band of candidates unless the draw leaves it: 0.7 keeps nearly every draw inside it, 1.7
  // and 40 send many or most draws past it.
  struct Case {
    float temperature, top_p, min_p;
    int top_k;
  };
  for (const Case& k : {Case{1.7f, 1.0f, 0.0f, 0}, Case{1.7f, 0.9f, 0.0f, 0},
                        Case{1.7f, 1.0f, 0.0f, 40}, Case{1.7f, 0.95f, 0.02f, 700},
                        Case{1.7f, 1.0f, 0.05f, 0}, Case{40.0f, 1.0f, 0.0f, 0},
                        Case{40.0f, 0.5f, 0.0f, 0}, Case{0.7f, 1.0f, 0.0f, 0}}) {
    SamplingParams p;
    p.temperature = k.temperature;
    p.top_p = k.top_p;
    p.min_p = k.min_p;
    p.top_k = k.top_k;
    p.seed = 99;
    Sampler s(p);
    Rng rng(p.seed);
    int distinct = 0;
    int32_t prev = -1;
    for (int i = 0; i < 300; ++i) {
      std::vector<float> l = logits;
      const int32_t got = s.sample(l.data(), static_cast<int64_t>(l.size()), {});
      ASSERT_EQ(got, reference_draw(logits, p, rng))
          << "draw " << i << ", temperature " << k.temperature << ", top_p " << k.top_p
          << ", min_p " << k.min_p << ", top_k " << k.top_k;
      distinct += got != prev;
      prev = got;
    }
    if (k.temperature > 1.0f) EXPECT_GT(distinct, 100);  // the draws move around the vocabulary
    else EXPECT_GT(distinct, 1);
  }
}

TEST(Sampler, RejectsOutOfRangeParameters) {
  SamplingParams p;
  p.top_p = 0.0f;
  EXPECT_THROW(Sampler{p}, Error);
  p = {};
  p.temperature = -1.0f;
  EXPECT_THROW(Sampler{p}, Error);
  p = {};
  p.top_k = -3;
  EXPECT_THROW(Sampler{p}, Error);
}

TEST(StopStringFilter, HoldsBackPossiblePrefixesAndCutsAtTheStop) {
  StopStringFilter f({"END", "\n\n"});
  EXPECT_EQ(f.push("hello E"), "hello ");
  EXPECT_EQ(f.push("N"), "");
  EXPECT_EQ(f.push("x and \n"), "ENx and ");
  EXPECT_EQ(f.push("\nmore"), "");
  EXPECT_TRUE(f.stopped());
  EXPECT_EQ(f.flush(), "");
  StopStringFilter g({"END"});
  EXPECT_EQ(g.push("abcEN"), "abc");
  EXPECT_EQ(g.flush(), "EN");
}

}  // namespace
}  // namespace sparsa
