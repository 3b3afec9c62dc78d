#include "sparsa/core/cpu.h"

#include <atomic>
#include <cstdlib>

#include "sparsa/core/error.h"

namespace sparsa {

namespace {
std::atomic<int> g_active{-1};
}

Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Generic;
}

bool cpu_has_avx512_vbmi2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    __builtin_cpu_init();
    return detect_isa() == Isa::Avx512 && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("avx512vbmi2");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = cpu_has_avx512_vbmi2() && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

std::string_view isa_name(Isa isa) {
  switch (isa) {
    case Isa::Generic: return "generic";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "?";
}

Isa parse_isa(std::string_view name) {
  if (name == "generic") return Isa::Generic;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512") return Isa::Avx512;
  fail("unknown ISA '{}' (expected generic, avx2 or avx512)", name);
}

void set_active_isa(Isa isa) {
  SPARSA_CHECK(static_cast<int>(isa) <= static_cast<int>(detect_isa()),
               "this CPU does not support the {} kernels (best: {})", isa_name(isa),
               isa_name(detect_isa()));
  g_active.store(static_cast<int>(isa));
}

Isa active_isa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {
    Isa isa = detect_isa();
    if (const char* env = std::getenv("SPARSA_FORCE_ISA"); env != nullptr && *env != '\0') {
      const Isa forced = parse_isa(env);
      SPARSA_CHECK(static_cast<int>(forced) <= static_cast<int>(isa),
                   "SPARSA_FORCE_ISA={}: this CPU supports at most {}", env, isa_name(isa));
      isa = forced;
    }
    v = static_cast<int>(isa);
    g_active.store(v);
  }
  return static_cast<Isa>(v);
}

}  // namespace sparsa
