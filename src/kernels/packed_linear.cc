// linear() over packed weights: argument checks, the (format, ISA) kernel registry, the decode
// driver (rows split across threads) and the prefill driver (panels of rows dequantized to f32,
// then the dense blocked GEMM of linear.cc).
#include "sparsa/kernels/packed_linear.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "kernels/kernels_internal.h"
#include "sparsa/core/error.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::kernels {

namespace {

using formats::Codec;
using formats::PackedView;
using formats::PackedWeight;
using formats::Positions;

bool is_dense(const PackedView& v) {
  return v.codec == Codec::Float && v.positions == Positions::All;
}
DenseWeight dense_of(const PackedView& v) { return {v.dtype, v.rows, v.cols, v.dense, v.panels}; }

// The registry: each ISA's format_kernels() maps a format (codec, positions, bits, group shape)
// to its kernels; AVX-512 without VBMI2 runs the AVX2 ones, with VNNI it has int8-input ones.
FormatKernels find_format_kernels(const PackedView& v, Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      if (cpu_has_avx512_vbmi2()) {
        FormatKernels k = avx512vbmi2::format_kernels(v);
        if (cpu_has_avx512_vnni()) k.decode_q8 = avx512vnni::decode_q8(v);
        return k;
      }
      return avx2::format_kernels(v);
    case Isa::Avx2:
      return avx2::format_kernels(v);
    case Isa::Generic:
      break;
  }
  return generic::format_kernels(v);
}

DecodeFn dense_decode_fn(const PackedView& v, Isa isa) {
  LinearKernels k;
  switch (isa) {
    case Isa::Avx512:
      k = avx512::linear_kernels(v.dtype);
      break;
    case Isa::Avx2:
      k = avx2::linear_kernels(v.dtype);
      break;
    case Isa::Generic:
      k = generic::linear_kernels(v.dtype);
      break;
  }
  return v.panels ? k.decode_panels : k.decode;
}

// Prefill dequantizes at most this many weights (16 MiB of f32) per GEMM call.
constexpr int64_t kPrefillPanelWeights = int64_t{1} << 22;

void check_args(const char* fn, Isa isa, const PackedView& v, const float* x, int64_t ldx,
                int64_t n_tokens, const float* y, int64_t ldy) {
  SPARSA_CHECK(static_cast<int>(isa) <= static_cast<int>(detect_isa()),
               "{}: this CPU cannot run the {} kernels", fn, isa_name(isa));
  SPARSA_CHECK(v.rows > 0 && v.cols > 0, "{}: the packed weight is empty", fn);
  SPARSA_CHECK(n_tokens >= 0, "{}: n_tokens is negative ({})", fn, n_tokens);
  if (n_tokens == 0) return;
  SPARSA_CHECK(x != nullptr && y != nullptr, "{}: the input or output pointer is null", fn);
  SPARSA_CHECK(ldx >= v.cols,
               "{}: input row stride ldx = {} is smaller than the weight's {} input features", fn,
               ldx, v.cols);
  SPARSA_CHECK(ldy >= v.rows,
               "{}: output row stride ldy = {} is smaller than the weight's {} output features",
               fn, ldy, v.rows);
}

// x gathered into the weight's stored column order (act-order weights), else x itself.
const float* permuted_input(const PackedView& v, const float* x, int64_t& ldx, int64_t n_tokens) {
  if (v.perm == nullptr) return x;
  float* xp = thread_scratch(Scratch::kPermutedX, static_cast<size_t>(n_tokens * v.cols));
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t j = 0; j < v.cols; ++j) xp[t * v.cols + j] = x[t * ldx + v.perm[j]];
  ldx = v.cols;
  return xp;
}

void decode(const FormatKernels& kn, const PackedView& v, const float* x, int64_t ldx,
            int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool) {
  split_decode_rows(v.rows, v.cols, pool, [&](int64_t r0, int64_t r1) {
    kn.decode(v, x, ldx, n_tokens, y, ldy, r0, r1);
  });
}

// The int8 decode input in the calling thread's scratch: [n_tokens][ldq] codes twice (plain and
// pair layout), then scales [n_tokens][n_pairs] and block sums [n_tokens][n_blocks], then
// `group_floats` floats for the weights' group sums.
struct QuantizedScratch {
  QuantizedInput in;
  const float* block_sum = nullptr;
  float* group_sums = nullptr;
};

QuantizedScratch quantize(const float* x, int64_t ldx, int64_t n_tokens, int64_t cols,
                          int64_t group_floats) {
  QuantizedScratch s;
  const int64_t nb = (cols + formats::kBlockCols - 1) / formats::kBlockCols, np = (nb + 1) / 2;
  const int64_t ldq = np * kInputBlockCols;
  const int64_t q_floats = n_tokens * ldq / static_cast<int64_t>(sizeof(float));
  float* buf = thread_scratch(Scratch::kQuantX, static_cast<size_t>(2 * q_floats + n_tokens * np +
                                                                    n_tokens * nb + group_floats));
  auto* q = reinterpret_cast<int8_t*>(buf);
  auto* qp = reinterpret_cast<int8_t*>(buf + q_floats);  // 64-byte aligned: q_floats % 32 == 0
  float* scale = buf + 2 * q_floats;
  float* block_sum = scale + n_tokens * np;
  avx512vnni::quantize_input(x, ldx, n_tokens, cols, q, qp, ldq, scale, block_sum);
  s.in.q = q;
  s.in.qp = qp;
  s.in.scale = scale;
  s.in.ldq = ldq;
  s.in.n_blocks = nb;
  s.in.n_pairs = np;
  s.block_sum = block_sum;
  s.group_sums = block_sum + n_tokens * nb;
  return s;
}

// Group sums of one weight's groups (Int) or of its whole rows (Palette).
int64_t q8_groups(const PackedView& v) { return v.codec == Codec::Int ? v.n_groups : 1; }

QuantizedInput with_group_sums(const QuantizedScratch& s, const PackedView& v, int64_t n_tokens,
                               float* out) {
  QuantizedInput in = s.in;
  const int64_t nb = in.n_blocks, ng = q8_groups(v);
  const int64_t per_group = ng == 1 ? nb : v.group_size / formats::kBlockCols;
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t g = 0; g < ng; ++g) {
      float sum = 0.0f;
      for (int64_t b = g * per_group; b < std::min(nb, (g + 1) * per_group); ++b)
        sum += s.block_sum[t * nb + b];
      out[t * ng + g] = sum;
    }
  in.group_sum = out;
  in.n_groups = ng;
  return in;
}

void decode_q8(const FormatKernels& kn, const PackedView& v, const float* x, int64_t ldx,
               int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool) {
  const QuantizedScratch s = quantize(x, ldx, n_tokens, v.cols, n_tokens * q8_groups(v));
  const QuantizedInput in = with_group_sums(s, v, n_tokens, s.group_sums);
  split_decode_rows(v.rows, v.cols, pool, [&](int64_t r0, int64_t r1) {
    kn.decode_q8(v, in, n_tokens, y, ldy, r0, r1);
  });
}

std::atomic<int> g_decode_input{-1};

void prefill(Isa isa, const FormatKernels& kn, const PackedView& v, const float* x, int64_t ldx,
             int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool) {
  const int64_t panel = std::clamp(kPrefillPanelWeights / v.cols / kDecodeRowAlign *
                                       kDecodeRowAlign,
                                   kDecodeRowAlign, v.rows);
  float* w = thread_scratch(Scratch::kDequantW, static_cast<size_t>(panel * v.cols));
  for (int64_t r0 = 0; r0 < v.rows; r0 += panel) {
    const int64_t n = std::min(panel, v.rows - r0);
    pool.parallel_for(n, kDecodeRowAlign, [&](int64_t b, int64_t e) {
      kn.dequant(v, r0 + b, r0 + e, w + b * v.cols);
    });
    linear_isa(isa, DenseWeight{DType::F32, n, v.cols, w}, x, ldx, n_tokens, y + r0, ldy, pool);
  }
}

}  // namespace

DecodeInput parse_decode_input(std::string_view name) {
  if (name == "int8") return DecodeInput::Int8;
  if (name == "f32") return DecodeInput::F32;
  fail("unknown decode input '{}' (expected int8 or f32)", name);
}

DecodeInput decode_input() {
  int v = g_decode_input.load(std::memory_order_relaxed);
  if (v < 0) {
    DecodeInput in = DecodeInput::Int8;
    if (const char* env = std::getenv("SPARSA_DECODE_INPUT"); env != nullptr && *env != '\0')
      in = parse_decode_input(env);
    v = static_cast<int>(in);
    g_decode_input.store(v);
  }
  return static_cast<DecodeInput>(v);
}

void set_decode_input(DecodeInput input) { g_decode_input.store(static_cast<int>(input)); }

bool decode_quantizes_input(const PackedWeight& w, Isa isa) {
  const PackedView& v = w.view();
  return !is_dense(v) && v.rows > 0 && find_format_kernels(v, isa).decode_q8 != nullptr;
}

void linear_isa(Isa isa, DecodeInput input, const PackedWeight& w, const float* x, int64_t ldx,
                int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool) {
  const PackedView& v = w.view();
  check_args("linear", isa, v, x, ldx, n_tokens, y, ldy);
  if (n_tokens == 0) return;
  if (is_dense(v)) return linear_isa(isa, dense_of(v), x, ldx, n_tokens, y, ldy, pool);
  const FormatKernels kn = find_format_kernels(v, isa);
  x = permuted_input(v, x, ldx, n_tokens);
  if (n_tokens <= kDecodeMaxTokens) {
    if (input == DecodeInput::Int8 && kn.decode_q8 != nullptr) {
      decode_q8(kn, v, x, ldx, n_tokens, y, ldy, pool);
    } else {
      decode(kn, v, x, ldx, n_tokens, y, ldy, pool);
    }
  } else {
    prefill(isa, kn, v, x, ldx, n_tokens, y, ldy, pool);
  }
}

void linear_isa(Isa isa, const PackedWeight& w, const float* x, int64_t ldx, int64_t n_tokens,
                float* y, int64_t ldy, ThreadPool& pool) {
  linear_isa(isa, decode_input(), w, x, ldx, n_tokens, y, ldy, pool);
}

void linear(const PackedWeight& w, const float* x, int64_t ldx, int64_t n_tokens, float* y,
            int64_t ldy, ThreadPool& pool) {
  linear_isa(active_isa(), decode_input(), w, x, ldx, n_tokens, y, ldy, pool);
}

void linear_many(const PackedLinearOutput* outs, int count, const float* x, int64_t ldx,
                 int64_t n_tokens, ThreadPool& pool) {
  const Isa isa = active_isa();
  const DecodeInput input = decode_input();
  bool together = n_tokens > 0 && n_tokens <= kDecodeMaxTokens && count <= kMaxManyOutputs &&
                  pool.size() > 1;
  for (int i = 0; i < count; ++i) {
    SPARSA_CHECK(outs[i].weight != nullptr, "linear_many: output {} has no weight", i);
    const PackedView& v = outs[i].weight->view();
    check_args("linear_many", isa, v, x, ldx, n_tokens, outs[i].y, outs[i].ldy);
    together = together && v.perm == nullptr;  // each act-order weight needs its own input order
  }
  if (!together) {
    for (int i = 0; i < count; ++i)
      linear_isa(isa, *outs[i].weight, x, ldx, n_tokens, outs[i].y, outs[i].ldy, pool);
    return;
  }
  FormatKernels kn[kMaxManyOutputs];
  DecodeFn dense[kMaxManyOutputs];
  int64_t rows[kMaxManyOutputs];
  // The int8 input is quantized once for the outputs of the first such output's width.
  int64_t q8_cols = 0, group_floats = 0;
  for (int i = 0; i < count; ++i) {
    const PackedView& v = outs[i].weight->view();
    dense[i] = is_dense(v) ? dense_decode_fn(v, isa) : nullptr;
    if (!is_dense(v)) {
      kn[i] = find_format_kernels(v, isa);
      if (input != DecodeInput::Int8 || (q8_cols != 0 && v.cols != q8_cols))
        kn[i].decode_q8 = nullptr;
      if (kn[i].decode_q8 != nullptr) {
        q8_cols = v.cols;
        group_floats += n_tokens * q8_groups(v);
      }
    }
    rows[i] = v.rows;
  }
  QuantizedInput q8[kMaxManyOutputs];
  if (q8_cols > 0) {
    const QuantizedScratch s = quantize(x, ldx, n_tokens, q8_cols, group_floats);
    float* sums = s.group_sums;
    for (int i = 0; i < count; ++i)
      if (dense[i] == nullptr && kn[i].decode_q8 != nullptr) {
        q8[i] = with_group_sums(s, outs[i].weight->view(), n_tokens, sums);
        sums += n_tokens * q8[i].n_groups;
      }
  }
  split_decode_outputs(rows, count, pool, [&](int i, int64_t r0, int64_t r1) {
    const PackedLinearOutput& o = outs[i];
    const PackedView& v = o.weight->view();
    if (dense[i] != nullptr) {
      dense[i](dense_of(v), x, ldx, n_tokens, o.y, o.ldy, r0, r1);
    } else if (kn[i].decode_q8 != nullptr) {
      kn[i].decode_q8(v, q8[i], n_tokens, o.y, o.ldy, r0, r1);
    } else {
      kn[i].decode(v, x, ldx, n_tokens, o.y, o.ldy, r0, r1);
    }
  });
}

}  // namespace sparsa::kernels
