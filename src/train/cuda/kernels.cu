// Kernels of the CUDA training engine (declared in kernels.cuh). Every reduction has a fixed
// shape: warp shuffles in a fixed pattern, then one pass over the warps, and grid-wide sums go
// through kPartials per-block partials summed by a single block, so results do not depend on
// scheduling.
#include "kernels.cuh"
#include "train/dkm_soft.h"

#include <cuda_bf16.h>

#include <cfloat>

namespace sparsa::train::cuda::kern {

namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T part[32];
  __shared__ T total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T x = lane < warps ? part[lane] : T(0);
    x = warp_sum(x);
    if (lane == 0) total = x;
  }
  __syncthreads();
  return total;
}

__device__ float block_max(float v) {
  __shared__ float part[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float x = lane < warps ? part[lane] : -FLT_MAX;
    x = warp_max(x);
    if (lane == 0) total = x;
  }
  __syncthreads();
  return total;
}

// ---- embedding --------------------------------------------------------------------------------

__global__ void embedding_forward_k(float* out, const int32_t* ids, const float* table, int64_t c) {
  const int64_t t = blockIdx.x;
  const float* src = table + static_cast<int64_t>(ids[t]) * c;
  float* dst = out + t * c;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) dst[i] = src[i];
}

__global__ void embedding_backward_k(float* dtable, const float* dout, const int32_t* uniq,
                                     const int32_t* starts, const int32_t* positions, int64_t c) {
  const int64_t u = blockIdx.x;
  const int32_t b = starts[u], e = starts[u + 1];
  float* dst = dtable + static_cast<int64_t>(uniq[u]) * c;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) {
    float s = 0.0f;
    for (int32_t p = b; p < e; ++p) s += dout[static_cast<int64_t>(positions[p]) * c + i];
    dst[i] += s;
  }
}

// ---- RMSNorm ----------------------------------------------------------------------------------

__global__ void rmsnorm_forward_k(float* out, float* rstd, const float* x, const float* w,
                                  int64_t c, float eps) {
  const int64_t t = blockIdx.x;
  const float* xt = x + t * c;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) ss += xt[i] * xt[i];
  ss = block_sum(ss);
  const float r = static_cast<float>(1.0 / sqrt(static_cast<double>(ss) / static_cast<double>(c) + eps));
  if (threadIdx.x == 0) rstd[t] = r;
  float* ot = out + t * c;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) ot[i] = w[i] * (xt[i] * r);
}

// y = w ⊙ x r, r = (mean x² + eps)^-1/2: ∂L/∂x_j = r (w_j g_j − x_j r² Σ_i w_i g_i x_i / c).
__global__ void rmsnorm_backward_dx_k(float* dx, const float* dout, const float* x, const float* w,
                                      const float* rstd, int64_t c) {
  const int64_t t = blockIdx.x;
  const float* xt = x + t * c;
  const float* gt = dout + t * c;
  float dot = 0.0f;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) dot += w[i] * gt[i] * xt[i];
  dot = block_sum(dot);
  const float r = rstd[t];
  const float k = r * r * dot / static_cast<float>(c);
  float* d = dx + t * c;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) d[i] += r * (w[i] * gt[i] - xt[i] * k);
}

constexpr int64_t kNormRows = 64;  // rows per partial of the RMSNorm weight gradient

__global__ void rmsnorm_dw_partial_k(float* part, const float* dout, const float* x,
                                     const float* rstd, int64_t n, int64_t c) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (j >= c) return;
  const int64_t t0 = chunk * kNormRows, t1 = min(n, t0 + kNormRows);
  float s = 0.0f;
  for (int64_t t = t0; t < t1; ++t) s += dout[t * c + j] * x[t * c + j] * rstd[t];
  part[chunk * c + j] = s;
}

__global__ void rmsnorm_dw_final_k(float* dw, const float* part, int64_t chunks, int64_t c) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= c) return;
  float s = 0.0f;
  for (int64_t k = 0; k < chunks; ++k) s += part[k * c + j];
  dw[j] += s;
}

// ---- RoPE and layouts -------------------------------------------------------------------------

__global__ void rope_permute_k(float* out, const float* in, const float* cos, const float* sin,
                               int64_t b, int64_t t, int64_t heads, int64_t hd, bool rotate) {
  const int64_t half = hd / 2;
  const int64_t total = b * t * heads * half;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t h = (idx / half) % heads;
    const int64_t p = (idx / (half * heads)) % t;
    const int64_t bb = idx / (half * heads * t);
    const float* src = in + ((bb * t + p) * heads + h) * hd;
    float* dst = out + ((bb * heads + h) * t + p) * hd;
    const float x1 = src[i], x2 = src[i + half];
    if (rotate) {
      const float co = cos[p * half + i], si = sin[p * half + i];
      dst[i] = x1 * co - x2 * si;
      dst[i + half] = x2 * co + x1 * si;
    } else {
      dst[i] = x1;
      dst[i + half] = x2;
    }
  }
}

__global__ void unpermute_rope_backward_k(float* out, const float* in, const float* cos,
                                          const float* sin, int64_t b, int64_t t, int64_t heads,
                                          int64_t hd, bool rotate) {
  const int64_t half = hd / 2;
  const int64_t total = b * t * heads * half;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t h = (idx / half) % heads;
    const int64_t p = (idx / (half * heads)) % t;
    const int64_t bb = idx / (half * heads * t);
    const float* src = in + ((bb * heads + h) * t + p) * hd;
    float* dst = out + ((bb * t + p) * heads + h) * hd;
    const float d1 = src[i], d2 = src[i + half];
    if (rotate) {
      const float co = cos[p * half + i], si = sin[p * half + i];
      dst[i] = d1 * co + d2 * si;
      dst[i + half] = d2 * co - d1 * si;
    } else {
      dst[i] = d1;
      dst[i + half] = d2;
    }
  }
}

// ---- causal softmax (one warp per row) --------------------------------------------------------

__global__ void softmax_causal_forward_k(float* att, int64_t rows, int64_t t) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t q = row % t;  // query position: columns 0..q are visible
  float* s = att + row * t;
  float mx = -FLT_MAX;
  for (int64_t j = lane; j <= q; j += 32) mx = fmaxf(mx, s[j]);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int64_t j = lane; j <= q; j += 32) sum += expf(s[j] - mx);
  sum = warp_sum(sum);
  const float inv = 1.0f / sum;
  for (int64_t j = lane; j < t; j += 32) s[j] = j <= q ? expf(s[j] - mx) * inv : 0.0f;
}

__global__ void softmax_causal_backward_k(float* dp, const float* p, int64_t rows, int64_t t) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t q = row % t;
  float* d = dp + row * t;
  const float* pr = p + row * t;
  float dot = 0.0f;
  for (int64_t j = lane; j <= q; j += 32) dot += pr[j] * d[j];
  dot = warp_sum(dot);
  for (int64_t j = lane; j < t; j += 32) d[j] = j <= q ? pr[j] * (d[j] - dot) : 0.0f;
}

// ---- SwiGLU ------------------------------------------------------------------------------------

__global__ void swiglu_forward_k(float* out, const float* gate, const float* up, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    const float sg = 1.0f / (1.0f + expf(-g));
    out[i] = g * sg * up[i];
  }
}

__global__ void swiglu_backward_k(float* dgate, float* dup, const float* dout, const float* gate,
                                  const float* up, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    const float sg = 1.0f / (1.0f + expf(-g));
    const float silu = g * sg;
    dup[i] = dout[i] * silu;
    dgate[i] = dout[i] * up[i] * (sg + g * sg * (1.0f - sg));
  }
}

// ---- losses -----------------------------------------------------------------------------------

__global__ void logit_losses_k(float* dlogits, double* row_ce, double* row_kl,
                               const float* student, const float* teacher,
                               const int32_t* targets, int64_t vocab, float ce_scale,
                               float kl_scale, float temperature) {
  const int64_t t = blockIdx.x;
  const float* z = student + t * vocab;
  const int32_t y = targets[t];
  float mx = -FLT_MAX;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, z[i]);
  mx = block_max(mx);
  float se = 0.0f;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) se += expf(z[i] - mx);
  se = block_sum(se);
  const float lse = mx + logf(se);
  if (threadIdx.x == 0) row_ce[t] = y >= 0 ? static_cast<double>(lse - z[y]) : 0.0;

  const float it = 1.0f / temperature;
  float ls_t = 0.0f, lt_t = 0.0f, mt = 0.0f;
  const float* zt = teacher != nullptr ? teacher + t * vocab : nullptr;
  if (zt != nullptr) {
    // Softened log-partition functions of student and teacher.
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) ss += expf((z[i] - mx) * it);
    ss = block_sum(ss);
    ls_t = logf(ss);
    mt = -FLT_MAX;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) mt = fmaxf(mt, zt[i]);
    mt = block_max(mt);
    float st = 0.0f;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) st += expf((zt[i] - mt) * it);
    st = block_sum(st);
    lt_t = logf(st);
    // KL(p ‖ q) = Σ p (log p − log q), log p = (zt − mt)/T − lt, log q = (z − mx)/T − ls.
    double kl = 0.0;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float lp = (zt[i] - mt) * it - lt_t;
      const float lq = (z[i] - mx) * it - ls_t;
      kl += static_cast<double>(expf(lp)) * static_cast<double>(lp - lq);
    }
    kl = block_sum(kl);
    if (threadIdx.x == 0) row_kl[t] = kl;
  }
  if (dlogits == nullptr) return;
  float* d = dlogits + t * vocab;
  const float ce = y >= 0 ? ce_scale : 0.0f;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    float g = ce * (expf(z[i] - lse) - (i == y ? 1.0f : 0.0f));
    if (zt != nullptr) {
      const float q = expf((z[i] - mx) * it - ls_t);
      const float p = expf((zt[i] - mt) * it - lt_t);
      g += kl_scale * (q - p);
    }
    d[i] = g;
  }
}

__global__ void squarehead_partial_k(double* part, const float* s, const float* t, int64_t n) {
  double se = 0.0, st = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double d = static_cast<double>(s[i]) - t[i];
    se += d * d;
    st += static_cast<double>(t[i]) * t[i];
  }
  se = block_sum(se);
  st = block_sum(st);
  if (threadIdx.x == 0) {
    part[blockIdx.x] = se;
    part[kPartials + blockIdx.x] = st;
  }
}

__global__ void squarehead_final_k(double* loss, float* coef, const double* part, int64_t n,
                                   float grad_scale) {
  double se = part[threadIdx.x], st = part[kPartials + threadIdx.x];
  se = block_sum(se);
  st = block_sum(st);
  if (threadIdx.x == 0) {
    const double den = st > 0 ? st / static_cast<double>(n) : 1.0;
    loss[0] = se / static_cast<double>(n) / den;
    coef[0] = static_cast<float>(grad_scale * 2.0 / (static_cast<double>(n) * den));
  }
}

__global__ void squarehead_grad_k(float* d, const float* s, const float* t, const float* coef,
                                  int64_t n) {
  const float c = coef[0];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    d[i] += c * (s[i] - t[i]);
}

// ---- optimizer --------------------------------------------------------------------------------

__global__ void sum_squares_partial_k(double* part, const float* g, int64_t n) {
  double s = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    s += static_cast<double>(g[i]) * g[i];
  s = block_sum(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ void sum_final_k(double* out, const double* part) {
  const double s = block_sum(part[threadIdx.x]);
  if (threadIdx.x == 0) out[0] = s;
}

__global__ void apply_mask_k(float* x, const uint8_t* keep, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    if (keep[i] == 0) x[i] = 0.0f;
}

__global__ void adamw_k(float* w, const float* g, float* m, float* v, const uint8_t* keep,
                        int64_t n, float lr, float beta1, float beta2, float eps, float wd,
                        float c1, float c2, float gscale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool pruned = keep != nullptr && keep[i] == 0;
    const float gi = pruned ? 0.0f : g[i] * gscale;
    const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float mhat = mi / c1, vhat = vi / c2;
    const float wi = w[i] - lr * (mhat / (sqrtf(vhat) + eps) + wd * w[i]);
    w[i] = pruned ? 0.0f : wi;
  }
}

__global__ void fill_k(float* x, float value, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = value;
}

__global__ void fake_quantize_k(float* out, const float* w, const float* scales,
                                const float* zeros, const int32_t* g_idx, int64_t rows,
                                int64_t cols, int64_t n_groups, float maxq) {
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const int64_t k = r * n_groups + g_idx[c];
    const float s = scales[k], z = zeros[k];
    float q = rintf(__fdiv_rn(w[i], s)) + z;
    q = q < 0.0f ? 0.0f : (q > maxq ? maxq : q);
    out[i] = __fmul_rn(s, __fsub_rn(q, z));
  }
}

// ---- DKM --------------------------------------------------------------------------------------

constexpr int kMaxCentroids = 16;

__device__ double dkm_tau(const float* c, int k, double temperature) {
  float lo = c[0], hi = c[0];
  for (int j = 1; j < k; ++j) lo = fminf(lo, c[j]), hi = fmaxf(hi, c[j]);
  const double gap = k > 1 ? (static_cast<double>(hi) - lo) / (k - 1) : 1.0;
  return fmax(temperature * gap * gap, 1e-12);
}

__global__ void dkm_histogram_k(uint32_t* counts, const float* w, int64_t rows, int64_t cols,
                                int64_t group_rows) {
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = (i / cols) / group_rows;
    const unsigned short b = __bfloat16_as_ushort(__float2bfloat16_rn(w[i]));
    atomicAdd(counts + g * 65536 + b, 1u);
  }
}

__global__ void dkm_update_k(float* centroids, const uint32_t* counts, int k, double temperature,
                             int64_t iterations) {
  __shared__ float c[kMaxCentroids];
  const int64_t g = blockIdx.x;
  if (threadIdx.x < k) c[threadIdx.x] = centroids[g * k + threadIdx.x];
  __syncthreads();
  const uint32_t* h = counts + g * 65536;
  double a[kMaxCentroids];
  for (int64_t it = 0; it < iterations; ++it) {
    const double tau = dkm_tau(c, k, temperature);
    double num[kMaxCentroids], den[kMaxCentroids];
    for (int j = 0; j < k; ++j) num[j] = den[j] = 0.0;
    for (int e = threadIdx.x; e < 65536; e += blockDim.x) {
      const uint32_t n = h[e];
      if (n == 0) continue;
      const double v = __uint_as_float(static_cast<unsigned>(e) << 16);
      double out, d;
      dkm_soft_assign(v, c, k, tau, a, &out, &d);
      for (int j = 0; j < k; ++j) {
        num[j] += n * a[j] * v;
        den[j] += n * a[j];
      }
    }
    for (int j = 0; j < k; ++j) {
      const double nj = block_sum(num[j]);
      const double dj = block_sum(den[j]);
      if (threadIdx.x == 0 && dj > 1e-30) c[j] = static_cast<float>(nj / dj);
    }
    __syncthreads();
  }
  if (threadIdx.x < k) centroids[g * k + threadIdx.x] = c[threadIdx.x];
}

__global__ void dkm_apply_k(float* out, float* deriv, const float* w, const float* centroids,
                            int64_t rows, int64_t cols, int64_t group_rows, int k,
                            double temperature) {
  const int64_t n = rows * cols;
  double a[kMaxCentroids];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float* c = centroids + ((i / cols) / group_rows) * k;
    const double tau = dkm_tau(c, k, temperature);
    const double v = __bfloat162float(__float2bfloat16_rn(w[i]));
    double x, d;
    dkm_soft_assign(v, c, k, tau, a, &x, &d);
    out[i] = static_cast<float>(x);
    deriv[i] = static_cast<float>(d);
  }
}

__global__ void multiply_k(float* x, const float* y, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] *= y[i];
}

inline unsigned grid_stride_blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 8192 ? 8192 : b));
}

inline int row_threads(int64_t c) {
  // One block per row: enough threads to cover c with a few values each, a multiple of 32.
  int t = 32;
  while (t < 1024 && t * 4 < c) t *= 2;
  return t;
}

}  // namespace

void embedding_forward(float* out, const int32_t* ids, const float* table, int64_t n, int64_t c) {
  if (n == 0) return;
  embedding_forward_k<<<static_cast<unsigned>(n), row_threads(c)>>>(out, ids, table, c);
}

void embedding_backward(float* dtable, const float* dout, const int32_t* uniq,
                        const int32_t* starts, const int32_t* positions, int64_t n_uniq,
                        int64_t c) {
  if (n_uniq == 0) return;
  embedding_backward_k<<<static_cast<unsigned>(n_uniq), row_threads(c)>>>(dtable, dout, uniq,
                                                                          starts, positions, c);
}

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t n,
                     int64_t c, float eps) {
  if (n == 0) return;
  rmsnorm_forward_k<<<static_cast<unsigned>(n), row_threads(c)>>>(out, rstd, x, w, c, eps);
}

void rmsnorm_backward_dx(float* dx, const float* dout, const float* x, const float* w,
                         const float* rstd, int64_t n, int64_t c) {
  if (n == 0) return;
  rmsnorm_backward_dx_k<<<static_cast<unsigned>(n), row_threads(c)>>>(dx, dout, x, w, rstd, c);
}

int64_t rmsnorm_dw_scratch(int64_t n, int64_t c) { return (n + kNormRows - 1) / kNormRows * c; }

void rmsnorm_backward_dw(float* dw, float* scratch, const float* dout, const float* x,
                         const float* rstd, int64_t n, int64_t c) {
  if (n == 0) return;
  const int64_t chunks = (n + kNormRows - 1) / kNormRows;
  const dim3 grid(static_cast<unsigned>((c + 127) / 128), static_cast<unsigned>(chunks));
  rmsnorm_dw_partial_k<<<grid, 128>>>(scratch, dout, x, rstd, n, c);
  rmsnorm_dw_final_k<<<static_cast<unsigned>((c + 127) / 128), 128>>>(dw, scratch, chunks, c);
}

void rope_permute(float* out, const float* in, const float* cos, const float* sin, int64_t b,
                  int64_t t, int64_t heads, int64_t hd, bool rotate) {
  const int64_t total = b * t * heads * (hd / 2);
  if (total == 0) return;
  rope_permute_k<<<grid_stride_blocks(total), kThreads>>>(out, in, cos, sin, b, t, heads, hd,
                                                          rotate);
}

void unpermute_rope_backward(float* out, const float* in, const float* cos, const float* sin,
                             int64_t b, int64_t t, int64_t heads, int64_t hd, bool rotate) {
  const int64_t total = b * t * heads * (hd / 2);
  if (total == 0) return;
  unpermute_rope_backward_k<<<grid_stride_blocks(total), kThreads>>>(out, in, cos, sin, b, t,
                                                                     heads, hd, rotate);
}

void softmax_causal_forward(float* att, int64_t rows, int64_t t) {
  if (rows == 0) return;
  softmax_causal_forward_k<<<static_cast<unsigned>((rows + 7) / 8), 256>>>(att, rows, t);
}

void softmax_causal_backward(float* dp, const float* p, int64_t rows, int64_t t) {
  if (rows == 0) return;
  softmax_causal_backward_k<<<static_cast<unsigned>((rows + 7) / 8), 256>>>(dp, p, rows, t);
}

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
  if (n == 0) return;
  swiglu_forward_k<<<grid_stride_blocks(n), kThreads>>>(out, gate, up, n);
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t n) {
  if (n == 0) return;
  swiglu_backward_k<<<grid_stride_blocks(n), kThreads>>>(dgate, dup, dout, gate, up, n);
}

void logit_losses(float* dlogits, double* row_ce, double* row_kl, const float* student,
                  const float* teacher, const int32_t* targets, int64_t n, int64_t vocab,
                  float ce_scale, float kl_scale, float temperature) {
  if (n == 0) return;
  logit_losses_k<<<static_cast<unsigned>(n), 512>>>(dlogits, row_ce, row_kl, student, teacher,
                                                     targets, vocab, ce_scale, kl_scale,
                                                     temperature);
}

void squarehead(double* loss, float* coef, double* scratch, const float* s, const float* t,
                int64_t numel, float grad_scale) {
  squarehead_partial_k<<<kPartials, kThreads>>>(scratch, s, t, numel);
  squarehead_final_k<<<1, kPartials>>>(loss, coef, scratch, numel, grad_scale);
}

void squarehead_grad(float* d, const float* s, const float* t, const float* coef, int64_t numel) {
  if (numel == 0) return;
  squarehead_grad_k<<<grid_stride_blocks(numel), kThreads>>>(d, s, t, coef, numel);
}

void sum_of_squares(double* out, double* scratch, const float* g, int64_t n) {
  sum_squares_partial_k<<<kPartials, kThreads>>>(scratch, g, n);
  sum_final_k<<<1, kPartials>>>(out, scratch);
}

void apply_mask(float* x, const uint8_t* keep, int64_t n) {
  if (n == 0) return;
  apply_mask_k<<<grid_stride_blocks(n), kThreads>>>(x, keep, n);
}

void adamw(float* w, const float* g, float* m, float* v, const uint8_t* keep, int64_t n,
           float lr, float beta1, float beta2, float eps, float weight_decay, float c1, float c2,
           float gscale) {
  if (n == 0) return;
  adamw_k<<<grid_stride_blocks(n), kThreads>>>(w, g, m, v, keep, n, lr, beta1, beta2, eps,
                                               weight_decay, c1, c2, gscale);
}

void fill(float* x, float value, int64_t n) {
  if (n == 0) return;
  fill_k<<<grid_stride_blocks(n), kThreads>>>(x, value, n);
}

void fake_quantize(float* out, const float* w, const float* scales, const float* zeros,
                   const int32_t* g_idx, int64_t rows, int64_t cols, int64_t n_groups, float maxq) {
  if (rows * cols == 0) return;
  fake_quantize_k<<<grid_stride_blocks(rows * cols), kThreads>>>(out, w, scales, zeros, g_idx,
                                                                 rows, cols, n_groups, maxq);
}

void dkm_histogram(uint32_t* counts, const float* w, int64_t rows, int64_t cols,
                   int64_t group_rows) {
  if (rows * cols == 0) return;
  dkm_histogram_k<<<grid_stride_blocks(rows * cols), kThreads>>>(counts, w, rows, cols,
                                                                 group_rows);
}

void dkm_update(float* centroids, const uint32_t* counts, int64_t n_groups, int k,
                double temperature, int64_t iterations) {
  if (n_groups == 0 || iterations == 0) return;
  dkm_update_k<<<static_cast<unsigned>(n_groups), kThreads>>>(centroids, counts, k, temperature,
                                                              iterations);
}

void dkm_apply(float* out, float* deriv, const float* w, const float* centroids, int64_t rows,
               int64_t cols, int64_t group_rows, int k, double temperature) {
  if (rows * cols == 0) return;
  dkm_apply_k<<<grid_stride_blocks(rows * cols), kThreads>>>(out, deriv, w, centroids, rows, cols,
                                                             group_rows, k, temperature);
}

void multiply(float* x, const float* y, int64_t n) {
  if (n == 0) return;
  multiply_k<<<grid_stride_blocks(n), kThreads>>>(x, y, n);
}

}  // namespace sparsa::train::cuda::kern
