// Structured pruning of attention heads (in whole GQA groups) and MLP channels, scored from the
// calibration inputs of the output projections: Wanda's |W|·‖X‖ summed over the structure, or
// FLAP's fluctuation Var(X_j)·‖W_:,j‖² with the removed channels' mean folded into a bias (An et
// al. 2024, arXiv:2312.11983; CASIA-IVA-Lab/FLAP), or plain |W|. See structured.h. Time:
// O(rows · cols) per matrix; memory: the kept copies of the matrices.
#include "sparsa/compress/structured.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "sparsa/core/error.h"

namespace sparsa::compress {

void ChannelMoments::accumulate(const float* x, int64_t n_tokens, int64_t ld) {
  const int64_t c = cols();
  SPARSA_CHECK(ld >= c, "ChannelMoments: row stride {} is less than {} columns", ld, c);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* row = x + t * ld;
    for (int64_t j = 0; j < c; ++j) {
      const double v = row[j];
      sum_[j] += v;
      sq_[j] += v * v;
    }
  }
  tokens_ += n_tokens;
}

std::vector<double> ChannelMoments::mean() const {
  std::vector<double> m(sum_.size(), 0.0);
  if (tokens_ == 0) return m;
  for (size_t j = 0; j < m.size(); ++j) m[j] = sum_[j] / static_cast<double>(tokens_);
  return m;
}

std::vector<double> ChannelMoments::variance() const {
  std::vector<double> v(sum_.size(), 0.0);
  if (tokens_ < 2) return v;
  const double n = static_cast<double>(tokens_);
  for (size_t j = 0; j < v.size(); ++j) {
    const double mu = sum_[j] / n;
    v[j] = std::max(0.0, (sq_[j] - n * mu * mu) / (n - 1.0));
  }
  return v;
}

std::vector<double> output_channel_scores(const Matrix& w, ChannelScore score,
                                          const std::vector<double>& sq_col_norms,
                                          const std::vector<double>& variance) {
  SPARSA_CHECK(w.rows > 0 && w.cols > 0 && w.data.size() == static_cast<size_t>(w.rows * w.cols),
               "output_channel_scores: the weight matrix is empty or does not match {}x{}", w.rows,
               w.cols);
  const size_t c = static_cast<size_t>(w.cols);
  const std::vector<double>& needed =
      score == ChannelScore::kActivation ? sq_col_norms : variance;
  if (score != ChannelScore::kMagnitude) {
    SPARSA_CHECK(needed.size() == c, "output_channel_scores: {} input statistics for {} columns",
                 needed.size(), c);
  }
  std::vector<double> s(c, 0.0);
  for (int64_t r = 0; r < w.rows; ++r) {
    const float* row = w.row(r);
    for (size_t j = 0; j < c; ++j) {
      const double v = row[j];
      s[j] += score == ChannelScore::kFluctuation ? v * v : std::abs(v);
    }
  }
  if (score == ChannelScore::kActivation) {
    for (size_t j = 0; j < c; ++j) s[j] *= std::sqrt(std::max(0.0, sq_col_norms[j]));
  } else if (score == ChannelScore::kFluctuation) {
    for (size_t j = 0; j < c; ++j) s[j] *= variance[j];
  }
  return s;
}

std::vector<double> row_abs_sums(const Matrix& w) {
  std::vector<double> s(static_cast<size_t>(w.rows), 0.0);
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t j = 0; j < w.cols; ++j) s[r] += std::abs(static_cast<double>(w.at(r, j)));
  return s;
}

std::vector<double> sum_groups(const std::vector<double>& scores, int64_t width) {
  SPARSA_CHECK(width > 0 && scores.size() % static_cast<size_t>(width) == 0,
               "sum_groups: {} scores do not split into groups of {}", scores.size(), width);
  std::vector<double> out(scores.size() / static_cast<size_t>(width), 0.0);
  for (size_t i = 0; i < scores.size(); ++i) out[i / static_cast<size_t>(width)] += scores[i];
  return out;
}

std::vector<int64_t> keep_highest(const std::vector<double>& scores, int64_t n_keep) {
  const int64_t n = static_cast<int64_t>(scores.size());
  SPARSA_CHECK(n_keep > 0 && n_keep <= n, "keep_highest: cannot keep {} of {} units", n_keep, n);
  for (double s : scores) SPARSA_CHECK(std::isfinite(s), "keep_highest: a score is not finite ({})", s);
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
  order.resize(static_cast<size_t>(n_keep));
  std::sort(order.begin(), order.end());
  return order;
}

std::vector<int64_t> expand_units(const std::vector<int64_t>& units, int64_t width) {
  std::vector<int64_t> out;
  out.reserve(units.size() * static_cast<size_t>(width));
  for (int64_t u : units)
    for (int64_t i = 0; i < width; ++i) out.push_back(u * width + i);
  return out;
}

Matrix select_rows(const Matrix& w, const std::vector<int64_t>& rows) {
  Matrix out(static_cast<int64_t>(rows.size()), w.cols);
  for (size_t i = 0; i < rows.size(); ++i) {
    SPARSA_CHECK(rows[i] >= 0 && rows[i] < w.rows, "select_rows: row {} of {}", rows[i], w.rows);
    std::copy(w.row(rows[i]), w.row(rows[i]) + w.cols, out.row(static_cast<int64_t>(i)));
  }
  return out;
}

Matrix select_cols(const Matrix& w, const std::vector<int64_t>& cols) {
  for (int64_t c : cols)
    SPARSA_CHECK(c >= 0 && c < w.cols, "select_cols: column {} of {}", c, w.cols);
  Matrix out(w.rows, static_cast<int64_t>(cols.size()));
  for (int64_t r = 0; r < w.rows; ++r)
    for (size_t j = 0; j < cols.size(); ++j) out.at(r, static_cast<int64_t>(j)) = w.at(r, cols[j]);
  return out;
}

std::vector<float> select(const std::vector<float>& v, const std::vector<int64_t>& index) {
  std::vector<float> out(index.size());
  for (size_t i = 0; i < index.size(); ++i) {
    SPARSA_CHECK(index[i] >= 0 && static_cast<size_t>(index[i]) < v.size(),
                 "select: index {} of {}", index[i], v.size());
    out[i] = v[static_cast<size_t>(index[i])];
  }
  return out;
}

std::vector<float> removed_channel_bias(const Matrix& w, const std::vector<int64_t>& kept_cols,
                                        const std::vector<double>& mean) {
  SPARSA_CHECK(mean.size() == static_cast<size_t>(w.cols),
               "removed_channel_bias: {} means for {} columns", mean.size(), w.cols);
  std::vector<uint8_t> kept(static_cast<size_t>(w.cols), 0);
  for (int64_t c : kept_cols) {
    SPARSA_CHECK(c >= 0 && c < w.cols, "removed_channel_bias: column {} of {}", c, w.cols);
    kept[static_cast<size_t>(c)] = 1;
  }
  std::vector<float> b(static_cast<size_t>(w.rows));
  for (int64_t r = 0; r < w.rows; ++r) {
    double acc = 0.0;
    for (int64_t j = 0; j < w.cols; ++j)
      if (!kept[static_cast<size_t>(j)]) acc += static_cast<double>(w.at(r, j)) * mean[j];
    b[static_cast<size_t>(r)] = static_cast<float>(acc);
  }
  return b;
}

namespace {

void check_layout(const HeadLayout& l, const std::vector<int64_t>& kept_groups) {
  SPARSA_CHECK(l.n_heads > 0 && l.n_kv_heads > 0 && l.head_dim > 0 &&
                   l.n_heads % l.n_kv_heads == 0,
               "structured pruning: {} query heads cannot be grouped over {} KV heads", l.n_heads,
               l.n_kv_heads);
  SPARSA_CHECK(!kept_groups.empty(), "structured pruning: no KV-head group is kept");
  for (size_t i = 0; i < kept_groups.size(); ++i)
    SPARSA_CHECK(kept_groups[i] >= 0 && kept_groups[i] < l.n_kv_heads &&
                     (i == 0 || kept_groups[i] > kept_groups[i - 1]),
                 "structured pruning: kept KV-head groups must be ascending indices below {}",
                 l.n_kv_heads);
}

}  // namespace

std::vector<int64_t> kept_query_channels(const HeadLayout& layout,
                                         const std::vector<int64_t>& kept_groups) {
  check_layout(layout, kept_groups);
  // Group g holds query heads [g·group, (g+1)·group), which are contiguous rows of q.
  return expand_units(kept_groups, layout.group() * layout.head_dim);
}

std::vector<int64_t> kept_kv_channels(const HeadLayout& layout,
                                      const std::vector<int64_t>& kept_groups) {
  check_layout(layout, kept_groups);
  return expand_units(kept_groups, layout.head_dim);
}

void prune_kv_groups(Matrix& q, Matrix& k, Matrix& v, Matrix& o, const HeadLayout& layout,
                     const std::vector<int64_t>& kept_groups) {
  const int64_t qw = layout.n_heads * layout.head_dim, kvw = layout.n_kv_heads * layout.head_dim;
  SPARSA_CHECK(q.rows == qw && k.rows == kvw && v.rows == kvw && o.cols == qw,
               "prune_kv_groups: shapes q {}x{}, k {}x{}, v {}x{}, o {}x{} do not match {} heads, "
               "{} KV heads of {}",
               q.rows, q.cols, k.rows, k.cols, v.rows, v.cols, o.rows, o.cols, layout.n_heads,
               layout.n_kv_heads, layout.head_dim);
  const std::vector<int64_t> qc = kept_query_channels(layout, kept_groups);
  const std::vector<int64_t> kc = kept_kv_channels(layout, kept_groups);
  q = select_rows(q, qc);
  k = select_rows(k, kc);
  v = select_rows(v, kc);
  o = select_cols(o, qc);
}

void prune_mlp_channels(Matrix& gate, Matrix& up, Matrix& down, const std::vector<int64_t>& kept) {
  SPARSA_CHECK(gate.rows == up.rows && down.cols == gate.rows && gate.cols == up.cols,
               "prune_mlp_channels: shapes gate {}x{}, up {}x{}, down {}x{} do not form an MLP",
               gate.rows, gate.cols, up.rows, up.cols, down.rows, down.cols);
  for (size_t i = 0; i < kept.size(); ++i)
    SPARSA_CHECK(kept[i] >= 0 && kept[i] < gate.rows && (i == 0 || kept[i] > kept[i - 1]),
                 "prune_mlp_channels: kept channels must be ascending indices below {}",
                 gate.rows);
  SPARSA_CHECK(!kept.empty(), "prune_mlp_channels: no channel is kept");
  gate = select_rows(gate, kept);
  up = select_rows(up, kept);
  down = select_cols(down, kept);
}

int64_t structured_prune_count(double sparsity, int64_t n) {
  return static_cast<int64_t>(std::floor(sparsity * static_cast<double>(n) + 1e-9));
}

}  // namespace sparsa::compress
