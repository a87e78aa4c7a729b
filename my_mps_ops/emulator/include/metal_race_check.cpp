// The emulator's race check, linked into kernel libraries built with it
// (my_mps_ops/emulator/build.py, race_check=True).
//
// Such a library compiles the translated shader with the compiler's
// thread-sanitizer instrumentation, which calls __tsan_read4(address) before
// every 4-byte load, __tsan_write8 before every 8-byte store, and so on. This
// file defines those calls (no sanitizer runtime is linked): every access to
// threadgroup memory or to a buffer bound to the launch is recorded per byte
// (the last writer and two readers, each with its thread, the barrier epochs
// it happened in and three return addresses, turned into shader lines by
// addr2line only for a report); other addresses (the threads' own stacks) are
// ignored.
//
// The rule, from the Metal Shading Language's definition of threadgroup_barrier
// and simdgroup_barrier: a barrier makes the threads wait for each other; with
// mem_flags::mem_threadgroup it also orders their threadgroup-memory accesses,
// with mem_flags::mem_device their device-memory accesses (mem_none: execution
// only). Two accesses to one byte by different threads, at least one of them a
// write and not both atomic, race unless ordered:
// - threadgroup memory: by a threadgroup_barrier(mem_threadgroup) between them,
//   or, for two lanes of one SIMD group, by a simdgroup_barrier(mem_threadgroup).
//   Lanes of a SIMD group run in lockstep on Apple GPUs, yet Metal does not make
//   one lane's threadgroup-memory writes visible to another without a barrier:
//   such a pair is a "simdgroup race", any other pair a "threadgroup race";
// - device memory: threads of one threadgroup by a threadgroup_barrier(mem_device)
//   (lanes of one SIMD group also by a simdgroup_barrier(mem_device)); threads
//   of different threadgroups never, within one launch ("device race").
// SIMD-group functions (simd_sum, simd_shuffle, ...) exchange values, not memory:
// they order nothing.
//
// A simdgroup race is reported when the threadgroup has finished without a
// threadgroup race (which a simdgroup_barrier would not fix), a threadgroup or
// device race at once.
//
// A threadgroup runs on one OS thread, so threadgroup-memory shadows are per OS
// thread; the device-memory shadow is shared by the OS threads of a launch
// (striped spin locks) and lives from mtl_emu_race_begin to mtl_emu_race_end,
// which the host calls around each launch.
#include "metal_race_check.h"

#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace __mtl {
namespace race {
namespace {

constexpr uint8_t kWrite = 1, kAtomic = 2;
constexpr unsigned kMemDevice = 1, kMemThreadgroup = 2;  // metal::mem_flags
constexpr int kFrames = 3;
constexpr unsigned kSimdWidth = 32;

struct Access {
  uint32_t group1;       // linear threadgroup id + 1; 0: no access recorded
  uint32_t epoch;        // the group's threadgroup_barrier epoch for this memory kind
  uint32_t simd_epoch;   // the thread's SIMD group's simdgroup_barrier epoch
  uint32_t pc[kFrames];  // return addresses as offsets in this library, innermost first
  uint16_t thread;       // thread_index_in_threadgroup
  uint8_t kind;          // kWrite, kAtomic bits
};

struct Cell {
  Access write;
  Access read[2];  // two different readers: a later writer differs from at least one
};

struct Region {
  uintptr_t lo, hi;
  Cell* cells;
  const char* name;  // threadgroup arrays
};

// A race found, to report later.
struct Found {
  bool any = false;
  const char* name = nullptr;
  uintptr_t lo = 0, address = 0;
  Access first{}, second{};
};

// Per OS thread: the threadgroup being run.
struct GroupState {
  const mtl_emu_launch* launch = nullptr;
  uint32_t group1 = 0;
  uint32_t tg_epoch = 0, dev_epoch = 0;
  std::vector<uint32_t> simd_tg_epoch, simd_dev_epoch;
  std::vector<Region> tg_regions;
  std::vector<Cell> tg_cells;
  Found simdgroup_race;  // the group's first
};
thread_local GroupState tls_group;

// Per launch: the bound buffers (merged where they overlap) and their shadow.
struct LaunchState {
  const mtl_emu_launch* launch;
  size_t lengths[MTL_EMU_MAX_BINDINGS];
  std::vector<Region> regions;
  std::vector<std::pair<void*, size_t>> mappings;
};
std::atomic<LaunchState*> g_launch{nullptr};

constexpr size_t kStripes = 4096;
std::atomic<bool> g_stripes[kStripes];

struct StripeLock {
  std::atomic<bool>* held = nullptr;
  void take(uintptr_t address) {
    std::atomic<bool>* want = &g_stripes[(address >> 6) % kStripes];
    if (want == held) return;
    release();
    while (want->exchange(true, std::memory_order_acquire)) {
    }
    held = want;
  }
  void release() {
    if (held) held->store(false, std::memory_order_release);
    held = nullptr;
  }
  ~StripeLock() { release(); }
};

// -------------------------------------------------------- library and lines

struct Library {
  uintptr_t base = 0;
  std::string path;
};

const Library& library() {
  static const Library lib = [] {
    Library l;
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&library), &info) != 0 && info.dli_fname != nullptr) {
      l.base = reinterpret_cast<uintptr_t>(info.dli_fbase);
      l.path = info.dli_fname;
    }
    return l;
  }();
  return lib;
}

// Return addresses of the instrumented code, walking the frame pointers from
// the hook's frame (the race-check build keeps them everywhere).
inline void call_stack(void* frame, uint32_t out[kFrames]) {
  const uintptr_t base = library().base;
  void** fp = static_cast<void**>(frame);
  for (int i = 0; i < kFrames; ++i) {
    out[i] = 0;
    if (fp == nullptr) continue;
    const uintptr_t ret = reinterpret_cast<uintptr_t>(fp[1]);
    if (ret > base && ret - base < (uintptr_t(1) << 32)) out[i] = uint32_t(ret - base);
    void** next = static_cast<void**>(fp[0]);
    fp = next > fp && reinterpret_cast<char*>(next) - reinterpret_cast<char*>(fp) < (1 << 20) ? next : nullptr;
  }
}

std::string basename_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// "file:line" of the innermost shader frame, with its caller when that is
// shader code too. Frames in the emulator's headers and in the translated
// source's own code (the kernel table, compiled from the library's folder) are
// skipped.
std::string source_lines(const uint32_t pc[kFrames]) {
  const Library& lib = library();
  std::string cmd = "addr2line -e '" + lib.path + "'";
  int n = 0;
  for (int i = 0; i < kFrames && pc[i] != 0; ++i, ++n) {
    char hex[32];
    std::snprintf(hex, sizeof(hex), " 0x%x", pc[i] - 1);  // the call, not the instruction after it
    cmd += hex;
  }
  if (n == 0 || lib.path.empty()) return "an unknown line";
  std::vector<std::string> frames;
  if (FILE* f = popen((cmd + " 2>/dev/null").c_str(), "r")) {
    char line[4096];
    while (std::fgets(line, sizeof(line), f) != nullptr) {
      std::string s(line);
      while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
      const size_t disc = s.find(" (discriminator");
      if (disc != std::string::npos) s.resize(disc);
      frames.push_back(s);
    }
    pclose(f);
  }
  std::string own_dir = __FILE__;
  own_dir.resize(own_dir.rfind('/') + 1);
  const std::string library_dir = lib.path.substr(0, lib.path.rfind('/') + 1);
  std::vector<std::string> shader;
  for (const std::string& s : frames) {
    const bool unknown = s.empty() || s[0] == '?';
    const bool emulator = s.compare(0, own_dir.size(), own_dir) == 0 ||
                          (!library_dir.empty() && s.compare(0, library_dir.size(), library_dir) == 0);
    if (unknown || emulator) {
      if (!shader.empty()) break;
      continue;
    }
    shader.push_back(basename_of(s));
  }
  if (shader.empty()) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "library offset 0x%x (no line information)", pc[0]);
    return buf;
  }
  return shader.size() > 1 ? shader[0] + " (called from " + shader[1] + ")" : shader[0];
}

// ------------------------------------------------------------------ reports

struct Position {
  uint32_t group[3], thread[3];
};

Position position_of(const mtl_emu_launch* L, uint64_t group, uint32_t index) {
  Position p{};
  uint64_t groups[3];
  for (int d = 0; d < 3; ++d)
    groups[d] = L->uniform ? L->grid[d] : (L->grid[d] + L->group[d] - 1) / L->group[d];
  p.group[0] = uint32_t(group % groups[0]);
  p.group[1] = uint32_t((group / groups[0]) % groups[1]);
  p.group[2] = uint32_t(group / (groups[0] * groups[1]));
  uint32_t size[3];
  for (int d = 0; d < 3; ++d)
    size[d] = uint32_t(L->uniform ? L->group[d] : std::min<uint64_t>(L->group[d], L->grid[d] - p.group[d] * L->group[d]));
  p.thread[0] = index % size[0];
  p.thread[1] = (index / size[0]) % size[1];
  p.thread[2] = index / (size[0] * size[1]);
  return p;
}

std::string describe(const mtl_emu_launch* L, const Access& a) {
  const Position p = position_of(L, a.group1 - 1, a.thread);
  const char* what = (a.kind & kAtomic) ? ((a.kind & kWrite) ? "atomic write" : "atomic read")
                                        : ((a.kind & kWrite) ? "write" : "read");
  char buf[256];
  std::snprintf(buf, sizeof(buf), "%s by thread (%u, %u, %u) of threadgroup (%u, %u, %u) at ", what, p.thread[0],
                p.thread[1], p.thread[2], p.group[0], p.group[1], p.group[2]);
  return buf + source_lines(a.pc);
}

// The buffer parameter whose binding holds `address`, and the offset in it.
std::string buffer_name(const LaunchState& st, uintptr_t address, size_t* offset) {
  const mtl_emu_kernel* k = st.launch->kernel;
  for (int32_t j = 0; j < k->num_params; ++j) {
    const mtl_emu_param& p = k->params[j];
    if (p.kind != MTL_EMU_PARAM_BUFFER || p.index >= MTL_EMU_MAX_BINDINGS) continue;
    const uintptr_t b = reinterpret_cast<uintptr_t>(st.launch->buffers[p.index]);
    if (address >= b && address - b < st.lengths[p.index]) {
      *offset = address - b;
      return "buffer(" + std::to_string(p.index) + ") '" + p.name + "'";
    }
  }
  *offset = 0;
  return "a buffer";
}

void report(const GroupState& g, bool device, const char* name, uintptr_t lo, uintptr_t address,
            const Access& first, const Access& second) {
  const mtl_emu_launch* L = g.launch;
  const bool same_group = first.group1 == second.group1;
  const bool same_simd = same_group && first.thread / kSimdWidth == second.thread / kSimdWidth;
  std::string where;
  size_t offset = address - lo;
  if (device) {
    where = buffer_name(*g_launch.load(), address, &offset);
  } else {
    where = std::string("threadgroup memory '") + name + "'";
  }
  std::string why;
  const char* kind;
  if (!device) {
    kind = same_simd ? "simdgroup race" : "threadgroup race";
    if (same_simd) {
      why = "lanes " + std::to_string(first.thread % kSimdWidth) + " and " + std::to_string(second.thread % kSimdWidth) +
            " of SIMD group " + std::to_string(first.thread / kSimdWidth) +
            " with no simdgroup_barrier(mem_flags::mem_threadgroup) or threadgroup_barrier(mem_flags::mem_threadgroup) "
            "between them (lanes of a SIMD group run in lockstep on Apple GPUs, but Metal orders their threadgroup "
            "memory accesses only through such a barrier)";
    } else {
      why = "no threadgroup_barrier(mem_flags::mem_threadgroup) between them";
    }
  } else {
    kind = "device race";
    why = same_group ? "no threadgroup_barrier(mem_flags::mem_device) between them"
                     : "threads of different threadgroups are not ordered within a launch (use atomics, or a "
                       "second launch)";
  }
  const std::string message = std::string(kind) + " on " + where + " at byte offset " + std::to_string(offset) + ": " +
                              describe(L, first) + ", then " + describe(L, second) + "; " + why;
  report_error(message.c_str());
}

// --------------------------------------------------------------- the check

inline bool involves_write(const Access& a, const Access& me) {
  return ((a.kind | me.kind) & kWrite) && !((a.kind & me.kind) & kAtomic);
}

inline bool same_simd(const Access& a, const Access& me) { return a.thread / kSimdWidth == me.thread / kSimdWidth; }

// Threadgroup memory: accesses of earlier threadgroups or barrier epochs are ordered.
inline bool tg_live(const Access& a, const GroupState& g) { return a.group1 == g.group1 && a.epoch == g.tg_epoch; }
enum Conflict { kNone, kSimdgroup, kRace };
inline Conflict tg_conflict(const Access& a, const Access& me, const GroupState& g) {
  if (!tg_live(a, g) || a.thread == me.thread || !involves_write(a, me)) return kNone;
  if (!same_simd(a, me)) return kRace;
  return a.simd_epoch != g.simd_tg_epoch[me.thread / kSimdWidth] ? kNone : kSimdgroup;
}

// Device memory: accesses of other threadgroups are never ordered.
inline bool dev_live(const Access& a, const GroupState& g) {
  return a.group1 != 0 && (a.group1 != g.group1 || a.epoch == g.dev_epoch);
}
inline Conflict dev_conflict(const Access& a, const Access& me, const GroupState& g) {
  if (a.group1 == 0 || !involves_write(a, me)) return kNone;
  if (a.group1 != me.group1) return kRace;
  if (a.thread == me.thread || a.epoch != g.dev_epoch) return kNone;
  return same_simd(a, me) && a.simd_epoch != g.simd_dev_epoch[me.thread / kSimdWidth] ? kNone : kRace;
}

// Checks one byte's accesses against `me` and records it. Returns the access
// `me` races with, if any; the first simdgroup race is copied to *simdgroup
// (when *found is false) instead.
template <bool Device>
inline const Access* check_byte(Cell& c, const Access& me, const GroupState& g, Access* simdgroup, bool* found) {
  auto conflict = [&](const Access& a) {
    const Conflict k = Device ? dev_conflict(a, me, g) : tg_conflict(a, me, g);
    if (k == kSimdgroup && !*found) {
      *simdgroup = a;
      *found = true;
    }
    return k == kRace;
  };
  auto live = [&](const Access& a) { return Device ? dev_live(a, g) : tg_live(a, g); };
  if (conflict(c.write)) return &c.write;
  if (me.kind & kWrite) {
    for (const Access& r : c.read)
      if (conflict(r)) return &r;
    c.write = me;
    return nullptr;
  }
  for (Access& r : c.read)
    if (r.group1 == me.group1 && r.thread == me.thread) {
      r = me;
      return nullptr;
    }
  for (Access& r : c.read)
    if (!live(r)) {
      r = me;
      return nullptr;
    }
  c.read[1] = me;  // keeps the first reader and the latest
  return nullptr;
}

inline const Region* find(const std::vector<Region>& regions, uintptr_t a) {
  for (const Region& r : regions)
    if (a - r.lo < r.hi - r.lo) return &r;
  return nullptr;
}

void record(const void* address, size_t bytes, uint8_t kind, void* frame) {
  GroupState& g = tls_group;
  if (g.launch == nullptr || bytes == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  bool device = false;
  const Region* r = find(g.tg_regions, a);
  LaunchState* st = nullptr;
  if (r == nullptr) {
    st = g_launch.load(std::memory_order_acquire);
    if (st == nullptr || st->launch != g.launch || (r = find(st->regions, a)) == nullptr) return;
    device = true;
  }
  const mtl_emu_lane* lane = current_lane_info();
  if (lane == nullptr || run_failed()) return;
  Access me{};
  me.group1 = g.group1;
  me.thread = uint16_t(lane->index_in_group);
  me.kind = kind;
  const uint32_t simd = lane->index_in_group / kSimdWidth;
  me.epoch = device ? g.dev_epoch : g.tg_epoch;
  me.simd_epoch = device ? g.simd_dev_epoch[simd] : g.simd_tg_epoch[simd];
  call_stack(frame, me.pc);
  const size_t n = std::min<size_t>(bytes, r->hi - a);
  const Access* other = nullptr;
  size_t at = 0;
  if (device) {
    StripeLock lock;
    Access unused;
    bool found = true;  // device memory has no simdgroup class
    for (; at < n && other == nullptr; ++at) {
      lock.take(a + at);
      other = check_byte<true>(r->cells[a + at - r->lo], me, g, &unused, &found);
    }
    if (other != nullptr) {
      const Access first = *other;
      lock.release();
      report(g, true, nullptr, r->lo, a + at - 1, first, me);
    }
    return;
  }
  for (; at < n && other == nullptr; ++at) {
    Access simdgroup;
    bool found = g.simdgroup_race.any;
    other = check_byte<false>(r->cells[a + at - r->lo], me, g, &simdgroup, &found);
    if (found && !g.simdgroup_race.any) g.simdgroup_race = Found{true, r->name, r->lo, a + at, simdgroup, me};
  }
  if (other != nullptr) report(g, false, r->name, r->lo, a + at - 1, *other, me);
}

}  // namespace

// ------------------------------------------------------- scheduler events

void begin_group(const mtl_emu_launch* launch, uint64_t group, const ThreadgroupRegion* regions, size_t count,
                 uint32_t simd_groups) {
  GroupState& g = tls_group;
  g.launch = launch;
  g.group1 = uint32_t(group + 1);
  ++g.tg_epoch;  // the previous group's threadgroup-memory accesses no longer count
  ++g.dev_epoch;
  g.simdgroup_race = Found{};
  if (g.simd_tg_epoch.size() < simd_groups) {
    g.simd_tg_epoch.resize(simd_groups);
    g.simd_dev_epoch.resize(simd_groups);
  }
  size_t total = 0;
  for (size_t i = 0; i < count; ++i) total += regions[i].bytes;
  if (g.tg_cells.size() < total) {
    g.tg_cells.clear();  // stale cells of a reallocated shadow would carry old epochs; start clean
    g.tg_cells.resize(total);
  }
  g.tg_regions.clear();
  size_t at = 0;
  for (size_t i = 0; i < count; ++i) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(regions[i].base);
    g.tg_regions.push_back({lo, lo + regions[i].bytes, g.tg_cells.data() + at, regions[i].name});
    at += regions[i].bytes;
  }
}

void end_group() {
  GroupState& g = tls_group;
  const Found f = g.simdgroup_race;
  g.simdgroup_race = Found{};
  if (f.any && !run_failed()) report(g, false, f.name, f.lo, f.address, f.first, f.second);
}

void threadgroup_barrier_released(unsigned flags) {
  GroupState& g = tls_group;
  if (flags & kMemThreadgroup) ++g.tg_epoch;
  if (flags & kMemDevice) ++g.dev_epoch;
}

void simdgroup_barrier_released(uint32_t simd_group, unsigned flags) {
  GroupState& g = tls_group;
  if (simd_group >= g.simd_tg_epoch.size()) return;
  if (flags & kMemThreadgroup) ++g.simd_tg_epoch[simd_group];
  if (flags & kMemDevice) ++g.simd_dev_epoch[simd_group];
}

}  // namespace race

void race_record(const void* address, size_t bytes, bool write) {
  race::record(address, bytes, write ? race::kWrite : 0, __builtin_frame_address(0));
}

}  // namespace __mtl

// --------------------------------------------------------------- host entries

#define MTL_EMU_EXPORT extern "C" __attribute__((visibility("default")))

MTL_EMU_EXPORT void mtl_emu_race_begin(const mtl_emu_launch* launch, const size_t* lengths) {
  using namespace __mtl::race;
  auto* st = new LaunchState();
  st->launch = launch;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  for (int i = 0; i < MTL_EMU_MAX_BINDINGS; ++i) {
    st->lengths[i] = lengths[i];
    if (launch->buffers[i] != nullptr && lengths[i] > 0) {
      const uintptr_t lo = reinterpret_cast<uintptr_t>(launch->buffers[i]);
      ranges.push_back({lo, lo + lengths[i]});
    }
  }
  std::sort(ranges.begin(), ranges.end());
  std::vector<std::pair<uintptr_t, uintptr_t>> merged;
  for (const auto& r : ranges) {
    if (!merged.empty() && r.first <= merged.back().second) merged.back().second = std::max(merged.back().second, r.second);
    else merged.push_back(r);
  }
  for (const auto& m : merged) {
    // Untouched pages of the shadow cost nothing: only what the kernel accesses is backed.
    const size_t bytes = (m.second - m.first) * sizeof(Cell);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) continue;  // that buffer goes unchecked
    st->mappings.push_back({p, bytes});
    st->regions.push_back({m.first, m.second, static_cast<Cell*>(p), nullptr});
  }
  delete g_launch.exchange(st, std::memory_order_acq_rel);
}

MTL_EMU_EXPORT void mtl_emu_race_end(const mtl_emu_launch*) {
  using namespace __mtl::race;
  LaunchState* st = g_launch.exchange(nullptr, std::memory_order_acq_rel);
  if (st == nullptr) return;
  for (const auto& m : st->mappings) munmap(m.first, m.second);
  delete st;
}

// ---------------------------------------------- the instrumentation's calls

namespace {
using __mtl::race::kAtomic;
using __mtl::race::kWrite;
using __mtl::race::record;
}  // namespace

#define MTL_EMU_HOOK extern "C" __attribute__((visibility("hidden"), noinline))
#define MTL_EMU_ACCESS(N)                                                                          \
  MTL_EMU_HOOK void __tsan_read##N(void* p) { record(p, N, 0, __builtin_frame_address(0)); }       \
  MTL_EMU_HOOK void __tsan_write##N(void* p) { record(p, N, kWrite, __builtin_frame_address(0)); } \
  MTL_EMU_HOOK void __tsan_unaligned_read##N(void* p) { record(p, N, 0, __builtin_frame_address(0)); } \
  MTL_EMU_HOOK void __tsan_unaligned_write##N(void* p) { record(p, N, kWrite, __builtin_frame_address(0)); } \
  MTL_EMU_HOOK void __tsan_volatile_read##N(void* p) { record(p, N, 0, __builtin_frame_address(0)); } \
  MTL_EMU_HOOK void __tsan_volatile_write##N(void* p) { record(p, N, kWrite, __builtin_frame_address(0)); }
MTL_EMU_ACCESS(1)
MTL_EMU_ACCESS(2)
MTL_EMU_ACCESS(4)
MTL_EMU_ACCESS(8)
MTL_EMU_ACCESS(16)
#undef MTL_EMU_ACCESS

MTL_EMU_HOOK void __tsan_read_range(void* p, unsigned long n) { record(p, n, 0, __builtin_frame_address(0)); }
MTL_EMU_HOOK void __tsan_write_range(void* p, unsigned long n) { record(p, n, kWrite, __builtin_frame_address(0)); }
MTL_EMU_HOOK void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
  record(s, n, 0, __builtin_frame_address(0));
  record(d, n, kWrite, __builtin_frame_address(0));
  return std::memcpy(d, s, n);
}
MTL_EMU_HOOK void* __tsan_memmove(void* d, const void* s, unsigned long n) {
  record(s, n, 0, __builtin_frame_address(0));
  record(d, n, kWrite, __builtin_frame_address(0));
  return std::memmove(d, s, n);
}
MTL_EMU_HOOK void* __tsan_memset(void* d, int c, unsigned long n) {
  record(d, n, kWrite, __builtin_frame_address(0));
  return std::memset(d, c, n);
}
MTL_EMU_HOOK void __tsan_init() {}
MTL_EMU_HOOK void __tsan_func_entry(void*) {}
MTL_EMU_HOOK void __tsan_func_exit() {}
MTL_EMU_HOOK void __tsan_vptr_update(void*, void*) {}
MTL_EMU_HOOK void __tsan_vptr_read(void*) {}
MTL_EMU_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
MTL_EMU_HOOK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// Atomics: performed sequentially consistent (at least what the kernel asked
// for), recorded as atomic accesses.
#define MTL_EMU_ATOMIC(N, T)                                                                                   \
  MTL_EMU_HOOK T __tsan_atomic##N##_load(const volatile T* a, int) {                                          \
    record((const void*)a, sizeof(T), kAtomic, __builtin_frame_address(0));                                    \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                               \
  }                                                                                                            \
  MTL_EMU_HOOK void __tsan_atomic##N##_store(volatile T* a, T v, int) {                                       \
    record((const void*)a, sizeof(T), kAtomic | kWrite, __builtin_frame_address(0));                           \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                                  \
  }                                                                                                            \
  MTL_EMU_ATOMIC_RMW(N, T, exchange, __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST))                              \
  MTL_EMU_ATOMIC_RMW(N, T, fetch_add, __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST))                              \
  MTL_EMU_ATOMIC_RMW(N, T, fetch_sub, __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST))                              \
  MTL_EMU_ATOMIC_RMW(N, T, fetch_and, __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST))                              \
  MTL_EMU_ATOMIC_RMW(N, T, fetch_or, __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST))                                \
  MTL_EMU_ATOMIC_RMW(N, T, fetch_xor, __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST))                              \
  MTL_EMU_ATOMIC_RMW(N, T, fetch_nand, __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST))                            \
  MTL_EMU_HOOK int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {            \
    record((const void*)a, sizeof(T), kAtomic | kWrite, __builtin_frame_address(0));                           \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
  }                                                                                                            \
  MTL_EMU_HOOK int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {              \
    record((const void*)a, sizeof(T), kAtomic | kWrite, __builtin_frame_address(0));                           \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
  }                                                                                                            \
  MTL_EMU_HOOK T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                  \
    record((const void*)a, sizeof(T), kAtomic | kWrite, __builtin_frame_address(0));                           \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                          \
    return c;                                                                                                  \
  }
#define MTL_EMU_ATOMIC_RMW(N, T, op, expr)                                           \
  MTL_EMU_HOOK T __tsan_atomic##N##_##op(volatile T* a, T v, int) {                  \
    record((const void*)a, sizeof(T), kAtomic | kWrite, __builtin_frame_address(0)); \
    return expr;                                                                     \
  }
MTL_EMU_ATOMIC(8, uint8_t)
MTL_EMU_ATOMIC(16, uint16_t)
MTL_EMU_ATOMIC(32, uint32_t)
MTL_EMU_ATOMIC(64, uint64_t)
#undef MTL_EMU_ATOMIC
#undef MTL_EMU_ATOMIC_RMW
