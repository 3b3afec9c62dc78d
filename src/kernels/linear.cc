// linear(): argument checks, the (weight dtype, ISA) kernel table, and the two drivers — decode
// (few tokens, W streamed once, rows split across threads) and a BLIS-style blocked GEMM for
// prefill (A packed once per call, a B panel of W rows packed per thread and K block).
#include "sparsa/kernels/linear.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <new>

#include "kernels/kernels_internal.h"
#include "sparsa/core/error.h"

namespace sparsa::kernels {

namespace {

struct ScratchBuffer {
  float* data = nullptr;
  size_t size = 0;
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { ::operator delete[](data, std::align_val_t{64}); }
};

thread_local std::array<ScratchBuffer, static_cast<size_t>(Scratch::kCount)> t_scratch;

struct KernelEntry {
  DType dtype;
  Isa isa;
  LinearKernels kernels;
};

const LinearKernels* find_kernels(DType dtype, Isa isa) {
  static const auto table = [] {
    constexpr DType kDTypes[] = {DType::F32, DType::F16, DType::BF16};
    std::array<KernelEntry, 9> t;
    size_t i = 0;
    for (DType d : kDTypes) {
      t[i++] = {d, Isa::Generic, generic::linear_kernels(d)};
      t[i++] = {d, Isa::Avx2, avx2::linear_kernels(d)};
      t[i++] = {d, Isa::Avx512, avx512::linear_kernels(d)};
    }
    return t;
  }();
  for (const KernelEntry& e : table)
    if (e.dtype == dtype && e.isa == isa) return &e.kernels;
  return nullptr;
}

// Rows are split in multiples of kDecodeRowAlign, so a chunk starts on a panel.
static_assert(kDecodeRowAlign % kPanelRows == 0);

DecodeFn decode_fn(const LinearKernels& kn, const DenseWeight& w) {
  return w.panels ? kn.decode_panels : kn.decode;
}

void decode(const LinearKernels& kn, const DenseWeight& w, const float* x, int64_t ldx,
            int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool) {
  const DecodeFn fn = decode_fn(kn, w);
  split_decode_rows(w.rows, w.cols, pool, [&](int64_t r0, int64_t r1) {
    fn(w, x, ldx, n_tokens, y, ldy, r0, r1);
  });
}

// K block: an A micro-panel [kKc][mr] stays in L1. N panel: the packed B panel
// [kNc / nr][kKc][nr] stays in L2 while every token block of the task streams over it.
constexpr int64_t kKc = 512;
constexpr int64_t kNc = 256;
constexpr int64_t kMinNc = 64;
// Token blocks per task at least, when tasks are split along the tokens too.
constexpr int64_t kMinBlocksPerTask = 4;

void gemm(const LinearKernels& kn, const DenseWeight& w, const float* x, int64_t ldx, int64_t m,
          float* y, int64_t ldy, ThreadPool& pool) {
  const int64_t mr = kn.mr, nr = kn.nr;
  const int64_t n = w.rows, k = w.cols;
  const int64_t m_blocks = (m + mr - 1) / mr;

  float* a_packed = thread_scratch(Scratch::kPackA, static_cast<size_t>(m_blocks * k * mr));
  pool.parallel_for(m_blocks, 1, [&](int64_t b0, int64_t b1) {  // [m_blocks][k][mr]
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t rows = std::min(mr, m - b * mr);
      const float* src = x + b * mr * ldx;
      float* dst = a_packed + b * k * mr;
      for (int64_t kk = 0; kk < k; ++kk)
        for (int64_t i = 0; i < mr; ++i) dst[kk * mr + i] = i < rows ? src[i * ldx + kk] : 0.0f;
    }
  });

  // Tasks: N panels first (narrower ones, down to kMinNc, when there are few), then token chunks,
  // which repeat the packing of their panel.
  const int64_t want = int64_t{4} * pool.size();
  int64_t nc = kNc;
  while (nc / 2 >= std::max(kMinNc, nr) && (n + nc - 1) / nc < want) nc /= 2;
  const int64_t n_panels = (n + nc - 1) / nc;
  int64_t m_chunks = 1;
  if (n_panels < want)
    m_chunks = std::clamp<int64_t>((want + n_panels - 1) / n_panels, 1,
                                   std::max<int64_t>(1, m_blocks / kMinBlocksPerTask));
  const int64_t blocks_per_chunk = (m_blocks + m_chunks - 1) / m_chunks;
  m_chunks = (m_blocks + blocks_per_chunk - 1) / blocks_per_chunk;

  pool.run(n_panels * m_chunks, [&](int64_t task) {
    const int64_t n0 = task / m_chunks * nc;
    const int64_t nn = std::min(nc, n - n0);
    const int64_t mb0 = task % m_chunks * blocks_per_chunk;
    const int64_t mb1 = std::min(m_blocks, mb0 + blocks_per_chunk);
    float* b_packed = thread_scratch(Scratch::kPackB, static_cast<size_t>(kKc * kNc));
    const PackBFn pack_b = w.panels ? kn.pack_b_panels : kn.pack_b;
    for (int64_t k0 = 0; k0 < k; k0 += kKc) {
      const int64_t kc = std::min(kKc, k - k0);
      for (int64_t j = 0; j < nn; j += nr)  // [nn / nr][kc][nr]
        pack_b(w, n0 + j, static_cast<int>(std::min(nr, nn - j)), k0, static_cast<int>(kc),
               b_packed + j * kc);
      for (int64_t mb = mb0; mb < mb1; ++mb) {
        const float* a = a_packed + mb * k * mr + k0 * mr;
        const int rows = static_cast<int>(std::min(mr, m - mb * mr));
        float* c = y + mb * mr * ldy + n0;
        for (int64_t j = 0; j < nn; j += nr)
          kn.micro(rows, static_cast<int>(std::min(nr, nn - j)), kc, a, b_packed + j * kc, c + j,
                   ldy, k0 > 0);
      }
    }
  });
}

}  // namespace

float* thread_scratch(Scratch slot, size_t n_floats) {
  ScratchBuffer& s = t_scratch[static_cast<size_t>(slot)];
  if (s.size < n_floats) {
    ::operator delete[](s.data, std::align_val_t{64});
    s.data = nullptr;
    const size_t size = (std::max(n_floats, s.size + s.size / 2) + 15) / 16 * 16;
    s.data = static_cast<float*>(::operator new[](size * sizeof(float), std::align_val_t{64}));
    s.size = size;
  }
  return s.data;
}

void linear_isa(Isa isa, const DenseWeight& w, const float* x, int64_t ldx, int64_t n_tokens,
                float* y, int64_t ldy, ThreadPool& pool) {
  const LinearKernels* kn = find_kernels(w.dtype, isa);
  SPARSA_CHECK(kn != nullptr && kn->decode != nullptr,
               "linear: weights of dtype {} are not supported (expected F32, F16 or BF16)",
               dtype_name(w.dtype));
  SPARSA_CHECK(static_cast<int>(isa) <= static_cast<int>(detect_isa()),
               "linear: this CPU cannot run the {} kernels", isa_name(isa));
  SPARSA_CHECK(w.rows > 0 && w.cols > 0, "linear: the weight shape [{}, {}] is empty", w.rows,
               w.cols);
  SPARSA_CHECK(n_tokens >= 0, "linear: n_tokens is negative ({})", n_tokens);
  if (n_tokens == 0) return;
  SPARSA_CHECK(w.data != nullptr, "linear: the weight [{}, {}] has no data", w.rows, w.cols);
  SPARSA_CHECK(x != nullptr && y != nullptr, "linear: the input or output pointer is null");
  SPARSA_CHECK(ldx >= w.cols,
               "linear: input row stride ldx = {} is smaller than the weight's {} input features",
               ldx, w.cols);
  SPARSA_CHECK(ldy >= w.rows,
               "linear: output row stride ldy = {} is smaller than the weight's {} output features",
               ldy, w.rows);
  if (n_tokens <= kDenseDecodeMaxTokens) {
    decode(*kn, w, x, ldx, n_tokens, y, ldy, pool);
  } else {
    gemm(*kn, w, x, ldx, n_tokens, y, ldy, pool);
  }
}

namespace {

// 16 × 16 blocks: the block's 16 row pieces are read, and its 16 panel columns (512 bytes of
// bf16) written contiguously.
template <class T>
void copy_to_panels(const T* src, int64_t rows, int64_t cols, T* dst) {
  const int64_t panels = (rows + kPanelRows - 1) / kPanelRows;
  for (int64_t q = 0; q < panels; ++q) {
    T* out = dst + q * kPanelRows * cols;
    const int64_t valid = std::min(kPanelRows, rows - q * kPanelRows);
    if (valid < kPanelRows) std::memset(out, 0, static_cast<size_t>(kPanelRows * cols) * sizeof(T));
    const T* in = src + q * kPanelRows * cols;
    for (int64_t c0 = 0; c0 < cols; c0 += kPanelRows) {
      const int64_t cn = std::min(kPanelRows, cols - c0);
      for (int64_t i = 0; i < valid; ++i)
        for (int64_t j = 0; j < cn; ++j) out[(c0 + j) * kPanelRows + i] = in[i * cols + c0 + j];
    }
  }
}

}  // namespace

void to_panels(const void* src, int64_t rows, int64_t cols, size_t elem_bytes, void* dst) {
  SPARSA_CHECK(rows > 0 && cols > 0 && src != nullptr && dst != nullptr,
               "to_panels: a [{}, {}] weight needs data and a destination", rows, cols);
  SPARSA_CHECK(elem_bytes == 2 || elem_bytes == 4, "to_panels: {}-byte elements", elem_bytes);
  if (elem_bytes == 2) {
    copy_to_panels(static_cast<const uint16_t*>(src), rows, cols, static_cast<uint16_t*>(dst));
  } else {
    copy_to_panels(static_cast<const uint32_t*>(src), rows, cols, static_cast<uint32_t*>(dst));
  }
}

void linear(const DenseWeight& w, const float* x, int64_t ldx, int64_t n_tokens, float* y,
            int64_t ldy, ThreadPool& pool) {
  linear_isa(active_isa(), w, x, ldx, n_tokens, y, ldy, pool);
}

void linear_many(const LinearOutput* outs, int count, const float* x, int64_t ldx,
                 int64_t n_tokens, ThreadPool& pool) {
  const Isa isa = active_isa();
  if (n_tokens > kDenseDecodeMaxTokens || count > kMaxManyOutputs || pool.size() == 1) {
    for (int i = 0; i < count; ++i)
      linear_isa(isa, outs[i].weight, x, ldx, n_tokens, outs[i].y, outs[i].ldy, pool);
    return;
  }
  // Validate each output as linear() does, by running the checks on an empty call.
  DecodeFn kn[kMaxManyOutputs];
  int64_t rows[kMaxManyOutputs];
  for (int i = 0; i < count; ++i) {
    linear_isa(isa, outs[i].weight, x, ldx, 0, outs[i].y, outs[i].ldy, pool);
    SPARSA_CHECK(ldx >= outs[i].weight.cols && outs[i].ldy >= outs[i].weight.rows,
                 "linear_many: output {} has strides ldx = {}, ldy = {} smaller than its weight "
                 "[{}, {}]",
                 i, ldx, outs[i].ldy, outs[i].weight.rows, outs[i].weight.cols);
    kn[i] = decode_fn(*find_kernels(outs[i].weight.dtype, isa), outs[i].weight);
    rows[i] = outs[i].weight.rows;
  }
  if (n_tokens == 0) return;
  SPARSA_CHECK(x != nullptr, "linear_many: the input pointer is null");
  split_decode_outputs(rows, count, pool, [&](int i, int64_t r0, int64_t r1) {
    const LinearOutput& o = outs[i];
    kn[i](o.weight, x, ldx, n_tokens, o.y, o.ldy, r0, r1);
  });
}

}  // namespace sparsa::kernels
