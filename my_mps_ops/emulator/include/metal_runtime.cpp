// The Metal emulator's scheduler, linked into every emulated kernel library.
//
// A threadgroup runs on one OS thread. Kernels that never synchronise run as a
// plain loop over their threads. Kernels with barriers or SIMD-group functions
// run each GPU thread as a Boost.Context fiber: a thread runs until it reaches
// a synchronisation point, then the next one runs; when every thread is
// blocked, the lanes of each SIMD group that wait in a SIMD-group function
// run it together (over those active lanes; lanes at a barrier or returned
// are inactive), then a barrier that every live thread of the group reached
// is released. What cannot progress is reported: divergent barriers, SIMD
// collectives waited on at two call sites of one SIMD group, threads that
// returned before a barrier, deadlock.
//
// Between synchronisation points the threads run in order of their index in
// the threadgroup, or in reverse or a seeded random order
// (MY_MPS_OPS_EMULATOR_SCHEDULE=reverse | random[:seed]), so that a kernel
// whose result depends on that order shows it.
//
// Built with MTL_EMU_RACE_CHECK, it tells the race check
// (metal_race_check.cpp) where each threadgroup starts and which barriers
// were released.
#include "metal_runtime.h"
#ifdef MTL_EMU_RACE_CHECK
#include "metal_race_check.h"
#endif
#ifdef MTL_EMU_PROFILE
#include "metal_profile.h"
#endif

#include <boost/context/fiber.hpp>

#include <sys/mman.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

namespace __mtl {
namespace {

enum class State : uint8_t { Runnable, AtBarrier, AtSimd, Done };

// A synchronisation call site: its .metal line, and the id the translator gave
// that call, so that two calls written on one line stay apart (0: untagged).
struct Site {
  unsigned line = 0;
  const char* file = "";
  unsigned id = 0;
  bool operator==(const Site& o) const {
    return line == o.line && id == o.id && (file == o.file || std::strcmp(file, o.file) == 0);
  }
};

// "a.metal:7 and a.metal:9", or "a.metal:7 and a.metal:7 (two different calls on that line)".
std::string two_sites(const Site& a, const Site& b) {
  std::string s = std::string(a.file) + ":" + std::to_string(a.line) + " and " + b.file + ":" + std::to_string(b.line);
  if (a.line == b.line && std::strcmp(a.file, b.file) == 0) s += " (two different calls on that line)";
  return s;
}

// The file name of the runtime's own SIMD-group exchanges (simdgroup_allgather).
const char* const internal_site_file = __FILE__;

struct Abort {};  // unwinds a lane after the error has been recorded

struct Lane {
  mtl_emu_lane info;
  uint32_t grid_pos[3];
  State state = State::Runnable;
  Site site;
  unsigned barrier_flags = 0;   // mem_flags of the barrier the lane waits at
  bool at_simd_barrier = false;  // State::AtSimd in simdgroup_barrier (not a SIMD-group function)
  size_t deposit_bytes = 0;
  alignas(16) unsigned char deposit[kSimdSlotBytes];
  SimdExchange result{};
  boost::context::fiber fiber;  // the lane while suspended
  boost::context::fiber sched;  // the scheduler while the lane runs
};

struct SimdGroup {
  alignas(16) unsigned char slots[2][kSimdWidth][kSimdSlotBytes];
  unsigned generation = 0;
};

// Fiber stacks, reused across threadgroups of one OS thread.
constexpr size_t kStackBytes = 256 * 1024;

enum class Order : uint8_t { InOrder, Reverse, Random };

struct Schedule {
  Order order = Order::InOrder;
  uint64_t seed = 0;
};

Schedule schedule_from_environment() {
  Schedule s;
  const char* v = std::getenv("MY_MPS_OPS_EMULATOR_SCHEDULE");
  if (v == nullptr || *v == 0) return s;
  if (std::strcmp(v, "reverse") == 0) {
    s.order = Order::Reverse;
  } else if (std::strncmp(v, "random", 6) == 0 && (v[6] == 0 || v[6] == ':')) {
    s.order = Order::Random;
    if (v[6] == ':') s.seed = std::strtoull(v + 7, nullptr, 10);
  }
  return s;
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Worker {
  std::vector<Lane> lanes;
  std::vector<SimdGroup> simds;
  std::vector<unsigned char*> stacks;
  std::vector<unsigned char> tg_static;
  std::vector<size_t> tg_offsets;
  std::vector<unsigned char> tg_dynamic[MTL_EMU_MAX_BINDINGS];
  Bindings bindings{};
  const mtl_emu_launch* launch = nullptr;
  mtl_emu_error* error = nullptr;
  bool fibers = false;
  Schedule schedule;
  uint64_t group = 0;            // linear id of the threadgroup being run
  std::vector<uint32_t> order;   // lane indices in run order (schedules other than InOrder)
  // A group that did not finish normally (an error, or a fault the host
  // jumped out of) leaves lanes owning suspended fibers.
  bool unfinished = false;

  ~Worker();
};

thread_local Worker* tls_worker = nullptr;
thread_local Lane* tls_lane = nullptr;

struct StackPool {
  Worker* worker;
  boost::context::stack_context allocate() {
    unsigned char* base;
    if (!worker->stacks.empty()) {
      base = worker->stacks.back();
      worker->stacks.pop_back();
    } else {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      base = static_cast<unsigned char*>(p);
    }
    boost::context::stack_context sc;
    sc.size = kStackBytes;
    sc.sp = base + kStackBytes;
    return sc;
  }
  void deallocate(boost::context::stack_context& sc) noexcept {
    worker->stacks.push_back(static_cast<unsigned char*>(sc.sp) - kStackBytes);
  }
};

void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void fail(const char* fmt, ...) {
  mtl_emu_error* err = tls_worker->error;
  if (err->failed) return;
  err->failed = 1;
  const char* name = tls_worker->launch->kernel->host_name;
  int n = std::snprintf(err->message, sizeof(err->message), "kernel '%s': ", name);
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(err->message + n, sizeof(err->message) - size_t(n), fmt, ap);
  va_end(ap);
}

void warn(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void warn(const char* fmt, ...) {
  mtl_emu_error* err = tls_worker->error;
  if (err->warnings++ == 0) {
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(err->first_warning, sizeof(err->first_warning), fmt, ap);
    va_end(ap);
  }
}

std::string lane_list(const std::vector<unsigned>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size() && i < 8; ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  if (ids.size() > 8) s += ", ... (" + std::to_string(ids.size()) + " in all)";
  return s;
}

Lane& current_lane(const char* what) {
  Lane* lane = tls_lane;
  if (lane == nullptr || tls_worker == nullptr) {
    std::fprintf(stderr, "metal emulator: %s called outside a kernel\n", what);
    std::abort();
  }
  return *lane;
}

// Suspends the calling lane until the scheduler releases it.
void suspend(Lane& lane, State state, unsigned line, const char* file, unsigned site) {
  if (!tls_worker->fibers) {
    fail("%s at %s:%u was reached, but the kernel was classified as never synchronising (emulator bug)",
         state == State::AtBarrier ? "a barrier" : "a SIMD-group function", file, line);
    throw Abort{};
  }
  lane.state = state;
  lane.site = Site{line, file, site};
  lane.sched = std::move(lane.sched).resume();
  tls_lane = &lane;
  if (tls_worker->error->failed) throw Abort{};
}

// The order the lanes run in during round `round` of the current threadgroup.
void fill_order(Worker& w, uint32_t count, uint64_t round) {
  w.order.resize(count);
  for (uint32_t i = 0; i < count; ++i) w.order[i] = w.schedule.order == Order::Reverse ? count - 1 - i : i;
  if (w.schedule.order != Order::Random) return;
  uint64_t state = w.schedule.seed ^ (w.group * 0xD1B54A32D192ED03ull) ^ (round * 0x8CB92BA72F3D8DD7ull);
  for (uint32_t i = count; i > 1; --i) std::swap(w.order[i - 1], w.order[splitmix64(state) % i]);
}

void setup_lane(Lane& lane, const mtl_emu_launch* L, const uint32_t group_pos[3], const uint32_t size[3],
                const uint32_t groups[3], const uint32_t grid_threads[3], uint32_t index) {
  mtl_emu_lane& info = lane.info;
  const uint32_t x = index % size[0], y = (index / size[0]) % size[1], z = index / (size[0] * size[1]);
  const uint32_t tig[3] = {x, y, z};
  const uint32_t count = size[0] * size[1] * size[2];
  for (int d = 0; d < 3; ++d) {
    info.thread_in_group[d] = tig[d];
    info.group_pos[d] = group_pos[d];
    info.group_size[d] = size[d];
    info.groups[d] = groups[d];
    info.grid_threads[d] = grid_threads[d];
    lane.grid_pos[d] = group_pos[d] * uint32_t(L->group[d]) + tig[d];
  }
  info.index_in_group = index;
  info.simd_lane = index % kSimdWidth;
  info.simd_group = index / kSimdWidth;
  info.simd_groups = (count + kSimdWidth - 1) / kSimdWidth;
  lane.state = State::Runnable;
  lane.deposit_bytes = 0;
}

void abandon_fibers(Worker& w) {
  // Fibers of an unfinished group are leaked, not unwound: after a fault
  // their stacks may be in any state. Error paths only.
  for (Lane& lane : w.lanes) {
    if (lane.fiber) new (std::malloc(sizeof(boost::context::fiber))) boost::context::fiber(std::move(lane.fiber));
    if (lane.sched) new (std::malloc(sizeof(boost::context::fiber))) boost::context::fiber(std::move(lane.sched));
  }
  w.unfinished = false;
}

Worker::~Worker() {
  if (unfinished) abandon_fibers(*this);
  for (unsigned char* s : stacks) munmap(s, kStackBytes);
}

// Releases, in each SIMD group, the lanes that wait in a SIMD-group function
// once no lane can run. As on a GPU, the function runs over the active lanes:
// those at that call; lanes waiting at a threadgroup barrier or returned are
// inactive (a GPU runs the divergent path to the reconvergence point first).
// Lanes waiting at two different SIMD-group calls are reported: which runs
// first is the hardware's choice, and the results can depend on it.
// Returns whether any lane became runnable; records errors.
bool release_simd_groups(Worker& w, uint32_t count) {
  bool released = false;
  const uint32_t nsimd = (count + kSimdWidth - 1) / kSimdWidth;
  for (uint32_t s = 0; s < nsimd; ++s) {
    const uint32_t first = s * kSimdWidth, last = std::min(count, first + kSimdWidth);
    std::vector<unsigned> at_simd;
    for (uint32_t i = first; i < last; ++i)
      if (w.lanes[i].state == State::AtSimd) at_simd.push_back(i - first);
    if (at_simd.empty()) continue;
    const Lane& lead = w.lanes[first + at_simd[0]];
    std::vector<unsigned> other;
    for (unsigned l : at_simd)
      if (!(w.lanes[first + l].site == lead.site)) other.push_back(l);
    if (!other.empty()) {
      const Lane& o = w.lanes[first + other[0]];
      fail("SIMD-group functions reached at different call sites by the lanes of SIMD group %u of threadgroup "
           "(%u, %u, %u): %s (lanes [%s]); the order a GPU runs divergent paths in is not defined, "
           "so the emulator does not pick one",
           s, lead.info.group_pos[0], lead.info.group_pos[1], lead.info.group_pos[2],
           two_sites(lead.site, o.site).c_str(), lane_list(other).c_str());
      return false;
    }
    SimdGroup& sg = w.simds[s];
    unsigned char(*slots)[kSimdSlotBytes] = sg.slots[sg.generation++ & 1u];
    uint32_t active = 0;
    for (unsigned l : at_simd) {
      const Lane& lane = w.lanes[first + l];
      std::memcpy(slots[l], lane.deposit, lane.deposit_bytes);
      active |= 1u << l;
    }
    unsigned flags = ~0u;
    for (unsigned l : at_simd) {
      Lane& lane = w.lanes[first + l];
      lane.result = SimdExchange{&slots[0][0], active, l};
      lane.state = State::Runnable;
      flags &= lane.barrier_flags;
    }
#ifdef MTL_EMU_RACE_CHECK
    if (lead.at_simd_barrier) race::simdgroup_barrier_released(s, flags);
#endif
#ifdef MTL_EMU_PROFILE
    profile::simd_released(uint32_t(at_simd.size()), lead.at_simd_barrier, lead.site.file == internal_site_file);
#endif
    (void)flags;
    released = true;
  }
  return released;
}

// Releases a barrier that every live thread of the group waits at.
bool release_barrier(Worker& w, uint32_t count, const mtl_emu_launch* L) {
  std::vector<unsigned> waiting, done;
  for (uint32_t i = 0; i < count; ++i) {
    if (w.lanes[i].state == State::AtBarrier) waiting.push_back(i);
    else if (w.lanes[i].state == State::Done) done.push_back(i);
  }
  if (waiting.empty()) return false;
  const Lane& lead = w.lanes[waiting[0]];
  std::vector<unsigned> other;
  for (unsigned i : waiting)
    if (!(w.lanes[i].site == lead.site)) other.push_back(i);
  if (!other.empty()) {
    const Lane& o = w.lanes[other[0]];
    fail("threadgroup barriers reached at different call sites in threadgroup (%u, %u, %u): %s "
         "(threads [%s] by index in threadgroup)",
         lead.info.group_pos[0], lead.info.group_pos[1], lead.info.group_pos[2], two_sites(lead.site, o.site).c_str(),
         lane_list(other).c_str());
    return false;
  }
  if (!done.empty()) {
    const Lane& d = w.lanes[done[0]];
    if (L->strict_barriers) {
      fail("threadgroup barrier at %s:%u reached by %zu of %u threads of threadgroup (%u, %u, %u): threads [%s] "
           "(by index in threadgroup; the first at thread_position_in_grid (%u, %u, %u)) had returned",
           lead.site.file, lead.site.line, waiting.size(), count, lead.info.group_pos[0], lead.info.group_pos[1],
           lead.info.group_pos[2], lane_list(done).c_str(), d.grid_pos[0], d.grid_pos[1], d.grid_pos[2]);
      return false;
    }
    warn("kernel '%s': threadgroup barrier at %s:%u reached by %zu of %u threads (the others had returned)",
         L->kernel->host_name, lead.site.file, lead.site.line, waiting.size(), count);
  }
  unsigned flags = ~0u;
  for (unsigned i : waiting) {
    w.lanes[i].state = State::Runnable;
    flags &= w.lanes[i].barrier_flags;
  }
#ifdef MTL_EMU_RACE_CHECK
  race::threadgroup_barrier_released(flags);
#endif
#ifdef MTL_EMU_PROFILE
  profile::barrier_released(uint32_t(waiting.size()));
#endif
  (void)flags;
  return true;
}

void run_group_fibers(Worker& w, const mtl_emu_launch* L, uint32_t count) {
  for (uint32_t i = 0; i < count; ++i) {
    Lane* lane = &w.lanes[i];
    lane->fiber = boost::context::fiber(std::allocator_arg, StackPool{&w},
                                        [lane, L](boost::context::fiber&& sched) {
                                          lane->sched = std::move(sched);
                                          tls_lane = lane;
                                          try {
                                            L->kernel->invoke(L, &lane->info);
                                          } catch (const Abort&) {
                                          } catch (const boost::context::detail::forced_unwind&) {
                                            throw;  // the fiber is being destroyed
                                          } catch (...) {
                                            fail("a C++ exception escaped the kernel");
                                          }
                                          lane->state = State::Done;
                                          return std::move(lane->sched);
                                        });
  }
  const bool in_order = w.schedule.order == Order::InOrder;
  for (uint64_t round = 0;; ++round) {
    if (cancel_requested != 0) {
      fail("%s at a synchronisation point", cancel_requested == 2 ? "timed out" : "interrupted");
      return;
    }
    if (!in_order) fill_order(w, count, round);
    bool all_done = true;
    for (uint32_t k = 0; k < count; ++k) {
      Lane& lane = w.lanes[in_order ? k : w.order[k]];
      if (lane.state == State::Runnable) {
        tls_lane = &lane;
        lane.fiber = std::move(lane.fiber).resume();
        tls_lane = nullptr;
        if (w.error->failed) return;
      }
      all_done = all_done && lane.state == State::Done;
    }
    if (all_done) return;
    if (release_simd_groups(w, count)) continue;
    if (!w.error->failed && release_barrier(w, count, L)) continue;
    if (!w.error->failed) fail("deadlock: no thread of threadgroup can make progress");
    return;
  }
}

#ifdef MTL_EMU_RACE_CHECK
// The threadgroup arrays of the launch, named for race reports.
std::vector<race::ThreadgroupRegion> threadgroup_regions(Worker& w, size_t static_bytes) {
  const mtl_emu_kernel* k = w.launch->kernel;
  std::vector<race::ThreadgroupRegion> regions;
  const char* const* names = threadgroup_names(k);
  size_t sites = 0;
  while (names[sites] != nullptr) ++sites;
  for (size_t i = 0; i < sites; ++i) {
    const size_t end = i + 1 < sites ? w.tg_offsets[i + 1] : static_bytes;
    regions.push_back({w.tg_static.data() + w.tg_offsets[i], end - w.tg_offsets[i], names[i]});
  }
  for (int32_t j = 0; j < k->num_params; ++j) {
    const mtl_emu_param& p = k->params[j];
    if (p.kind == MTL_EMU_PARAM_THREADGROUP && !w.tg_dynamic[p.index].empty())
      regions.push_back({w.tg_dynamic[p.index].data(), w.tg_dynamic[p.index].size(), p.name});
  }
  return regions;
}
#endif

}  // namespace

#ifdef MTL_EMU_RACE_CHECK
namespace race {
const mtl_emu_lane* current_lane_info() { return tls_lane != nullptr ? &tls_lane->info : nullptr; }
void report_error(const char* message) { fail("%s", message); }
bool run_failed() { return tls_worker != nullptr && tls_worker->error->failed; }
}  // namespace race
#endif

// ----------------------------------------------------- kernel-side entries

void sync_barrier(unsigned flags, unsigned line, const char* file, unsigned site) {
  Lane& lane = current_lane("threadgroup_barrier");
  lane.barrier_flags = flags;
  suspend(lane, State::AtBarrier, line, file, site);
}

void simd_barrier(unsigned flags, unsigned line, const char* file, unsigned site) {
  Lane& lane = current_lane("simdgroup_barrier");
  lane.barrier_flags = flags;
  lane.at_simd_barrier = true;
  lane.deposit_bytes = 0;
  suspend(lane, State::AtSimd, line, file, site);
}

SimdExchange simd_exchange(const void* value, size_t bytes, unsigned line, const char* file, unsigned site) {
  Lane& lane = current_lane("a SIMD-group function");
  if (bytes > kSimdSlotBytes) {
    fail("SIMD-group function argument of %zu bytes is larger than the emulator supports", bytes);
    throw Abort{};
  }
  if (bytes) std::memcpy(lane.deposit, value, bytes);
  lane.deposit_bytes = bytes;
  lane.at_simd_barrier = false;
  suspend(lane, State::AtSimd, line, file, site);
  return lane.result;
}

void note_inactive_lane_read(unsigned line, const char* file, unsigned lane, unsigned src) {
  warn("kernel '%s': lane %u read lane %u, which is not active, in a SIMD-group function at %s:%u (undefined "
       "on the GPU; the emulator returns all bits set)",
       tls_worker->launch->kernel->host_name, lane, src, file, line);
}

void threadgroup_index_fault(int site, long long index, size_t extent, unsigned dim, unsigned line, const char* file) {
  const Lane& lane = current_lane("a threadgroup array");
  const mtl_emu_lane& t = lane.info;
  char where[32] = "";
  if (dim > 0) std::snprintf(where, sizeof(where), " in dimension %u", dim);
  fail("threadgroup array '%s' indexed at %lld%s, outside its %zu elements, at %s:%u by thread_position_in_threadgroup "
       "(%u, %u, %u) of threadgroup (%u, %u, %u) (thread_position_in_grid (%u, %u, %u))",
       threadgroup_names(tls_worker->launch->kernel)[site], index, where, extent, file, line, t.thread_in_group[0],
       t.thread_in_group[1], t.thread_in_group[2], t.group_pos[0], t.group_pos[1], t.group_pos[2], lane.grid_pos[0],
       lane.grid_pos[1], lane.grid_pos[2]);
  throw Abort{};
}

volatile int32_t cancel_requested = 0;

void cancelled(unsigned line, const char* file) {
  const Lane* lane = tls_lane;
  const char* why = cancel_requested == 2 ? "timed out" : "interrupted";
  if (lane != nullptr && line != 0)
    fail("%s in the loop at %s:%u, running thread_position_in_grid (%u, %u, %u) in threadgroup (%u, %u, %u)", why,
         file, line, lane->grid_pos[0], lane->grid_pos[1], lane->grid_pos[2], lane->info.group_pos[0],
         lane->info.group_pos[1], lane->info.group_pos[2]);
  else
    fail("%s", why);
  throw Abort{};
}

Bindings launch_bindings{};

const Bindings* threadgroup_bindings() { return &tls_worker->bindings; }

void buffer_index_fault(int slot, long long index, long long offset, size_t bytes, unsigned line, const char* file) {
  const Lane& lane = current_lane("a buffer subscript");
  const mtl_emu_kernel* k = tls_worker->launch->kernel;
  const bool threadgroup = slot >= kMaxBindings;
  const int index_in_table = threadgroup ? slot - kMaxBindings : slot;
  const char *name = "?", *type = "?";
  for (int32_t j = 0; j < k->num_params; ++j)
    if (k->params[j].kind == (threadgroup ? MTL_EMU_PARAM_THREADGROUP : MTL_EMU_PARAM_BUFFER) &&
        k->params[j].index == index_in_table) {
      name = k->params[j].name;
      type = k->params[j].type;
    }
  const mtl_emu_lane& t = lane.info;
  fail("out-of-bounds access to %s(%d) '%s' (%s): index %lld reaches byte offset %lld, outside the %zu bytes bound "
       "(elements of %zu bytes), at %s:%u by thread_position_in_grid (%u, %u, %u) in threadgroup (%u, %u, %u)",
       threadgroup ? "threadgroup" : "buffer", index_in_table, name, type, index, offset,
       (threadgroup ? tls_worker->bindings : launch_bindings).length[slot], bytes, file, line, lane.grid_pos[0], lane.grid_pos[1], lane.grid_pos[2],
       t.group_pos[0], t.group_pos[1], t.group_pos[2]);
  throw Abort{};
}

unsigned char* threadgroup_static_base(int site) {
  Worker& w = *tls_worker;
  return w.tg_static.data() + w.tg_offsets[size_t(site)];
}

unsigned char* threadgroup_dynamic_base(int index) { return tls_worker->tg_dynamic[index].data(); }

unsigned short simdgroup_lane_id() { return (unsigned short)current_lane("simdgroup_lane_id").info.simd_lane; }

void simdgroup_allgather(const void* mine, void* all, unsigned long bytes) {
  const SimdExchange ex = simd_exchange(mine, bytes, __LINE__, internal_site_file);
  for (unsigned i = 0; i < kSimdWidth; ++i) {
    if ((ex.active >> i) & 1u) std::memcpy(static_cast<unsigned char*>(all) + i * bytes, ex.slots + i * kSimdSlotBytes, bytes);
    else std::memset(static_cast<unsigned char*>(all) + i * bytes, 0, bytes);
  }
}

}  // namespace __mtl

// ----------------------------------------------------------- host entries

extern "C" __attribute__((visibility("default"))) void mtl_emu_run(const mtl_emu_launch* L, uint64_t first,
                                                                   uint64_t last, mtl_emu_error* error) {
  using namespace __mtl;
  static thread_local Worker worker;
  Worker& w = worker;
  tls_worker = &w;
  if (w.unfinished) abandon_fibers(w);
  w.launch = L;
  w.error = error;
  w.fibers = L->kernel->uses_sync != 0;
  w.schedule = schedule_from_environment();

  uint32_t groups[3], grid_threads[3];
  for (int d = 0; d < 3; ++d) {
    groups[d] = uint32_t(L->uniform ? L->grid[d] : (L->grid[d] + L->group[d] - 1) / L->group[d]);
    grid_threads[d] = uint32_t(L->uniform ? L->grid[d] * L->group[d] : L->grid[d]);
  }
  const size_t nominal = size_t(L->group[0] * L->group[1] * L->group[2]);
  if (w.lanes.size() < nominal) w.lanes.resize(nominal);
  if (w.simds.size() < (nominal + kSimdWidth - 1) / kSimdWidth) w.simds.resize((nominal + kSimdWidth - 1) / kSimdWidth);
  const size_t static_bytes = L->kernel->threadgroup_layout(nullptr);
  w.tg_offsets.assign(64, 0);
  L->kernel->threadgroup_layout(w.tg_offsets.data());
  w.tg_static.resize(static_bytes + 16);
  for (int i = 0; i < MTL_EMU_MAX_BINDINGS; ++i) {
    w.tg_dynamic[i].resize(L->threadgroup_lengths[i]);
    w.bindings.base[kMaxBindings + i] = w.tg_dynamic[i].data();
    w.bindings.length[kMaxBindings + i] = w.tg_dynamic[i].size();
  }
#ifdef MTL_EMU_RACE_CHECK
  std::vector<race::ThreadgroupRegion> regions = threadgroup_regions(w, static_bytes);
#endif

  for (uint64_t g = first; g < last && !error->failed; ++g) {
    if (cancel_requested != 0) {
      fail("%s", cancel_requested == 2 ? "timed out" : "interrupted");
      break;
    }
    const uint32_t pos[3] = {uint32_t(g % groups[0]), uint32_t((g / groups[0]) % groups[1]),
                             uint32_t(g / (uint64_t(groups[0]) * groups[1]))};
    uint32_t size[3];
    for (int d = 0; d < 3; ++d) {
      const uint64_t start = uint64_t(pos[d]) * L->group[d];
      size[d] = uint32_t(L->uniform ? L->group[d] : std::min<uint64_t>(L->group[d], L->grid[d] - start));
    }
    const uint32_t count = size[0] * size[1] * size[2];
    // Poison threadgroup memory: reads before writes show up as NaN / all-ones.
    std::memset(w.tg_static.data(), 0xFF, w.tg_static.size());
    for (int i = 0; i < MTL_EMU_MAX_BINDINGS; ++i)
      if (!w.tg_dynamic[i].empty()) std::memset(w.tg_dynamic[i].data(), 0xFF, w.tg_dynamic[i].size());
    tls_lane = nullptr;  // (the initial values are no thread's stores)
    threadgroup_initialize(L->kernel, w.tg_static.data(), w.tg_offsets.data());
    for (uint32_t i = 0; i < count; ++i) setup_lane(w.lanes[i], L, pos, size, groups, grid_threads, i);
    w.group = g;
#ifdef MTL_EMU_RACE_CHECK
    race::begin_group(L, g, regions.data(), regions.size(), (count + kSimdWidth - 1) / kSimdWidth);
#endif
    w.unfinished = true;
    if (w.fibers) {
      run_group_fibers(w, L, count);
    } else {
      const bool in_order = w.schedule.order == Order::InOrder;
      if (!in_order) fill_order(w, count, 0);
      for (uint32_t k = 0; k < count && !error->failed; ++k) {
        const uint32_t i = in_order ? k : w.order[k];
        tls_lane = &w.lanes[i];
        try {
          L->kernel->invoke(L, &w.lanes[i].info);
        } catch (const Abort&) {
        }
      }
      tls_lane = nullptr;
    }
#ifdef MTL_EMU_RACE_CHECK
    if (!error->failed) race::end_group();
#endif
    if (!error->failed) w.unfinished = false;
  }
  tls_lane = nullptr;
}

extern "C" __attribute__((visibility("default"))) void mtl_emu_bind(const mtl_emu_launch* L) {
  for (int i = 0; i < MTL_EMU_MAX_BINDINGS; ++i) {
    __mtl::launch_bindings.base[i] = static_cast<const unsigned char*>(L->buffers[i]);
    __mtl::launch_bindings.length[i] = L->buffers[i] != nullptr ? L->buffer_lengths[i] : 0;
  }
}

extern "C" __attribute__((visibility("default"))) void mtl_emu_cancel(int32_t reason) {
  __mtl::cancel_requested = reason;
}

extern "C" __attribute__((visibility("default"))) int mtl_emu_current(uint32_t thread_in_grid[3],
                                                                      uint32_t group_pos[3]) {
  __mtl::Lane* lane = __mtl::tls_lane;
  if (lane == nullptr) return 0;
  for (int d = 0; d < 3; ++d) {
    thread_in_grid[d] = lane->grid_pos[d];
    group_pos[d] = lane->info.group_pos[d];
  }
  return 1;
}
