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
  // One uniform number per draw, whichever path spends it.
  const double u = rng_.uniform();
  if (p_.top_k == 0 && p_.top_p >= 1.0f && p_.min_p <= 0.0f) {
    const int32_t id = sample_plain(logits, vocab, u);
    if (id >= 0) return id;
  }
  return sample_sorted(logits, vocab, u);
}

namespace {
// The order the draw walks: the larger logit first, the smaller id on ties.
bool by_logit(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}
// Bands of value below the maximum (in units of logit / temperature) in which sample_sorted()
// builds the sorted order; sample_plain() walks the first band only.
constexpr float kBandWidth[] = {3.0f, 8.0f, 16.0f, 32.0f};
}  // namespace

// logits / temperature into scaled_, and their maximum.
float Sampler::scale(const float* logits, size_t v) {
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
  return *std::max_element(part_max, part_max + 8);
}

// Σ exp(scaled − max) over the vocabulary, in id order (eight chains of double sums); scaled_
// holds the weights afterwards.
double Sampler::exp_sum(size_t v, float maxf) {
  kernels::exp_shifted(scaled_.data(), maxf, scaled_.data(), static_cast<int64_t>(v));
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= v; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += scaled_[i + j];
  for (int j = 0; i + j < v; ++j) part[j] += scaled_[i + j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Temperature alone (no top-k, top-p or min-p): the same walk as sample_sorted(), but only the
// first band is gathered (one pass that writes a few dozen candidates instead of the whole
// vocabulary). -1 when the draw runs past the band (sample_sorted() then redoes it all) or the
// band is too wide to be worth sorting.
int32_t Sampler::sample_plain(const float* logits, int64_t vocab, double u) {
  const size_t v = static_cast<size_t>(vocab);
  const float maxf = scale(logits, v);
  const float floor = maxf - kBandWidth[0];
  band_.clear();
  // Chunks of 64 are tested with a loop the compiler vectorizes; few hold a band member.
  for (size_t c = 0; c < v; c += 64) {
    const size_t e = std::min(v, c + 64);
    bool any = false;
    for (size_t i = c; i < e; ++i) any |= scaled_[i] >= floor;
    if (!any) continue;
    for (size_t i = c; i < e; ++i)
      if (scaled_[i] >= floor) {
        if (band_.size() == kPlainBand) return -1;
        band_.push_back({scaled_[i], static_cast<int32_t>(i)});
      }
  }
  std::sort(band_.begin(), band_.end(), by_logit);
  double r = u * exp_sum(v, maxf);
  for (const auto& c : band_) {
    r -= static_cast<double>(scaled_[static_cast<size_t>(c.second)]);
    if (r < 0) return c.second;
  }
  return -1;
}

int32_t Sampler::sample_sorted(const float* logits, int64_t vocab, double u) {
  // The draw walks the candidates from the most to the least likely (ties: smaller id first),
  // as if the whole vocabulary were sorted; but only as much of that order is built as the draw
  // reaches. The survivors' weights are summed in whatever order they lie, which moves the
  // result only by rounding in the last bits; the walk itself, top-p's and min-p's cut-offs all
  // follow the sorted order. Most draws end within the first few dozen tokens, so a draw costs a
  // selection over the vocabulary (linear) instead of a full sort.
  const size_t v = static_cast<size_t>(vocab);
  candidates_.resize(v);
  const float maxf = scale(logits, v);
  for (size_t i = 0; i < v; ++i) candidates_[i] = {scaled_[i], static_cast<int32_t>(i)};
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
  double sum = 0;
  if (n == v) {  // the whole vocabulary, in id order
    sum = exp_sum(v, maxf);
  } else {
    kernels::exp_shifted(scaled_.data(), maxf, scaled_.data(), vocab);
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
  double r = u * total;
  for (size_t i = 0; i < n; ++i) {
    sort_through(i + 1);
    r -= weight(i);
    if (r < 0) return candidates_[i].second;
  }
  sort_through(n);
  return candidates_[n - 1].second;
}

}  // namespace sparsa
