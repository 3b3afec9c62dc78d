#include "sparsa/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "sparsa/core/error.h"

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

// Sorts `c` by value, largest first, ties by index, smallest first: the order of std::sort
// with the comparator of Sampler::sample (which is used below kRadixMin). `c` must hold indices
// in ascending order. Least-significant-digit radix sort, 11 bits a pass, over an
// order-preserving unsigned key of each float; stable, so ties keep their ascending indices.
// A vocabulary of 8k–150k entries sorts in 3 linear passes instead of O(n log n) comparisons.
constexpr size_t kRadixMin = 512;

// key, key_tmp, count and tmp are scratch (resized here).
void sort_by_value_descending(std::vector<std::pair<float, int32_t>>& c,
                              std::vector<uint32_t>& key, std::vector<uint32_t>& key_tmp,
                              std::vector<uint32_t>& count,
                              std::vector<std::pair<float, int32_t>>& tmp) {
  const size_t n = c.size();
  key.resize(n);
  key_tmp.resize(n);
  tmp.resize(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &c[i].first, sizeof u);
    if (u == 0x80000000u) u = 0;  // -0 ties with +0, as the comparator has it
    const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    key[i] = ~ascending;
  }
  constexpr int kBits = 11;
  constexpr uint32_t kMask = (1u << kBits) - 1;
  count.resize(size_t{1} << kBits);
  for (int shift = 0; shift < 32; shift += kBits) {
    std::fill(count.begin(), count.end(), 0u);
    for (size_t i = 0; i < n; ++i) ++count[(key[i] >> shift) & kMask];
    if (count[(key[0] >> shift) & kMask] == n) continue;  // every key has this digit
    uint32_t sum = 0;
    for (uint32_t& x : count) {
      const uint32_t v = x;
      x = sum;
      sum += v;
    }
    for (size_t i = 0; i < n; ++i) {
      const uint32_t d = count[(key[i] >> shift) & kMask]++;
      key_tmp[d] = key[i];
      tmp[d] = c[i];
    }
    key.swap(key_tmp);
    c.swap(tmp);
  }
}
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

  candidates_.resize(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i)
    candidates_[static_cast<size_t>(i)] = {logits[i] / p_.temperature, static_cast<int32_t>(i)};
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t n = candidates_.size();
  if (p_.top_k > 0 && static_cast<size_t>(p_.top_k) < n) {
    n = static_cast<size_t>(p_.top_k);
    std::partial_sort(candidates_.begin(), candidates_.begin() + static_cast<ptrdiff_t>(n),
                      candidates_.end(), by_logit);
  } else if (n >= kRadixMin) {
    sort_by_value_descending(candidates_, keys_, keys_tmp_, digit_counts_, candidates_tmp_);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), by_logit);
  }
  // Softmax over the survivors, in double so that tiny tails still sum correctly.
  const double maxl = candidates_[0].first;
  std::vector<double>& prob = prob_;
  prob.resize(n);
  double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += prob[i] = std::exp(candidates_[i].first - maxl);
  for (double& p : prob) p /= sum;
  if (p_.top_p < 1.0f) {
    double cum = 0;
    size_t keep = 0;
    while (keep < n) {
      cum += prob[keep++];
      if (cum >= p_.top_p) break;
    }
    n = std::max<size_t>(keep, 1);
  }
  if (p_.min_p > 0.0f) {
    const double floor = prob[0] * p_.min_p;
    size_t keep = 1;
    while (keep < n && prob[keep] >= floor) ++keep;
    n = keep;
  }
  double total = 0;
  for (size_t i = 0; i < n; ++i) total += prob[i];
  double r = rng_.uniform() * total;
  for (size_t i = 0; i < n; ++i) {
    r -= prob[i];
    if (r < 0) return candidates_[i].second;
  }
  return candidates_[n - 1].second;
}

}  // namespace sparsa
