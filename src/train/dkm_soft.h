// DKM's soft assignment of one weight, written once for the CPU engine (src/train/dkm.cc) and the
// CUDA kernels (src/train/cuda/kernels.cu), so that both compute the same formula in the same
// order: a_j ∝ exp(−(v − c_j)² / τ) over the k centroids c, in double; out = w̃ = Σ a_j c_j and
// deriv = ∂w̃/∂v = Σ a_j c_j g_j − w̃ Σ a_j g_j with g_j = −2 (v − c_j) / τ (see sparsa/train/dkm.h).
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define SPARSA_HOST_DEVICE __host__ __device__
#else
#define SPARSA_HOST_DEVICE
#endif

namespace sparsa::train {

/// a [k] receives the assignment; deriv may be null.
SPARSA_HOST_DEVICE inline void dkm_soft_assign(double v, const float* c, int k, double tau,
                                               double* a, double* out, double* deriv) {
  double best = -HUGE_VAL;
  for (int j = 0; j < k; ++j) {
    const double d = v - c[j];
    a[j] = -d * d / tau;
    best = fmax(best, a[j]);
  }
  double sum = 0;
  for (int j = 0; j < k; ++j) sum += (a[j] = exp(a[j] - best));
  double w = 0, gbar = 0, cg = 0;
  for (int j = 0; j < k; ++j) {
    a[j] /= sum;
    const double g = -2.0 * (v - c[j]) / tau;
    w += a[j] * c[j];
    gbar += a[j] * g;
    cg += a[j] * c[j] * g;
  }
  *out = w;
  if (deriv != nullptr) *deriv = cg - w * gbar;
}

}  // namespace sparsa::train
