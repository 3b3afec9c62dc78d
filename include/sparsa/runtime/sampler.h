// Picks the next token from logits: repetition penalty, temperature, top-k, top-p, min-p, in
// that order (as llama.cpp and transformers apply them), then a draw from a seeded generator.
//
//   sparsa::SamplingParams p;  p.temperature = 0.8f;  p.top_p = 0.95f;  p.seed = 42;
//   sparsa::Sampler sampler(p);
//   int32_t next = sampler.sample(logits, vocab_size, history);
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace sparsa {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax)
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  float repetition_penalty = 1.0f;  // 1: off (CTRL-style: divide positive logits, multiply negative)
  float presence_penalty = 0.0f;    // OpenAI-style, subtracted once per token seen
  float frequency_penalty = 0.0f;   // OpenAI-style, subtracted per occurrence
  uint64_t seed = 0;

  /// Throws sparsa::Error naming the field when a value is out of range.
  void validate() const;
};

/// Small, fast, reproducible on every platform (xoshiro256**, seeded through splitmix64).
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t next();
  /// Uniform in [0, 1).
  double uniform();

 private:
  uint64_t s_[4];
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  /// `logits` [vocab] is modified in place. `history`: the tokens so far (prompt included), for
  /// the penalties.
  int32_t sample(float* logits, int64_t vocab, std::span<const int32_t> history);

 private:
  float scale(const float* logits, size_t vocab);
  double exp_sum(size_t vocab, float max);
  int32_t sample_plain(const float* logits, int64_t vocab, double u);
  int32_t sample_sorted(const float* logits, int64_t vocab, double u);
  // sample_plain() gathers at most this many candidates of its band.
  static constexpr size_t kPlainBand = 512;

  SamplingParams p_;
  Rng rng_;
  std::vector<std::pair<float, int32_t>> candidates_;
  std::vector<int32_t> counts_;
  // Scratch kept between calls, so that a draw allocates nothing: logits / temperature, then
  // exp(· - max), by token id.
  std::vector<float> scaled_;
  std::vector<std::pair<float, int32_t>> band_;
};

/// Index of the largest logit (the first one on ties).
int32_t argmax(const float* logits, int64_t vocab);

}  // namespace sparsa
