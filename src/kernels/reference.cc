// The scalar oracles of the kernels: plain loops in double precision, no blocking, no threads.
#include <cmath>
#include <cstdint>
#include <vector>

#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::kernels::reference {

namespace {

double weight_at(const DenseWeight& w, int64_t i) {
  switch (w.dtype) {
    case DType::F32:
      return static_cast<const float*>(w.data)[i];
    case DType::F16:
      return f16_to_f32(static_cast<const uint16_t*>(w.data)[i]);
    case DType::BF16:
      return bf16_to_f32(static_cast<const uint16_t*>(w.data)[i]);
    default:
      break;
  }
  fail("reference::linear: weights of dtype {} are not supported", dtype_name(w.dtype));
}

}  // namespace

void linear(const DenseWeight& w, const float* x, int64_t ldx, int64_t n_tokens, float* y,
            int64_t ldy) {
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t r = 0; r < w.rows; ++r) {
      double acc = 0.0;
      for (int64_t k = 0; k < w.cols; ++k)
        acc += double{x[t * ldx + k]} * weight_at(w, r * w.cols + k);
      y[t * ldy + r] = static_cast<float>(acc);
    }
}

void attention(const AttentionShape& s, const float* q, int64_t ldq, const void* k_data,
               const void* v_data, int64_t ldkv, float* out, int64_t ldo) {
  const int g = s.n_heads / s.n_kv_heads;
  const int d = s.head_dim;
  // Element c of kv head hk's row j, dequantized: an int8 code times its row's scale.
  auto at = [&](const void* base, const float* scales, int64_t j, int hk, int c) -> double {
    const int64_t i = j * ldkv + int64_t{hk} * d + c;
    switch (s.kv_dtype) {
      case DType::F32:
        return static_cast<const float*>(base)[i];
      case DType::BF16:
        return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
      case DType::I8:
        return static_cast<double>(static_cast<const int8_t*>(base)[i]) *
               scales[hk * s.ld_scales + j];
      default:
        break;
    }
    fail("reference::attention: a KV cache of {} is not supported", dtype_name(s.kv_dtype));
  };
  std::vector<double> p;
  std::vector<double> o(static_cast<size_t>(d));
  for (int64_t i = 0; i < s.n_q; ++i)
    for (int h = 0; h < s.n_heads; ++h) {
      const int64_t len = s.pos0 + i + 1;
      const float* qi = q + i * ldq + h * d;
      const int hk = h / g;
      p.assign(static_cast<size_t>(len), 0.0);
      double mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        double dot = 0.0;
        for (int c = 0; c < d; ++c) dot += double{qi[c]} * at(k_data, s.k_scales, j, hk, c);
        p[static_cast<size_t>(j)] = dot * s.scale;
        mx = std::max(mx, p[static_cast<size_t>(j)]);
      }
      double sum = 0.0;
      for (double& e : p) sum += (e = std::exp(e - mx));
      std::fill(o.begin(), o.end(), 0.0);
      for (int64_t j = 0; j < len; ++j)
        for (int c = 0; c < d; ++c)
          o[static_cast<size_t>(c)] += p[static_cast<size_t>(j)] * at(v_data, s.v_scales, j, hk, c);
      for (int c = 0; c < d; ++c)
        out[i * ldo + h * d + c] = static_cast<float>(o[static_cast<size_t>(c)] / sum);
    }
}

}  // namespace sparsa::kernels::reference
