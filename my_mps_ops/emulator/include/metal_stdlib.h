// Metal Shading Language standard library for the CPU emulator.
//
// Shader source translated to C++ (address-space keywords erased) is compiled by g++ against this
// header. It supplies what `#include <metal_stdlib>` + `using namespace metal;` give a Metal kernel:
// scalar and vector types, swizzles (through __mtl::swizzle / __mtl::swizzle_ref, which the
// translator emits for `.xy`-style member access), conversions, the math library (metal::,
// metal::fast::, metal::precise::), atomics and simdgroup_matrix.
// Thread builtins, barriers and simd_* collectives live in metal_runtime.h, which includes this.
//
// Kept to cheap headers (no <cmath>, no <iostream>): math goes through GCC builtins so that each
// kernel compile pays little for the prelude.
#pragma once

// Shared headers test these to pick their Metal branch (PyTorch's c10/metal/common.h does).
#ifndef __METAL__
#define __METAL__ 1
#endif
#ifndef __METAL_VERSION__
#define __METAL_VERSION__ 320
#endif

#include <cfloat>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "metal_types.h"
#include "metal_math.h"
#include "metal_matrix.h"
#include "metal_atomic.h"
#include "metal_simdgroup_matrix.h"
#include "metal_logging.h"
#include "metal_intrinsics.h"
#include "metal_globals.h"
