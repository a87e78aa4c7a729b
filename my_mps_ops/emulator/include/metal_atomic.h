// Metal atomics for the emulator's metal_stdlib.
//
// The emulator runs threadgroups on several OS threads at once, so device-memory atomics must be
// real atomics: every operation is a GCC __atomic builtin on the object's storage (lock-free for
// 1/2/4/8-byte types on x86-64). Operations Metal has no instruction for on a type (fetch_add on
// float, min/max) are compare-exchange loops, which are atomic as well.
// atomic<T> has the layout of T, so a `device atomic_uint*` can point into a uint32 tensor.
#pragma once

#include "metal_types.h"

namespace metal {

enum memory_order {
  memory_order_relaxed = __ATOMIC_RELAXED,
  memory_order_acquire = __ATOMIC_ACQUIRE,
  memory_order_release = __ATOMIC_RELEASE,
  memory_order_acq_rel = __ATOMIC_ACQ_REL,
  memory_order_seq_cst = __ATOMIC_SEQ_CST,
};

enum thread_scope {
  thread_scope_thread = 0,
  thread_scope_simdgroup = 1,
  thread_scope_threadgroup = 2,
  thread_scope_device = 3,
};

// Memory-fence flags taken by threadgroup_barrier / simdgroup_barrier (metal_runtime.h).
enum class mem_flags : unsigned {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }
constexpr mem_flags operator&(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) & unsigned(b)); }

template <class T> struct atomic {
  static_assert(sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8,
                "atomic<T> needs a 1, 2, 4 or 8-byte T");
  T __value;  // no members in Metal: all access goes through the atomic_*_explicit functions
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;
typedef atomic<long> atomic_long;
typedef atomic<ulong> atomic_ulong;

namespace atomic_detail {
// Kernels may declare `volatile device atomic_uint*`; the builtins work on plain pointers.
template <class T> inline T* storage(volatile atomic<T>* obj) { return const_cast<T*>(&obj->__value); }
template <class T> inline T* storage(atomic<T>* obj) { return &obj->__value; }

// A read-modify-write by compare-exchange: new value = op(old).
template <class T, class Op> inline T cas_loop(T* p, Op op, memory_order order) {
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T desired;
  do {
    desired = op(old);
  } while (!__atomic_compare_exchange(p, &old, &desired, true, int(order), __ATOMIC_RELAXED));
  return old;
}
}  // namespace atomic_detail

template <class T>
inline void atomic_store_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T> desired, memory_order order) {
  __atomic_store(atomic_detail::storage(obj), &desired, int(order));
}
template <class T> inline T atomic_load_explicit(volatile atomic<T>* obj, memory_order order) {
  T r;
  __atomic_load(atomic_detail::storage(obj), &r, int(order));
  return r;
}
template <class T>
inline T atomic_exchange_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T> desired, memory_order order) {
  T r;
  __atomic_exchange(atomic_detail::storage(obj), &desired, &r, int(order));
  return r;
}
// On failure *expected receives the current value, as in Metal and C11.
template <class T>
inline bool atomic_compare_exchange_weak_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T>* expected,
                                                  __mtl::type_identity_t<T> desired, memory_order success,
                                                  memory_order failure) {
  // The strong form: no spurious failures, which the weak contract allows.
  return __atomic_compare_exchange(atomic_detail::storage(obj), expected, &desired, false, int(success),
                                   int(failure));
}
template <class T>
inline bool atomic_compare_exchange_strong_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T>* expected,
                                                    __mtl::type_identity_t<T> desired, memory_order success,
                                                    memory_order failure) {
  return __atomic_compare_exchange(atomic_detail::storage(obj), expected, &desired, false, int(success),
                                   int(failure));
}

template <class T>
inline T atomic_fetch_add_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T> v, memory_order order) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(atomic_detail::storage(obj), v, int(order));
  } else {
    return atomic_detail::cas_loop(atomic_detail::storage(obj), [v](T old) { return T(old + v); }, order);
  }
}
template <class T>
inline T atomic_fetch_sub_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T> v, memory_order order) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_sub(atomic_detail::storage(obj), v, int(order));
  } else {
    return atomic_detail::cas_loop(atomic_detail::storage(obj), [v](T old) { return T(old - v); }, order);
  }
}
template <class T>
inline T atomic_fetch_min_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T> v, memory_order order) {
  return atomic_detail::cas_loop(atomic_detail::storage(obj), [v](T old) { return v < old ? v : old; }, order);
}
template <class T>
inline T atomic_fetch_max_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T> v, memory_order order) {
  return atomic_detail::cas_loop(atomic_detail::storage(obj), [v](T old) { return old < v ? v : old; }, order);
}
template <class T>
inline T atomic_fetch_and_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T> v, memory_order order) {
  return __atomic_fetch_and(atomic_detail::storage(obj), v, int(order));
}
template <class T>
inline T atomic_fetch_or_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T> v, memory_order order) {
  return __atomic_fetch_or(atomic_detail::storage(obj), v, int(order));
}
template <class T>
inline T atomic_fetch_xor_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T> v, memory_order order) {
  return __atomic_fetch_xor(atomic_detail::storage(obj), v, int(order));
}

// A full fence whatever the flags/scope: stronger than Metal asks, never weaker.
inline void atomic_thread_fence(mem_flags, memory_order order, thread_scope = thread_scope_device) {
  __atomic_thread_fence(int(order) == __ATOMIC_RELAXED ? __ATOMIC_RELAXED : __ATOMIC_SEQ_CST);
}

}  // namespace metal
