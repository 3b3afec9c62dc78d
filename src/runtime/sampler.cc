#include "sparsa/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "sparsa/core/error.h"
#include "sparsa/kernels/linear.h"

namespace sparsa {

void SamplingParams::validate() const {
  SPARSA_CHECK(std::isfinite(temperature) && temperature >= 0,
               "temperature must be a non-negative number, got {}", temperature);
  SPARSA_CHECK(top_k >= 0, "top_k must be non-negative, got {}", top_k);
  SPARSA_CHECK(top_p > 0 && top_p <= 1, "top_p must be in (0, 1], got {}", top_p);
  SPARSA_CHECK(min_p >= 0 && min_p <= 1, "min_p must be in [0, 1], got {}", min_p);
  SPARSA_CHECK(std::isfinite(repetition_penalty) && repetition_penalty > 0,
               "repetition_penalty must be positive, got {}", repetition_penalty);
  SPARSA_CHECK(std::isfinite(presence_penalty) && std::abs(presence_penalty) <= 2,
               "presence_penalty must be in [-2, 2], got {}", presence_penalty);
  SPARSA_CHECK(std::isfinite(frequency_penalty) && std::abs(frequency_penalty) <= 2,
               "frequency_penalty must be in [-2, 2], got {}", frequency_penalty);
}

namespace {
uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

}  // namespace

Rng::Rng(uint64_t seed) {
  for (uint64_t& s : s_) s = splitmix64(seed);
}

uint64_t Rng::next() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

int32_t argmax(const float* logits, int64_t vocab) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

Sampler::Sampler(const SamplingParams& params) : p_(params), rng_(params.seed) {
  p_.validate();
}

int32_t Sampler::sample(float* logits, int64_t vocab, std::span<const int32_t> history) {
  if (p_.repetition_penalty != 1.0f || p_.presence_penalty != 0 || p_.frequency_penalty != 0) {
    counts_.assign(static_cast<size_t>(vocab), 0);
    for (int32_t id : history)
      if (id >= 0 && id < vocab) ++counts_[static_cast<size_t>(id)];
    for (int64_t i = 0; i < vocab; ++i) {
      const int32_t c = counts_[static_cast<size_t>(i)];
      if (c == 0) continue;
      float& l = logits[i];
      if (p_.repetition_penalty != 1.0f)
        l = l > 0 ? l / p_.repetition_penalty : l * p_.repetition_penalty;
      l -= p_.presence_penalty + p_.frequency_penalty * static_cast<float>(c);
    }
  }
  if (p_.temperature == 0.0f) return argmax(logits, vocab);

  // The draw walks the candidates from the most to the least likely (ties: smaller id first),
  // as if the whole vocabulary were sorted; but only as much of that order is built as the draw
  // reaches. The survivors' weights are summed in whatever order they lie, which moves the
  // result only by rounding in the last bits; the walk itself, top-p's and min-p's cut-offs all
  // follow the sorted order. Most draws end within the first few dozen tokens, so a draw costs a
  // selection over the vocabulary (linear) instead of a full sort.
  const size_t v = static_cast<size_t>(vocab);
  candidates_.resize(v);
  scaled_.resize(v);
  // Separate simple loops, so that the compiler vectorizes them; the maximum in eight chains.
  const float temperature = p_.temperature;
  for (size_t i = 0; i < v; ++i) scaled_[i] = logits[i] / temperature;
  float part_max[8];
  std::fill(part_max, part_max + 8, -std::numeric_limits<float>::infinity());
  size_t i8 = 0;
  for (; i8 + 8 <= v; i8 += 8)
    for (int j = 0; j < 8; ++j) part_max[j] = std::max(part_max[j], scaled_[i8 + j]);
  for (int j = 0; i8 + j < v; ++j) part_max[j] = std::max(part_max[j], scaled_[i8 + j]);
  const float maxf = *std::max_element(part_max, part_max + 8);
  for (size_t i = 0; i < v; ++i) candidates_[i] = {scaled_[i], static_cast<int32_t>(i)};
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  const auto first = candidates_.begin();
  size_t n = v;
  if (p_.top_k > 0 && static_cast<size_t>(p_.top_k) < n) {
    n = static_cast<size_t>(p_.top_k);
    std::nth_element(first, first + static_cast<ptrdiff_t>(n), candidates_.end(), by_logit);
  }
  // [0, sorted) is in final order, and every candidate in [sorted, n) comes after all of them.
  // The order is built in bands of value, highest first: a band's candidates are gathered
  // to the front of the rest (one linear pass) and sorted; a single pass of nth_element keeps
  // a band from growing past a few hundred (ties at one value, a flat distribution).
  size_t sorted = 0;
  int band = 0;
  auto sort_through = [&](size_t m) {
    while (sorted < m) {
      constexpr float kBandWidth[] = {3.0f, 8.0f, 16.0f, 32.0f};
      size_t end = n;
      if (band < 4) {
        const float floor = maxf - kBandWidth[band++];
        end = sorted;
        for (size_t i = sorted; i < n; ++i)
          if (candidates_[i].first >= floor) std::swap(candidates_[i], candidates_[end++]);
      }
      if (end - sorted > 512 && m < sorted + 512) {
        end = sorted + std::max<size_t>(m - sorted, 256);
        std::nth_element(first + static_cast<ptrdiff_t>(sorted), first + static_cast<ptrdiff_t>(end),
                         first + static_cast<ptrdiff_t>(n), by_logit);
        band = 4;  // the rest is ordered by nth_element from here on, not by bands
      }
      std::sort(first + static_cast<ptrdiff_t>(sorted), first + static_cast<ptrdiff_t>(end),
                by_logit);
      sorted = end;
    }
  };
  // Softmax over the survivors: exp(c - max) by the vector kernel (f32, about 1 ulp) for the
  // whole vocabulary at once, summed in double so that tiny tails still count.
  kernels::exp_shifted(scaled_.data(), maxf, scaled_.data(), vocab);
  double sum = 0;
  if (n == v) {  // the whole vocabulary, in id order: eight chains of double sums
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t i = 0;
    for (; i + 8 <= v; i += 8)
      for (int j = 0; j < 8; ++j) part[j] += scaled_[i + j];
    for (int j = 0; i + j < v; ++j) part[j] += scaled_[i + j];
    sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  } else {
    for (size_t i = 0; i < n; ++i) sum += scaled_[static_cast<size_t>(candidates_[i].second)];
  }
  const size_t survivors = n;
  auto weight = [&](size_t i) {
    return static_cast<double>(scaled_[static_cast<size_t>(candidates_[i].second)]);
  };
  auto prob = [&](size_t i) { return weight(i) / sum; };
  if (p_.top_p < 1.0f) {
    double cum = 0;
    size_t keep = 0;
    while (keep < n) {
      sort_through(keep + 1);
      cum += prob(keep++);
      if (cum >= p_.top_p) break;
    }
    n = std::max<size_t>(keep, 1);
  }
  if (p_.min_p > 0.0f) {
    sort_through(1);
    const double floor = prob(0) * p_.min_p;
    size_t keep = 1;
    while (keep < n) {
      sort_through(keep + 1);
      if (!(prob(keep) >= floor)) break;
      ++keep;
    }
    n = keep;
  }
  // The draw, in units of weight: r uniform in [0, the kept weight), spent in sorted order.
  double total = sum;
  if (n < survivors) {
    total = 0;
    for (size_t i = 0; i < n; ++i) total += weight(i);
  }
  double r = rng_.uniform() * total;
  for (size_t i = 0; i < n; ++i) {
    sort_through(i + 1);
    r -= weight(i);
    if (r < 0) return candidates_[i].second;
  }
  sort_through(n);
  return candidates_[n - 1].second;
}

}  // namespace sparsa
