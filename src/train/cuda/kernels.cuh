// The CUDA training engine's own kernels (everything but the GEMMs, which are cuBLAS's): the
// launchers take device pointers and sizes, run on the default stream and report nothing; the
// engine checks cudaGetLastError() at its sync points. Shapes and semantics follow the CPU ops
// of sparsa/train/ops.h, except where a comment says otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparsa::train::cuda::kern {

/// out[t] = table[ids[t]], rows of c floats.
void embedding_forward(float* out, const int32_t* ids, const float* table, int64_t n, int64_t c);
/// dtable[uniq[u]] += Σ_{p in positions[starts[u] .. starts[u+1])} dout[p], in that order
/// (one block per distinct id: no atomics, a fixed summation order).
void embedding_backward(float* dtable, const float* dout, const int32_t* uniq,
                        const int32_t* starts, const int32_t* positions, int64_t n_uniq,
                        int64_t c);

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t n,
                     int64_t c, float eps);
/// dx += ∂L/∂x.
void rmsnorm_backward_dx(float* dx, const float* dout, const float* x, const float* w,
                         const float* rstd, int64_t n, int64_t c);
/// dw += Σ_t dout[t] ⊙ x[t] · rstd[t], through `scratch` (rmsnorm_dw_scratch floats).
void rmsnorm_backward_dw(float* dw, float* scratch, const float* dout, const float* x,
                         const float* rstd, int64_t n, int64_t c);
int64_t rmsnorm_dw_scratch(int64_t n, int64_t c);

/// in [b, t, heads, hd] → out [b, heads, t, hd], rotated by RoPE (rotate-half, cos/sin
/// [t, hd/2]) when `rotate`.
void rope_permute(float* out, const float* in, const float* cos, const float* sin, int64_t b,
                  int64_t t, int64_t heads, int64_t hd, bool rotate);
/// in [b, heads, t, hd] → out [b, t, heads, hd] (overwritten), with the transposed rotation
/// when `rotate` (the gradient of rope_permute's input).
void unpermute_rope_backward(float* out, const float* in, const float* cos, const float* sin,
                             int64_t b, int64_t t, int64_t heads, int64_t hd, bool rotate);

/// Row r of `rows` rows of t scores (query position r % t) becomes its causal softmax in place;
/// entries past the query position become 0.
void softmax_causal_forward(float* att, int64_t rows, int64_t t);
/// dp ← p ⊙ (dp − Σ p ⊙ dp), in place, row by row (0 past the query position).
void softmax_causal_backward(float* dp, const float* p, int64_t rows, int64_t t);

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n);
/// dgate, dup overwritten.
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t n);

/// Per row: row_ce[t] = −log softmax(student[t])[targets[t]] (0 when the target is < 0) and,
/// when teacher is given, row_kl[t] = KL(softmax(teacher[t]/T) ‖ softmax(student[t]/T)). When
/// dlogits is given it is overwritten with ce_scale · (softmax − onehot) + kl_scale · (q − p).
void logit_losses(float* dlogits, double* row_ce, double* row_kl, const float* student,
                  const float* teacher, const int32_t* targets, int64_t n, int64_t vocab,
                  float ce_scale, float kl_scale, float temperature);

/// Number of partial sums the ordered reductions below use.
constexpr int kPartials = 1024;
/// SquareHead of one layer: loss[0] = MSE(s, t) / MSE(t, 0) (plain MSE when the teacher is all
/// zero), coef[0] = grad_scale · 2 / (numel · MSE(t, 0)); scratch holds 2 · kPartials doubles.
void squarehead(double* loss, float* coef, double* scratch, const float* s, const float* t,
                int64_t numel, float grad_scale);
/// d += coef[0] · (s − t).
void squarehead_grad(float* d, const float* s, const float* t, const float* coef, int64_t numel);

/// out[0] = Σ g² (f64, fixed order); scratch holds kPartials doubles.
void sum_of_squares(double* out, double* scratch, const float* g, int64_t n);
/// x[i] = 0 where keep[i] == 0.
void apply_mask(float* x, const uint8_t* keep, int64_t n);
/// AdamW on n values with gradients g · gscale; where keep is given and keep[i] == 0 the weight
/// is set to 0 and its gradient taken as 0. c1, c2: the bias corrections 1 − β^t.
void adamw(float* w, const float* g, float* m, float* v, const uint8_t* keep, int64_t n,
           float lr, float beta1, float beta2, float eps, float weight_decay, float c1, float c2,
           float gscale);
void fill(float* x, float value, int64_t n);
/// out[r, c] = s · (clamp(rint(w / s) + z, 0, maxq) − z), s = scales[r, g], z = zeros[r, g],
/// g = g_idx[c] (the CPU's fake_quantize, bit for bit).
void fake_quantize(float* out, const float* w, const float* scales, const float* zeros,
                   const int32_t* g_idx, int64_t rows, int64_t cols, int64_t n_groups, float maxq);

/// Clustering-aware training (sparsa/train/dkm.h; k = 2^bits <= 16 centroids per palette):
/// counts[g · 65536 + bf16(w)] += 1 over a [rows, cols] weight, g = row / group_rows (counts
/// zeroed by the caller).
void dkm_histogram(uint32_t* counts, const float* w, int64_t rows, int64_t cols,
                   int64_t group_rows);
/// `iterations` soft k-means updates of each group's centroids [n_groups, k] over its counts.
void dkm_update(float* centroids, const uint32_t* counts, int64_t n_groups, int k,
                double temperature, int64_t iterations);
/// out = Σ_j a_j c_j and deriv = ∂out/∂w at bf16(w), per weight.
void dkm_apply(float* out, float* deriv, const float* w, const float* centroids, int64_t rows,
               int64_t cols, int64_t group_rows, int k, double temperature);
/// x *= y over n values.
void multiply(float* x, const float* y, int64_t n);

}  // namespace sparsa::train::cuda::kern
