// Instruction-set levels the CPU kernels are compiled for, and which one this machine runs.
//
// SPARSA_FORCE_ISA=generic|avx2|avx512 picks a lower level (tests use it to cover every path on
// one machine); asking for a level the CPU lacks is an error, not a silent fallback.
#pragma once

#include <string_view>

namespace sparsa {

enum class Isa { Generic = 0, Avx2 = 1, Avx512 = 2 };

/// The best level this CPU supports (AVX2 needs FMA and F16C; AVX-512 needs F, BW, DQ, VL).
Isa detect_isa();
/// The level kernels use: detect_isa(), or SPARSA_FORCE_ISA when set. Read once.
Isa active_isa();
/// Overrides active_isa() for the rest of the process (tests); throws if the CPU lacks it.
void set_active_isa(Isa isa);
std::string_view isa_name(Isa isa);
/// AVX-512 VBMI and VBMI2 (byte permutes and expand: the packed formats' AVX-512 kernels).
bool cpu_has_avx512_vbmi2();
/// The above plus AVX-512 VNNI (the int8-input decode kernels).
bool cpu_has_avx512_vnni();
/// Parses "generic", "avx2", "avx512"; throws sparsa::Error on anything else.
Isa parse_isa(std::string_view name);

}  // namespace sparsa
