// Packed weights (sparsa/formats) and their kernels (sparsa/kernels/packed_linear.h): packing is
// checked exactly against the compression library's own dequantization, and every (format, ISA)
// this CPU runs against double-precision sums over PackedWeight::dequantize_to, on odd shapes,
// tails, strides, token counts (decode and prefill) and thread counts.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "sparsa/compress/palettize.h"
#include "sparsa/compress/prune.h"
#include "sparsa/compress/quantize.h"
#include "sparsa/core/cpu.h"
#include "sparsa/core/error.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/formats/packed_weight.h"
#include "sparsa/kernels/linear.h"
#include "sparsa/kernels/packed_linear.h"

namespace sparsa::formats {
namespace {

using compress::Mask;
using compress::Matrix;

// Relative to sum_k |x_k w_k| of each output (the kernels accumulate in f32).
constexpr double kTol = 1e-4;

std::vector<Isa> runnable_isas() {
  std::vector<Isa> isas;
  for (int i = 0; i <= static_cast<int>(detect_isa()); ++i) isas.push_back(static_cast<Isa>(i));
  return isas;
}

Matrix random_matrix(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix w(rows, cols);
  for (float& f : w.data) f = dist(rng);
  return w;
}

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& f : v) f = dist(rng);
  return v;
}

// A keep mask: unstructured at `sparsity`, or n:m; empty for dense.
Mask make_mask(const Matrix& w, double sparsity, int n = 0, int m = 0) {
  if (sparsity == 0.0 && m == 0) return {};
  Matrix copy = w;
  return compress::magnitude_prune(copy, compress::SparsityPattern{sparsity, n, m});
}

// The expected weights of a quantized result with a mask: compress::dequantize, pruned = 0.
std::vector<float> expected(const compress::QuantResult& q, const Mask& keep) {
  Matrix out;
  compress::dequantize(q, out);
  for (size_t i = 0; i < keep.size(); ++i)
    if (keep[i] == 0) out.data[i] = 0.0f;
  return out.data;
}

void expect_dequantizes_to(const PackedWeight& pw, const std::vector<float>& want,
                           const std::string& what) {
  std::vector<float> got(static_cast<size_t>(pw.rows() * pw.cols()));
  pw.dequantize_to(got.data());
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i]) {
      ADD_FAILURE() << what << ": weight " << i / pw.cols() << ", " << i % pw.cols() << " is "
                    << got[i] << ", expected " << want[i];
      return;
    }
}

// The int8 decode input as packed_linear.h defines it, in the input's own column order: token
// t's stored columns (perm) in blocks of 128, s = max|x| / 127, x̂ = s · round-half-even(x / s).
struct QuantizedX {
  std::vector<float> xhat;   // [n_tokens, cols]
  std::vector<float> step;   // [n_tokens, cols]: s of the column's block
};
QuantizedX quantize_like_decode(const PackedView& v, const float* x, int64_t ldx, int64_t n) {
  QuantizedX q;
  const int64_t cols = v.cols;
  q.xhat.resize(static_cast<size_t>(n * cols));
  q.step.resize(q.xhat.size());
  for (int64_t t = 0; t < n; ++t)
    for (int64_t b0 = 0; b0 < cols; b0 += 128) {
      const int64_t b1 = std::min<int64_t>(cols, b0 + 128);
      const auto col = [&](int64_t j) { return v.perm != nullptr ? v.perm[j] : j; };
      float amax = 0.0f;
      for (int64_t j = b0; j < b1; ++j) amax = std::max(amax, std::abs(x[t * ldx + col(j)]));
      const float s = amax / 127.0f;
      for (int64_t j = b0; j < b1; ++j) {
        const int64_t k = t * cols + col(j);
        q.xhat[k] = s > 0.0f ? s * std::nearbyint(x[t * ldx + col(j)] / s) : 0.0f;
        q.step[k] = s;
      }
    }
  return q;
}

// Every runnable ISA × decode input × threads × token counts against the reference over
// dequantize_to. With DecodeInput::Int8 where the kernel quantizes its input, the result is
// checked twice: tightly against the reference on the same quantized input, and against the
// exact reference within the error bound of that rounding, Σ_k |w_k| · s_k / 2. Palettes' int8
// kernels use their tables as 8-bit (<= 16 entries) or 16-bit integers: the tight check uses the
// weights rounded as those tables round them, and the bound grows by Σ_k |x̂_k| · step / 2. Outputs are written
// with a padded stride whose pads must stay untouched.
void check_kernels(const PackedWeight& pw, const std::string& what,
                   const std::vector<int64_t>& token_counts = {1, 2, 3, 5, 8, 9, 21}) {
  const int64_t rows = pw.rows(), cols = pw.cols();
  const PackedView& v = pw.view();
  std::vector<float> w(static_cast<size_t>(rows * cols));
  pw.dequantize_to(w.data());
  const int64_t max_n = *std::max_element(token_counts.begin(), token_counts.end());
  const int64_t ldx = cols + 3, ldy = rows + 5;
  const std::vector<float> x = random_floats(static_cast<size_t>(max_n * ldx), 17);
  const int64_t max_q = std::min<int64_t>(max_n, 8);
  const QuantizedX xq = quantize_like_decode(v, x.data(), ldx, max_q);
  std::vector<double> ref(static_cast<size_t>(max_n * rows)), bound(ref.size());
  std::vector<double> ref_q(static_cast<size_t>(max_q * rows)), bound_q(ref_q.size()),
      bound_round(ref_q.size());
  for (int64_t t = 0; t < max_n; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t tbl = v.group_rows > 0 ? r / v.group_rows : 0;
      const double lut_step = v.lut_u8 != nullptr      ? 0.5 * v.lut_u8_scale[tbl]
                              : v.lut_qscale != nullptr ? 0.5 * v.lut_qscale[tbl]
                                                        : 0.0;
      // A weight as the int8-input kernel's table holds it (the palette entry rounded to the
      // table's integer grid).
      const auto table_value = [&](double wk) {
        if (v.lut_u8 != nullptr) {
          const double sc = v.lut_u8_scale[tbl], z = v.lut_u8_zero[tbl];
          return sc * (std::clamp(std::nearbyint(wk / sc) + z, 0.0, 255.0) - z);
        }
        if (v.lut_qscale != nullptr) return v.lut_qscale[tbl] * std::nearbyint(wk / v.lut_qscale[tbl]);
        return wk;
      };
      double s = 0.0, a = 0.0, sq = 0.0, aq = 0.0, round = 0.0;
      for (int64_t k = 0; k < cols; ++k) {
        const double wk = w[r * cols + k];
        const double p = double{x[t * ldx + k]} * wk;
        s += p;
        a += std::abs(p);
        if (t < max_q) {
          const double xh = xq.xhat[t * cols + k], wq = table_value(wk);
          sq += xh * wq;
          aq += std::abs(xh * wq);
          round += std::abs(wk) * 0.5 * xq.step[t * cols + k] + std::abs(xh) * lut_step;
        }
      }
      ref[t * rows + r] = s;
      bound[t * rows + r] = kTol * a + 1e-30;
      if (t < max_q) {
        ref_q[t * rows + r] = sq;
        bound_q[t * rows + r] = kTol * aq + 1e-30;
        bound_round[t * rows + r] = 1.001 * round + kTol * a + 1e-30;
      }
    }
  const float sentinel = std::numeric_limits<float>::quiet_NaN();
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    for (Isa isa : runnable_isas())
      for (kernels::DecodeInput input : {kernels::DecodeInput::F32, kernels::DecodeInput::Int8})
        for (int64_t n : token_counts) {
          const bool quantized = input == kernels::DecodeInput::Int8 && n <= 8 &&
                                 kernels::decode_quantizes_input(pw, isa);
          if (input == kernels::DecodeInput::Int8 && n > 8) continue;  // prefill: f32 input
          std::vector<float> y(static_cast<size_t>(n * ldy), sentinel);
          kernels::linear_isa(isa, input, pw, x.data(), ldx, n, y.data(), ldy, pool);
          const std::string where =
              fmt::format("{} [{}, {}] {} {} threads={} n_tokens={}", what, rows, cols,
                          isa_name(isa), quantized ? "int8-input" : "f32-input", threads, n);
          for (int64_t t = 0; t < n; ++t) {
            for (int64_t r = 0; r < rows; ++r) {
              const size_t i = static_cast<size_t>(t * rows + r);
              const double got = y[t * ldy + r];
              const double err = std::abs(got - ref[i]);
              if (!quantized && !(err <= bound[i])) {
                ADD_FAILURE() << where << ": y[" << t << ", " << r << "] = " << got
                              << ", reference " << ref[i];
                return;
              }
              if (quantized && !(std::abs(got - ref_q[i]) <= bound_q[i] && err <= bound_round[i])) {
                ADD_FAILURE() << where << ": y[" << t << ", " << r << "] = " << got
                              << ", reference on the quantized input " << ref_q[i]
                              << ", exact reference " << ref[i] << " (rounding bound "
                              << bound_round[i] << ")";
                return;
              }
            }
            for (int64_t r = rows; r < ldy; ++r)
              if (!std::isnan(y[t * ldy + r])) {
                ADD_FAILURE() << where << ": wrote past the row into y[" << t << ", " << r << "]";
                return;
              }
          }
        }
  }
}

struct Shape {
  int64_t rows, cols;
};
// Rows that are not a multiple of 16, columns with tails of every size class; 576 columns make
// 9 blocks, in groups of 192 (3 blocks) in PackedQuant.GroupsOfOddBlockCounts.
const Shape kShapes[] = {{7, 64}, {33, 100}, {19, 200}, {70, 320}};

// ---- quantized ----------------------------------------------------------------------------

struct QuantCase {
  int bits;
  int64_t group;  // 0: per channel; -1: half of cols (not a multiple of 64)
};

TEST(PackedQuant, DenseMatchesCompressAndReference) {
  for (const QuantCase qc : {QuantCase{8, 64}, QuantCase{4, 64}, QuantCase{3, 64}, QuantCase{2, 64},
                             QuantCase{4, 0}, QuantCase{4, -1}, QuantCase{5, 0}, QuantCase{3, -1}})
    for (const Shape s : kShapes) {
      const int64_t group = qc.group < 0 ? s.cols / 2 : qc.group;
      if (group > 0 && s.cols % group != 0) continue;
      Matrix w = random_matrix(s.rows, s.cols, static_cast<uint32_t>(s.rows + qc.bits));
      const auto q = compress::rtn_quantize(
          w, {.bits = qc.bits, .symmetric = qc.bits == 8, .group_size = group});
      const PackedWeight pw = pack_quantized(q);
      const std::string what = pw.describe();
      EXPECT_EQ(pw.positions(), Positions::All) << what;
      expect_dequantizes_to(pw, expected(q, {}), what);
      check_kernels(pw, what);
    }
}

// Groups of an odd number of 64-column blocks (192 columns): kernels that read two blocks at a
// time meet blocks of two groups together.
TEST(PackedQuant, GroupsOfOddBlockCounts) {
  for (int bits : {8, 4, 3, 2}) {
    Matrix w = random_matrix(21, 576, static_cast<uint32_t>(bits));
    const auto q = compress::rtn_quantize(w, {.bits = bits, .group_size = 192});
    const PackedWeight pw = pack_quantized(q);
    expect_dequantizes_to(pw, expected(q, {}), pw.describe());
    check_kernels(pw, pw.describe(), {1, 2, 8});
    const Mask keep = make_mask(w, 0.6);
    const auto qs = compress::rtn_quantize(w, {.bits = bits, .group_size = 192}, &keep);
    const PackedWeight sparse = pack_quantized(qs, &keep, SparseEncoding::Bitmask);
    expect_dequantizes_to(sparse, expected(qs, keep), sparse.describe());
    check_kernels(sparse, sparse.describe(), {1, 3});
  }
}

TEST(PackedQuant, SparseMatchesCompressAndReference) {
  struct SparseCase {
    double sparsity;
    int n, m;
  };
  for (const SparseCase sc : {SparseCase{0.5, 0, 0}, SparseCase{0.7, 0, 0}, SparseCase{0.9, 0, 0},
                              SparseCase{0, 2, 4}})
    for (int bits : {8, 4, 3})
      for (const Shape s : kShapes) {
        if (sc.m > 0 && s.cols % sc.m != 0) continue;
        Matrix w = random_matrix(s.rows, s.cols, static_cast<uint32_t>(s.cols + bits));
        const Mask keep = make_mask(w, sc.sparsity, sc.n, sc.m);
        const int64_t group = s.cols % 64 == 0 ? 64 : 0;
        const auto q = compress::rtn_quantize(w, {.bits = bits, .group_size = group}, &keep);
        for (SparseEncoding enc : {SparseEncoding::Bitmask, SparseEncoding::All}) {
          const PackedWeight pw = pack_quantized(q, &keep, enc);
          const std::string what = pw.describe();
          EXPECT_EQ(pw.positions(),
                    enc == SparseEncoding::All ? Positions::All : Positions::Bitmask);
          expect_dequantizes_to(pw, expected(q, keep), what);
          check_kernels(pw, what, {1, 4, 8, 13});
        }
      }
}

TEST(PackedQuant, AutoEncodingPicksTheSmallerLayout) {
  Matrix w = random_matrix(64, 256, 3);
  const Mask light = make_mask(w, 0.1), heavy = make_mask(w, 0.7), nm = make_mask(w, 0, 2, 4);
  const auto q = compress::rtn_quantize(w, {.bits = 4, .group_size = 128});
  EXPECT_EQ(pack_quantized(q, &light).positions(), Positions::All);
  const PackedWeight sparse = pack_quantized(q, &heavy);
  EXPECT_EQ(sparse.positions(), Positions::Bitmask);
  EXPECT_LT(sparse.bytes(), pack_quantized(q).bytes());
  const PackedWeight two_four = pack_quantized(q, &nm);
  EXPECT_EQ(two_four.positions(), Positions::Bitmask);
  EXPECT_EQ(two_four.nm_n(), 2);
  EXPECT_EQ(two_four.nm_m(), 4);
  EXPECT_EQ(two_four.describe(), "sparse2:4-int4g128");
  // A clone owns its own storage and decodes to the same weights.
  std::vector<float> a(64 * 256), b(a.size());
  const PackedWeight copy = sparse.clone();
  EXPECT_NE(copy.view().codes, sparse.view().codes);
  EXPECT_EQ(copy.bytes(), sparse.bytes());
  sparse.dequantize_to(a.data());
  copy.dequantize_to(b.data());
  EXPECT_EQ(a, b);
  // int4 g128: 32 bytes of codes per 64 weights, a 2-byte (f16) scale and a 1-byte zero per 128.
  EXPECT_EQ(pack_quantized(q).bytes(), 64u * (256 / 2 + 2 * 3));
}

// GPTQ act-order: columns in any order of groups. The packed weight stores them sorted by group
// and the kernels gather x through the permutation.
TEST(PackedQuant, ActOrderColumnsArePermutedBack) {
  Matrix w = random_matrix(40, 192, 5);
  const auto q = compress::rtn_quantize(w, {.bits = 4, .group_size = 64});
  std::vector<int32_t> sigma(192);
  std::iota(sigma.begin(), sigma.end(), 0);
  std::shuffle(sigma.begin(), sigma.end(), std::mt19937(1));
  compress::QuantResult shuffled = q;
  for (int64_t c = 0; c < 192; ++c) {
    shuffled.g_idx[c] = q.g_idx[sigma[c]];
    for (int64_t r = 0; r < 40; ++r) shuffled.codes[r * 192 + c] = q.codes[r * 192 + sigma[c]];
  }
  const Mask keep = make_mask(w, 0.6);
  for (const Mask* k : {static_cast<const Mask*>(nullptr), &keep}) {
    const PackedWeight pw = pack_quantized(shuffled, k);
    EXPECT_NE(pw.describe().find("actorder"), std::string::npos) << pw.describe();
    expect_dequantizes_to(pw, expected(shuffled, k == nullptr ? Mask{} : *k), pw.describe());
    check_kernels(pw, pw.describe(), {1, 3, 12});
  }
}

// ---- sparse bf16 and int via pack_sparse --------------------------------------------------

TEST(PackedSparse, Bf16AndIntValues) {
  for (double sparsity : {0.5, 0.7, 0.9})
    for (const Shape s : kShapes) {
      Matrix w = random_matrix(s.rows, s.cols, 9);
      const Mask keep = make_mask(w, sparsity);
      const PackedWeight bf = pack_sparse(w, keep, {});
      std::vector<float> want(w.data.size());
      for (size_t i = 0; i < want.size(); ++i)
        want[i] = keep[i] != 0 ? bf16_to_f32(f32_to_bf16(w.data[i])) : 0.0f;
      expect_dequantizes_to(bf, want, bf.describe());
      check_kernels(bf, bf.describe(), {1, 2, 8, 11});
      ValueFormat int4{.kind = ValueFormat::Int, .bits = 4, .group_size = 0};
      const PackedWeight q4 = pack_sparse(w, keep, int4);
      EXPECT_EQ(q4.codec(), Codec::Int);
      check_kernels(q4, q4.describe(), {1, 5});
    }
}

// ---- palettes -----------------------------------------------------------------------------

// Rows per palette that divide the rows (palettize requires it) into several tables.
int64_t largest_proper_divisor(int64_t n) {
  for (int64_t p = 2; p < n; ++p)
    if (n % p == 0) return n / p;
  return 1;
}

TEST(PackedPalette, DenseAndSparseMatchTheTable) {
  for (int bits : {2, 3, 4, 6})
    for (const Shape s : kShapes)
      for (int64_t group_rows : {int64_t{0}, largest_proper_divisor(s.rows)}) {
        if (group_rows == 1) continue;
        Matrix w = random_matrix(s.rows, s.cols, static_cast<uint32_t>(bits * 7 + s.rows));
        compress::PaletteOptions opts;
        opts.bits = bits;
        opts.group_rows = group_rows;
        opts.max_iters = 5;
        Matrix pw_src = w;
        const compress::Palette pal = compress::palettize(pw_src, opts);
        const Mask keep = make_mask(w, 0.5);
        for (const Mask* k : {static_cast<const Mask*>(nullptr), &keep}) {
          const PackedWeight pw = pack_palette(pal, s.cols, k);
          std::vector<float> want(pw_src.data);
          if (k != nullptr)
            for (size_t i = 0; i < want.size(); ++i)
              if (keep[i] == 0) want[i] = 0.0f;
          expect_dequantizes_to(pw, want, pw.describe());
          check_kernels(pw, pw.describe(), {1, 3, 8, 10});
        }
      }
}

// ---- dense --------------------------------------------------------------------------------

TEST(PackedDense, BitwiseEqualToTheDenseKernels) {
  ThreadPool pool(2);
  const int64_t rows = 45, cols = 130;
  const Matrix w = random_matrix(rows, cols, 4);
  std::vector<uint16_t> bf(w.data.size());
  for (size_t i = 0; i < bf.size(); ++i) bf[i] = f32_to_bf16(w.data[i]);
  const std::vector<float> x = random_floats(static_cast<size_t>(20 * cols), 6);
  for (DType d : {DType::F32, DType::BF16})
    for (bool copy : {false, true}) {
      const void* data = d == DType::F32 ? static_cast<const void*>(w.data.data()) : bf.data();
      const PackedWeight pw = pack_dense(d, rows, cols, data, copy);
      EXPECT_EQ(pw.bytes(), static_cast<size_t>(rows * cols) * dtype_size(d));
      for (int64_t n : {1, 5, 20}) {
        std::vector<float> a(static_cast<size_t>(n * rows)), b(a.size());
        kernels::linear(pw, x.data(), cols, n, a.data(), rows, pool);
        kernels::linear(kernels::DenseWeight{d, rows, cols, data}, x.data(), cols, n, b.data(),
                        rows, pool);
        EXPECT_EQ(a, b) << dtype_name(d) << " n_tokens=" << n;
      }
    }
}

// The panel copy: the same values (dequantize_to), the padded bytes counted, and the same
// results as the dense panel kernels on a panel copy made by hand.
TEST(PackedDense, PanelCopyHoldsTheWeightsAndRunsThePanelKernels) {
  ThreadPool pool(2);
  const int64_t rows = 45, cols = 130;  // 45 rows: the third panel has 13 rows and 3 of padding
  const Matrix w = random_matrix(rows, cols, 4);
  std::vector<uint16_t> bf(w.data.size());
  for (size_t i = 0; i < bf.size(); ++i) bf[i] = f32_to_bf16(w.data[i]);
  const std::vector<float> x = random_floats(static_cast<size_t>(20 * cols), 6);
  for (DType d : {DType::F32, DType::BF16}) {
    const void* data = d == DType::F32 ? static_cast<const void*>(w.data.data()) : bf.data();
    const PackedWeight pw = pack_dense(d, rows, cols, data, true, true);
    EXPECT_TRUE(pw.view().panels);
    EXPECT_EQ(pw.bytes(), static_cast<size_t>(48 * cols) * dtype_size(d));
    std::vector<float> deq(static_cast<size_t>(rows * cols));
    pw.dequantize_to(deq.data());
    for (int64_t i = 0; i < rows * cols; ++i)
      ASSERT_EQ(deq[static_cast<size_t>(i)],
                d == DType::F32 ? w.data[static_cast<size_t>(i)] : bf16_to_f32(bf[static_cast<size_t>(i)]))
          << dtype_name(d) << " element " << i;
    std::vector<uint8_t> by_hand(static_cast<size_t>(kernels::panel_elements(rows, cols)) *
                                 dtype_size(d));
    kernels::to_panels(data, rows, cols, dtype_size(d), by_hand.data());
    for (int64_t n : {1, 5, 8, 20}) {
      std::vector<float> a(static_cast<size_t>(n * rows)), b(a.size());
      kernels::linear(pw, x.data(), cols, n, a.data(), rows, pool);
      kernels::linear(kernels::DenseWeight{d, rows, cols, by_hand.data(), true}, x.data(), cols,
                      n, b.data(), rows, pool);
      EXPECT_EQ(a, b) << dtype_name(d) << " n_tokens=" << n;
    }
  }
}

// ---- linear_many --------------------------------------------------------------------------

TEST(PackedLinearMany, EqualsOneLinearCallPerWeight) {
  Matrix a = random_matrix(517, 128, 1), b = random_matrix(40, 128, 2), c = random_matrix(200, 128, 3);
  const auto qa = compress::rtn_quantize(a, {.bits = 4, .group_size = 64});
  const Mask keep = make_mask(c, 0.7);
  std::vector<uint16_t> bf(b.data.size());
  for (size_t i = 0; i < bf.size(); ++i) bf[i] = f32_to_bf16(b.data[i]);
  const PackedWeight ws[4] = {pack_quantized(qa), pack_dense(DType::BF16, 40, 128, bf.data(), false),
                              pack_sparse(c, keep, {}),
                              pack_dense(DType::BF16, 40, 128, bf.data(), true, true)};
  const std::vector<float> x = random_floats(128 * 12, 14);
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    for (int64_t n : {1, 3, 8, 12}) {
      std::vector<float> want[4], got[4];
      kernels::PackedLinearOutput outs[4];
      for (int i = 0; i < 4; ++i) {
        const int64_t ld = ws[i].rows() + 5;
        want[i].assign(static_cast<size_t>(ld * n), -7.0f);
        got[i] = want[i];
        kernels::linear(ws[i], x.data(), 128, n, want[i].data(), ld, pool);
        outs[i] = {&ws[i], got[i].data(), ld};
      }
      kernels::linear_many(outs, 4, x.data(), 128, n, pool);
      for (int i = 0; i < 4; ++i)
        EXPECT_EQ(got[i], want[i]) << "output " << i << " n_tokens=" << n << " threads=" << threads;
    }
  }
}

// ---- bad arguments ------------------------------------------------------------------------

template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(PackedErrors, RejectBadArgumentsWithClearMessages) {
  Matrix w = random_matrix(8, 64, 1);
  const auto q = compress::rtn_quantize(w, {.bits = 4, .group_size = 32});
  expect_error([&] { pack_dense(DType::I8, 8, 64, w.data.data(), false); }, "dtype I8");
  expect_error([&] { pack_dense(DType::F32, 0, 64, w.data.data(), false); }, "[0, 64] is empty");
  expect_error([&] { pack_dense(DType::F32, 8, 64, nullptr, false); }, "has no data");
  auto bad_bits = q;
  bad_bits.bits = 9;
  expect_error([&] { pack_quantized(bad_bits); }, "9 bits");
  auto bad_codes = q;
  bad_codes.codes.pop_back();
  expect_error([&] { pack_quantized(bad_codes); }, "codes do not fill");
  auto big_code = q;
  big_code.codes[3] = 16;
  expect_error([&] { pack_quantized(big_code); }, "code 16 does not fit in 4 bits");
  auto bad_gidx = q;
  bad_gidx.g_idx[5] = 7;
  expect_error([&] { pack_quantized(bad_gidx); }, "g_idx[5] = 7");
  auto uneven = q;
  uneven.g_idx[0] = 1;
  expect_error([&] { pack_quantized(uneven); }, "group 0 has 31 columns");
  const Mask short_mask(10, 1);
  expect_error([&] { pack_quantized(q, &short_mask); }, "keep mask has 10 entries");
  compress::Palette pal;
  pal.bits = 2;
  pal.group_rows = 8;
  pal.lut = {0.f, 1.f, 2.f};
  pal.indices.assign(8 * 64, 0);
  expect_error([&] { pack_palette(pal, 64); }, "3 table entries");
  pal.lut.push_back(3.f);
  expect_error([&] { pack_palette(pal, 60); }, "do not fill rows of 60 columns");
  const PackedWeight pw = pack_quantized(q);
  ThreadPool pool(1);
  std::vector<float> x(64), y(8);
  expect_error([&] { kernels::linear(pw, x.data(), 32, 1, y.data(), 8, pool); }, "ldx = 32");
  expect_error([&] { kernels::linear(pw, x.data(), 64, 1, y.data(), 4, pool); }, "ldy = 4");
  expect_error([&] { kernels::linear(PackedWeight{}, x.data(), 64, 1, y.data(), 8, pool); },
               "empty");
}

// Scales are stored as f16: a checkpoint's f32 scales off the f16 grid decode with their nearest
// f16 value (every kernel reads the same stored scale), and one beyond f16's range is refused.
TEST(PackedQuant, ScalesAreStoredAsF16) {
  Matrix w = random_matrix(13, 256, 4);
  auto q = compress::rtn_quantize(w, {.bits = 4, .group_size = 128});
  for (size_t i = 0; i < q.scales.size(); ++i) q.scales[i] *= 1.0f + 1e-4f * static_cast<float>(i);
  compress::QuantResult rounded = q;
  int off_grid = 0;
  for (float& sc : rounded.scales) {
    const float h = f16_to_f32(f32_to_f16(sc));
    off_grid += h != sc;
    sc = h;
  }
  ASSERT_GT(off_grid, 20);
  const PackedWeight pw = pack_quantized(q);
  expect_dequantizes_to(pw, expected(rounded, {}), pw.describe());
  check_kernels(pw, pw.describe(), {1, 3});
  auto huge = q;
  huge.scales[7] = 7e4f;
  expect_error([&] { pack_quantized(huge); },
               "scale 70000 of row 3 group 1 is outside f16's range");
  // Rows of more than 1024 groups (here 1032 of 32 columns) run on the kernels of f32 input.
  Matrix wide = random_matrix(3, 1032 * 32, 6);
  const PackedWeight many =
      pack_quantized(compress::rtn_quantize(wide, {.bits = 4, .group_size = 32}));
  check_kernels(many, many.describe(), {1, 2});
  Matrix big(1, 64);
  big.data.assign(64, 1e6f);
  expect_error([&] { compress::rtn_quantize(big, {.bits = 4, .group_size = 64}); },
               "beyond f16's range");
}

// ---- decode input coding ------------------------------------------------------------------

TEST(PackedDecodeInput, ParsesSelectsAndReportsTheInt8Path) {
  EXPECT_EQ(kernels::parse_decode_input("int8"), kernels::DecodeInput::Int8);
  EXPECT_EQ(kernels::parse_decode_input("f32"), kernels::DecodeInput::F32);
  expect_error([] { kernels::parse_decode_input("int4"); }, "unknown decode input 'int4'");

  Matrix w = random_matrix(96, 256, 8);
  const auto q = compress::rtn_quantize(w, {.bits = 4, .group_size = 128});
  const PackedWeight pw = pack_quantized(q);
  const bool vnni = cpu_has_avx512_vnni();
  EXPECT_EQ(kernels::decode_quantizes_input(pw, detect_isa()), vnni);
  EXPECT_FALSE(kernels::decode_quantizes_input(pw, Isa::Generic));
  std::vector<uint16_t> bf(w.data.size());
  const PackedWeight dense = pack_dense(DType::BF16, 96, 256, bf.data(), false);
  EXPECT_FALSE(kernels::decode_quantizes_input(dense, detect_isa()));
  // Group sizes that split a 64-column block have no int8 kernel.
  const auto q96 = compress::rtn_quantize(w, {.bits = 4, .group_size = 32});
  EXPECT_FALSE(kernels::decode_quantizes_input(pack_quantized(q96), detect_isa()));

  // linear() follows the process-wide setting.
  ThreadPool pool(2);
  const std::vector<float> x = random_floats(256 * 2, 3);
  const kernels::DecodeInput saved = kernels::decode_input();
  for (kernels::DecodeInput in : {kernels::DecodeInput::F32, kernels::DecodeInput::Int8}) {
    kernels::set_decode_input(in);
    EXPECT_EQ(kernels::decode_input(), in);
    std::vector<float> a(2 * 96), b(a.size());
    kernels::linear(pw, x.data(), 256, 2, a.data(), 96, pool);
    kernels::linear_isa(active_isa(), in, pw, x.data(), 256, 2, b.data(), 96, pool);
    EXPECT_EQ(a, b);
  }
  kernels::set_decode_input(saved);
}

}  // namespace
}  // namespace sparsa::formats
