#include "sparsa/runtime/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
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
