// Round-to-nearest (RTN) weight quantization on the asymmetric (or symmetric) min-max grid of the
// GPTQ reference code (Frantar et al. 2022, IST-DASLab/gptq quant.py): per output row and group of
// group_size input columns, the grid spans [min(w, 0), max(w, 0)] in 2^bits levels and each weight
// goes to its nearest level. The baseline GPTQ is measured against ("RTN" in the GPTQ paper).
// Time O(rows · cols); memory: the codes [rows, cols] and grids [rows, n_groups] it returns.
#include "sparsa/compress/quantize.h"

#include <algorithm>

#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"

namespace sparsa::compress {

namespace {
constexpr float kMinF16Scale = 0x1p-24f;  // f16's smallest positive (subnormal) value
}  // namespace

QuantGrid find_quant_grid(const float* w, int64_t n, int bits, bool symmetric,
                          const uint8_t* keep) {
  const float maxq = static_cast<float>((1 << bits) - 1);
  float xmin = 0.0f, xmax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (keep != nullptr && keep[i] == 0) continue;
    xmin = std::min(xmin, w[i]);
    xmax = std::max(xmax, w[i]);
  }
  if (symmetric) {
    xmax = std::max(-xmin, xmax);
    if (xmin < 0.0f) xmin = -xmax;
  }
  if (xmin == 0.0f && xmax == 0.0f) {
    xmin = -1.0f;
    xmax = 1.0f;
  }
  QuantGrid g;
  // The scale is rounded to f16, the precision checkpoints and the packed kernels keep, before
  // any code is chosen, so the codes fit the scale that is stored. A scale below f16's smallest
  // subnormal (weights under about 1e-6) takes that subnormal instead of 0.
  g.scale = std::max(f16_to_f32(f32_to_f16((xmax - xmin) / maxq)), kMinF16Scale);
  SPARSA_CHECK(std::isfinite(g.scale),
               "quantize: weights in [{}, {}] need a scale beyond f16's range (65504)", xmin, xmax);
  g.zero = symmetric ? (maxq + 1.0f) / 2.0f : std::nearbyint(-xmin / g.scale);
  return g;
}

void check_quant_spec(const QuantSpec& spec, int64_t cols, const char* fn) {
  SPARSA_CHECK(spec.bits >= 2 && spec.bits <= 8, "{}: bits = {} is outside 2..8", fn, spec.bits);
  SPARSA_CHECK(spec.group_size >= 0, "{}: group_size = {} is negative (0 means per channel)", fn,
               spec.group_size);
  SPARSA_CHECK(spec.group_size == 0 || cols % spec.group_size == 0,
               "{}: group_size {} does not divide the {} input columns", fn, spec.group_size, cols);
}

QuantResult rtn_quantize(Matrix& w, const QuantSpec& spec, const Mask* keep) {
  constexpr const char* kFn = "rtn_quantize";
  const int64_t rows = w.rows, cols = w.cols;
  SPARSA_CHECK(rows > 0 && cols > 0 && w.data.size() == static_cast<size_t>(rows * cols),
               "{}: the weight matrix is empty or its data does not match {}x{}", kFn, rows, cols);
  check_quant_spec(spec, cols, kFn);
  const uint8_t* km = nullptr;
  if (keep != nullptr && !keep->empty()) {
    SPARSA_CHECK(keep->size() == w.data.size(), "{}: the mask has {} entries, the weights {}", kFn,
                 keep->size(), w.data.size());
    km = keep->data();
  }
  const int64_t g = spec.group_size > 0 ? spec.group_size : cols, n_groups = cols / g;
  const float maxq = static_cast<float>((1 << spec.bits) - 1);

  QuantResult res;
  res.bits = spec.bits;
  res.group_size = spec.group_size;
  res.symmetric = spec.symmetric;
  res.scales.resize(static_cast<size_t>(rows * n_groups));
  res.zeros.resize(static_cast<size_t>(rows * n_groups));
  res.codes.resize(static_cast<size_t>(rows * cols));
  res.g_idx.resize(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) res.g_idx[c] = static_cast<int32_t>(c / g);

  for (int64_t r = 0; r < rows; ++r) {
    float* wr = w.row(r);
    const uint8_t* kr = km != nullptr ? km + r * cols : nullptr;
    if (kr != nullptr)
      for (int64_t c = 0; c < cols; ++c)
        if (kr[c] == 0) wr[c] = 0.0f;
    for (int64_t gi = 0; gi < n_groups; ++gi) {
      float* wg = wr + gi * g;
      const QuantGrid grid = find_quant_grid(wg, g, spec.bits, spec.symmetric);
      res.scales[r * n_groups + gi] = grid.scale;
      res.zeros[r * n_groups + gi] = static_cast<int32_t>(grid.zero);
      uint8_t* code = res.codes.data() + r * cols + gi * g;
      for (int64_t j = 0; j < g; ++j) {
        const float q = quant_code(wg[j], grid, maxq);
        code[j] = static_cast<uint8_t>(q);
        wg[j] = dequant_code(q, grid);
      }
    }
  }
  return res;
}

void dequantize(const QuantResult& q, Matrix& out) {
  const int64_t cols = q.cols(), rows = q.rows(), n_groups = q.n_groups();
  SPARSA_CHECK(cols > 0 && rows > 0 && q.codes.size() == static_cast<size_t>(rows * cols),
               "dequantize: {} codes do not fill rows of {} columns", q.codes.size(), cols);
  SPARSA_CHECK(n_groups > 0 && q.scales.size() == static_cast<size_t>(rows * n_groups) &&
                   q.zeros.size() == q.scales.size(),
               "dequantize: {} scales and {} zeros do not match {} rows", q.scales.size(),
               q.zeros.size(), rows);
  for (int32_t gi : q.g_idx)
    SPARSA_CHECK(gi >= 0 && gi < n_groups, "dequantize: g_idx entry {} is outside 0..{}", gi,
                 n_groups - 1);
  out = Matrix(rows, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* code = q.codes.data() + r * cols;
    const float* scale = q.scales.data() + r * n_groups;
    const int32_t* zero = q.zeros.data() + r * n_groups;
    float* o = out.row(r);
    for (int64_t c = 0; c < cols; ++c) {
      const int32_t gi = q.g_idx[c];
      o[c] = dequant_code(static_cast<float>(code[c]),
                          QuantGrid{scale[gi], static_cast<float>(zero[gi])});
    }
  }
}

}  // namespace sparsa::compress
