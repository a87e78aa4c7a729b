// The __metal_* builtins Apple's own headers are written with. Some libraries call them directly
// (MLX's bfloat math and SIMD wrappers do): `__metal_exp(x, fast)`, `__metal_simd_sum(x)`. Each
// forwards to the emulator's metal:: function (the SIMD-group ones are at the end of
// metal_runtime.h); the math mode flag is accepted and ignored: the emulator's math has one
// precision. Part of the emulator's metal_stdlib (see metal_stdlib.h).
#pragma once

#include "metal_math.h"

#define MTL_INTRINSIC1(NAME)                                                                        \
  template <class T> inline auto __metal_##NAME(T x, bool = false) { return metal::NAME(x); }
#define MTL_INTRINSIC2(NAME)                                                                        \
  template <class T> inline auto __metal_##NAME(T x, T y, bool = false) { return metal::NAME(x, y); }
#define MTL_INTRINSIC3(NAME)                                                                        \
  template <class T> inline auto __metal_##NAME(T x, T y, T z, bool = false) { return metal::NAME(x, y, z); }
MTL_INTRINSIC1(fabs) MTL_INTRINSIC1(acos) MTL_INTRINSIC1(acosh) MTL_INTRINSIC1(asin) MTL_INTRINSIC1(asinh)
MTL_INTRINSIC1(atan) MTL_INTRINSIC1(atanh) MTL_INTRINSIC1(ceil) MTL_INTRINSIC1(cos) MTL_INTRINSIC1(cosh)
MTL_INTRINSIC1(cospi) MTL_INTRINSIC1(exp) MTL_INTRINSIC1(exp10) MTL_INTRINSIC1(exp2) MTL_INTRINSIC1(floor)
MTL_INTRINSIC1(fract) MTL_INTRINSIC1(log) MTL_INTRINSIC1(log10) MTL_INTRINSIC1(log2) MTL_INTRINSIC1(rint)
MTL_INTRINSIC1(round) MTL_INTRINSIC1(rsqrt) MTL_INTRINSIC1(sin) MTL_INTRINSIC1(sinh) MTL_INTRINSIC1(sinpi)
MTL_INTRINSIC1(sqrt) MTL_INTRINSIC1(tan) MTL_INTRINSIC1(tanh) MTL_INTRINSIC1(tanpi) MTL_INTRINSIC1(trunc)
MTL_INTRINSIC2(atan2) MTL_INTRINSIC2(divide) MTL_INTRINSIC2(fmax) MTL_INTRINSIC2(fmin) MTL_INTRINSIC2(fmod)
MTL_INTRINSIC2(pow) MTL_INTRINSIC2(powr) MTL_INTRINSIC2(nextafter)
MTL_INTRINSIC3(fma) MTL_INTRINSIC3(fmax3) MTL_INTRINSIC3(fmedian3) MTL_INTRINSIC3(fmin3)
#undef MTL_INTRINSIC1
#undef MTL_INTRINSIC2
#undef MTL_INTRINSIC3
template <class T> inline T __metal_frexp(T x, int* e) { return metal::frexp(x, *e); }
template <class T> inline T __metal_ldexp(T x, int k, bool = false) { return metal::ldexp(x, k); }
