// Shared by the shaders and the host C++ that launches them: the shared
// headers (shaders/include/<family>.h) hold the parameter structs and
// constants both sides use, so they cannot drift apart. Compiled as MSL when
// __METAL__ is defined (Apple's compiler and the emulator define it), as C++
// otherwise, in the style of PyTorch's c10/metal/common.h.
#pragma once

#ifdef __METAL__
#include <metal_stdlib>
// A compile-time constant both sides see (program-scope constants need the
// constant address space in MSL).
#define MY_MPS_OPS_CONSTANT constant constexpr
// A real constant: float in MSL (no double there), double on the host so the
// float64 CPU paths keep every digit (the float paths round it once).
#define MY_MPS_OPS_REAL_CONSTANT constant constexpr float
#define MY_MPS_OPS_REAL(literal) literal##f
#define MY_MPS_OPS_SHADER_NAMESPACE_BEGIN
#define MY_MPS_OPS_SHADER_NAMESPACE_END
#else
#include <cstdint>
#define MY_MPS_OPS_CONSTANT inline constexpr
#define MY_MPS_OPS_REAL_CONSTANT inline constexpr double
#define MY_MPS_OPS_REAL(literal) literal
#define MY_MPS_OPS_SHADER_NAMESPACE_BEGIN namespace my_mps_ops::shaders {
#define MY_MPS_OPS_SHADER_NAMESPACE_END }
#endif

#ifdef __METAL__
// Instantiates kernel template `name` for type T under the host name
// "<name>_<T>" (e.g. swiglu_forward_bfloat); the signature comes from the
// template itself, so it is written once.
#define MY_MPS_OPS_INSTANTIATE_KERNEL(name, T) \
  template [[host_name(#name "_" #T)]] [[kernel]] decltype(name<T>) name<T>;
// The same for a kernel template on a type and a value (e.g. the head size
// of attention), under the host name "<name>_<T>_<N>"
// (flash_attention_forward_half_128).
#define MY_MPS_OPS_INSTANTIATE_KERNEL2(name, T, N) \
  template [[host_name(#name "_" #T "_" #N)]] [[kernel]] decltype(name<T, N>) name<T, N>;
#endif
