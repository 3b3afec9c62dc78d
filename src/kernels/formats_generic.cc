// The baseline packed-weight kernels: scalar block decoding, 4-lane sums the compiler vectorizes
// with SSE2. Also the code behind formats::PackedWeight::dequantize_to.
#include <cstring>

#include "kernels/kernels_internal.h"

#define SPARSA_KERNELS_ISA generic
#include "kernels/formats_impl.h"

namespace sparsa::kernels::generic {
namespace {

struct Vec {
  static constexpr int kLanes = 4;
  struct alignas(16) Reg {
    float v[kLanes];
  };
  static Reg zero() { return Reg{}; }
  static Reg load(const float* p) {
    Reg r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static Reg load_partial(const float* p, int n) {
    Reg r{};
    std::memcpy(r.v, p, static_cast<size_t>(n) * sizeof(float));
    return r;
  }
  static Reg fmadd(Reg a, Reg b, Reg c) {
    for (int i = 0; i < kLanes; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static float reduce_add(Reg a) { return (a.v[0] + a.v[2]) + (a.v[1] + a.v[3]); }
};

}  // namespace

FormatKernels format_kernels(const formats::PackedView&) {
  return {&fmt::decode_rows<Vec>, &fmt::dequant_rows};
}

}  // namespace sparsa::kernels::generic
