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

namespace atomic_detail {
// What an atomic<T> stores: T itself, except bool, which Metal stores in 4 bytes.
template <class T> struct repr { typedef T type; };
template <> struct repr<bool> { typedef uint type; };
template <class T> using repr_t = typename repr<T>::type;
}  // namespace atomic_detail

template <class T> struct atomic {
  static_assert(sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8,
                "atomic<T> needs a 1, 2, 4 or 8-byte T");
  atomic_detail::repr_t<T> __value;  // no members in Metal: all access goes through atomic_*_explicit
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;
typedef atomic<long> atomic_long;
typedef atomic<ulong> atomic_ulong;

namespace atomic_detail {
// Kernels may declare `volatile device atomic_uint*`; the builtins work on plain pointers.
template <class T> inline repr_t<T>* storage(volatile atomic<T>* obj) {
  return const_cast<repr_t<T>*>(&obj->__value);
}

// A read-modify-write by compare-exchange: new value = op(old).
template <class R, class Op> inline R cas_loop(R* p, Op op, memory_order order) {
  R old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  R desired;
  do {
    desired = op(old);
  } while (!__atomic_compare_exchange(p, &old, &desired, true, int(order), __ATOMIC_RELAXED));
  return old;
}
}  // namespace atomic_detail

template <class T>
inline void atomic_store_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T> desired, memory_order order) {
  atomic_detail::repr_t<T> d = atomic_detail::repr_t<T>(desired);
  __atomic_store(atomic_detail::storage(obj), &d, int(order));
}
template <class T> inline T atomic_load_explicit(volatile atomic<T>* obj, memory_order order) {
  atomic_detail::repr_t<T> r;
  __atomic_load(atomic_detail::storage(obj), &r, int(order));
  return T(r);
}
template <class T>
inline T atomic_exchange_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T> desired, memory_order order) {
  atomic_detail::repr_t<T> d = atomic_detail::repr_t<T>(desired), r;
  __atomic_exchange(atomic_detail::storage(obj), &d, &r, int(order));
  return T(r);
}
// On failure *expected receives the current value, as in Metal and C11.
template <class T>
inline bool atomic_compare_exchange_strong_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T>* expected,
                                                    __mtl::type_identity_t<T> desired, memory_order success,
                                                    memory_order failure) {
  atomic_detail::repr_t<T> e = atomic_detail::repr_t<T>(*expected), d = atomic_detail::repr_t<T>(desired);
  const bool ok = __atomic_compare_exchange(atomic_detail::storage(obj), &e, &d, false, int(success), int(failure));
  *expected = T(e);
  return ok;
}
// The strong form: no spurious failures, which the weak contract allows.
template <class T>
inline bool atomic_compare_exchange_weak_explicit(volatile atomic<T>* obj, __mtl::type_identity_t<T>* expected,
                                                  __mtl::type_identity_t<T> desired, memory_order success,
                                                  memory_order failure) {
  return atomic_compare_exchange_strong_explicit(obj, expected, desired, success, failure);
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
