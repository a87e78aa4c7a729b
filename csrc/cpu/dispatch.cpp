// Which copy of the CPU loop files runs (see cpu/dispatch.h).
#include "cpu/dispatch.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace my_mps_ops::cpu {

CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = CpuIsa::Baseline;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      best = __builtin_cpu_supports("avx512f") ? CpuIsa::Avx512 : CpuIsa::Avx2;
#endif
    const char* cap = std::getenv("MY_MPS_OPS_CPU_ISA");
    if (cap == nullptr || *cap == 0 || std::strcmp(cap, "avx512") == 0) return best;
    if (std::strcmp(cap, "avx2") == 0) return std::min(best, CpuIsa::Avx2);
    TORCH_CHECK(std::strcmp(cap, "baseline") == 0,
                "MY_MPS_OPS_CPU_ISA must be baseline, avx2 or avx512, got \"", cap, "\"");
    return CpuIsa::Baseline;
  }();
  return isa;
}

const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace my_mps_ops::cpu
