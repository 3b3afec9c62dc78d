// Clustering-aware fine-tuning: differentiable k-means (DKM; Cho et al. 2022, "DKM:
// Differentiable k-Means Clustering Layer for Neural Network Compression", arXiv:2108.12659).
// Each weight w is replaced in the forward by its soft assignment to the palette,
//
//   w̃ = Σ_j a_j c_j,   a = softmax_j(−(v − c_j)² / τ),   v = bf16(w),  τ = temperature · Δ²
//
// (Δ: the mean gap between neighbouring centroids, so the temperature is scale-free), and its
// gradient flows back through a with the centroids held fixed: ∂w̃/∂w = Σ_j a_j c_j g_j − w̃ ḡ,
// g_j = −2 (v − c_j) / τ, ḡ = Σ_j a_j g_j. Before every forward the centroids take `iterations`
// soft k-means updates c_j ← Σ n_v a_vj v / Σ n_v a_vj over the distinct bf16 values v of the
// palette's weights, n_v of each — eDKM's unique-value table (Cho et al. 2023, "eDKM: An
// Efficient and Accurate Train-time Weight Clustering for Large Language Models",
// arXiv:2309.00964): the centroid updates evaluate the attention on at most 65,536 values per
// palette, whatever the number of weights, and no [weights × palette] matrix is ever stored (the
// forward and backward recompute a from the centroids). At the end every weight takes its
// nearest centroid (dkm_palette), the layout `sparsa compress` writes for palettization.
#pragma once

#include <cstdint>
#include <vector>

#include "sparsa/compress/palettize.h"

namespace sparsa::train {

/// One clustering-aware weight [rows, cols] with palettes of `group_rows` rows.
struct DkmTensor {
  int bits = 3;
  int64_t rows = 0, cols = 0, group_rows = 0;
  std::vector<float> centroids;  // [n_groups, 2^bits]
  int64_t n_groups() const { return group_rows > 0 ? (rows + group_rows - 1) / group_rows : 0; }
  int64_t k() const { return int64_t{1} << bits; }
};

struct DkmOptions {
  double temperature = 0.02;
  int64_t iterations = 3;
};

/// The initial palettes: k-means (sparsa/compress/palettize.h, unweighted) over w.
DkmTensor dkm_init(const float* w, int64_t rows, int64_t cols, int bits, int64_t group_rows);
/// The centroid updates over the unique-value table (t.centroids changes).
void dkm_update_centroids(DkmTensor& t, const float* w, const DkmOptions& o);
/// out = w̃ and deriv = ∂w̃/∂w for every weight.
void dkm_soft_weights(const DkmTensor& t, const float* w, const DkmOptions& o, float* out,
                      float* deriv);
/// τ of palette group g: temperature · (mean centroid gap)² (1e-12 at least).
double dkm_tau(const DkmTensor& t, int64_t g, const DkmOptions& o);
/// The hard assignment: each weight's nearest centroid, palettes sorted ascending.
compress::Palette dkm_palette(const DkmTensor& t, const float* w);

}  // namespace sparsa::train
