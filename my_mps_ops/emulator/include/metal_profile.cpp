// The emulator's performance counters, linked into kernel libraries built
// with them (my_mps_ops/emulator/build.py, profile=True) in place of the race
// check (metal_race_check.cpp), whose interface it implements: the shader is
// compiled as for the race check (unoptimised, the compiler's thread-sanitizer
// instrumentation calling __tsan_read4(address) before every 4-byte load and
// so on), and this file counts the calls instead of checking them.
//
// What is counted, per launch:
// - device memory: bytes loaded and stored through each buffer binding (every
//   lane's every access), and the distinct bytes read and written of each
//   (a bitmap per binding). Bindings of reference parameters (`constant T&`:
//   scalars and structs from setBytes) are left out: they sit in the argument
//   table, not in device memory traffic.
// - per access site (the innermost .metal line of the access, its buffer or
//   threadgroup array, load or store): the accesses of the lanes of one SIMD
//   group that are the same dynamic instance of the site (the k-th execution of
//   that site by each lane; accesses of one lane at one line from different
//   instructions and to contiguous bytes, up to 16 bytes, are one access: the
//   component copies of a vector) form one SIMD-group access. For device
//   memory: the distinct aligned segments it touches (segment_bytes) and the
//   fewest segments its distinct bytes could fill. For threadgroup memory: the
//   bank conflict degree (banks of bank_bytes: the most distinct words any bank
//   serves; words read by several lanes are broadcast) beyond the fewest passes
//   the distinct words need (ceil(words / banks): 8- and 16-byte accesses).
// - threadgroup memory allocated per threadgroup; barrier arrivals; SIMD-group
//   function calls (per SIMD group); simdgroup_barrier calls; FLOPs of
//   simdgroup_multiply_accumulate (2*8*8*K per SIMD group); transcendental
//   function evaluations (per lane and vector component).
//
// Threadgroup memory offsets are taken from the start of the group's
// threadgroup allocation (static arrays in declaration order, then the
// [[threadgroup(n)]] parameters); device offsets from the start of the
// binding (a GPU buffer offset of 0 mod segment_bytes assumed).
#include "metal_profile.h"
#include "metal_race_check.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace __mtl {
namespace prof {
namespace {

constexpr int kFrames = 4;
constexpr uint32_t kSimdWidth = 32;
constexpr int kMaxBindings = MTL_EMU_MAX_BINDINGS;

struct PcKey {
  uint32_t pc[kFrames];
  bool operator==(const PcKey& o) const { return std::memcmp(pc, o.pc, sizeof(pc)) == 0; }
};
struct PcHash {
  size_t operator()(const PcKey& k) const {
    uint64_t h = 1469598103934665603ull;
    for (uint32_t v : k.pc) h = (h ^ v) * 1099511628211ull;
    return size_t(h);
  }
};

struct Access {
  PcKey pcs;
  uint64_t offset;   // from the binding's start (device) or the threadgroup allocation's (threadgroup)
  uint32_t bytes;
  uint16_t thread;
  uint8_t write;
  int8_t where;      // >= 0: buffer binding index; < 0: -(threadgroup region + 1)
};

struct SiteStats {
  uint64_t instructions = 0, lane_accesses = 0, bytes = 0;
  uint64_t segments = 0, min_segments = 0;    // device
  uint64_t wavefronts = 0, conflicts = 0, conflicted = 0;  // threadgroup
};

struct BindingRange {
  uintptr_t lo, hi;
  int index;
};

struct TgRegion {
  uintptr_t lo, hi;
  uint64_t layout;  // offset in the group's threadgroup allocation
  const char* name;
};

struct Params {
  uint64_t segment_bytes = 64, banks = 32, bank_bytes = 4;
};

struct LaunchState {
  const mtl_emu_launch* launch = nullptr;
  Params params;
  std::vector<BindingRange> ranges;          // counted bindings, by address
  std::vector<std::atomic<uint8_t>>* bitmaps[kMaxBindings] = {};  // bit 0 read, bit 1 written
  std::mutex mutex;                          // everything below
  uint64_t loaded[kMaxBindings] = {}, stored[kMaxBindings] = {};
  uint64_t tg_loaded = 0, tg_stored = 0;
  uint64_t threads = 0, groups = 0, tg_bytes = 0;
  uint64_t barrier_arrivals = 0, barriers = 0, simd_calls = 0, simd_lane_calls = 0, simd_barriers = 0;
  uint64_t mma_flops = 0, transcendentals = 0;
  std::map<std::string, SiteStats> sites;    // "space\tkind\twhere\tline"
  std::vector<std::string> tg_names;
  std::string result;
};

LaunchState* g_launch = nullptr;  // set by the host around a launch (launches of a library do not overlap)

std::mutex g_lines_mutex;
// The innermost shader line of a call stack, and whether the access is made
// there (not in a header's helper, such as a vector's component-wise copy).
struct Line {
  std::string line;
  bool direct = false;
};
std::unordered_map<PcKey, Line, PcHash> g_lines;

struct GroupState {
  LaunchState* st = nullptr;
  uint32_t threads = 0;
  std::vector<TgRegion> tg;
  std::vector<Access> accesses;
  uint64_t loaded[kMaxBindings] = {}, stored[kMaxBindings] = {};
  uint64_t tg_loaded = 0, tg_stored = 0;
  uint64_t barrier_arrivals = 0, barriers = 0, simd_calls = 0, simd_lane_calls = 0, simd_barriers = 0;
  uint64_t mma_flops = 0, transcendentals = 0;
};
thread_local GroupState tls;

// ------------------------------------------------------------ source lines

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

// Resolves the call stacks not seen yet with one addr2line run: each to the
// innermost frame in shader code ("file.metal:line"); frames in the emulator's
// headers and in the translated source's own code are skipped.
void resolve(const std::vector<PcKey>& keys) {
  std::vector<PcKey> todo;
  {
    std::lock_guard<std::mutex> lock(g_lines_mutex);
    for (const PcKey& k : keys)
      if (g_lines.find(k) == g_lines.end()) todo.push_back(k);
  }
  if (todo.empty()) return;
  std::sort(todo.begin(), todo.end(), [](const PcKey& a, const PcKey& b) { return std::memcmp(a.pc, b.pc, sizeof(a.pc)) < 0; });
  todo.erase(std::unique(todo.begin(), todo.end()), todo.end());
  const Library& lib = library();
  std::string own_dir = __FILE__;
  own_dir.resize(own_dir.rfind('/') + 1);
  const std::string library_dir = lib.path.substr(0, lib.path.rfind('/') + 1);
  std::vector<Line> resolved(todo.size());
  // In chunks: a command line of a few thousand addresses at most.
  const size_t chunk = 512;
  for (size_t start = 0; start < todo.size(); start += chunk) {
    const size_t end = std::min(todo.size(), start + chunk);
    std::string cmd = "addr2line -e '" + lib.path + "'";
    for (size_t i = start; i < end; ++i)
      for (int f = 0; f < kFrames; ++f) {
        char hex[32];
        std::snprintf(hex, sizeof(hex), " 0x%x", todo[i].pc[f] ? todo[i].pc[f] - 1 : 0);
        cmd += hex;
      }
    std::vector<std::string> frames;
    if (FILE* p = popen((cmd + " 2>/dev/null").c_str(), "r")) {
      char line[4096];
      while (std::fgets(line, sizeof(line), p) != nullptr) {
        std::string s(line);
        while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
        const size_t disc = s.find(" (discriminator");
        if (disc != std::string::npos) s.resize(disc);
        frames.push_back(s);
      }
      pclose(p);
    }
    for (size_t i = start; i < end; ++i) {
      std::string found;
      bool direct = false;
      for (int f = 0; f < kFrames; ++f) {
        const size_t at = (i - start) * kFrames + f;
        if (todo[i].pc[f] == 0 || at >= frames.size()) continue;
        const std::string& s = frames[at];
        const bool unknown = s.empty() || s[0] == '?';
        const bool emulator = s.compare(0, own_dir.size(), own_dir) == 0 ||
                              (!library_dir.empty() && s.compare(0, library_dir.size(), library_dir) == 0);
        if (unknown || emulator) continue;
        found = basename_of(s);
        direct = f == 0;
        break;
      }
      if (found.empty()) {
        char buf[64];
        std::snprintf(buf, sizeof(buf), "library offset 0x%x", todo[i].pc[0]);
        found = buf;
      }
      resolved[i] = Line{found, direct};
    }
  }
  std::lock_guard<std::mutex> lock(g_lines_mutex);
  for (size_t i = 0; i < todo.size(); ++i) g_lines[todo[i]] = resolved[i];
}

// ------------------------------------------------------------------ record

void record(const void* address, size_t bytes, bool write, void* frame) {
  GroupState& g = tls;
  LaunchState* st = g.st;
  if (st == nullptr || bytes == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  Access acc{};
  acc.bytes = uint32_t(bytes);
  acc.write = write;
  bool found = false;
  for (size_t i = 0; i < g.tg.size(); ++i) {
    const TgRegion& r = g.tg[i];
    if (a - r.lo < r.hi - r.lo) {
      acc.where = int8_t(-int(i) - 1);
      acc.offset = r.layout + (a - r.lo);
      (write ? g.tg_stored : g.tg_loaded) += bytes;
      found = true;
      break;
    }
  }
  if (!found) {
    for (const BindingRange& r : st->ranges) {
      if (a - r.lo < r.hi - r.lo) {
        acc.where = int8_t(r.index);
        acc.offset = a - r.lo;
        (write ? g.stored : g.loaded)[r.index] += bytes;
        const size_t n = std::min<size_t>(bytes, r.hi - a);
        std::vector<std::atomic<uint8_t>>& bits = *st->bitmaps[r.index];
        for (size_t k = 0; k < n; ++k) bits[acc.offset + k].fetch_or(write ? 2 : 1, std::memory_order_relaxed);
        found = true;
        break;
      }
    }
  }
  if (!found) return;  // the thread's own memory
  const mtl_emu_lane* lane = race::current_lane_info();
  if (lane == nullptr) return;
  acc.thread = uint16_t(lane->index_in_group);
  call_stack(frame, acc.pcs.pc);
  g.accesses.push_back(acc);
}

// ------------------------------------------------------- group accounting

struct InstrKey {
  uint32_t site;
  uint32_t simd;
  uint32_t occurrence;
  bool operator<(const InstrKey& o) const {
    return site != o.site ? site < o.site : simd != o.simd ? simd < o.simd : occurrence < o.occurrence;
  }
};

// A lane's recent dynamic instances of one site, which later accesses may complete.
struct Open {
  uint32_t occurrence = 0;
  uint64_t end = 0;     // offset past its last byte so far
  uint32_t merged = 0;  // bytes in it
  PcKey last{};
};
struct LaneSite {
  uint32_t next = 0;    // instances so far
  Open open[4];         // the latest ones, round robin
};

void flush_group() {
  GroupState& g = tls;
  LaunchState* st = g.st;
  if (st == nullptr) return;
  std::vector<PcKey> keys;
  keys.reserve(g.accesses.size());
  for (const Access& a : g.accesses) keys.push_back(a.pcs);
  resolve(keys);
  // Site names for this group's accesses.
  std::vector<std::string> site_names;
  std::map<std::string, uint32_t> site_ids;
  std::vector<uint32_t> site_of(g.accesses.size());
  std::vector<uint8_t> direct(g.accesses.size());
  {
    std::lock_guard<std::mutex> lock(g_lines_mutex);
    std::unordered_map<PcKey, uint32_t, PcHash> pc_line;  // per group: line ids
    for (size_t i = 0; i < g.accesses.size(); ++i) {
      const Access& a = g.accesses[i];
      std::string where;
      if (a.where >= 0) {
        where = "buffer(" + std::to_string(int(a.where)) + ")";
      } else {
        where = g.tg[size_t(-a.where - 1)].name;
      }
      const std::string key = std::string(a.where >= 0 ? "device" : "threadgroup") + "\t" +
                              (a.write ? "store" : "load") + "\t" + where + "\t" + g_lines[a.pcs].line;
      direct[i] = g_lines[a.pcs].direct;
      auto it = site_ids.find(key);
      if (it == site_ids.end()) {
        it = site_ids.emplace(key, uint32_t(site_names.size())).first;
        site_names.push_back(key);
      }
      site_of[i] = it->second;
    }
  }
  // Dynamic instances: the k-th access of each lane at each site.
  std::unordered_map<uint64_t, LaneSite> lanes;
  std::map<InstrKey, std::vector<std::pair<uint64_t, uint32_t>>> instrs;  // (offset, bytes) per lane access
  for (size_t i = 0; i < g.accesses.size(); ++i) {
    const Access& a = g.accesses[i];
    LaneSite& ls = lanes[(uint64_t(a.thread) << 32) | site_of[i]];
    // One access of a lane may reach here as several: a vector read component by
    // component in a header's helper (not at the shader line itself; possibly
    // interleaved with another vector's components, as in `a + b`), or by
    // different instructions of that line. Contiguous, up to 16 bytes in all.
    uint32_t occurrence = ls.next;
    bool merged = false;
    for (uint32_t k = 0; k < 4 && k < ls.next; ++k) {
      Open& o = ls.open[k];
      if (o.end == a.offset && (!direct[i] || !(a.pcs == o.last)) && o.merged + a.bytes <= 16) {
        o.end += a.bytes;
        o.merged += a.bytes;
        o.last = a.pcs;
        occurrence = o.occurrence;
        merged = true;
        break;
      }
    }
    if (!merged) {
      ls.open[ls.next % 4] = Open{occurrence, a.offset + a.bytes, a.bytes, a.pcs};
      ++ls.next;
    }
    instrs[InstrKey{site_of[i], uint32_t(a.thread / kSimdWidth), occurrence}].push_back({a.offset, a.bytes});
  }
  std::vector<SiteStats> stats(site_names.size());
  const Params& P = st->params;
  for (auto& [key, ranges] : instrs) {
    SiteStats& s = stats[key.site];
    const bool device = site_names[key.site].compare(0, 7, "device\t") == 0;
    s.instructions += 1;
    s.lane_accesses += ranges.size();
    for (const auto& r : ranges) s.bytes += r.second;
    if (device) {
      std::vector<uint64_t> segs;
      std::sort(ranges.begin(), ranges.end());
      uint64_t distinct = 0, covered_to = 0;
      bool first = true;
      for (const auto& r : ranges) {
        const uint64_t lo = r.first, hi = r.first + r.second;
        if (first || lo >= covered_to) distinct += hi - lo;
        else if (hi > covered_to) distinct += hi - covered_to;
        covered_to = first ? hi : std::max(covered_to, hi);
        first = false;
        for (uint64_t sgm = lo / P.segment_bytes; sgm <= (hi - 1) / P.segment_bytes; ++sgm) segs.push_back(sgm);
      }
      std::sort(segs.begin(), segs.end());
      segs.erase(std::unique(segs.begin(), segs.end()), segs.end());
      s.segments += segs.size();
      s.min_segments += (distinct + P.segment_bytes - 1) / P.segment_bytes;
    } else {
      std::vector<std::pair<uint64_t, uint64_t>> bank_words;  // (bank, word)
      for (const auto& r : ranges)
        for (uint64_t w = r.first / P.bank_bytes; w <= (r.first + r.second - 1) / P.bank_bytes; ++w)
          bank_words.push_back({w % P.banks, w});
      std::sort(bank_words.begin(), bank_words.end());
      bank_words.erase(std::unique(bank_words.begin(), bank_words.end()), bank_words.end());
      uint64_t degree = 0, run = 0;
      for (size_t i = 0; i < bank_words.size(); ++i) {
        run = (i > 0 && bank_words[i].first == bank_words[i - 1].first) ? run + 1 : 1;
        degree = std::max(degree, run);
      }
      // The fewest passes the distinct words need (more than one when the lanes ask for more
      // words than there are banks: 8- and 16-byte accesses); conflicts are passes beyond it.
      const uint64_t least = (bank_words.size() + P.banks - 1) / P.banks;
      s.wavefronts += degree;
      if (degree > least) {
        s.conflicts += degree - least;
        s.conflicted += 1;
      }
    }
  }
  std::lock_guard<std::mutex> lock(st->mutex);
  for (size_t i = 0; i < site_names.size(); ++i) {
    SiteStats& d = st->sites[site_names[i]];
    const SiteStats& s = stats[i];
    d.instructions += s.instructions;
    d.lane_accesses += s.lane_accesses;
    d.bytes += s.bytes;
    d.segments += s.segments;
    d.min_segments += s.min_segments;
    d.wavefronts += s.wavefronts;
    d.conflicts += s.conflicts;
    d.conflicted += s.conflicted;
  }
  for (int i = 0; i < kMaxBindings; ++i) {
    st->loaded[i] += g.loaded[i];
    st->stored[i] += g.stored[i];
    g.loaded[i] = g.stored[i] = 0;
  }
  st->tg_loaded += g.tg_loaded;
  st->tg_stored += g.tg_stored;
  st->threads += g.threads;
  st->groups += 1;
  st->barrier_arrivals += g.barrier_arrivals;
  st->barriers += g.barriers;
  st->simd_calls += g.simd_calls;
  st->simd_lane_calls += g.simd_lane_calls;
  st->simd_barriers += g.simd_barriers;
  st->mma_flops += g.mma_flops;
  st->transcendentals += g.transcendentals;
  uint64_t tg_bytes = 0;
  for (const TgRegion& r : g.tg) tg_bytes += r.hi - r.lo;
  st->tg_bytes = std::max(st->tg_bytes, tg_bytes);
  if (st->tg_names.empty())
    for (const TgRegion& r : g.tg) st->tg_names.push_back(r.name ? r.name : "?");
  g.tg_loaded = g.tg_stored = 0;
  g.barrier_arrivals = g.barriers = g.simd_calls = g.simd_lane_calls = g.simd_barriers = 0;
  g.mma_flops = g.transcendentals = 0;
  g.accesses.clear();
}

uint64_t env_param(const char* text, const char* name, uint64_t fallback) {
  if (text == nullptr) return fallback;
  const char* at = std::strstr(text, name);
  if (at == nullptr || at[std::strlen(name)] != '=') return fallback;
  const uint64_t v = std::strtoull(at + std::strlen(name) + 1, nullptr, 10);
  return v > 0 ? v : fallback;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    out += c;
  }
  return out;
}

}  // namespace
}  // namespace prof

// ------------------------------------------------- the race check's interface

namespace race {
void begin_group(const mtl_emu_launch* launch, uint64_t group, const ThreadgroupRegion* regions, size_t count,
                 uint32_t) {
  prof::GroupState& g = prof::tls;
  g.st = prof::g_launch != nullptr && prof::g_launch->launch == launch ? prof::g_launch : nullptr;
  g.tg.clear();
  uint64_t layout = 0;
  for (size_t i = 0; i < count; ++i) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(regions[i].base);
    g.tg.push_back({lo, lo + regions[i].bytes, layout, regions[i].name});
    layout += regions[i].bytes;
  }
  g.accesses.clear();
  // This threadgroup's real size (edge groups of a non-uniform grid are smaller).
  const mtl_emu_launch* L = launch;
  uint64_t groups[3];
  for (int d = 0; d < 3; ++d) groups[d] = L->uniform ? L->grid[d] : (L->grid[d] + L->group[d] - 1) / L->group[d];
  const uint64_t pos[3] = {group % groups[0], (group / groups[0]) % groups[1], group / (groups[0] * groups[1])};
  uint64_t threads = 1;
  for (int d = 0; d < 3; ++d)
    threads *= L->uniform ? L->group[d] : std::min<uint64_t>(L->group[d], L->grid[d] - pos[d] * L->group[d]);
  g.threads = uint32_t(threads);
}

void end_group() {
  prof::flush_group();
  prof::tls.st = nullptr;
}

void threadgroup_barrier_released(unsigned) {}
void simdgroup_barrier_released(uint32_t, unsigned) {}
}  // namespace race

namespace profile {
void barrier_released(uint32_t threads) {
  prof::tls.barrier_arrivals += threads;
  prof::tls.barriers += 1;
}
void simd_released(uint32_t lanes, bool barrier, bool internal) {
  if (internal) return;
  if (barrier) {
    prof::tls.simd_barriers += 1;
  } else {
    prof::tls.simd_calls += 1;
    prof::tls.simd_lane_calls += lanes;
  }
}
}  // namespace profile

void profile_mma(unsigned long flops) {
  const mtl_emu_lane* lane = race::current_lane_info();
  if (lane != nullptr && lane->simd_lane == 0) prof::tls.mma_flops += flops;
}
void profile_transcendental() { prof::tls.transcendentals += 1; }

void race_record(const void* address, size_t bytes, bool write) {
  prof::record(address, bytes, write, __builtin_frame_address(0));
}

}  // namespace __mtl

// --------------------------------------------------------------- host entries

#define MTL_EMU_EXPORT extern "C" __attribute__((visibility("default")))

MTL_EMU_EXPORT void mtl_emu_race_begin(const mtl_emu_launch* launch, const size_t* lengths) {
  using namespace __mtl::prof;
  auto* st = new LaunchState();
  st->launch = launch;
  const char* env = std::getenv("MY_MPS_OPS_EMULATOR_PROFILE");
  st->params.segment_bytes = env_param(env, "segment_bytes", 64);
  st->params.banks = env_param(env, "banks", 32);
  st->params.bank_bytes = env_param(env, "bank_bytes", 4);
  const mtl_emu_kernel* k = launch->kernel;
  for (int32_t j = 0; j < k->num_params; ++j) {
    const mtl_emu_param& p = k->params[j];
    if (p.kind != MTL_EMU_PARAM_BUFFER || p.index < 0 || p.index >= kMaxBindings) continue;
    if (p.bytes > 0) continue;  // a reference: argument-table data
    if (launch->buffers[p.index] == nullptr || lengths[p.index] == 0 || st->bitmaps[p.index] != nullptr) continue;
    const uintptr_t lo = reinterpret_cast<uintptr_t>(launch->buffers[p.index]);
    st->ranges.push_back({lo, lo + lengths[p.index], p.index});
    st->bitmaps[p.index] = new std::vector<std::atomic<uint8_t>>(lengths[p.index]);
  }
  delete g_launch;
  g_launch = st;
}

MTL_EMU_EXPORT void mtl_emu_race_end(const mtl_emu_launch*) {}

MTL_EMU_EXPORT const char* mtl_emu_profile_result(const mtl_emu_launch* launch) {
  using namespace __mtl::prof;
  LaunchState* st = g_launch;
  if (st == nullptr || st->launch != launch) return "{}";
  const mtl_emu_kernel* k = launch->kernel;
  std::string out = "{\"kernel\": \"" + json_escape(k->host_name) + "\"";
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                ", \"grid\": [%llu, %llu, %llu], \"group\": [%llu, %llu, %llu], \"uniform\": %d, \"threads\": %llu, "
                "\"threadgroups\": %llu, \"segment_bytes\": %llu, \"banks\": %llu, \"bank_bytes\": %llu",
                (unsigned long long)launch->grid[0], (unsigned long long)launch->grid[1],
                (unsigned long long)launch->grid[2], (unsigned long long)launch->group[0],
                (unsigned long long)launch->group[1], (unsigned long long)launch->group[2], launch->uniform,
                (unsigned long long)st->threads, (unsigned long long)st->groups,
                (unsigned long long)st->params.segment_bytes, (unsigned long long)st->params.banks,
                (unsigned long long)st->params.bank_bytes);
  out += buf;
  std::snprintf(buf, sizeof(buf),
                ", \"threadgroup_memory_bytes\": %llu, \"threadgroup_loaded\": %llu, \"threadgroup_stored\": %llu, "
                "\"barriers\": %llu, \"barrier_arrivals\": %llu, \"simd_calls\": %llu, \"simd_lane_calls\": %llu, "
                "\"simdgroup_barriers\": %llu, \"mma_flops\": %llu, \"transcendentals\": %llu",
                (unsigned long long)st->tg_bytes, (unsigned long long)st->tg_loaded,
                (unsigned long long)st->tg_stored, (unsigned long long)st->barriers,
                (unsigned long long)st->barrier_arrivals, (unsigned long long)st->simd_calls,
                (unsigned long long)st->simd_lane_calls, (unsigned long long)st->simd_barriers,
                (unsigned long long)st->mma_flops, (unsigned long long)st->transcendentals);
  out += buf;
  out += ", \"buffers\": [";
  bool first = true;
  for (int32_t j = 0; j < k->num_params; ++j) {
    const mtl_emu_param& p = k->params[j];
    if (p.kind != MTL_EMU_PARAM_BUFFER || p.index < 0 || p.index >= kMaxBindings || st->bitmaps[p.index] == nullptr)
      continue;
    uint64_t read = 0, written = 0, touched = 0;
    for (const auto& b : *st->bitmaps[p.index]) {
      const uint8_t v = b.load(std::memory_order_relaxed);
      read += v & 1;
      written += (v >> 1) & 1;
      touched += v != 0;
    }
    std::snprintf(buf, sizeof(buf),
                  "%s{\"index\": %d, \"name\": \"%s\", \"type\": \"%s\", \"bound\": %zu, \"loaded\": %llu, "
                  "\"stored\": %llu, \"distinct_read\": %llu, \"distinct_written\": %llu, \"distinct_touched\": %llu}",
                  first ? "" : ", ", p.index, json_escape(p.name).c_str(), json_escape(p.type).c_str(),
                  st->bitmaps[p.index]->size(), (unsigned long long)st->loaded[p.index],
                  (unsigned long long)st->stored[p.index], (unsigned long long)read, (unsigned long long)written,
                  (unsigned long long)touched);
    out += buf;
    first = false;
  }
  out += "], \"sites\": [";
  first = true;
  for (const auto& [key, s] : st->sites) {
    // key: space \t kind \t where \t line
    std::vector<std::string> parts;
    size_t at = 0;
    for (int i = 0; i < 3; ++i) {
      const size_t tab = key.find('\t', at);
      parts.push_back(key.substr(at, tab - at));
      at = tab + 1;
    }
    parts.push_back(key.substr(at));
    std::string where = parts[2];
    if (where.compare(0, 7, "buffer(") == 0) {
      const int index = std::atoi(where.c_str() + 7);
      for (int32_t j = 0; j < k->num_params; ++j)
        if (k->params[j].kind == MTL_EMU_PARAM_BUFFER && k->params[j].index == index)
          where += std::string(" '") + k->params[j].name + "'";
    }
    std::snprintf(buf, sizeof(buf),
                  "\"instructions\": %llu, \"lane_accesses\": %llu, \"bytes\": %llu, \"segments\": %llu, "
                  "\"min_segments\": %llu, \"wavefronts\": %llu, \"conflicts\": %llu, \"conflicted\": %llu}",
                  (unsigned long long)s.instructions, (unsigned long long)s.lane_accesses,
                  (unsigned long long)s.bytes, (unsigned long long)s.segments, (unsigned long long)s.min_segments,
                  (unsigned long long)s.wavefronts, (unsigned long long)s.conflicts,
                  (unsigned long long)s.conflicted);
    out += std::string(first ? "" : ", ") + "{\"space\": \"" + parts[0] + "\", \"kind\": \"" + parts[1] +
           "\", \"where\": \"" + json_escape(where) + "\", \"line\": \"" + json_escape(parts[3]) + "\", " + buf;
    first = false;
  }
  out += "]}";
  st->result = out;
  for (auto* b : st->bitmaps) delete b;
  std::fill(std::begin(st->bitmaps), std::end(st->bitmaps), nullptr);
  return st->result.c_str();
}

// ---------------------------------------------- the instrumentation's calls

namespace {
using __mtl::prof::record;
}  // namespace

#define MTL_EMU_HOOK extern "C" __attribute__((visibility("hidden"), noinline))
#define MTL_EMU_ACCESS(N)                                                                          \
  MTL_EMU_HOOK void __tsan_read##N(void* p) { record(p, N, false, __builtin_frame_address(0)); }   \
  MTL_EMU_HOOK void __tsan_write##N(void* p) { record(p, N, true, __builtin_frame_address(0)); }   \
  MTL_EMU_HOOK void __tsan_unaligned_read##N(void* p) { record(p, N, false, __builtin_frame_address(0)); } \
  MTL_EMU_HOOK void __tsan_unaligned_write##N(void* p) { record(p, N, true, __builtin_frame_address(0)); } \
  MTL_EMU_HOOK void __tsan_volatile_read##N(void* p) { record(p, N, false, __builtin_frame_address(0)); } \
  MTL_EMU_HOOK void __tsan_volatile_write##N(void* p) { record(p, N, true, __builtin_frame_address(0)); }
MTL_EMU_ACCESS(1)
MTL_EMU_ACCESS(2)
MTL_EMU_ACCESS(4)
MTL_EMU_ACCESS(8)
MTL_EMU_ACCESS(16)
#undef MTL_EMU_ACCESS

MTL_EMU_HOOK void __tsan_read_range(void* p, unsigned long n) { record(p, n, false, __builtin_frame_address(0)); }
MTL_EMU_HOOK void __tsan_write_range(void* p, unsigned long n) { record(p, n, true, __builtin_frame_address(0)); }
MTL_EMU_HOOK void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
  record(s, n, false, __builtin_frame_address(0));
  record(d, n, true, __builtin_frame_address(0));
  return std::memcpy(d, s, n);
}
MTL_EMU_HOOK void* __tsan_memmove(void* d, const void* s, unsigned long n) {
  record(s, n, false, __builtin_frame_address(0));
  record(d, n, true, __builtin_frame_address(0));
  return std::memmove(d, s, n);
}
MTL_EMU_HOOK void* __tsan_memset(void* d, int c, unsigned long n) {
  record(d, n, true, __builtin_frame_address(0));
  return std::memset(d, c, n);
}
MTL_EMU_HOOK void __tsan_init() {}
MTL_EMU_HOOK void __tsan_func_entry(void*) {}
MTL_EMU_HOOK void __tsan_func_exit() {}
MTL_EMU_HOOK void __tsan_vptr_update(void*, void*) {}
MTL_EMU_HOOK void __tsan_vptr_read(void*) {}
MTL_EMU_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
MTL_EMU_HOOK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// Atomics: performed sequentially consistent, counted as a load and a store.
#define MTL_EMU_ATOMIC(N, T)                                                                                   \
  MTL_EMU_HOOK T __tsan_atomic##N##_load(const volatile T* a, int) {                                          \
    record((const void*)a, sizeof(T), false, __builtin_frame_address(0));                                      \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                               \
  }                                                                                                            \
  MTL_EMU_HOOK void __tsan_atomic##N##_store(volatile T* a, T v, int) {                                       \
    record((const void*)a, sizeof(T), true, __builtin_frame_address(0));                                       \
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
    record((const void*)a, sizeof(T), true, __builtin_frame_address(0));                                       \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
  }                                                                                                            \
  MTL_EMU_HOOK int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {              \
    record((const void*)a, sizeof(T), true, __builtin_frame_address(0));                                       \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
  }                                                                                                            \
  MTL_EMU_HOOK T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                  \
    record((const void*)a, sizeof(T), true, __builtin_frame_address(0));                                       \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                          \
    return c;                                                                                                  \
  }
#define MTL_EMU_ATOMIC_RMW(N, T, op, expr)                                     \
  MTL_EMU_HOOK T __tsan_atomic##N##_##op(volatile T* a, T v, int) {            \
    record((const void*)a, sizeof(T), false, __builtin_frame_address(0));      \
    record((const void*)a, sizeof(T), true, __builtin_frame_address(0));       \
    return expr;                                                               \
  }
MTL_EMU_ATOMIC(8, uint8_t)
MTL_EMU_ATOMIC(16, uint16_t)
MTL_EMU_ATOMIC(32, uint32_t)
MTL_EMU_ATOMIC(64, uint64_t)
#undef MTL_EMU_ATOMIC
#undef MTL_EMU_ATOMIC_RMW
