// What Apple's compiler declares outside namespace metal: the scalar and vector type names and
// as_type are visible without `using namespace metal;` (PyTorch's c10/metal headers spell
// `float4`, `uint` unqualified inside their own namespace; files without <metal_stdlib> use
// `uint`), and the implementation macros Apple's headers define (METAL_FUNC, the math modes
// their __metal_* builtins take, which some libraries pass themselves).
// Part of the emulator's metal_stdlib (see metal_stdlib.h).
#pragma once

#include "metal_types.h"

using metal::half;
using metal::bfloat;
using metal::uchar;
using metal::ushort;
using metal::uint;
using metal::ulong;
using metal::as_type;

#define MTL_GLOBAL_VECS(NAME)                                                                       \
  using metal::NAME##2;                                                                             \
  using metal::NAME##3;                                                                             \
  using metal::NAME##4;                                                                             \
  using metal::packed_##NAME##2;                                                                    \
  using metal::packed_##NAME##3;                                                                    \
  using metal::packed_##NAME##4;
MTL_GLOBAL_VECS(float)
MTL_GLOBAL_VECS(half)
MTL_GLOBAL_VECS(bfloat)
MTL_GLOBAL_VECS(bool)
MTL_GLOBAL_VECS(char)
MTL_GLOBAL_VECS(uchar)
MTL_GLOBAL_VECS(short)
MTL_GLOBAL_VECS(ushort)
MTL_GLOBAL_VECS(int)
MTL_GLOBAL_VECS(uint)
MTL_GLOBAL_VECS(long)
MTL_GLOBAL_VECS(ulong)
#undef MTL_GLOBAL_VECS

#ifndef METAL_FUNC
#define METAL_FUNC inline __attribute__((always_inline))
#endif
#ifndef METAL_INTERNAL
#define METAL_INTERNAL
#endif
#ifndef METAL_ASM
#define METAL_ASM
#endif
#ifndef __METAL_FAST_MATH__
#define __METAL_FAST_MATH__ true
#define __METAL_PRECISE_MATH__ false
#define __METAL_MAYBE_FAST_MATH__ false
#endif
