// The kernel side of the Metal emulator's runtime: thread builtins,
// threadgroup_barrier / simdgroup_barrier, the simd_* functions and
// threadgroup storage, over the scheduler in metal_runtime.cpp (fibers, one
// per GPU thread, when a kernel synchronises; a plain loop otherwise).
//
// Every translated shader includes this first. Synchronisation points take
// their call site from __builtin_LINE()/__builtin_FILE() default arguments and
// an id the translator gives each call (template argument __S), so that lanes
// meeting at different calls in the .metal source are reported.
#pragma once

#include "metal_emulator_abi.h"
#include "metal_stdlib.h"

#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

namespace __mtl {

// Bytes one lane can contribute to a SIMD-group exchange.
constexpr size_t kSimdSlotBytes = 256;
constexpr unsigned kSimdWidth = 32;

struct SimdExchange {
  const unsigned char* slots;  // lane i's value at slots + i * kSimdSlotBytes
  uint32_t active;             // bit i: lane i took part
  uint32_t lane;               // the calling lane
};

// Scheduler entry points (metal_runtime.cpp). `flags` are the barrier's mem_flags.
void sync_barrier(unsigned flags, unsigned line, const char* file, unsigned site);
void simd_barrier(unsigned flags, unsigned line, const char* file, unsigned site);
SimdExchange simd_exchange(const void* value, size_t bytes, unsigned line, const char* file,
                           unsigned site = 0);
void note_inactive_lane_read(unsigned line, const char* file, unsigned lane, unsigned src);
unsigned char* threadgroup_static_base(int site);
unsigned char* threadgroup_dynamic_base(int index);
// Set by the host (mtl_emu_cancel) to stop a run: a Ctrl-C or a timeout.
extern volatile int32_t cancel_requested __attribute__((visibility("hidden")));
[[noreturn]] void cancelled(unsigned line, const char* file);

// The translator makes every loop condition `poll() && (cond)`, so that a
// kernel that never ends can be stopped: one load and a not-taken branch per
// iteration. (The volatile read also makes an empty loop a side effect, not UB.)
constexpr inline bool poll(unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  if (__builtin_is_constant_evaluated()) return true;
  if (__builtin_expect(cancel_requested != 0, 0)) cancelled(line, file);
  return true;
}

// Names of a kernel's `threadgroup T name[N];` declarations by site, null-terminated
// (defined in every translated shader, next to its kernel table).
const char* const* threadgroup_names(const mtl_emu_kernel* kernel);
// Stores the initial values of a kernel's initialized threadgroup variables
// (`threadgroup uint32_t flag = 0;`) at `base` (laid out by `offsets`); defined
// in every translated shader, called once per threadgroup before its threads run.
void threadgroup_initialize(const mtl_emu_kernel* kernel, unsigned char* base, const size_t* offsets);

// `threadgroup T x[N];` in a kernel becomes `auto& x = *threadgroup_static<T[N]>(site)`.
template <class T>
inline T* threadgroup_static(int site) {
  return reinterpret_cast<T*>(threadgroup_static_base(site));
}

// A subscript outside a `threadgroup T name[N]...;` array: records the error
// (array, index, thread) and unwinds the thread.
[[noreturn]] void threadgroup_index_fault(int site, long long index, size_t extent, unsigned dim, unsigned line,
                                          const char* file);

// The translator rewrites `name[i]` on a threadgroup array declared at `site`
// to `name[tg_index<decltype(name), 0>(i, site)]`: the index, checked against
// the array's extent in dimension Dim.
template <class A, unsigned Dim, class I>
inline I tg_index(I i, int site, unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  constexpr size_t extent = std::extent_v<std::remove_reference_t<A>, Dim>;
  bool inside;
  if constexpr (std::is_signed_v<I>) inside = i >= 0 && static_cast<unsigned long long>(i) < extent;
  else inside = static_cast<unsigned long long>(i) < extent;
  if (__builtin_expect(!inside, 0)) threadgroup_index_fault(site, static_cast<long long>(i), extent, Dim, line, file);
  return i;
}

// Where each pointer parameter of the running kernel may reach: slot n is
// [[buffer(n)]], slot kMaxBindings + n [[threadgroup(n)]] (this worker's copy).
constexpr int kMaxBindings = MTL_EMU_MAX_BINDINGS;
struct Bindings {
  const unsigned char* base[2 * kMaxBindings];
  size_t length[2 * kMaxBindings];
};
// Buffers are the launch's (set by mtl_emu_bind before it runs: a kernel
// reads them without a call); threadgroup memory is each worker's own.
extern Bindings launch_bindings __attribute__((visibility("hidden")));
const Bindings* threadgroup_bindings();
[[noreturn]] void buffer_index_fault(int slot, long long index, long long offset, size_t bytes, unsigned line,
                                     const char* file);

// What one pointer parameter may reach, copied at kernel entry: locals the
// compiler keeps in registers (a store through any pointer could change the
// tables above, so reading them at each access would cost more).
struct Bound {
  const unsigned char* base;
  size_t length;
  int slot;
};
inline Bound bound(const Bindings& table, int slot) { return Bound{table.base[slot], table.length[slot], slot}; }

// The translator rewrites `p[i]` on a kernel's pointer parameter p to
// `p[buffer_index(i, p, bound_p)]`: the element's address, wherever p points
// now, must lie inside what was bound to that parameter.
template <class I, class P>
inline I buffer_index(I i, P* p, const Bound& b, unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  // (p may be volatile: `coherent(device)` buffers; only its address is used)
  const auto* address = static_cast<const unsigned char*>(const_cast<const void*>(static_cast<const volatile void*>(p)));
  const long long offset = static_cast<long long>(address - b.base) +
                           static_cast<long long>(i) * static_cast<long long>(sizeof(P));
  if (__builtin_expect(offset < 0 || static_cast<unsigned long long>(offset) + sizeof(P) > b.length, 0))
    buffer_index_fault(b.slot, static_cast<long long>(i), offset, sizeof(P), line, file);
  return i;
}

// Static threadgroup layout: appends T at its alignment, records its offset.
template <class T>
inline size_t threadgroup_place(size_t total, size_t* offsets, int site) {
  const size_t align = alignof(T) < 16 ? 16 : alignof(T);
  total = (total + align - 1) / align * align;
  if (offsets != nullptr) offsets[site] = total;
  return total + sizeof(T);
}

// ---------------------------------------------------------------- builtins

MTL_EMU_UNCHECKED inline void builtin_value(const mtl_emu_launch* L, const mtl_emu_lane* lane, int which, uint32_t v[3]) {
  v[1] = v[2] = 0;
  switch (which) {
    case MTL_EMU_THREAD_POSITION_IN_GRID:
      for (int d = 0; d < 3; ++d) v[d] = lane->group_pos[d] * uint32_t(L->group[d]) + lane->thread_in_group[d];
      return;
    case MTL_EMU_THREADGROUP_POSITION_IN_GRID: for (int d = 0; d < 3; ++d) v[d] = lane->group_pos[d]; return;
    case MTL_EMU_THREAD_POSITION_IN_THREADGROUP: for (int d = 0; d < 3; ++d) v[d] = lane->thread_in_group[d]; return;
    case MTL_EMU_THREADS_PER_THREADGROUP: for (int d = 0; d < 3; ++d) v[d] = lane->group_size[d]; return;
    case MTL_EMU_THREADGROUPS_PER_GRID: for (int d = 0; d < 3; ++d) v[d] = lane->groups[d]; return;
    case MTL_EMU_THREADS_PER_GRID: for (int d = 0; d < 3; ++d) v[d] = lane->grid_threads[d]; return;
    case MTL_EMU_THREAD_INDEX_IN_THREADGROUP: v[0] = lane->index_in_group; return;
    case MTL_EMU_THREAD_INDEX_IN_SIMDGROUP: v[0] = lane->simd_lane; return;
    case MTL_EMU_SIMDGROUP_INDEX_IN_THREADGROUP: v[0] = lane->simd_group; return;
    case MTL_EMU_THREADS_PER_SIMDGROUP: v[0] = kSimdWidth; return;
    case MTL_EMU_SIMDGROUPS_PER_THREADGROUP: v[0] = lane->simd_groups; return;
    // Quad-groups: four consecutive threads (SIMD groups are 32 consecutive threads).
    case MTL_EMU_QUADGROUP_INDEX_IN_THREADGROUP: v[0] = lane->index_in_group / 4; return;
    case MTL_EMU_THREAD_INDEX_IN_QUADGROUP: v[0] = lane->index_in_group % 4; return;
    case MTL_EMU_THREADS_PER_QUADGROUP: v[0] = 4; return;
    case MTL_EMU_QUADGROUPS_PER_THREADGROUP:
      v[0] = (lane->group_size[0] * lane->group_size[1] * lane->group_size[2] + 3) / 4;
      return;
    default: v[0] = 0; return;
  }
}

template <class P>
inline P builtin(const mtl_emu_launch* L, const mtl_emu_lane* lane, int which) {
  uint32_t v[3];
  builtin_value(L, lane, which, v);
  if constexpr (is_vec_v<P>) {
    using E = typename vec_traits<P>::elem;
    constexpr int n = vec_traits<P>::size;
    if constexpr (n == 2) return P(E(v[0]), E(v[1]));
    else if constexpr (n == 3) return P(E(v[0]), E(v[1]), E(v[2]));
    else return P(E(v[0]), E(v[1]), E(v[2]), E(0));
  } else {
    return P(v[0]);
  }
}

// ------------------------------------------------------- kernel invocation

template <class F>
struct kernel_signature;
template <class... P>
struct kernel_signature<void (*)(P...)> {
  using args = std::tuple<P...>;
  static constexpr size_t arity = sizeof...(P);
};

// Bytes a constant-reference parameter reads (0 for pointers and builtins).
template <class F, size_t I>
constexpr uint32_t param_bytes() {
  using P = std::tuple_element_t<I, typename kernel_signature<F>::args>;
  if constexpr (std::is_reference_v<P>) return uint32_t(sizeof(std::remove_reference_t<P>));
  else return 0;
}

template <class P>
inline P kernel_arg(const mtl_emu_launch* L, const mtl_emu_lane* lane, const mtl_emu_param& p) {
  if constexpr (std::is_pointer_v<P>) {
    void* base = p.kind == MTL_EMU_PARAM_THREADGROUP ? static_cast<void*>(threadgroup_dynamic_base(p.index))
                                                      : L->buffers[p.index];
    return reinterpret_cast<P>(base);
  } else if constexpr (std::is_reference_v<P>) {
    return *reinterpret_cast<std::remove_reference_t<P>*>(L->buffers[p.index]);
  } else {
    return builtin<P>(L, lane, p.index);
  }
}

template <auto Fn, size_t... I>
inline void invoke_kernel(const mtl_emu_param* params, const mtl_emu_launch* L, const mtl_emu_lane* lane,
                          std::index_sequence<I...>) {
  using Args = typename kernel_signature<decltype(Fn)>::args;
  Fn(kernel_arg<std::tuple_element_t<I, Args>>(L, lane, params[I])...);
}

template <auto Fn>
inline void invoke_kernel(const mtl_emu_param* params, const mtl_emu_launch* L, const mtl_emu_lane* lane) {
  invoke_kernel<Fn>(params, L, lane, std::make_index_sequence<kernel_signature<decltype(Fn)>::arity>{});
}

// ------------------------------------------------------ SIMD-group helpers

template <class T>
MTL_EMU_UNCHECKED inline T slot_value(const SimdExchange& ex, unsigned src) {
  T v;
  std::memcpy(&v, ex.slots + size_t(src) * kSimdSlotBytes, sizeof(T));
  return v;
}

template <class T>
inline SimdExchange exchange(const T& value, unsigned line, const char* file, unsigned site) {
  static_assert(sizeof(T) <= kSimdSlotBytes, "SIMD-group function argument too large for the emulator");
  return simd_exchange(&value, sizeof(T), line, file, site);
}

// The value lane `src` contributed, or poison (all bits set) with a warning
// when that lane did not take part: hardware results there are undefined.
template <class T>
inline T read_lane(const SimdExchange& ex, const T& own, unsigned src, unsigned line, const char* file) {
  (void)own;
  if (src < kSimdWidth && (ex.active >> src) & 1u) return slot_value<T>(ex, src);
  note_inactive_lane_read(line, file, ex.lane, src);
  T poison;
  std::memset(&poison, 0xFF, sizeof(T));
  return poison;
}

// a & b, a | b, a ^ b; on the bits of a floating-point value too (Apple's __metal_simd_xor
// takes float, which MLX's bfloat wrappers call).
template <class T> inline T bitwise(const T& a, const T& b, char op) {
  if constexpr (std::is_integral<T>::value || is_vec_v<T>) {
    return op == '&' ? T(a & b) : op == '|' ? T(a | b) : T(a ^ b);
  } else {
    typedef std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>> U;
    const U x = __builtin_bit_cast(U, a), y = __builtin_bit_cast(U, b);
    return __builtin_bit_cast(T, U(op == '&' ? x & y : op == '|' ? x | y : x ^ y));
  }
}

template <class T, class Op>
MTL_EMU_UNCHECKED inline T reduce_lanes(const SimdExchange& ex, Op op) {
  // Pairwise tree over the active lanes, like the hardware's reduction order.
  T vals[kSimdWidth];
  int n = 0;
  for (unsigned i = 0; i < kSimdWidth; ++i)
    if ((ex.active >> i) & 1u) vals[n++] = slot_value<T>(ex, i);
  for (int width = 1; width < n; width *= 2)
    for (int i = 0; i + width < n; i += 2 * width) vals[i] = op(vals[i], vals[i + width]);
  return vals[0];
}

template <class T, class Op>
MTL_EMU_UNCHECKED inline T prefix_lanes(const SimdExchange& ex, Op op, T identity, bool inclusive) {
  T acc = identity;
  for (unsigned i = 0; i < ex.lane; ++i)
    if ((ex.active >> i) & 1u) acc = op(acc, slot_value<T>(ex, i));
  return inclusive ? op(acc, slot_value<T>(ex, ex.lane)) : acc;
}

}  // namespace __mtl

namespace metal {

#define MTL_EMU_SITE unsigned __line = __builtin_LINE(), const char* __file = __builtin_FILE()

template <unsigned __S = 0>
inline void threadgroup_barrier(mem_flags flags = mem_flags::mem_none, MTL_EMU_SITE) {
  __mtl::sync_barrier(unsigned(flags), __line, __file, __S);
}
template <unsigned __S = 0>
inline void simdgroup_barrier(mem_flags flags = mem_flags::mem_none, MTL_EMU_SITE) {
  __mtl::simd_barrier(unsigned(flags), __line, __file, __S);
}

template <unsigned __S = 0, class T>
inline T simd_sum(T x, MTL_EMU_SITE) {
  return __mtl::reduce_lanes<T>(__mtl::exchange(x, __line, __file, __S), [](T a, T b) { return T(a + b); });
}
template <unsigned __S = 0, class T>
inline T simd_product(T x, MTL_EMU_SITE) {
  return __mtl::reduce_lanes<T>(__mtl::exchange(x, __line, __file, __S), [](T a, T b) { return T(a * b); });
}
template <unsigned __S = 0, class T>
inline T simd_min(T x, MTL_EMU_SITE) {
  return __mtl::reduce_lanes<T>(__mtl::exchange(x, __line, __file, __S), [](T a, T b) { return T(min(a, b)); });
}
template <unsigned __S = 0, class T>
inline T simd_max(T x, MTL_EMU_SITE) {
  return __mtl::reduce_lanes<T>(__mtl::exchange(x, __line, __file, __S), [](T a, T b) { return T(max(a, b)); });
}
template <unsigned __S = 0, class T>
inline T simd_and(T x, MTL_EMU_SITE) {
  return __mtl::reduce_lanes<T>(__mtl::exchange(x, __line, __file, __S), [](T a, T b) { return __mtl::bitwise(a, b, '&'); });
}
template <unsigned __S = 0, class T>
inline T simd_or(T x, MTL_EMU_SITE) {
  return __mtl::reduce_lanes<T>(__mtl::exchange(x, __line, __file, __S), [](T a, T b) { return __mtl::bitwise(a, b, '|'); });
}
template <unsigned __S = 0, class T>
inline T simd_xor(T x, MTL_EMU_SITE) {
  return __mtl::reduce_lanes<T>(__mtl::exchange(x, __line, __file, __S), [](T a, T b) { return __mtl::bitwise(a, b, '^'); });
}

template <unsigned __S = 0, class T>
inline T simd_prefix_inclusive_sum(T x, MTL_EMU_SITE) {
  return __mtl::prefix_lanes<T>(__mtl::exchange(x, __line, __file, __S), [](T a, T b) { return T(a + b); }, T(0), true);
}
template <unsigned __S = 0, class T>
inline T simd_prefix_exclusive_sum(T x, MTL_EMU_SITE) {
  return __mtl::prefix_lanes<T>(__mtl::exchange(x, __line, __file, __S), [](T a, T b) { return T(a + b); }, T(0), false);
}
template <unsigned __S = 0, class T>
inline T simd_prefix_inclusive_product(T x, MTL_EMU_SITE) {
  return __mtl::prefix_lanes<T>(__mtl::exchange(x, __line, __file, __S), [](T a, T b) { return T(a * b); }, T(1), true);
}
template <unsigned __S = 0, class T>
inline T simd_prefix_exclusive_product(T x, MTL_EMU_SITE) {
  return __mtl::prefix_lanes<T>(__mtl::exchange(x, __line, __file, __S), [](T a, T b) { return T(a * b); }, T(1), false);
}

template <unsigned __S = 0, class T>
inline T simd_shuffle(T x, ushort src, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return __mtl::read_lane(ex, x, src, __line, __file);
}
template <unsigned __S = 0, class T>
inline T simd_broadcast(T x, ushort src, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return __mtl::read_lane(ex, x, src, __line, __file);
}
// Lanes whose source would fall outside the SIMD group keep their own value.
template <unsigned __S = 0, class T>
inline T simd_shuffle_up(T x, ushort delta, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return ex.lane < delta ? x : __mtl::read_lane(ex, x, ex.lane - delta, __line, __file);
}
template <unsigned __S = 0, class T>
inline T simd_shuffle_down(T x, ushort delta, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return ex.lane + delta >= __mtl::kSimdWidth ? x : __mtl::read_lane(ex, x, ex.lane + delta, __line, __file);
}
template <unsigned __S = 0, class T>
inline T simd_shuffle_xor(T x, ushort mask, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return __mtl::read_lane(ex, x, (ex.lane ^ mask) & (__mtl::kSimdWidth - 1), __line, __file);
}
template <unsigned __S = 0, class T>
inline T simd_shuffle_rotate_up(T x, ushort delta, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return __mtl::read_lane(ex, x, (ex.lane + __mtl::kSimdWidth - delta % __mtl::kSimdWidth) % __mtl::kSimdWidth,
                          __line, __file);
}
template <unsigned __S = 0, class T>
inline T simd_shuffle_rotate_down(T x, ushort delta, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return __mtl::read_lane(ex, x, (ex.lane + delta) % __mtl::kSimdWidth, __line, __file);
}
template <unsigned __S = 0, class T>
inline T simd_broadcast_first(T x, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return __mtl::slot_value<T>(ex, unsigned(__builtin_ctz(ex.active)));
}

// simd_vote: the ballot of the active lanes.
struct simd_vote {
  typedef ulong vote_t;
  vote_t __bits;
  explicit constexpr simd_vote(vote_t bits = 0) : __bits(bits) {}
  explicit constexpr operator vote_t() const { return __bits; }
  bool all() const { return __bits == __active; }
  bool any() const { return __bits != 0; }
  vote_t __active = ~vote_t(0);
};

template <unsigned __S = 0>
inline simd_vote simd_ballot(bool predicate, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(predicate, __line, __file, __S);
  ulong bits = 0;
  for (unsigned i = 0; i < __mtl::kSimdWidth; ++i)
    if (((ex.active >> i) & 1u) && __mtl::slot_value<bool>(ex, i)) bits |= ulong(1) << i;
  simd_vote vote(bits);
  vote.__active = ex.active;
  return vote;
}
template <unsigned __S = 0>
inline simd_vote simd_active_threads_mask(MTL_EMU_SITE) {
  const auto ex = __mtl::simd_exchange(nullptr, 0, __line, __file, __S);
  simd_vote vote(ex.active);
  vote.__active = ex.active;
  return vote;
}
template <unsigned __S = 0>
inline bool simd_all(bool predicate, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(predicate, __line, __file, __S);
  for (unsigned i = 0; i < __mtl::kSimdWidth; ++i)
    if (((ex.active >> i) & 1u) && !__mtl::slot_value<bool>(ex, i)) return false;
  return true;
}
template <unsigned __S = 0>
inline bool simd_any(bool predicate, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(predicate, __line, __file, __S);
  for (unsigned i = 0; i < __mtl::kSimdWidth; ++i)
    if (((ex.active >> i) & 1u) && __mtl::slot_value<bool>(ex, i)) return true;
  return false;
}
template <unsigned __S = 0>
inline bool simd_is_first(MTL_EMU_SITE) {
  const auto ex = __mtl::simd_exchange(nullptr, 0, __line, __file, __S);
  return ex.lane == unsigned(__builtin_ctz(ex.active));
}

// simd_shuffle_and_fill_down/up: the SIMD group as windows of `modulo` lanes (32 by default);
// a lane reads `data` from delta lanes further down (up) its window, or, past the window's
// end (start), `filling_data` from the lane as far into the window from the other side.
template <class T> struct __shuffle_fill_pair { T data, fill; };
template <unsigned __S = 0, class T>
inline T simd_shuffle_and_fill_down(T data, T filling_data, ushort delta, ushort modulo, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(__shuffle_fill_pair<T>{data, filling_data}, __line, __file, __S);
  const unsigned base = ex.lane - ex.lane % modulo, k = ex.lane % modulo + delta;
  const auto own = __shuffle_fill_pair<T>{data, filling_data};
  return k < modulo ? __mtl::read_lane(ex, own, base + k, __line, __file).data
                    : __mtl::read_lane(ex, own, base + k - modulo, __line, __file).fill;
}
template <unsigned __S = 0, class T>
inline T simd_shuffle_and_fill_down(T data, T filling_data, ushort delta, MTL_EMU_SITE) {
  return simd_shuffle_and_fill_down<__S>(data, filling_data, delta, ushort(__mtl::kSimdWidth), __line, __file);
}
template <unsigned __S = 0, class T>
inline T simd_shuffle_and_fill_up(T data, T filling_data, ushort delta, ushort modulo, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(__shuffle_fill_pair<T>{data, filling_data}, __line, __file, __S);
  const unsigned base = ex.lane - ex.lane % modulo, i = ex.lane % modulo;
  const auto own = __shuffle_fill_pair<T>{data, filling_data};
  return i >= delta ? __mtl::read_lane(ex, own, base + i - delta, __line, __file).data
                    : __mtl::read_lane(ex, own, base + i + modulo - delta, __line, __file).fill;
}
template <unsigned __S = 0, class T>
inline T simd_shuffle_and_fill_up(T data, T filling_data, ushort delta, MTL_EMU_SITE) {
  return simd_shuffle_and_fill_up<__S>(data, filling_data, delta, ushort(__mtl::kSimdWidth), __line, __file);
}

// Quad-groups: four consecutive lanes of a SIMD group. Each function exchanges over the SIMD
// group (so divergent call sites are still reported) and reads within the caller's quad.
#define MTL_QUAD_REDUCE(NAME, EXPR)                                                                 \
  template <unsigned __S = 0, class T> inline T quad_##NAME(T x, MTL_EMU_SITE) {                                     \
    const auto ex = __mtl::exchange(x, __line, __file, __S);                                            \
    const unsigned base = ex.lane & ~3u;                                                           \
    T acc = __mtl::read_lane(ex, x, base, __line, __file);                                         \
    for (unsigned i = base + 1; i < base + 4; ++i) {                                               \
      if (!((ex.active >> i) & 1u)) continue;                                                      \
      const T b = __mtl::slot_value<T>(ex, i);                                                     \
      acc = T(EXPR);                                                                               \
    }                                                                                              \
    return acc;                                                                                    \
  }
MTL_QUAD_REDUCE(sum, acc + b)
MTL_QUAD_REDUCE(product, acc * b)
MTL_QUAD_REDUCE(min, min(acc, b))
MTL_QUAD_REDUCE(max, max(acc, b))
MTL_QUAD_REDUCE(and, acc & b)
MTL_QUAD_REDUCE(or, acc | b)
MTL_QUAD_REDUCE(xor, acc ^ b)
#undef MTL_QUAD_REDUCE
template <unsigned __S = 0, class T> inline T quad_shuffle(T x, ushort src, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return __mtl::read_lane(ex, x, (ex.lane & ~3u) + (src & 3u), __line, __file);
}
template <unsigned __S = 0, class T> inline T quad_broadcast(T x, ushort src, MTL_EMU_SITE) { return quad_shuffle<__S>(x, src, __line, __file); }
template <unsigned __S = 0, class T> inline T quad_shuffle_xor(T x, ushort mask, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return __mtl::read_lane(ex, x, (ex.lane & ~3u) + ((ex.lane ^ mask) & 3u), __line, __file);
}
template <unsigned __S = 0, class T> inline T quad_shuffle_up(T x, ushort delta, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return (ex.lane & 3u) < delta ? x : __mtl::read_lane(ex, x, ex.lane - delta, __line, __file);
}
template <unsigned __S = 0, class T> inline T quad_shuffle_down(T x, ushort delta, MTL_EMU_SITE) {
  const auto ex = __mtl::exchange(x, __line, __file, __S);
  return (ex.lane & 3u) + delta > 3u ? x : __mtl::read_lane(ex, x, ex.lane + delta, __line, __file);
}

#undef MTL_EMU_SITE

}  // namespace metal

// The __metal_simd_* builtins (see metal_intrinsics.h), keeping the caller's call site.
#define MTL_EMU_SITE unsigned __line = __builtin_LINE(), const char* __file = __builtin_FILE()
#define MTL_SIMD_INTRINSIC1(NAME)                                                                   \
  template <class T> inline T __metal_##NAME(T x, MTL_EMU_SITE) { return metal::NAME(x, __line, __file); }
#define MTL_SIMD_INTRINSIC2(NAME)                                                                   \
  template <class T> inline T __metal_##NAME(T x, ushort k, MTL_EMU_SITE) {                        \
    return metal::NAME(x, k, __line, __file);                                                      \
  }
MTL_SIMD_INTRINSIC1(simd_sum) MTL_SIMD_INTRINSIC1(simd_product) MTL_SIMD_INTRINSIC1(simd_min)
MTL_SIMD_INTRINSIC1(simd_max) MTL_SIMD_INTRINSIC1(simd_and) MTL_SIMD_INTRINSIC1(simd_or) MTL_SIMD_INTRINSIC1(simd_xor)
MTL_SIMD_INTRINSIC1(simd_prefix_inclusive_sum) MTL_SIMD_INTRINSIC1(simd_prefix_exclusive_sum)
MTL_SIMD_INTRINSIC1(simd_prefix_inclusive_product) MTL_SIMD_INTRINSIC1(simd_prefix_exclusive_product)
MTL_SIMD_INTRINSIC2(simd_shuffle) MTL_SIMD_INTRINSIC2(simd_broadcast) MTL_SIMD_INTRINSIC2(simd_shuffle_up)
MTL_SIMD_INTRINSIC2(simd_shuffle_down) MTL_SIMD_INTRINSIC2(simd_shuffle_xor)
MTL_SIMD_INTRINSIC2(simd_shuffle_rotate_up) MTL_SIMD_INTRINSIC2(simd_shuffle_rotate_down)
#undef MTL_SIMD_INTRINSIC1
#undef MTL_SIMD_INTRINSIC2
template <class T> inline T __metal_simd_shuffle_and_fill_down(T x, T fill, ushort delta, ushort modulo, MTL_EMU_SITE) {
  return metal::simd_shuffle_and_fill_down(x, fill, delta, modulo, __line, __file);
}
template <class T> inline T __metal_simd_shuffle_and_fill_up(T x, T fill, ushort delta, ushort modulo, MTL_EMU_SITE) {
  return metal::simd_shuffle_and_fill_up(x, fill, delta, modulo, __line, __file);
}
// `__metal_get_simdgroup_size(ushort())`: the SIMD width, in the type of the argument.
template <class T> inline T __metal_get_simdgroup_size(T) { return T(__mtl::kSimdWidth); }
#undef MTL_EMU_SITE
