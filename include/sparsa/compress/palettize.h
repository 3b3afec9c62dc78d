// K-means palettization (weight clustering): every weight of a group of output channels is replaced
// by one of 2^bits values of a look-up table, stored as a bits-wide index.
//
//   PaletteOptions opts;                        // 4 bits → 16 centroids, one palette per tensor
//   opts.group_rows = 128;                      // or one palette per 128 output channels
//   Palette p = palettize(w, opts);             // w ← lut[indices]
//   // With SqueezeLLM-style sensitivity: weight (r, c) counts with importance diag(H)[c].
//   Palette q = palettize(w2, opts, hessian_diag);
//
// The k-means is fitted, as in eDKM (Cho et al. 2023), on the table of the distinct bf16 values of
// the group with their multiplicities (at most 65,536 entries whatever the group's size): each
// weight is rounded to bf16 for the fit only, and the objective Σ_i importance_i (w_i − c(w_i))² of
// the raw weights equals the table's weighted objective up to that rounding. Initialisation is
// k-means++ from a seed (deterministic on every platform); Lloyd iterations run until no entry
// changes cluster or `max_iters`. The look-up table of each group is sorted ascending.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "sparsa/compress/matrix.h"

namespace sparsa::compress {

struct PaletteOptions {
  int bits = 4;            // 2..8: 2^bits centroids
  int64_t group_rows = 0;  // output channels sharing a palette; 0: the whole tensor
  int max_iters = 100;     // Lloyd iterations at most
  uint64_t seed = 0;       // of the k-means++ initialisation
};

struct Palette {
  int bits = 0;
  int64_t group_rows = 0;         // rows per palette (= rows when per tensor)
  std::vector<float> lut;         // [n_groups, 2^bits], ascending within a group
  std::vector<uint8_t> indices;   // [rows, cols], into the row's group's table
  std::vector<double> objective;  // [n_groups], the weighted k-means objective on the table
  std::vector<int> iterations;    // [n_groups], Lloyd iterations run
};

/// The distinct bf16 values of rows [row_begin, row_end) of w, ascending, with their weights: the
/// number of weights rounding to each value, or, given col_importance [cols], the sum of the
/// importance of their columns (e.g. the Hessian diagonal).
struct UniqueTable {
  std::vector<uint16_t> bits;   // [n], bf16 bit patterns
  std::vector<float> values;    // [n], ascending
  std::vector<double> weights;  // [n]
};
UniqueTable unique_bf16_table(const Matrix& w, int64_t row_begin, int64_t row_end,
                              std::span<const double> col_importance = {});
/// The same for row-major [rows, cols] data held elsewhere (the weights are the counts).
UniqueTable unique_bf16_table(const float* w, int64_t rows, int64_t cols);

/// k-means++ seeding of k centroids on weighted 1-D values; returns them ascending. When there are
/// fewer than k distinct values with positive weight the last centroid is repeated.
std::vector<double> kmeans_plus_plus(std::span<const float> values, std::span<const double> weights,
                                     int k, uint64_t seed);

struct KMeans1d {
  std::vector<double> centroids;  // [k], ascending
  std::vector<int> assignment;    // [n], cluster of each value
  double objective = 0.0;         // Σ weights_i (values_i − centroid)²
  int iterations = 0;
  bool converged = false;  // the last iteration changed no assignment
};
/// Weighted Lloyd iterations from the given centroids (an empty cluster keeps its centroid).
/// values must be ascending.
KMeans1d kmeans_lloyd(std::span<const float> values, std::span<const double> weights,
                      std::vector<double> centroids, int max_iters);

/// Palettizes w in place (w ← lut[indices]). col_importance: empty, or [cols] non-negative
/// per-column weights of the objective (the diagonal of the layer's Hessian).
Palette palettize(Matrix& w, const PaletteOptions& opts,
                  std::span<const double> col_importance = {});

}  // namespace sparsa::compress
