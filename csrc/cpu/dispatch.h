// How CPU loop files become one copy per instruction set, and how the right
// copy is picked at run time (the scheme of ATen's native/cpu kernels and
// DispatchStub, reduced to what this library needs).
//
// - A loop file is csrc/cpu/<family>_kernels.cpp. Its first line names the
//   copies the build makes of it, e.g. `// cpu copies: baseline avx2 avx512`.
//   setup.py compiles it once per copy through a generated wrapper that
//   defines MY_MPS_OPS_CPU_CAPABILITY (baseline, avx2 or avx512) and includes
//   it. Non-x86 builds (Apple Silicon) make the baseline copy only.
// - After its #includes a loop file opens MY_MPS_OPS_CPU_KERNELS_BEGIN: from
//   there on, every function is compiled for the copy's target and lives in
//   the namespace my_mps_ops::cpu::<capability>, where `vec::` is the SIMD
//   dialect (cpu/vec.h, compiled into each copy for its target) and `Vec` the
//   copy's float32 vector type. It ends with MY_MPS_OPS_CPU_KERNELS_END.
// - Entry points are plain function pointers in DispatchStubs declared by the
//   family's header (csrc/cpu/<family>.h); after END, each copy registers
//   its entries with MY_MPS_OPS_REGISTER_CPU_KERNEL. Calling a stub runs the best registered
//   copy this CPU can run, capped by MY_MPS_OPS_CPU_ISA=baseline|avx2|avx512
//   (read once; the tests use it to run every copy on one machine).
#pragma once

#include <cstdint>

namespace my_mps_ops::cpu {

enum class CpuIsa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };
constexpr int kCpuIsaCount = 3;

// The best copy this CPU runs, capped by MY_MPS_OPS_CPU_ISA (cpu/dispatch.cpp).
CpuIsa cpu_isa();
// "baseline", "avx2" or "avx512": the copy cpu_isa() selects.
const char* cpu_isa_name();

template <typename Fn>
struct DispatchStub {
  Fn copies[kCpuIsaCount] = {};

  Fn pick() const {
    for (int i = static_cast<int>(cpu_isa()); i >= 0; --i)
      if (copies[i] != nullptr) return copies[i];
    return nullptr;  // unreachable: every loop file has a baseline copy
  }
  template <typename... Args>
  auto operator()(Args&&... args) const {
    return pick()(static_cast<Args&&>(args)...);
  }
};

// Declares (in a family header) a stub; the inline variable has one
// definition across the ops file and every copy of the loop file.
#define MY_MPS_OPS_CPU_STUB(name, fn_type) inline ::my_mps_ops::cpu::DispatchStub<fn_type> name

}  // namespace my_mps_ops::cpu

// ---- inside a loop file's copy (MY_MPS_OPS_CPU_CAPABILITY defined by the wrapper)
#ifdef MY_MPS_OPS_CPU_CAPABILITY
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define MY_MPS_OPS_CPU_CAPABILITY_baseline 0
#define MY_MPS_OPS_CPU_CAPABILITY_avx2 1
#define MY_MPS_OPS_CPU_CAPABILITY_avx512 2
#define MY_MPS_OPS_CPU_CAT_(a, b) a##b
#define MY_MPS_OPS_CPU_CAT(a, b) MY_MPS_OPS_CPU_CAT_(a, b)
#define MY_MPS_OPS_CPU_INDEX MY_MPS_OPS_CPU_CAT(MY_MPS_OPS_CPU_CAPABILITY_, MY_MPS_OPS_CPU_CAPABILITY)

// The target of the copy: GCC's pragma, or clang's attribute push, applies to
// every function defined after it (and only to those: the headers included
// before stay baseline, so no inline function of theirs is emitted with a
// wider instruction set than the CPU may have).
#if MY_MPS_OPS_CPU_INDEX == 0
#define MY_MPS_OPS_CPU_TARGET_PUSH
#define MY_MPS_OPS_CPU_TARGET_POP
#elif defined(__clang__)
#if MY_MPS_OPS_CPU_INDEX == 1
#define MY_MPS_OPS_CPU_TARGET_PUSH \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#else
#define MY_MPS_OPS_CPU_TARGET_PUSH \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx2,fma\"))), apply_to = function)")
#endif
#define MY_MPS_OPS_CPU_TARGET_POP _Pragma("clang attribute pop")
#else
#if MY_MPS_OPS_CPU_INDEX == 1
#define MY_MPS_OPS_CPU_TARGET_PUSH _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#else
#define MY_MPS_OPS_CPU_TARGET_PUSH _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx2,fma\")")
#endif
#define MY_MPS_OPS_CPU_TARGET_POP _Pragma("GCC pop_options")
#endif

// The copy's own vector helpers (cpu/vec.h), compiled for its target.
MY_MPS_OPS_CPU_TARGET_PUSH
namespace my_mps_ops::cpu::MY_MPS_OPS_CPU_CAPABILITY::vec {
#include "cpu/vec.h"
#if MY_MPS_OPS_CPU_INDEX == 0
using Vec = f32x4;
#elif MY_MPS_OPS_CPU_INDEX == 1
using Vec = f32x8;
#else
using Vec = f32x16;
#endif
// Streaming stores need the AVX copies' 32- or 64-byte vectors (x86-64).
constexpr bool kCanStream = sizeof(Vec) >= 32;
}  // namespace my_mps_ops::cpu::MY_MPS_OPS_CPU_CAPABILITY::vec
MY_MPS_OPS_CPU_TARGET_POP

// Opens the copy's target region and namespace, where `vec::` names its
// helpers and `Vec` its float32 vector type.
#define MY_MPS_OPS_CPU_KERNELS_BEGIN                     \
  MY_MPS_OPS_CPU_TARGET_PUSH                             \
  namespace my_mps_ops::cpu::MY_MPS_OPS_CPU_CAPABILITY { \
  using vec::Vec;

#define MY_MPS_OPS_CPU_KERNELS_END \
  }                                \
  MY_MPS_OPS_CPU_TARGET_POP

// After END: makes this copy's `fn` (a name in the copy's namespace) the
// entry of `stub`. Outside the target region, so the static initialiser runs
// baseline code on any CPU.
#define MY_MPS_OPS_REGISTER_CPU_KERNEL(stub, fn)                                       \
  [[maybe_unused]] static const bool MY_MPS_OPS_CPU_CAT(registered_, __COUNTER__) = [] { \
    (stub).copies[MY_MPS_OPS_CPU_INDEX] = &::my_mps_ops::cpu::MY_MPS_OPS_CPU_CAPABILITY::fn; \
    return true;                                                                       \
  }()
#endif  // MY_MPS_OPS_CPU_CAPABILITY
