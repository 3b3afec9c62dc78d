// Structured pruning of a Llama block: whole attention heads and whole MLP intermediate channels
// are removed, so the matrices shrink (q/k/v and gate/up lose rows, o and down lose columns) and
// the checkpoint is a smaller dense model with a standard config.
//
//   using namespace sparsa::compress;
//   ChannelMoments m(ffn);  m.accumulate(hidden, n_tokens, ffn);   // inputs of down_proj
//   std::vector<double> s = output_channel_scores(down, ChannelScore::kFluctuation,
//                                                 stats.sq_norms(), m.variance());
//   std::vector<int64_t> kept = keep_highest(s, ffn - n_remove);
//   std::vector<float> b = removed_channel_bias(down, kept, m.mean());  // FLAP compensation
//   prune_mlp_channels(gate, up, down, kept);                            // [kept, h], [h, kept]
//
// Heads are removed in whole GQA groups (one KV head with its n_heads / n_kv_heads query heads):
// the query-to-KV ratio stays, the KV cache shrinks with the query heads, and a model whose
// query heads already share few KV heads can still be pruned in steps of 1 / n_kv_heads.
//
// Importance (a column of the output projection, o_proj or down_proj, is one channel; a head sums
// its head_dim channels, a GQA group its query heads):
//   activation   ‖X_j‖ · Σ_i |W_ij|           Wanda's score (Sun et al. 2023) summed over the
//                                             structure: FLAP's WIFN / "Wanda-sp" (An et al. 2024)
//   fluctuation  Var(X_j) · Σ_i W_ij²         FLAP's WIFV (An et al. 2024, "Fluctuation-based
//                                             Adaptive Structured Pruning for Large Language
//                                             Models", AAAI, arXiv:2312.11983): a channel whose
//                                             input barely varies is replaced by its mean
//   magnitude    Σ |W| over every weight the structure holds (its q/k/v or gate/up rows and its
//                o/down columns)
// FLAP's bias compensation adds the removed channels' mean contribution W_{:,removed} · mean(X)
// to the output projection's bias, which is exact for a channel whose input is constant.
//
// Time: O(rows · cols) per matrix; memory: the kept copies.
#pragma once

#include <cstdint>
#include <vector>

#include "sparsa/compress/matrix.h"

namespace sparsa::compress {

/// Per-column first and second moments of a linear layer's inputs, in f64.
class ChannelMoments {
 public:
  ChannelMoments() = default;
  explicit ChannelMoments(int64_t cols) : sum_(static_cast<size_t>(cols)), sq_(sum_.size()) {}

  /// x: [n_tokens, cols] with row stride ld (>= cols).
  void accumulate(const float* x, int64_t n_tokens, int64_t ld);

  int64_t cols() const { return static_cast<int64_t>(sum_.size()); }
  int64_t tokens() const { return tokens_; }
  /// mean_t x_tj.
  std::vector<double> mean() const;
  /// The sample variance Σ_t (x_tj − mean_j)² / (N − 1), as FLAP's fluctuation (0 for N < 2).
  std::vector<double> variance() const;

 private:
  std::vector<double> sum_, sq_;
  int64_t tokens_ = 0;
};

enum class ChannelScore : uint8_t { kActivation, kFluctuation, kMagnitude };

/// The importance of each input column j of an output projection w [rows, cols] (o_proj or
/// down_proj): kActivation ‖X_j‖ · Σ_i |W_ij| with ‖X_j‖² = sq_col_norms[j]; kFluctuation
/// variance[j] · Σ_i W_ij²; kMagnitude Σ_i |W_ij|. Only the vector the score reads need be given.
std::vector<double> output_channel_scores(const Matrix& w, ChannelScore score,
                                          const std::vector<double>& sq_col_norms,
                                          const std::vector<double>& variance);

/// Σ_j |W_rj| for each row r of w [rows, cols]: what a structure's input-side rows add to a
/// magnitude score.
std::vector<double> row_abs_sums(const Matrix& w);

/// Sums consecutive runs of `width` scores: head_dim channels into a head, query heads into a
/// GQA group. scores.size() must be a multiple of width.
std::vector<double> sum_groups(const std::vector<double>& scores, int64_t width);

/// The indices of the n_keep highest scores, in ascending order; among equal scores the lower
/// index is kept. Throws unless 0 < n_keep <= scores.size() and every score is finite.
std::vector<int64_t> keep_highest(const std::vector<double>& scores, int64_t n_keep);

/// Unit indices (heads, groups) to the element indices they cover: unit u → [u·width, (u+1)·width).
std::vector<int64_t> expand_units(const std::vector<int64_t>& units, int64_t width);

/// The given rows (columns) of w, in the order given.
Matrix select_rows(const Matrix& w, const std::vector<int64_t>& rows);
Matrix select_cols(const Matrix& w, const std::vector<int64_t>& cols);
std::vector<float> select(const std::vector<float>& v, const std::vector<int64_t>& index);

/// FLAP's bias compensation for an output projection w [rows, cols] whose columns outside
/// `kept_cols` are removed: b_r = Σ_{j removed} W_rj · mean[j], [rows]. Adding b to the layer's
/// bias replaces each removed input by its calibration mean.
std::vector<float> removed_channel_bias(const Matrix& w, const std::vector<int64_t>& kept_cols,
                                        const std::vector<double>& mean);

/// Query-head layout of one attention block.
struct HeadLayout {
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t group() const { return n_heads / n_kv_heads; }  // query heads per KV head
};

/// Keeps the GQA groups `kept_groups` (KV-head indices, ascending) of one attention block:
/// q [n_heads·hd, h] and k, v [n_kv·hd, h] keep their rows, o [h, n_heads·hd] its columns.
/// Query head i belongs to group i / (n_heads / n_kv_heads), as HF Llama's repeat_kv.
void prune_kv_groups(Matrix& q, Matrix& k, Matrix& v, Matrix& o, const HeadLayout& layout,
                     const std::vector<int64_t>& kept_groups);

/// The element indices of q's rows (= o's columns) and of k/v's rows that `kept_groups` keep.
std::vector<int64_t> kept_query_channels(const HeadLayout& layout,
                                         const std::vector<int64_t>& kept_groups);
std::vector<int64_t> kept_kv_channels(const HeadLayout& layout,
                                      const std::vector<int64_t>& kept_groups);

/// Keeps the intermediate channels `kept` (ascending) of one MLP: gate and up [ffn, h] keep
/// their rows, down [h, ffn] its columns.
void prune_mlp_channels(Matrix& gate, Matrix& up, Matrix& down, const std::vector<int64_t>& kept);

/// The number of units structured pruning removes: floor(sparsity · n), as the unstructured
/// pruners count.
int64_t structured_prune_count(double sparsity, int64_t n);

}  // namespace sparsa::compress
