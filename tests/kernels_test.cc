// Every (weight dtype, ISA) this CPU can run, against the double-precision references in
// sparsa::kernels::reference, on odd shapes, tails, strides and thread counts.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "sparsa/core/cpu.h"
#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::kernels {
namespace {

// A dot product of n terms accumulated in f32 is within about eps · sqrt(n) · sum |x_k w_k| of
// the exact value; this bound leaves a margin of ~15× over eps = 6e-8 for blocked sums.
constexpr double kLinearTol = 1e-6;
// Attention outputs are convex combinations of values in [-1, 1].
constexpr double kAttentionTol = 1e-5;

std::vector<Isa> runnable_isas() {
  std::vector<Isa> isas;
  for (int i = 0; i <= static_cast<int>(detect_isa()); ++i) isas.push_back(static_cast<Isa>(i));
  return isas;
}

std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& f : v) f = dist(rng);
  return v;
}

// Weights [rows, cols] of one dtype, and the same values widened back to f32.
struct TestWeight {
  DType dtype;
  int64_t rows, cols;
  std::vector<float> f32;
  std::vector<uint16_t> half;

  TestWeight(DType d, int64_t r, int64_t c, uint32_t seed) : dtype(d), rows(r), cols(c) {
    f32 = random_floats(static_cast<size_t>(r * c), seed);
    if (d == DType::F32) return;
    half.resize(f32.size());
    for (size_t i = 0; i < f32.size(); ++i) {
      half[i] = d == DType::BF16 ? f32_to_bf16(f32[i]) : f32_to_f16(f32[i]);
      f32[i] = d == DType::BF16 ? bf16_to_f32(half[i]) : f16_to_f32(half[i]);
    }
  }
  std::vector<uint8_t> panel_data;  // the panel layout, once asked for

  DenseWeight view() const {
    return {dtype, rows, cols,
            dtype == DType::F32 ? static_cast<const void*>(f32.data()) : half.data()};
  }
  // The same weights in the panel layout, built by to_panels() and checked element by element
  // against the row-major ones through weight_index().
  DenseWeight panels() {
    const DenseWeight rm = view();
    const size_t elem = dtype_size(dtype);
    panel_data.assign(static_cast<size_t>(panel_elements(rows, cols)) * elem, 0xff);
    to_panels(rm.data, rows, cols, elem, panel_data.data());
    DenseWeight pw{dtype, rows, cols, panel_data.data(), true};
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        EXPECT_EQ(std::memcmp(panel_data.data() + weight_index(pw, r, c) * elem,
                              static_cast<const uint8_t*>(rm.data) + (r * cols + c) * elem, elem),
                  0)
            << "panel copy of (" << r << ", " << c << ")";
    const int64_t padded_rows = panel_elements(rows, cols) / cols;
    for (int64_t r = rows; r < padded_rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        for (size_t b = 0; b < elem; ++b)
          EXPECT_EQ(panel_data[static_cast<size_t>(weight_index(pw, r, c)) * elem + b], 0)
              << "padding row " << r << ", column " << c;
    return pw;
  }
};

std::string describe(Isa isa, DType d, int64_t rows, int64_t cols, int64_t n, int threads) {
  return fmt::format("{} {} rows={} cols={} n_tokens={} threads={}", isa_name(isa), dtype_name(d),
                     rows, cols, n, threads);
}

// Runs linear_isa on every runnable ISA and both thread counts, with padded strides, and checks
// every output against the reference and every pad against being written.
void check_linear(DType dtype, int64_t rows, int64_t cols, int64_t n, ThreadPool* pools[2],
                  bool panels = false) {
  TestWeight w(dtype, rows, cols, static_cast<uint32_t>(rows * 1000 + cols));
  const DenseWeight run = panels ? w.panels() : w.view();
  const int64_t ldx = cols + 3, ldy = rows + 5;
  const std::vector<float> x = random_floats(static_cast<size_t>(n * ldx), 7u + n);
  std::vector<float> ref(static_cast<size_t>(n * ldy));
  reference::linear(w.view(), x.data(), ldx, n, ref.data(), ldy);
  std::vector<double> bound(static_cast<size_t>(n * rows));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0.0;
      for (int64_t k = 0; k < cols; ++k)
        s += std::abs(double{x[t * ldx + k]} * w.f32[r * cols + k]);
      bound[t * rows + r] = kLinearTol * std::sqrt(static_cast<double>(cols)) * s + 1e-30;
    }
  const float sentinel = std::numeric_limits<float>::quiet_NaN();
  for (Isa isa : runnable_isas())
    for (int p = 0; p < 2; ++p) {
      std::vector<float> y(static_cast<size_t>(n * ldy), sentinel);
      linear_isa(isa, run, x.data(), ldx, n, y.data(), ldy, *pools[p]);
      const std::string what =
          describe(isa, dtype, rows, cols, n, pools[p]->size()) + (panels ? " (panels)" : "");
      int failures = 0;
      for (int64_t t = 0; t < n && failures < 5; ++t) {
        for (int64_t r = 0; r < rows; ++r) {
          const double err = std::abs(double{y[t * ldy + r]} - ref[t * ldy + r]);
          if (!(err <= bound[t * rows + r])) {
            ADD_FAILURE() << what << ": y[" << t << ", " << r << "] = " << y[t * ldy + r]
                          << ", reference " << ref[t * ldy + r];
            ++failures;
          }
        }
        for (int64_t r = rows; r < ldy; ++r)
          if (!std::isnan(y[t * ldy + r])) {
            ADD_FAILURE() << what << ": wrote past the row into y[" << t << ", " << r << "]";
            ++failures;
          }
      }
    }
}

class LinearTest : public ::testing::TestWithParam<DType> {
 protected:
  ThreadPool one_{1}, two_{2};
  ThreadPool* pools_[2] = {&one_, &two_};
};

TEST_P(LinearTest, MatchesReferenceOnOddShapes) {
  for (int64_t rows : {1, 7, 33, 100})
    for (int64_t cols : {1, 15, 17, 100, 513})
      for (int64_t n : {1, 2, 3, 8, 9, 13, 64}) check_linear(GetParam(), rows, cols, n, pools_);
}

// Several N panels and K blocks of the GEMM, a row tail in the last panel, and token counts
// that split the work along the tokens too.
TEST_P(LinearTest, MatchesReferenceOnBlockedShapes) {
  check_linear(GetParam(), 520, 600, 50, pools_);
  check_linear(GetParam(), 40, 70, 200, pools_);
  check_linear(GetParam(), 300, 257, 5, pools_);
  check_linear(GetParam(), 1000, 64, 1, pools_);
  check_linear(GetParam(), 19, 4103, 1, pools_);  // long rows: 8-row tiles for one token
  check_linear(GetParam(), 9, 5000, 3, pools_);
}

// The panel layout: row tails inside the last panel, every token count of the decode tiles
// (1 .. 16) and the GEMM above them.
TEST_P(LinearTest, PanelLayoutMatchesReferenceOnOddShapes) {
  for (int64_t rows : {1, 7, 16, 33, 100})
    for (int64_t cols : {1, 15, 100, 513})
      for (int64_t n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 64})
        check_linear(GetParam(), rows, cols, n, pools_, true);
}

TEST_P(LinearTest, PanelLayoutMatchesReferenceOnBlockedShapes) {
  check_linear(GetParam(), 520, 600, 50, pools_, true);
  check_linear(GetParam(), 300, 257, 5, pools_, true);
  check_linear(GetParam(), 1000, 64, 1, pools_, true);
  check_linear(GetParam(), 1000, 64, 8, pools_, true);
  check_linear(GetParam(), 19, 4103, 1, pools_, true);
}

INSTANTIATE_TEST_SUITE_P(Kernel, LinearTest, ::testing::Values(DType::F32, DType::F16, DType::BF16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(LinearDispatch, ActiveIsaEntryPointMatchesExplicitOne) {
  ThreadPool pool(2);
  const TestWeight w(DType::BF16, 64, 96, 3);
  const std::vector<float> x = random_floats(96 * 20, 4);
  for (int64_t n : {1, 20}) {
    std::vector<float> a(static_cast<size_t>(64 * n)), b(a.size());
    linear(w.view(), x.data(), 96, n, a.data(), 64, pool);
    linear_isa(active_isa(), w.view(), x.data(), 96, n, b.data(), 64, pool);
    EXPECT_EQ(a, b);
  }
}

// linear_many runs several weights over one input in one parallel region: the results must be
// exactly those of one linear() call per weight, for decode and prefill token counts, mixed
// dtypes and row counts that do not divide into the chunks.
TEST(LinearMany, EqualsOneLinearCallPerWeight) {
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    TestWeight a(DType::BF16, 517, 96, 11), b(DType::F32, 40, 96, 12), c(DType::F16, 1030, 96, 13),
        d(DType::BF16, 200, 96, 15);
    const DenseWeight dp = d.panels();  // one output in the panel layout
    const std::vector<float> x = random_floats(96 * 20, 14);
    for (int64_t n : {1, 3, 8, 20}) {
      const DenseWeight views[4] = {a.view(), b.view(), c.view(), dp};
      std::vector<float> want[4], got[4];
      LinearOutput outs[4];
      for (int i = 0; i < 4; ++i) {
        const int64_t ld = views[i].rows + 5;
        want[i].assign(static_cast<size_t>(ld * n), -7.0f);
        got[i] = want[i];
        linear(views[i], x.data(), 96, n, want[i].data(), ld, pool);
        outs[i] = {views[i], got[i].data(), ld};
      }
      linear_many(outs, 4, x.data(), 96, n, pool);
      for (int i = 0; i < 4; ++i)
        EXPECT_EQ(got[i], want[i]) << "output " << i << " n_tokens=" << n << " threads=" << threads;
    }
  }
}

TEST(LinearMany, RejectsAnOutputStrideSmallerThanItsWeight) {
  ThreadPool pool(2);
  const TestWeight a(DType::BF16, 64, 32, 1);
  const std::vector<float> x = random_floats(32, 2);
  std::vector<float> y(64);
  const LinearOutput outs[1] = {{a.view(), y.data(), 10}};
  try {
    linear_many(outs, 1, x.data(), 32, 1, pool);
    FAIL() << "no error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("ldy = 10"), std::string::npos)
        << e.what();
  }
}

// Every finite 16-bit pattern, as W [4096, 16], read back exactly through one-hot inputs: covers
// each ISA's widening in the decode kernel (8 tokens) and in the GEMM's packing (16 tokens).
TEST(LinearConversion, WidensEveryFinite16BitValueExactly) {
  ThreadPool pool(2);
  for (DType dtype : {DType::F16, DType::BF16}) {
    std::vector<uint16_t> bits;
    for (uint32_t h = 0; h < 0x10000; ++h) {
      const uint32_t exp_mask = dtype == DType::F16 ? 0x7c00u : 0x7f80u;
      if ((h & exp_mask) != exp_mask) bits.push_back(static_cast<uint16_t>(h));
    }
    bits.resize((bits.size() + 15) / 16 * 16, 0);
    const int64_t rows = static_cast<int64_t>(bits.size()) / 16;
    const DenseWeight w{dtype, rows, 16, bits.data()};
    std::vector<float> x(16 * 16, 0.0f);  // x[t] = e_t
    for (int t = 0; t < 16; ++t) x[t * 16 + t] = 1.0f;
    for (Isa isa : runnable_isas()) {
      std::vector<float> gemm(static_cast<size_t>(16 * rows)), decode(gemm.size());
      linear_isa(isa, w, x.data(), 16, 16, gemm.data(), rows, pool);
      for (int64_t t0 : {0, 8})
        linear_isa(isa, w, x.data() + t0 * 16, 16, 8, decode.data() + t0 * rows, rows, pool);
      int failures = 0;
      for (int64_t r = 0; r < rows && failures < 5; ++r)
        for (int64_t t = 0; t < 16; ++t) {
          const uint16_t h = bits[r * 16 + t];
          const float want = dtype == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
          const float got[2] = {gemm[t * rows + r], decode[t * rows + r]};
          for (int path = 0; path < 2; ++path)
            if (got[path] != want) {
              ADD_FAILURE() << isa_name(isa) << " " << dtype_name(dtype)
                            << (path == 0 ? " gemm" : " decode") << " bits 0x" << std::hex << h
                            << std::dec << ": " << got[path] << " != " << want;
              ++failures;
            }
        }
    }
  }
}

void expect_error(const std::function<void()>& fn, const std::string& fragment) {
  try {
    fn();
    ADD_FAILURE() << "no sparsa::Error thrown; expected one mentioning '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(LinearArgs, RejectsBadArguments) {
  ThreadPool pool(1);
  std::vector<float> buf(64, 0.0f), y(64);
  const DenseWeight good{DType::F32, 4, 8, buf.data()};
  expect_error(
      [&] {
        linear(DenseWeight{DType::F32, 4, 8, nullptr}, buf.data(), 8, 1, y.data(), 4, pool);
      },
      "has no data");
  expect_error([&] { linear(good, nullptr, 8, 1, y.data(), 4, pool); }, "pointer is null");
  expect_error([&] { linear(good, buf.data(), 7, 1, y.data(), 4, pool); },
               "ldx = 7 is smaller than the weight's 8 input features");
  expect_error([&] { linear(good, buf.data(), 8, 1, y.data(), 3, pool); }, "ldy = 3");
  expect_error(
      [&] {
        linear(DenseWeight{DType::I8, 4, 8, buf.data()}, buf.data(), 8, 1, y.data(), 4, pool);
      },
      "dtype I8 are not supported");
  expect_error(
      [&] {
        linear(DenseWeight{DType::F32, 0, 8, buf.data()}, buf.data(), 8, 1, y.data(), 4, pool);
      },
      "is empty");

  AttentionShape s;
  s.n_q = 1;
  s.n_heads = 3;
  s.n_kv_heads = 2;
  s.head_dim = 4;
  expect_error([&] { attention(s, buf.data(), 12, buf.data(), buf.data(), 8, y.data(), 12, pool); },
               "3 query heads cannot be grouped over 2 kv heads");
  s.n_heads = 4;
  expect_error([&] { attention(s, buf.data(), 12, buf.data(), buf.data(), 8, y.data(), 16, pool); },
               "ldq = 12");
  expect_error([&] { attention(s, buf.data(), 16, nullptr, buf.data(), 8, y.data(), 16, pool); },
               "pointer is null");
  s.kv_dtype = DType::F16;
  expect_error([&] { attention(s, buf.data(), 16, buf.data(), buf.data(), 8, y.data(), 16, pool); },
               "a KV cache of F16 is not supported (expected F32, BF16 or I8)");
  s.kv_dtype = DType::I8;
  expect_error([&] { attention(s, buf.data(), 16, buf.data(), buf.data(), 8, y.data(), 16, pool); },
               "an I8 KV cache needs its key and value scales (k_scales null, v_scales null)");
  s.k_scales = buf.data();
  s.v_scales = buf.data();
  s.pos0 = 3;
  s.ld_scales = 3;
  expect_error([&] { attention(s, buf.data(), 16, buf.data(), buf.data(), 8, y.data(), 16, pool); },
               "ld_scales = 3 is less than the 4 keys");
}

// Symmetric int8 rows as an I8 cache holds them: per (token, kv head) row of d values,
// scale = max |x| / 127 and code = round(x / scale); scales [n_kv_heads][ld_scales].
struct Int8Cache {
  std::vector<int8_t> codes;
  std::vector<float> scales;
};
Int8Cache quantize_cache(const std::vector<float>& x, int64_t n_keys, int64_t ld, int n_kv_heads,
                         int d, int64_t ld_scales) {
  Int8Cache c{std::vector<int8_t>(x.size()),
              std::vector<float>(static_cast<size_t>(n_kv_heads * ld_scales), -1.0f)};
  for (int64_t j = 0; j < n_keys; ++j)
    for (int h = 0; h < n_kv_heads; ++h) {
      const float* row = x.data() + j * ld + int64_t{h} * d;
      float amax = 0.0f;
      for (int i = 0; i < d; ++i) amax = std::max(amax, std::abs(row[i]));
      const float scale = amax / 127.0f;
      c.scales[static_cast<size_t>(h * ld_scales + j)] = scale;
      for (int i = 0; i < d; ++i)
        c.codes[static_cast<size_t>(j * ld + int64_t{h} * d + i)] =
            static_cast<int8_t>(scale == 0.0f ? 0 : std::lround(row[i] / scale));
    }
  return c;
}

struct AttentionCase {
  int n_heads, n_kv_heads, head_dim;
  int64_t n_q, pos0;
  float q_scale;  // larger queries make the softmax peaked
};

void PrintTo(const AttentionCase& c, std::ostream* os) {
  *os << "heads=" << c.n_heads << "/" << c.n_kv_heads << " head_dim=" << c.head_dim
      << " n_q=" << c.n_q << " pos0=" << c.pos0;
}

class AttentionTest : public ::testing::TestWithParam<AttentionCase> {};

// The cache in f32, bf16 and int8: the kernels widen bf16 keys and values and int8 codes as they
// read them (and apply an int8 cache's scales to the scores and softmax weights), so against the
// reference over the same rounded or quantized values the tolerance is the f32 one.
TEST_P(AttentionTest, MatchesReference) {
  for (DType kv : {DType::F32, DType::BF16, DType::I8}) {
    SCOPED_TRACE(std::string("kv cache ") + std::string(dtype_name(kv)));
    const AttentionCase& c = GetParam();
    AttentionShape s;
    s.kv_dtype = kv;
    s.n_q = c.n_q;
    s.pos0 = c.pos0;
    s.n_heads = c.n_heads;
    s.n_kv_heads = c.n_kv_heads;
    s.head_dim = c.head_dim;
    s.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    const int64_t ldq = int64_t{c.n_heads} * c.head_dim + 5;
    const int64_t ldo = int64_t{c.n_heads} * c.head_dim + 3;
    const int64_t ldkv = int64_t{c.n_kv_heads} * c.head_dim + 7;
    const int64_t n_keys = c.pos0 + c.n_q;
    const auto q = random_floats(static_cast<size_t>(c.n_q * ldq), 1, -c.q_scale, c.q_scale);
    const auto k32 = random_floats(static_cast<size_t>(n_keys * ldkv), 2);
    const auto v32 = random_floats(static_cast<size_t>(n_keys * ldkv), 3);
    std::vector<uint16_t> k16(k32.size()), v16(v32.size());
    for (size_t i = 0; i < k32.size(); ++i) {
      k16[i] = f32_to_bf16(k32[i]);
      v16[i] = f32_to_bf16(v32[i]);
    }
    // int8: the scales in rows of an odd stride; key 0 of kv head 0 is all zero (scale 0).
    const int64_t ld_scales = n_keys + 3;
    std::vector<float> k32z = k32;
    std::fill_n(k32z.begin(), c.head_dim, 0.0f);
    const Int8Cache k8 = quantize_cache(k32z, n_keys, ldkv, c.n_kv_heads, c.head_dim, ld_scales);
    const Int8Cache v8 = quantize_cache(v32, n_keys, ldkv, c.n_kv_heads, c.head_dim, ld_scales);
    ASSERT_EQ(k8.scales[0], 0.0f);
    const void* k = k32.data();
    const void* v = v32.data();
    if (kv == DType::BF16) {
      k = k16.data();
      v = v16.data();
    } else if (kv == DType::I8) {
      k = k8.codes.data();
      v = v8.codes.data();
      s.k_scales = k8.scales.data();
      s.v_scales = v8.scales.data();
      s.ld_scales = ld_scales;
    }
    std::vector<float> ref(static_cast<size_t>(c.n_q * ldo));
    reference::attention(s, q.data(), ldq, k, v, ldkv, ref.data(), ldo);
    if (kv != DType::F32) {
      // The reference reads the bf16 or int8 cache too: it differs from the f32 one's by the
      // rounding (int8: up to a half step of max |x| / 127 per element).
      std::vector<float> exact(ref.size());
      AttentionShape s32 = s;
      s32.kv_dtype = DType::F32;
      const float* k_exact = kv == DType::I8 ? k32z.data() : k32.data();
      reference::attention(s32, q.data(), ldq, k_exact, v32.data(), ldkv, exact.data(), ldo);
      double diff = 0;
      for (size_t i = 0; i < ref.size(); ++i)
        diff = std::max(diff, std::abs(double{ref[i]} - exact[i]));
      EXPECT_GT(diff, 0.0);
      EXPECT_LT(diff, kv == DType::I8 ? 5e-2 : 2e-2);
    }

    const int64_t width = int64_t{c.n_heads} * c.head_dim;
    for (Isa isa : runnable_isas())
      for (int threads : {1, 2}) {
        ThreadPool pool(threads);
        std::vector<float> out(ref.size(), std::numeric_limits<float>::quiet_NaN());
        attention_isa(isa, s, q.data(), ldq, k, v, ldkv, out.data(), ldo, pool);
        int failures = 0;
        for (int64_t i = 0; i < c.n_q && failures < 5; ++i)
          for (int64_t j = 0; j < ldo; ++j) {
            const float o = out[i * ldo + j];
            const bool ok =
                j < width ? std::abs(double{o} - ref[i * ldo + j]) <= kAttentionTol : std::isnan(o);
            if (!ok) {
              ADD_FAILURE() << isa_name(isa) << " threads=" << threads << ": out[" << i << ", " << j
                            << "] = " << o << ", reference " << ref[i * ldo + j];
              ++failures;
            }
          }
      }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Kernel, AttentionTest,
    ::testing::Values(
        // Decode: one query against a cache of pos0 + 1 keys.
        AttentionCase{4, 4, 64, 1, 0, 1.0f}, AttentionCase{8, 4, 32, 1, 37, 1.0f},
        AttentionCase{8, 2, 128, 1, 300, 1.0f}, AttentionCase{4, 1, 40, 1, 17, 1.0f},
        AttentionCase{32, 4, 64, 1, 700, 1.0f},
        // Prefill from position 0.
        AttentionCase{4, 4, 64, 33, 0, 1.0f}, AttentionCase{8, 2, 40, 50, 0, 1.0f},
        AttentionCase{8, 4, 64, 100, 0, 4.0f}, AttentionCase{4, 2, 32, 300, 0, 1.0f},
        AttentionCase{2, 2, 128, 64, 0, 1.0f}, AttentionCase{3, 3, 20, 17, 0, 1.0f},
        // Chunked prefill: several queries after a filled cache.
        AttentionCase{8, 4, 64, 20, 30, 1.0f}, AttentionCase{4, 1, 40, 13, 260, 1.0f},
        AttentionCase{2, 2, 128, 7, 5, 4.0f}, AttentionCase{8, 8, 32, 9, 250, 1.0f}),
    [](const auto& info) {
      const AttentionCase& c = info.param;
      return fmt::format("h{}kv{}d{}q{}p{}", c.n_heads, c.n_kv_heads, c.head_dim, c.n_q, c.pos0);
    });

TEST(SiluMul, MatchesDoublePrecisionOnEveryIsa) {
  // Lengths around the vector widths (tails), values from deep saturation to zero.
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> dist(-12.0f, 12.0f);
  for (int64_t n : {1, 3, 15, 16, 17, 33, 1000, 1027}) {
    std::vector<float> gate(static_cast<size_t>(n)), up(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      gate[static_cast<size_t>(i)] = dist(gen);
      up[static_cast<size_t>(i)] = dist(gen);
    }
    if (n > 4) {
      gate[0] = 0.0f;
      gate[1] = -95.0f;  // exp(95) overflows f32: silu is -0 up to rounding
      gate[2] = 95.0f;   // silu(g) = g
      gate[3] = -1e-30f;
    }
    for (Isa isa : runnable_isas()) {
      std::vector<float> out = gate;
      silu_mul_isa(isa, out.data(), up.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const double g = gate[static_cast<size_t>(i)], u = up[static_cast<size_t>(i)];
        const double want = g / (1.0 + std::exp(-g)) * u;
        ASSERT_NEAR(out[static_cast<size_t>(i)], want, 4e-7 * std::abs(want) + 1e-30)
            << isa_name(isa) << ", n " << n << ", i " << i << ", g " << g;
      }
    }
  }
  std::vector<float> g(4, 1.0f), u(4, 1.0f);
  EXPECT_THROW(silu_mul_isa(Isa::Generic, g.data(), u.data(), -1), Error);
}

TEST(ExpShifted, MatchesDoublePrecisionOnEveryIsa) {
  // The sampler's range: 0 at the maximum down to deep underflow, lengths around the vector
  // widths; in place and out of place.
  std::mt19937 gen(12);
  std::uniform_real_distribution<float> dist(-100.0f, 20.0f);
  const float shift = 20.0f;
  for (int64_t n : {1, 3, 15, 16, 17, 33, 1000, 8192, 8197}) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = dist(gen);
    x[0] = shift;  // exp(0) = 1
    if (n > 3) {
      x[1] = shift - 86.0f;   // just above the smallest normal
      x[2] = shift - 200.0f;  // far below it
    }
    for (Isa isa : runnable_isas()) {
      std::vector<float> out(static_cast<size_t>(n), -1.0f), in_place = x;
      exp_shifted_isa(isa, x.data(), shift, out.data(), n);
      exp_shifted_isa(isa, in_place.data(), shift, in_place.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const float d = x[static_cast<size_t>(i)] - shift;  // the difference is taken in f32
        const double want = std::exp(static_cast<double>(d));
        if (d < -87.0f) {  // below the smallest normal: tiny, whatever the path
          ASSERT_GE(out[static_cast<size_t>(i)], 0.0f) << isa_name(isa);
          ASSERT_LE(out[static_cast<size_t>(i)], 1.7e-38f) << isa_name(isa);
        } else {
          ASSERT_NEAR(out[static_cast<size_t>(i)], want, 4e-7 * want)
              << isa_name(isa) << ", n " << n << ", i " << i << ", x " << x[static_cast<size_t>(i)];
        }
        ASSERT_EQ(in_place[static_cast<size_t>(i)], out[static_cast<size_t>(i)]) << isa_name(isa);
      }
      EXPECT_EQ(out[0], 1.0f) << isa_name(isa);
    }
  }
  std::vector<float> v(4, 1.0f);
  EXPECT_THROW(exp_shifted_isa(Isa::Generic, v.data(), 0.0f, v.data(), -1), Error);
}

TEST(KernelBandwidth, MeasuresSomething) {
  ThreadPool pool(2);
  const double bw = measure_read_bandwidth(pool, size_t{16} << 20, 2);
  EXPECT_GT(bw, 1e8);
  EXPECT_LT(bw, 1e13);
}

}  // namespace
}  // namespace sparsa::kernels
