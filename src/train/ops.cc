// CPU training ops: see ops.h. GEMMs are OpenBLAS calls split over the pool by blocks of output
// rows or columns (never along the reduction, so every element is summed in the same order
// whatever the thread count); attention runs one task per (sequence, kv head) so the key and value
// gradients shared by a group of query heads are summed by one thread in head order.
#include "sparsa/train/ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "sparsa/model/llama.h"

namespace sparsa::train::ops {

namespace {

// Calls fn(begin, end) over [0, n) in at most pool.size() pieces whose boundaries are multiples
// of `align` (except the last).
template <typename F>
void split(ThreadPool& pool, int64_t n, int64_t align, F&& fn) {
  if (n <= 0) return;
  const int64_t units = (n + align - 1) / align;
  const int64_t parts = std::min<int64_t>(pool.size(), units);
  if (parts <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t per = (units + parts - 1) / parts;
  pool.run(parts, [&](int64_t p) {
    const int64_t b = std::min(n, p * per * align), e = std::min(n, (p + 1) * per * align);
    if (b < e) fn(b, e);
  });
}

int ci(int64_t x) { return static_cast<int>(x); }

}  // namespace

void embedding_forward(float* out, const int32_t* ids, const float* table, int64_t n, int64_t c) {
  for (int64_t t = 0; t < n; ++t)
    std::memcpy(out + t * c, table + static_cast<int64_t>(ids[t]) * c,
                static_cast<size_t>(c) * sizeof(float));
}

void embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t n,
                        int64_t c) {
  for (int64_t t = 0; t < n; ++t) {
    float* d = dtable + static_cast<int64_t>(ids[t]) * c;
    const float* g = dout + t * c;
    for (int64_t i = 0; i < c; ++i) d[i] += g[i];
  }
}

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t n,
                     int64_t c, float eps, ThreadPool& pool) {
  pool.parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* xt = x + t * c;
      float* ot = out + t * c;
      double ss = 0;
      for (int64_t i = 0; i < c; ++i) ss += static_cast<double>(xt[i]) * xt[i];
      // As model::rms_norm: the reciprocal in f64, rounded once.
      const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(c) + eps));
      rstd[t] = r;
      for (int64_t i = 0; i < c; ++i) ot[i] = w[i] * (xt[i] * r);
    }
  });
}

void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w,
                      const float* rstd, int64_t n, int64_t c, ThreadPool& pool) {
  // y_i = w_i x_i r, r = (mean x² + eps)^(-1/2):
  // ∂L/∂x_i = r w_i g_i − (r³ / c) x_i Σ_j w_j g_j x_j.
  pool.parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* xt = x + t * c;
      const float* gt = dout + t * c;
      float* dxt = dx + t * c;
      const float r = rstd[t];
      double dot = 0;
      for (int64_t i = 0; i < c; ++i) dot += static_cast<double>(w[i]) * gt[i] * xt[i];
      const float k = static_cast<float>(dot * r * r * r / static_cast<double>(c));
      for (int64_t i = 0; i < c; ++i) dxt[i] += r * w[i] * gt[i] - k * xt[i];
    }
  });
  if (dw == nullptr) return;
  // Columns in parallel, each summed over the rows in order.
  split(pool, c, 16, [&](int64_t b, int64_t e) {
    std::vector<double> acc(static_cast<size_t>(e - b), 0.0);
    for (int64_t t = 0; t < n; ++t) {
      const float* xt = x + t * c;
      const float* gt = dout + t * c;
      const float r = rstd[t];
      for (int64_t i = b; i < e; ++i) acc[static_cast<size_t>(i - b)] += gt[i] * (xt[i] * r);
    }
    for (int64_t i = b; i < e; ++i) dw[i] += static_cast<float>(acc[static_cast<size_t>(i - b)]);
  });
}

void matmul_forward(float* out, const float* in, const float* w, const float* bias, int64_t n,
                    int64_t c, int64_t oc, ThreadPool& pool) {
  split(pool, oc, 16, [&](int64_t b, int64_t e) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ci(n), ci(e - b), ci(c), 1.0f, in,
                ci(c), w + b * c, ci(c), 0.0f, out + b, ci(oc));
    if (bias != nullptr)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t o = b; o < e; ++o) out[t * oc + o] += bias[o];
  });
}

void matmul_backward(float* din, float* dw, float* dbias, const float* dout, const float* in,
                     const float* w, int64_t n, int64_t c, int64_t oc, ThreadPool& pool) {
  if (din != nullptr) {
    // din[:, b:e] += dout [n, oc] · w[:, b:e]
    split(pool, c, 16, [&](int64_t b, int64_t e) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, ci(n), ci(e - b), ci(oc), 1.0f, dout,
                  ci(oc), w + b, ci(c), 1.0f, din + b, ci(c));
    });
  }
  if (dw != nullptr) {
    // dw[b:e, :] += dout[:, b:e]ᵀ · in
    split(pool, oc, 16, [&](int64_t b, int64_t e) {
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, ci(e - b), ci(c), ci(n), 1.0f,
                  dout + b, ci(oc), in, ci(c), 1.0f, dw + b * c, ci(c));
    });
  }
  if (dbias != nullptr) {
    split(pool, oc, 16, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        double s = 0;
        for (int64_t t = 0; t < n; ++t) s += dout[t * oc + o];
        dbias[o] += static_cast<float>(s);
      }
    });
  }
}

void rope_tables(float* cos, float* sin, const float* inv_freq, int64_t t, int64_t half) {
  for (int64_t p = 0; p < t; ++p)
    model::rope_angles(inv_freq, half, p, cos + p * half, sin + p * half);
}

namespace {

// Rows [begin, end) of x [b · t, heads · hd], cut where a sequence ends (row r is at position
// r mod t).
void rope_rows(float* x, const float* cos, const float* sin, int64_t b, int64_t t,
               int64_t heads, int64_t hd, bool inverse, ThreadPool& pool) {
  const int64_t half = hd / 2, ld = heads * hd;
  pool.parallel_for(b * t, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      const int64_t p = row % t, n = std::min(end - row, t - p);
      model::apply_rope(x + row * ld, ld, n, heads, hd, cos + p * half, sin + p * half, inverse);
      row += n;
    }
  });
}

}  // namespace

void rope_forward(float* x, const float* cos, const float* sin, int64_t b, int64_t t,
                  int64_t heads, int64_t hd, ThreadPool& pool) {
  rope_rows(x, cos, sin, b, t, heads, hd, false, pool);
}

void rope_backward(float* dx, const float* cos, const float* sin, int64_t b, int64_t t,
                   int64_t heads, int64_t hd, ThreadPool& pool) {
  rope_rows(dx, cos, sin, b, t, heads, hd, true, pool);
}

void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                       const AttentionShape& s, ThreadPool& pool) {
  const int64_t T = s.seq, nh = s.n_heads, nkv = s.n_kv_heads, hd = s.head_dim;
  const int64_t group = nh / nkv, qld = nh * hd, kld = nkv * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  pool.run(s.batch * nh, [&](int64_t task) {
    const int64_t bi = task / nh, h = task % nh, kh = h / group;
    const float* qb = q + bi * T * qld + h * hd;
    const float* kb = k + bi * T * kld + kh * hd;
    const float* vb = v + bi * T * kld + kh * hd;
    float* ob = out + bi * T * qld + h * hd;
    float* ab = att + (bi * nh + h) * T * T;
    for (int64_t t = 0; t < T; ++t) {
      const float* qt = qb + t * qld;
      float* row = ab + t * T;
      float mx = -INFINITY;
      for (int64_t u = 0; u <= t; ++u) {
        const float* ku = kb + u * kld;
        float d = 0;
        for (int64_t i = 0; i < hd; ++i) d += qt[i] * ku[i];
        row[u] = d * scale;
        mx = std::max(mx, row[u]);
      }
      float sum = 0;
      for (int64_t u = 0; u <= t; ++u) {
        row[u] = std::exp(row[u] - mx);
        sum += row[u];
      }
      const float inv = 1.0f / sum;
      for (int64_t u = 0; u <= t; ++u) row[u] *= inv;
      for (int64_t u = t + 1; u < T; ++u) row[u] = 0.0f;
      float* ot = ob + t * qld;
      for (int64_t i = 0; i < hd; ++i) ot[i] = 0.0f;
      for (int64_t u = 0; u <= t; ++u) {
        const float p = row[u];
        const float* vu = vb + u * kld;
        for (int64_t i = 0; i < hd; ++i) ot[i] += p * vu[i];
      }
    }
  });
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* att,
                        const float* q, const float* k, const float* v, const AttentionShape& s,
                        ThreadPool& pool) {
  const int64_t T = s.seq, nh = s.n_heads, nkv = s.n_kv_heads, hd = s.head_dim;
  const int64_t group = nh / nkv, qld = nh * hd, kld = nkv * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  pool.run(s.batch * nkv, [&](int64_t task) {
    const int64_t bi = task / nkv, kh = task % nkv;
    std::vector<float> dp(static_cast<size_t>(T));
    const float* kb = k + bi * T * kld + kh * hd;
    const float* vb = v + bi * T * kld + kh * hd;
    float* dkb = dk + bi * T * kld + kh * hd;
    float* dvb = dv + bi * T * kld + kh * hd;
    for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
      const float* qb = q + bi * T * qld + h * hd;
      float* dqb = dq + bi * T * qld + h * hd;
      const float* dob = dout + bi * T * qld + h * hd;
      const float* ab = att + (bi * nh + h) * T * T;
      for (int64_t t = 0; t < T; ++t) {
        const float* row = ab + t * T;
        const float* dot = dob + t * qld;
        // dP[u] = dO[t] · V[u]; dV[u] += P[t,u] dO[t]
        float pdp = 0;
        for (int64_t u = 0; u <= t; ++u) {
          const float* vu = vb + u * kld;
          float d = 0;
          for (int64_t i = 0; i < hd; ++i) d += dot[i] * vu[i];
          dp[static_cast<size_t>(u)] = d;
          pdp += row[u] * d;
          float* dvu = dvb + u * kld;
          const float p = row[u];
          for (int64_t i = 0; i < hd; ++i) dvu[i] += p * dot[i];
        }
        // Softmax backward: dS[u] = P[u] (dP[u] − Σ P dP); scores were scaled by `scale`.
        const float* qt = qb + t * qld;
        float* dqt = dqb + t * qld;
        for (int64_t u = 0; u <= t; ++u) {
          const float ds = row[u] * (dp[static_cast<size_t>(u)] - pdp) * scale;
          const float* ku = kb + u * kld;
          float* dku = dkb + u * kld;
          for (int64_t i = 0; i < hd; ++i) {
            dqt[i] += ds * ku[i];
            dku[i] += ds * qt[i];
          }
        }
      }
    }
  });
}

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n, ThreadPool& pool) {
  pool.parallel_for(n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float g = gate[i];
      out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  });
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t n, ThreadPool& pool) {
  pool.parallel_for(n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float g = gate[i];
      const float sg = 1.0f / (1.0f + std::exp(-g));
      const float silu = g * sg;
      dgate[i] += dout[i] * up[i] * sg * (1.0f + g * (1.0f - sg));
      dup[i] += dout[i] * silu;
    }
  });
}

void add_inplace(float* y, const float* x, int64_t n, ThreadPool& pool) {
  pool.parallel_for(n, 8192, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] += x[i];
  });
}

namespace {

// Sums per-row values in row order (deterministic), rows computed in parallel; each task gets a
// scratch buffer of `scratch` floats.
template <typename F>
double sum_rows(int64_t n, int64_t scratch, ThreadPool& pool, F&& row_value) {
  std::vector<double> per(static_cast<size_t>(n));
  pool.parallel_for(n, 4, [&](int64_t b, int64_t e) {
    std::vector<float> buf(static_cast<size_t>(scratch));
    for (int64_t t = b; t < e; ++t) per[static_cast<size_t>(t)] = row_value(t, buf.data());
  });
  double s = 0;
  for (double x : per) s += x;
  return s;
}

// e[i] = exp((x[i] − max x) / temp) (f32); returns log Σ e (f64) and the max.
double softmax_terms(const float* x, int64_t v, float inv_temp, float* e, float* max_out) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < v; ++i) mx = std::max(mx, x[i]);
  double s = 0;
  for (int64_t i = 0; i < v; ++i) {
    e[i] = std::exp((x[i] - mx) * inv_temp);
    s += e[i];
  }
  *max_out = mx;
  return std::log(s);
}

}  // namespace

double cross_entropy(float* dlogits, const float* logits, const int32_t* targets, int64_t n,
                     int64_t vocab, float grad_scale, ThreadPool& pool) {
  int64_t count = 0;
  for (int64_t t = 0; t < n; ++t) count += targets[t] >= 0;
  if (count == 0) return 0.0;
  const double inv_count = 1.0 / static_cast<double>(count);
  const double total = sum_rows(n, vocab, pool, [&](int64_t t, float* e) -> double {
    const int32_t y = targets[t];
    if (y < 0) return 0.0;
    const float* z = logits + t * vocab;
    float mx = 0;
    const double lse = softmax_terms(z, vocab, 1.0f, e, &mx);
    if (dlogits != nullptr) {
      float* d = dlogits + t * vocab;
      const float g = static_cast<float>(grad_scale * inv_count);
      const float inv_sum = static_cast<float>(std::exp(-lse));
      for (int64_t i = 0; i < vocab; ++i) d[i] += g * (e[i] * inv_sum);
      d[y] -= g;
    }
    return lse - static_cast<double>(z[y] - mx);
  });
  return total * inv_count;
}

double kl_distillation(float* dstudent, const float* student, const float* teacher, int64_t n,
                       int64_t vocab, float temperature, float grad_scale, ThreadPool& pool) {
  if (n == 0) return 0.0;
  const float it = 1.0f / temperature;
  const double tt = static_cast<double>(temperature) * temperature;
  const double total = sum_rows(n, 2 * vocab, pool, [&](int64_t t, float* buf) -> double {
    const float* zs = student + t * vocab;
    const float* zt = teacher + t * vocab;
    float* es = buf;
    float* et = buf + vocab;
    float ms = 0, mt = 0;
    const double ls = softmax_terms(zs, vocab, it, es, &ms);
    const double lt = softmax_terms(zt, vocab, it, et, &mt);
    const float inv_s = static_cast<float>(std::exp(-ls)), inv_t = static_cast<float>(std::exp(-lt));
    // ∂(T² KL)/∂z_s = T (q − p), with q the student's and p the teacher's softened distribution.
    const float g = static_cast<float>(grad_scale * static_cast<double>(temperature) /
                                       static_cast<double>(n));
    float* d = dstudent != nullptr ? dstudent + t * vocab : nullptr;
    double kl = 0;
    const double shift = ls - lt;  // log p − log q = (zt − mt − zs + ms)/T + ls − lt
    for (int64_t i = 0; i < vocab; ++i) {
      const float p = et[i] * inv_t;
      const double diff = static_cast<double>((zt[i] - mt - zs[i] + ms) * it) + shift;
      kl += static_cast<double>(p) * diff;
      if (d != nullptr) d[i] += g * (es[i] * inv_s - p);
    }
    return kl;
  });
  return tt * total / static_cast<double>(n);
}

double squarehead(float* dstudent, const float* student, const float* teacher, int64_t numel,
                  float grad_scale, ThreadPool& pool) {
  if (numel == 0) return 0.0;
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  std::vector<double> err(static_cast<size_t>(blocks)), norm(static_cast<size_t>(blocks));
  pool.parallel_for(blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      double se = 0, st = 0;
      for (int64_t i = blk * kBlock; i < std::min(numel, (blk + 1) * kBlock); ++i) {
        const double d = static_cast<double>(student[i]) - teacher[i];
        se += d * d;
        st += static_cast<double>(teacher[i]) * teacher[i];
      }
      err[static_cast<size_t>(blk)] = se;
      norm[static_cast<size_t>(blk)] = st;
    }
  });
  double se = 0, st = 0;
  for (int64_t b = 0; b < blocks; ++b) se += err[static_cast<size_t>(b)], st += norm[static_cast<size_t>(b)];
  // Guard a teacher whose features are all zero (an untrained layer): plain MSE then.
  const double den = st > 0 ? st / static_cast<double>(numel) : 1.0;
  const double loss = se / static_cast<double>(numel) / den;
  if (dstudent != nullptr) {
    const float g = static_cast<float>(grad_scale * 2.0 / (static_cast<double>(numel) * den));
    pool.parallel_for(numel, 8192, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dstudent[i] += g * (student[i] - teacher[i]);
    });
  }
  return loss;
}

double sum_of_squares(const float* g, int64_t n, ThreadPool& pool) {
  constexpr int64_t kBlock = 16384;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> part(static_cast<size_t>(blocks));
  pool.parallel_for(blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      double s = 0;
      for (int64_t i = blk * kBlock; i < std::min(n, (blk + 1) * kBlock); ++i)
        s += static_cast<double>(g[i]) * g[i];
      part[static_cast<size_t>(blk)] = s;
    }
  });
  double s = 0;
  for (double x : part) s += x;
  return s;
}

void scale(float* g, float s, int64_t n, ThreadPool& pool) {
  pool.parallel_for(n, 8192, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) g[i] *= s;
  });
}

void adamw_update(float* w, const float* g, float* m, float* v, int64_t n, const AdamW& o,
                  int64_t t, ThreadPool& pool) {
  const float c1 = 1.0f - std::pow(o.beta1, static_cast<float>(t));
  const float c2 = 1.0f - std::pow(o.beta2, static_cast<float>(t));
  pool.parallel_for(n, 8192, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float gi = g[i];
      const float mi = o.beta1 * m[i] + (1.0f - o.beta1) * gi;
      const float vi = o.beta2 * v[i] + (1.0f - o.beta2) * gi * gi;
      m[i] = mi;
      v[i] = vi;
      const float mhat = mi / c1, vhat = vi / c2;
      w[i] -= o.lr * (mhat / (std::sqrt(vhat) + o.eps) + o.weight_decay * w[i]);
    }
  });
}

void apply_mask(float* w, const uint8_t* keep, int64_t n, ThreadPool& pool) {
  pool.parallel_for(n, 8192, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (keep[i] == 0) w[i] = 0.0f;
  });
}

BlasSingleThread::BlasSingleThread() {
  saved_ = openblas_get_num_threads();
  if (saved_ != 1) openblas_set_num_threads(1);
}

BlasSingleThread::~BlasSingleThread() {
  if (saved_ != 1) openblas_set_num_threads(saved_);
}

}  // namespace sparsa::train::ops
