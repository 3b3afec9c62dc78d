// Packing of compressed weights into the layouts of include/sparsa/formats/packed_weight.h.
#include "sparsa/formats/packed_weight.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cmath>
#include <cstring>
#include <new>
#include <numeric>
#include <type_traits>

#include <sys/mman.h>

#include "kernels/kernels_internal.h"
#include "sparsa/core/huge_pages.h"
#include "sparsa/compress/prune.h"
#include "sparsa/core/error.h"

namespace sparsa::formats {

int stored_code_bits(int bits) { return bits <= 2 ? 2 : (bits <= 4 ? bits : 8); }

namespace {

// Bytes of one 64-column block of codes in Positions::All.
int64_t all_block_bytes(int bits) { return 8 * stored_code_bits(bits); }

// Codes of <= 4 bits in Positions::Bitmask: blocks 2p and 2p + 1 share their bytes (nibbles).
bool paired_nibbles(Codec codec, int bits) { return codec != Codec::Float && bits <= 4; }

// Bytes of the kept values of blocks with c0 and c1 kept values in Positions::Bitmask: a pair of
// blocks (c1 = 0 when the row has no second block) for paired nibbles, else one block (c1 unused).
int64_t kept_bytes(Codec codec, int bits, int c0, int c1) {
  if (codec == Codec::Float) return 2 * c0;
  return paired_nibbles(codec, bits) ? std::max(c0, c1) : c0;
}

// The logical matrix being packed: codes (Int, Palette) or bf16 values (Float), a keep mask, and
// for Int the zero point that a pruned weight takes in Positions::All.
struct Source {
  Codec codec = Codec::Int;
  int bits = 0;
  int64_t rows = 0, cols = 0;
  const uint8_t* codes = nullptr;   // [rows, cols]
  const uint16_t* bf16 = nullptr;   // [rows, cols]
  const uint8_t* keep = nullptr;    // [rows, cols] or null
  const uint8_t* zeros = nullptr;   // Int: [rows, n_groups]
  int64_t n_groups = 1;

  bool kept(int64_t r, int64_t c) const { return keep == nullptr || keep[r * cols + c] != 0; }
  uint32_t code(int64_t r, int64_t c) const {
    if (c >= cols) return 0;
    if (kept(r, c)) return codes[r * cols + c];
    return codec == Codec::Int ? zeros[r * n_groups + c / (cols / n_groups)] : 0;
  }
};

void encode_all_row(const Source& s, int64_t r, uint8_t* dst) {
  const int sbits = stored_code_bits(s.bits);
  const int64_t n_blocks = (s.cols + kBlockCols - 1) / kBlockCols;
  for (int64_t b = 0; b < n_blocks; ++b) {
    uint8_t* blk = dst + b * all_block_bytes(s.bits);
    const int64_t c0 = b * kBlockCols;
    if (sbits == 8) {
      for (int i = 0; i < 64; ++i) blk[i] = static_cast<uint8_t>(s.code(r, c0 + i));
    } else if (sbits == 4) {
      for (int i = 0; i < 32; ++i)
        blk[i] = static_cast<uint8_t>(s.code(r, c0 + i) | s.code(r, c0 + i + 32) << 4);
    } else {
      uint64_t plane = 0;
      for (int i = 0; i < 16; ++i) {
        uint32_t v = 0;
        for (int q = 0; q < 4; ++q) v |= (s.code(r, c0 + i + 16 * q) & 3u) << (2 * q);
        blk[i] = static_cast<uint8_t>(v);
      }
      if (sbits == 3) {
        for (int i = 0; i < 64; ++i) plane |= uint64_t{(s.code(r, c0 + i) >> 2) & 1u} << i;
        std::memcpy(blk + 16, &plane, 8);
      }
    }
  }
}

uint64_t block_mask(const Source& s, int64_t r, int64_t b) {
  uint64_t m = 0;
  for (int i = 0; i < 64 && b * kBlockCols + i < s.cols; ++i)
    if (s.kept(r, b * kBlockCols + i)) m |= uint64_t{1} << i;
  return m;
}

// Bytes of row r in Positions::Bitmask (a multiple of 8).
int64_t bitmask_row_bytes(const Source& s, int64_t r) {
  const int64_t n_blocks = (s.cols + kBlockCols - 1) / kBlockCols;
  int64_t bytes = 8 * n_blocks;
  const int64_t step = paired_nibbles(s.codec, s.bits) ? 2 : 1;
  for (int64_t b = 0; b < n_blocks; b += step) {
    const int c1 = step == 2 && b + 1 < n_blocks ? std::popcount(block_mask(s, r, b + 1)) : 0;
    bytes += kept_bytes(s.codec, s.bits, std::popcount(block_mask(s, r, b)), c1);
  }
  return (bytes + 7) / 8 * 8;
}

void encode_bitmask_row(const Source& s, int64_t r, uint8_t* dst) {
  const int64_t n_blocks = (s.cols + kBlockCols - 1) / kBlockCols;
  uint8_t* v = dst + 8 * n_blocks;
  // The kept values of block b in column order; returns their count.
  const auto kept_values = [&](int64_t b, uint32_t* vals) {
    const uint64_t m = block_mask(s, r, b);
    std::memcpy(dst + 8 * b, &m, 8);
    int c = 0;
    for (int i = 0; i < 64; ++i)
      if ((m >> i) & 1u) {
        const int64_t col = b * kBlockCols + i;
        vals[c++] = s.codec == Codec::Float ? s.bf16[r * s.cols + col] : s.codes[r * s.cols + col];
      }
    return c;
  };
  uint32_t vals[64], vals1[64];
  if (paired_nibbles(s.codec, s.bits)) {
    for (int64_t b = 0; b < n_blocks; b += 2) {
      const int c0 = kept_values(b, vals);
      const int c1 = b + 1 < n_blocks ? kept_values(b + 1, vals1) : 0;
      const int n = std::max(c0, c1);
      for (int k = 0; k < n; ++k)
        v[k] = static_cast<uint8_t>((k < c0 ? vals[k] : 0u) | (k < c1 ? vals1[k] << 4 : 0u));
      v += n;
    }
    return;
  }
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int c = kept_values(b, vals);
    if (s.codec == Codec::Float) {
      for (int k = 0; k < c; ++k) {
        const auto h = static_cast<uint16_t>(vals[k]);
        std::memcpy(v + 2 * k, &h, 2);
      }
    } else {
      for (int k = 0; k < c; ++k) v[k] = static_cast<uint8_t>(vals[k]);
    }
    v += kept_bytes(s.codec, s.bits, c, 0);
  }
}

// n kept of every m consecutive columns in every row, for the smallest m in {4, 8, 16}; {0, 0}
// when the mask has no such structure.
std::pair<int, int> detect_nm(const uint8_t* keep, int64_t rows, int64_t cols) {
  for (int m : {4, 8, 16}) {
    if (cols % m != 0) continue;
    int n = -1;
    bool ok = true;
    for (int64_t g = 0; ok && g < rows * cols / m; ++g) {
      int k = 0;
      for (int i = 0; i < m; ++i) k += keep[g * m + i] != 0;
      if (n < 0) n = k;
      ok = k == n;
    }
    if (ok && n > 0 && n < m) return {n, m};
  }
  return {0, 0};
}

bool all_kept(const compress::Mask* keep) {
  return keep == nullptr || keep->empty() ||
         std::all_of(keep->begin(), keep->end(), [](uint8_t k) { return k != 0; });
}

void check_mask(const compress::Mask* keep, int64_t rows, int64_t cols, const char* fn) {
  SPARSA_CHECK(keep == nullptr || keep->empty() || keep->size() == static_cast<size_t>(rows * cols),
               "{}: the keep mask has {} entries, the weight [{}, {}] has {}", fn,
               keep == nullptr ? 0 : keep->size(), rows, cols, rows * cols);
}

}  // namespace

void PackedWeight::AlignedFree::operator()(uint8_t* p) const {
  ::operator delete[](p, std::align_val_t{64});
}

// Lays out the sections of a packed weight in one 64-byte aligned allocation.
struct Packer {
  PackedWeight w;
  size_t total = 0;
  struct Section {
    size_t offset, size;
  };

  PackedView& view() { return w.view_; }
  void add_bytes(size_t n) { w.bytes_ += n; }
  void set_nm(std::pair<int, int> nm) {
    w.nm_n_ = nm.first;
    w.nm_m_ = nm.second;
  }

  Section reserve(size_t size) {
    const Section s{total, size};
    total += (size + 63) / 64 * 64;
    return s;
  }
  // zero = false: the caller writes every byte it reserved itself; only the last reserved line
  // (which may end in rounding bytes nobody writes) and the spare line are zeroed here.
  void allocate(bool zero = true) {
    // Kernels may read a full 64-byte vector at the last block: one spare line at the end.
    const size_t size = total + 64;
    w.storage_.reset(static_cast<uint8_t*>(::operator new[](size, std::align_val_t{64})));
    w.storage_size_ = size;
    advise_huge_pages(w.storage_.get(), size);
    const size_t from = zero ? 0 : (total >= 64 ? total - 64 : 0);
    std::memset(w.storage_.get() + from, 0, size - from);
  }
  // Decode streams the storage front to back: the whole 2 MiB pages inside it are advised for
  // transparent huge pages (before they are first touched), so its reads cross few TLB entries.
  static void advise_huge_pages(uint8_t* p, size_t size) {
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHugePageBytes - 1) / kHugePageBytes *
                            kHugePageBytes;
    const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + size) / kHugePageBytes * kHugePageBytes;
    if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
  uint8_t* at(Section s) { return w.storage_.get() + s.offset; }

  // Codes or values of s with the position coding `positions`; sets codes / row_offsets. Reserves
  // the last sections and allocates: every other section must be reserved before.
  void pack_codes(const Source& s, Positions positions) {
    PackedView& v = w.view_;
    v.positions = positions;
    if (positions == Positions::All) {
      v.row_bytes = v.n_blocks * all_block_bytes(s.bits);
      const Section codes = reserve(static_cast<size_t>(v.row_bytes * s.rows));
      allocate();
      v.codes = at(codes);
      for (int64_t r = 0; r < s.rows; ++r) encode_all_row(s, r, at(codes) + r * v.row_bytes);
      w.bytes_ += codes.size;
      return;
    }
    std::vector<uint64_t> offsets(static_cast<size_t>(s.rows + 1), 0);
    for (int64_t r = 0; r < s.rows; ++r)
      offsets[static_cast<size_t>(r + 1)] = offsets[static_cast<size_t>(r)] + bitmask_row_bytes(s, r);
    const Section off = reserve(offsets.size() * sizeof(uint64_t));
    const Section codes = reserve(offsets.back());
    allocate();
    v.codes = at(codes);
    for (int64_t r = 0; r < s.rows; ++r)
      encode_bitmask_row(s, r, at(codes) + offsets[static_cast<size_t>(r)]);
    std::memcpy(at(off), offsets.data(), off.size);
    v.row_offsets = reinterpret_cast<const uint64_t*>(at(off));
    w.bytes_ += codes.size + off.size;
  }
};

PackedWeight PackedWeight::clone() const {
  PackedWeight c;
  c.view_ = view_;
  c.bytes_ = bytes_;
  c.nm_n_ = nm_n_;
  c.nm_m_ = nm_m_;
  if (!storage_) return c;
  c.storage_.reset(static_cast<uint8_t*>(::operator new[](storage_size_, std::align_val_t{64})));
  c.storage_size_ = storage_size_;
  std::memcpy(c.storage_.get(), storage_.get(), storage_size_);
  // Every pointer into the storage moves by the same distance.
  const uint8_t* const old_base = storage_.get();
  const auto rebase = [&](auto& ptr) {
    const auto* p = reinterpret_cast<const uint8_t*>(ptr);
    if (p != nullptr && p >= old_base && p < old_base + storage_size_)
      ptr = reinterpret_cast<std::remove_reference_t<decltype(ptr)>>(c.storage_.get() +
                                                                     (p - old_base));
  };
  PackedView& v = c.view_;
  rebase(v.codes);
  rebase(v.row_offsets);
  rebase(v.scales);
  rebase(v.zeros);
  rebase(v.lut);
  rebase(v.lut_q);
  rebase(v.lut_qscale);
  rebase(v.lut_u8);
  rebase(v.lut_u8_scale);
  rebase(v.lut_u8_zero);
  rebase(v.dense);
  rebase(v.perm);
  return c;
}

std::string PackedWeight::describe() const {
  const PackedView& v = view_;
  std::string s;
  switch (v.codec) {
    case Codec::Float:
      s = fmt::format("{}", dtype_name(v.dtype));
      std::transform(s.begin(), s.end(), s.begin(), [](char c) { return std::tolower(c); });
      break;
    case Codec::Int:
      s = v.n_groups == 1 ? fmt::format("int{}", v.bits)
                          : fmt::format("int{}g{}", v.bits, v.group_size);
      if (v.perm != nullptr) s += "-actorder";
      break;
    case Codec::Palette:
      s = fmt::format("palette{}", v.bits);
      if (v.group_rows < v.rows) s += fmt::format("r{}", v.group_rows);
      break;
  }
  if (v.positions == Positions::Bitmask)
    s = (nm_m_ > 0 ? fmt::format("sparse{}:{}-", nm_n_, nm_m_) : std::string("sparse-")) + s;
  return s;
}

void PackedWeight::dequantize_to(float* out) const {
  SPARSA_CHECK(view_.rows > 0, "PackedWeight::dequantize_to: the weight is empty");
  const PackedView& v = view_;
  if (v.codec == Codec::Float && v.positions == Positions::All) {
    const kernels::DenseWeight w{v.dtype, v.rows, v.cols, v.dense, v.panels};
    for (int64_t r = 0; r < v.rows; ++r)
      for (int64_t c = 0; c < v.cols; ++c) {
        const int64_t i = kernels::weight_index(w, r, c);
        float& o = out[r * v.cols + c];
        if (v.dtype == DType::F32) {
          o = static_cast<const float*>(v.dense)[i];
        } else {
          const uint16_t h = static_cast<const uint16_t*>(v.dense)[i];
          o = v.dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
        }
      }
  } else if (v.perm == nullptr) {
    kernels::generic::format_kernels(v).dequant(v, 0, v.rows, out);
  } else {
    std::vector<float> row(static_cast<size_t>(v.cols));
    const kernels::FormatKernels k = kernels::generic::format_kernels(v);
    for (int64_t r = 0; r < v.rows; ++r) {
      k.dequant(v, r, r + 1, row.data());
      for (int64_t j = 0; j < v.cols; ++j) out[r * v.cols + v.perm[j]] = row[static_cast<size_t>(j)];
    }
  }
}

PackedWeight pack_dense(DType dtype, int64_t rows, int64_t cols, const void* data, bool copy,
                        bool panels) {
  SPARSA_CHECK(dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16,
               "pack_dense: dtype {} is not supported (expected F32, F16 or BF16)",
               dtype_name(dtype));
  SPARSA_CHECK(rows > 0 && cols > 0, "pack_dense: the shape [{}, {}] is empty", rows, cols);
  SPARSA_CHECK(data != nullptr, "pack_dense: the weight [{}, {}] has no data", rows, cols);
  Packer p;
  PackedView& v = p.view();
  v.codec = Codec::Float;
  v.dtype = dtype;
  v.rows = rows;
  v.cols = cols;
  v.n_blocks = (cols + kBlockCols - 1) / kBlockCols;
  if (panels) {
    const size_t bytes = static_cast<size_t>(kernels::panel_elements(rows, cols)) * dtype_size(dtype);
    const Packer::Section s = p.reserve(bytes);
    p.allocate(/*zero=*/false);  // to_panels writes every byte, the padding rows included
    kernels::to_panels(data, rows, cols, dtype_size(dtype), p.at(s));
    v.dense = p.at(s);
    v.panels = true;
    p.add_bytes(bytes);
    return std::move(p.w);
  }
  const size_t bytes = static_cast<size_t>(rows * cols) * dtype_size(dtype);
  v.dense = data;
  if (copy) {
    const Packer::Section s = p.reserve(bytes);
    p.allocate();
    std::memcpy(p.at(s), data, bytes);
    v.dense = p.at(s);
  }
  p.add_bytes(bytes);
  return std::move(p.w);
}

PackedWeight pack_quantized(const compress::QuantResult& q, const compress::Mask* keep,
                            SparseEncoding encoding) {
  const int64_t rows = q.rows(), cols = q.cols();
  SPARSA_CHECK(q.bits >= 2 && q.bits <= 8, "pack_quantized: {} bits are not supported (2..8)",
               q.bits);
  SPARSA_CHECK(rows > 0 && cols > 0 && q.codes.size() == static_cast<size_t>(rows * cols),
               "pack_quantized: {} codes do not fill rows of {} columns (g_idx has {} entries)",
               q.codes.size(), cols, q.g_idx.size());
  const int64_t n_groups = q.n_groups();
  SPARSA_CHECK(n_groups > 0 && q.scales.size() == static_cast<size_t>(rows * n_groups) &&
                   q.zeros.size() == q.scales.size() && cols % n_groups == 0,
               "pack_quantized: {} scales and {} zeros do not describe {} rows of groups that "
               "divide {} columns",
               q.scales.size(), q.zeros.size(), rows, cols);
  check_mask(keep, rows, cols, "pack_quantized");
  const int maxq = (1 << q.bits) - 1;
  for (uint8_t c : q.codes)
    SPARSA_CHECK(c <= maxq, "pack_quantized: code {} does not fit in {} bits", c, q.bits);
  for (int32_t z : q.zeros)
    SPARSA_CHECK(z >= 0 && z <= maxq, "pack_quantized: zero point {} is outside 0..{}", z, maxq);
  const int64_t gs = cols / n_groups;
  std::vector<int64_t> count(static_cast<size_t>(n_groups), 0);
  bool in_order = true;
  for (int64_t c = 0; c < cols; ++c) {
    const int32_t g = q.g_idx[static_cast<size_t>(c)];
    SPARSA_CHECK(g >= 0 && g < n_groups, "pack_quantized: g_idx[{}] = {} is outside 0..{}", c, g,
                 n_groups - 1);
    ++count[static_cast<size_t>(g)];
    in_order = in_order && g == c / gs;
  }
  for (int64_t g = 0; g < n_groups; ++g)
    SPARSA_CHECK(count[static_cast<size_t>(g)] == gs,
                 "pack_quantized: group {} has {} columns, expected {} (cols / n_groups)", g,
                 count[static_cast<size_t>(g)], gs);

  // Act-order: stored column j is input column perm[j], sorted by group (stable).
  std::vector<int32_t> perm;
  std::vector<uint8_t> codes_p, keep_p;
  const uint8_t* codes = q.codes.data();
  const uint8_t* keep_bits = keep == nullptr || keep->empty() ? nullptr : keep->data();
  if (!in_order) {
    perm.resize(static_cast<size_t>(cols));
    std::iota(perm.begin(), perm.end(), 0);
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int32_t a, int32_t b) { return q.g_idx[a] < q.g_idx[b]; });
    codes_p.resize(q.codes.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) codes_p[r * cols + j] = codes[r * cols + perm[j]];
    codes = codes_p.data();
    if (keep_bits != nullptr) {
      keep_p.resize(keep->size());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j) keep_p[r * cols + j] = keep_bits[r * cols + perm[j]];
      keep_bits = keep_p.data();
    }
  }
  std::vector<uint8_t> zeros8(q.zeros.begin(), q.zeros.end());
  // Scales are stored as f16, rounded to nearest: a relative error under 2^-11, or an absolute one
  // under 2^-25 (3e-8) below f16's normal range (6.1e-5). The quantizers (find_quant_grid) already
  // give f16 values, which are stored exactly.
  std::vector<uint16_t> scales16(q.scales.size());
  for (size_t i = 0; i < q.scales.size(); ++i) {
    const float sc = q.scales[i];
    scales16[i] = f32_to_f16(sc);
    SPARSA_CHECK(std::isfinite(sc) && std::isfinite(f16_to_f32(scales16[i])),
                 "pack_quantized: scale {} of row {} group {} is outside f16's range (|scale| "
                 "<= 65504)",
                 sc, static_cast<int64_t>(i) / n_groups, static_cast<int64_t>(i) % n_groups);
  }
  if (all_kept(keep)) keep_bits = nullptr;

  Source s;
  s.codec = Codec::Int;
  s.bits = q.bits;
  s.rows = rows;
  s.cols = cols;
  s.codes = codes;
  s.keep = keep_bits;
  s.zeros = zeros8.data();
  s.n_groups = n_groups;

  Positions positions = Positions::All;
  if (keep_bits != nullptr && encoding != SparseEncoding::All) {
    if (encoding == SparseEncoding::Bitmask) {
      positions = Positions::Bitmask;
    } else {
      int64_t sparse = 0;
      for (int64_t r = 0; r < rows; ++r) sparse += bitmask_row_bytes(s, r);
      const int64_t dense = rows * ((cols + kBlockCols - 1) / kBlockCols) * all_block_bytes(q.bits);
      if (sparse < dense) positions = Positions::Bitmask;
    }
  }

  Packer p;
  PackedView& v = p.view();
  v.codec = Codec::Int;
  v.bits = q.bits;
  v.rows = rows;
  v.cols = cols;
  v.n_blocks = (cols + kBlockCols - 1) / kBlockCols;
  v.group_size = gs;
  v.n_groups = n_groups;
  const Packer::Section sc = p.reserve(scales16.size() * sizeof(uint16_t));
  const Packer::Section zc = p.reserve(zeros8.size());
  const Packer::Section pc = p.reserve(perm.size() * sizeof(int32_t));
  p.pack_codes(s, positions);
  std::memcpy(p.at(sc), scales16.data(), sc.size);
  std::memcpy(p.at(zc), zeros8.data(), zc.size);
  v.scales = reinterpret_cast<const uint16_t*>(p.at(sc));
  v.zeros = p.at(zc);
  if (!perm.empty()) {
    std::memcpy(p.at(pc), perm.data(), pc.size);
    v.perm = reinterpret_cast<const int32_t*>(p.at(pc));
  }
  p.add_bytes(sc.size + zc.size);
  if (positions == Positions::Bitmask) {
    p.set_nm(detect_nm(keep_bits, rows, cols));
  }
  return std::move(p.w);
}

PackedWeight pack_sparse(const compress::Matrix& w, const compress::Mask& keep, ValueFormat values,
                         SparseEncoding encoding) {
  SPARSA_CHECK(w.rows > 0 && w.cols > 0 && w.data.size() == static_cast<size_t>(w.rows * w.cols),
               "pack_sparse: the weight [{}, {}] is empty or has {} values", w.rows, w.cols,
               w.data.size());
  check_mask(&keep, w.rows, w.cols, "pack_sparse");
  if (values.kind == ValueFormat::Int) {
    compress::Matrix copy = w;
    const compress::QuantSpec spec{.bits = values.bits, .symmetric = values.symmetric,
                                   .group_size = values.group_size};
    compress::check_quant_spec(spec, w.cols, "pack_sparse");
    const compress::QuantResult q =
        compress::rtn_quantize(copy, spec, keep.empty() ? nullptr : &keep);
    return pack_quantized(q, &keep, encoding);
  }
  const int64_t rows = w.rows, cols = w.cols;
  std::vector<uint16_t> bf(w.data.size());
  for (size_t i = 0; i < bf.size(); ++i)
    bf[i] = keep.empty() || keep[i] != 0 ? f32_to_bf16(w.data[i]) : uint16_t{0};
  Source s;
  s.codec = Codec::Float;
  s.rows = rows;
  s.cols = cols;
  s.bf16 = bf.data();
  s.keep = all_kept(&keep) ? nullptr : keep.data();
  bool bitmask = s.keep != nullptr && encoding == SparseEncoding::Bitmask;
  if (s.keep != nullptr && encoding == SparseEncoding::Auto) {
    int64_t sparse = 0;
    for (int64_t r = 0; r < rows; ++r) sparse += bitmask_row_bytes(s, r);
    bitmask = sparse < rows * cols * 2;
  }
  if (!bitmask) return pack_dense(DType::BF16, rows, cols, bf.data(), true);
  Packer p;
  PackedView& v = p.view();
  v.codec = Codec::Float;
  v.dtype = DType::BF16;
  v.rows = rows;
  v.cols = cols;
  v.n_blocks = (cols + kBlockCols - 1) / kBlockCols;
  p.pack_codes(s, Positions::Bitmask);
  p.set_nm(detect_nm(s.keep, rows, cols));
  return std::move(p.w);
}

PackedWeight pack_palette(const compress::Palette& pal, int64_t cols, const compress::Mask* keep) {
  SPARSA_CHECK(pal.bits >= 2 && pal.bits <= 8, "pack_palette: {} bits are not supported (2..8)",
               pal.bits);
  const int64_t k = int64_t{1} << pal.bits;
  SPARSA_CHECK(cols > 0 && !pal.indices.empty() && pal.indices.size() % cols == 0,
               "pack_palette: {} indices do not fill rows of {} columns", pal.indices.size(),
               cols);
  const int64_t rows = static_cast<int64_t>(pal.indices.size()) / cols;
  const int64_t n_luts = static_cast<int64_t>(pal.lut.size()) / k;
  SPARSA_CHECK(pal.group_rows > 0 && pal.lut.size() % k == 0 &&
                   n_luts == (rows + pal.group_rows - 1) / pal.group_rows,
               "pack_palette: {} table entries do not make one table of {} per {} rows of {}",
               pal.lut.size(), k, pal.group_rows, rows);
  for (uint8_t i : pal.indices)
    SPARSA_CHECK(i < k, "pack_palette: index {} does not fit in {} bits", i, pal.bits);
  check_mask(keep, rows, cols, "pack_palette");
  for (float f : pal.lut)
    SPARSA_CHECK(std::isfinite(f), "pack_palette: the table holds a non-finite value {}", f);

  Source s;
  s.codec = Codec::Palette;
  s.bits = pal.bits;
  s.rows = rows;
  s.cols = cols;
  s.codes = pal.indices.data();
  s.keep = all_kept(keep) ? nullptr : keep->data();

  Packer p;
  PackedView& v = p.view();
  v.codec = Codec::Palette;
  v.bits = pal.bits;
  v.rows = rows;
  v.cols = cols;
  v.n_blocks = (cols + kBlockCols - 1) / kBlockCols;
  v.group_rows = pal.group_rows;
  const Packer::Section lc = p.reserve(pal.lut.size() * sizeof(float));
  // The int8-input kernels' tables: 8-bit tables with a zero point for <= 16 entries (one
  // vpshufb), 16-bit byte planes for 32 or 64 entries (byte lookups reach 64 entries).
  const bool u8_tables = pal.bits <= 4;
  const bool int_tables = pal.bits > 4 && pal.bits <= 6;
  const auto luts = static_cast<size_t>(n_luts);
  const Packer::Section uc = p.reserve(u8_tables ? luts * 16 : 0);
  const Packer::Section us = p.reserve(u8_tables ? luts * sizeof(float) : 0);
  const Packer::Section uz = p.reserve(u8_tables ? luts : 0);
  const Packer::Section qc = p.reserve(int_tables ? luts * 128 : 0);
  const Packer::Section qs = p.reserve(int_tables ? luts * sizeof(float) : 0);
  // A table may have no zero entry for pruned weights: masked palettes always use the bitmask.
  p.pack_codes(s, s.keep != nullptr ? Positions::Bitmask : Positions::All);
  std::memcpy(p.at(lc), pal.lut.data(), lc.size);
  v.lut = reinterpret_cast<const float*>(p.at(lc));
  if (int_tables) {
    uint8_t* planes = p.at(qc);
    float* scales = reinterpret_cast<float*>(p.at(qs));
    for (int64_t t = 0; t < n_luts; ++t) {
      const float* lut = pal.lut.data() + t * k;
      float amax = 0.0f;
      for (int64_t j = 0; j < k; ++j) amax = std::max(amax, std::abs(lut[j]));
      const float s = amax > 0.0f ? amax / 32767.0f : 1.0f;
      scales[t] = s;
      for (int64_t j = 0; j < 64; ++j) {
        const int32_t q =
            j < k ? std::clamp(static_cast<int32_t>(std::nearbyint(lut[j] / s)), -32767, 32767) : 0;
        planes[t * 128 + j] = static_cast<uint8_t>((q >> 8) + 128);
        planes[t * 128 + 64 + j] = static_cast<uint8_t>(q & 255);
      }
    }
    v.lut_q = planes;
    v.lut_qscale = scales;
  }
  if (u8_tables) {
    uint8_t* tables = p.at(uc);
    float* scales = reinterpret_cast<float*>(p.at(us));
    uint8_t* zeros = p.at(uz);
    for (int64_t t = 0; t < n_luts; ++t) {
      const float* lut = pal.lut.data() + t * k;
      // The range holds 0, so that a pruned weight is the zero point exactly.
      float lo = 0.0f, hi = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        lo = std::min(lo, lut[j]);
        hi = std::max(hi, lut[j]);
      }
      const float sc = hi > lo ? (hi - lo) / 255.0f : 1.0f;
      const int32_t z = std::clamp(static_cast<int32_t>(std::nearbyint(-lo / sc)), 0, 255);
      scales[t] = sc;
      zeros[t] = static_cast<uint8_t>(z);
      for (int64_t j = 0; j < 16; ++j)
        tables[t * 16 + j] = static_cast<uint8_t>(
            j < k ? std::clamp(static_cast<int32_t>(std::nearbyint(lut[j] / sc)) + z, 0, 255) : z);
    }
    v.lut_u8 = tables;
    v.lut_u8_scale = scales;
    v.lut_u8_zero = zeros;
  }
  p.add_bytes(lc.size);
  if (s.keep != nullptr) {
    p.set_nm(detect_nm(s.keep, rows, cols));
  }
  return std::move(p.w);
}

}  // namespace sparsa::formats
