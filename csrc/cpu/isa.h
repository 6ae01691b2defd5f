// The instruction-set level the CPU kernels run at: the best one the CPU supports, or TOME_CPU_ISA.
//
// Levels: scalar (the x86-64 baseline, SSE2; the only level on other architectures), avx2 (AVX2 + FMA),
// avx512 (AVX-512 F/DQ/BW/VL). A kernel without code for a level runs its best lower one (the matcher has
// no AVX-512 version: it runs its AVX2 code at avx512). Results are bit-identical for any thread count at
// every level; different levels may round differently (FMA), within the parity tolerances.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace tome::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "scalar";
}

inline Isa supported_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// Read once (call it outside OpenMP regions: a bad TOME_CPU_ISA throws, and does so again on every call).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    const Isa supported = supported_isa();
    const char* env = std::getenv("TOME_CPU_ISA");
    if (env == nullptr || *env == '\0') return supported;
    const std::string name(env);
    Isa wanted = Isa::kScalar;
    if (name == "avx2") {
      wanted = Isa::kAvx2;
    } else if (name == "avx512") {
      wanted = Isa::kAvx512;
    } else {
      TORCH_CHECK_VALUE(name == "scalar", "tome: TOME_CPU_ISA must be scalar, avx2 or avx512, got '", name, "'");
    }
    TORCH_CHECK_VALUE(wanted <= supported, "tome: TOME_CPU_ISA=", name, " but this CPU supports at most ",
                      isa_name(supported));
    return wanted;
  }();
  return isa;
}

}  // namespace tome::cpu
