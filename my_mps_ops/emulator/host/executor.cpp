// The Metal emulator's executor: runs metal::Launch descriptions on CPU
// tensors with kernel libraries built by my_mps_ops/emulator (translated MSL
// compiled to a .so), checking what the GPU would not:
// - every [[buffer(n)]] the kernel declares is bound; a scalar's byte size
//   equals the kernel parameter's; threadgroup size <= 1024; threadgroup
//   memory <= 32 KB;
// - out-of-bounds accesses: each buffer (a tensor view's extent) is copied
//   into memory whose end abuts an inaccessible reservation (and whose start
//   follows one); a fault there is reported with the kernel, the thread and
//   the buffer, then the run stops (the kernel checks its own subscripts);
// - a SIGINT or a timeout stops a run (the kernel polls a cancel flag);
// - the runtime inside the library reports divergent barriers and SIMD-group
//   functions, and early returns before barriers.
// Libraries built with the race check (my_mps_ops.emulator.race_check()) are
// told where each launch's buffers are, and when it starts and ends.
#include "emulator.h"

#include "metal_emulator_abi.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__linux__)
#include <ucontext.h>  // the faulting access's read/write bit (macOS would need _XOPEN_SOURCE)
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <csetjmp>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

namespace my_mps_ops::emulator {
namespace {

using metal::Arg;
using metal::Executor;
using metal::Launch;
using metal::PipelineInfo;

constexpr size_t kMaxThreadsPerThreadgroup = 1024;
constexpr size_t kMaxThreadgroupMemory = 32 * 1024;
constexpr uint32_t kSimdWidth = 32;
// What pipeline_info reports as every pipeline's maxTotalThreadsPerThreadgroup
// (and run() enforces): 1024 unless a test lowers it to stand for a pipeline
// whose register use allows fewer threads, as a GPU's compiler may.
std::atomic<uint32_t> g_pipeline_thread_limit{kMaxThreadsPerThreadgroup};

struct EmulatedLibrary {
  std::string path;
  void* handle = nullptr;
  const mtl_emu_kernel* kernels = nullptr;
  int32_t count = 0;
  mtl_emu_run_fn run = nullptr;
  mtl_emu_current_fn current = nullptr;
  mtl_emu_bind_fn bind = nullptr;
  mtl_emu_cancel_fn cancel = nullptr;
  mtl_emu_race_begin_fn race_begin = nullptr;  // race-check libraries only
  mtl_emu_race_end_fn race_end = nullptr;
  mtl_emu_profile_result_fn profile_result = nullptr;  // profile libraries only

  const mtl_emu_kernel& kernel(const std::string& library, const std::string& name) const {
    for (int32_t i = 0; i < count; ++i)
      if (name == kernels[i].host_name) return kernels[i];
    std::ostringstream known;
    for (int32_t i = 0; i < count; ++i) known << (i ? ", " : "") << kernels[i].host_name;
    TORCH_CHECK(false, "Metal emulator: no kernel named '", name, "' in library '", library, "' (it has: ",
                known.str(), ")");
  }
};

std::mutex g_registry_mutex;
std::map<std::string, std::shared_ptr<EmulatedLibrary>>& registry() {
  static std::map<std::string, std::shared_ptr<EmulatedLibrary>> libraries;
  return libraries;
}

// Builds a library specialised with function constants (set by
// my_mps_ops.testing; see set_library_resolver).
std::mutex g_resolver_mutex;
LibraryResolver& resolver() {
  static LibraryResolver fn;
  return fn;
}

std::shared_ptr<EmulatedLibrary> find_registered(const std::string& key) {
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  auto it = registry().find(key);
  return it != registry().end() ? it->second : nullptr;
}

// The library a launch of `library` with `constants` runs: the one registered
// under that name, or, with function constants, the library compiled with
// them (built through the resolver on first use and registered under
// specialised_library_key), as a Metal pipeline is specialised.
std::shared_ptr<EmulatedLibrary> find_library(const std::string& library,
                                              const std::vector<metal::FunctionConstant>& constants = {}) {
  const std::string key = specialised_library_key(library, constants);
  if (auto lib = find_registered(key)) return lib;
  TORCH_CHECK(!constants.empty(), "Metal emulator: no shader library '", library,
              "' is loaded (ops run their Metal path on cpu tensors only inside my_mps_ops.testing.metal_emulation())");
  TORCH_CHECK(find_registered(library) != nullptr, "Metal emulator: no shader library '", library,
              "' is loaded (ops run their Metal path on cpu tensors only inside my_mps_ops.testing.metal_emulation())");
  LibraryResolver build;
  {
    std::lock_guard<std::mutex> lock(g_resolver_mutex);
    build = resolver();
  }
  TORCH_CHECK(build, "Metal emulator: library '", library, "' specialised with function constants ",
              metal::function_constants_key(constants), " needs a builder (import my_mps_ops.testing)");
  const std::string path = build(library, key, constants);
  register_library(key, path);
  auto lib = find_registered(key);
  TORCH_CHECK(lib != nullptr, "Metal emulator: the specialised library ", key, " was not registered");
  return lib;
}

// ------------------------------------------------------- guarded buffers

size_t page_size() {
  static const size_t size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

// Inaccessible address space reserved on each side of a buffer: an index
// far past either end (a uint index of 4-byte elements reaches 16 GB) faults
// here instead of landing in other memory. PROT_NONE reservations cost no memory.
constexpr size_t kGuardBytes = size_t(16) << 30;

// A copy of [source, source + length) placed so that its end is 16-byte
// aligned right before an inaccessible reservation (another one precedes
// it); the few padding bytes between are filled with a canary checked after
// the run, and so is the slack between the start of its pages and its start.
struct GuardedRegion {
  unsigned char* storage = nullptr;  // the tensor storage and the byte range of it this mirrors
  size_t storage_begin = 0;
  unsigned char* source = nullptr;   // storage + storage_begin
  size_t length = 0;
  unsigned char* mapping = nullptr;
  size_t mapping_length = 0;
  unsigned char* data = nullptr;
  size_t padding = 0, slack = 0;
  std::string label;  // "buffer(0) 'x'"
  static constexpr unsigned char kCanary = 0xA5;

  void allocate() {
    const size_t ps = page_size();
    const size_t padded = (length + 15) / 16 * 16;
    const size_t body = (padded + ps - 1) / ps * ps;
    size_t guard = kGuardBytes;
    void* p = MAP_FAILED;
    for (; p == MAP_FAILED && guard >= ps; guard /= 16) {
      mapping_length = body + 2 * guard;
      p = mmap(nullptr, mapping_length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p != MAP_FAILED) break;
    }
    TORCH_CHECK(p != MAP_FAILED, "Metal emulator: cannot map ", mapping_length, " bytes");
    mapping = static_cast<unsigned char*>(p);
    TORCH_CHECK(mprotect(mapping + guard, body, PROT_READ | PROT_WRITE) == 0, "Metal emulator: mprotect failed");
    data = mapping + guard + body - padded;
    padding = padded - length;
    slack = body - padded;
    if (length) std::memcpy(data, source, length);
    std::memset(data + length, kCanary, padding);
    std::memset(data - slack, kCanary, slack);
  }
  bool canary_intact() const {
    for (size_t i = 0; i < padding; ++i)
      if (data[length + i] != kCanary) return false;
    return true;
  }
  bool slack_intact() const {
    for (size_t i = 1; i <= slack; ++i)
      if (data[-static_cast<ptrdiff_t>(i)] != kCanary) return false;
    return true;
  }
  bool contains_guard(const unsigned char* addr) const {
    return addr >= mapping && addr < mapping + mapping_length;
  }
  ~GuardedRegion() {
    if (mapping) munmap(mapping, mapping_length);
  }
};

// ------------------------------------------------------- fault handling

struct FaultState {
  std::vector<GuardedRegion*> regions;
  mtl_emu_current_fn current = nullptr;
  const char* kernel = "";
  std::atomic<bool> faulted{false};
  char message[1024] = {0};
};

FaultState* g_fault = nullptr;  // set while a launch runs (launches are serialised)
thread_local sigjmp_buf* tls_recover = nullptr;
std::mutex g_launch_mutex;

// Counters of launches run from profile libraries, as JSON, until taken.
std::mutex g_profile_mutex;
std::vector<std::string> g_profile_records;

void on_fault(int sig, siginfo_t* info, void* uctx) {
  FaultState* fs = g_fault;
  if (fs == nullptr || tls_recover == nullptr) {
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  const unsigned char* addr = static_cast<const unsigned char*>(info->si_addr);
  const char* access = "access";
#if defined(__x86_64__) && defined(__linux__)
  if (sig == SIGSEGV) {
    const auto* uc = static_cast<const ucontext_t*>(uctx);
    access = (uc->uc_mcontext.gregs[REG_ERR] & 2) ? "write" : "read";
  }
#else
  (void)uctx;
#endif
  uint32_t pos[3] = {0, 0, 0}, group[3] = {0, 0, 0};
  const bool have_thread = fs->current && fs->current(pos, group);
  if (!fs->faulted.exchange(true)) {
    int n;
    if (sig == SIGFPE) {
      n = snprintf(fs->message, sizeof(fs->message), "kernel '%s': arithmetic fault (integer division by zero?)",
                   fs->kernel);
    } else {
      const GuardedRegion* hit = nullptr;
      for (const GuardedRegion* r : fs->regions)
        if (r->contains_guard(addr)) hit = r;
      if (hit != nullptr) {
        const long offset = static_cast<long>(addr - hit->data);
        n = snprintf(fs->message, sizeof(fs->message),
                     "kernel '%s': out-of-bounds %s at byte offset %ld of a %zu-byte buffer bound at %s", fs->kernel,
                     access, offset, hit->length, hit->label.c_str());
      } else {
        n = snprintf(fs->message, sizeof(fs->message), "kernel '%s': invalid memory %s at address %p", fs->kernel,
                     access, static_cast<const void*>(addr));
      }
    }
    if (have_thread && n > 0 && size_t(n) < sizeof(fs->message))
      snprintf(fs->message + n, sizeof(fs->message) - size_t(n),
               " by thread_position_in_grid (%u, %u, %u) in threadgroup (%u, %u, %u)", pos[0], pos[1], pos[2], group[0],
               group[1], group[2]);
  }
  siglongjmp(*tls_recover, 1);
}

struct SignalScope {
  struct sigaction old_segv {}, old_bus {}, old_fpe {};
  SignalScope() {
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
    sigaction(SIGFPE, &sa, &old_fpe);
  }
  ~SignalScope() {
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaction(SIGFPE, &old_fpe, nullptr);
  }
};

// The fault handler must not run on a fiber's stack.
void ensure_alternate_signal_stack() {
  thread_local bool installed = false;
  if (installed) return;
  stack_t current{};
  if (sigaltstack(nullptr, &current) == 0 && !(current.ss_flags & SS_DISABLE) && current.ss_size >= 65536) {
    installed = true;
    return;
  }
  static constexpr size_t kSize = 256 * 1024;
  stack_t st{};
  st.ss_sp = mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  st.ss_size = kSize;
  st.ss_flags = 0;
  TORCH_CHECK(st.ss_sp != MAP_FAILED && sigaltstack(&st, nullptr) == 0, "Metal emulator: sigaltstack failed");
  installed = true;
}

// ------------------------------------------------------- stopping a run

// While a run is under way, a SIGINT stops it (through the library's
// mtl_emu_cancel) and is passed on to the handler it replaced (Python's, which
// then raises KeyboardInterrupt); a timeout stops it from a watchdog thread.
std::atomic<mtl_emu_cancel_fn> g_cancel{nullptr};
volatile sig_atomic_t g_interrupted = 0;
struct sigaction g_previous_sigint {};

void on_sigint(int sig, siginfo_t* info, void* uctx) {
  g_interrupted = 1;
  if (mtl_emu_cancel_fn cancel = g_cancel.load()) cancel(1);
  const struct sigaction& prev = g_previous_sigint;
  if (prev.sa_flags & SA_SIGINFO) {
    if (prev.sa_sigaction != nullptr) prev.sa_sigaction(sig, info, uctx);
  } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN && prev.sa_handler != nullptr) {
    prev.sa_handler(sig);
  }
}

struct StopScope {
  std::mutex mutex;
  std::condition_variable done_cv;
  bool done = false;
  bool timed_out = false;
  std::thread watchdog;

  StopScope(mtl_emu_cancel_fn cancel, double timeout) {
    cancel(0);
    g_interrupted = 0;
    g_cancel.store(cancel);
    struct sigaction sa {};
    sa.sa_sigaction = on_sigint;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &g_previous_sigint);
    if (timeout > 0)
      watchdog = std::thread([this, cancel, timeout] {
        std::unique_lock<std::mutex> lock(mutex);
        if (!done_cv.wait_for(lock, std::chrono::duration<double>(timeout), [this] { return done; })) {
          timed_out = true;
          cancel(2);
        }
      });
  }
  ~StopScope() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      done = true;
    }
    done_cv.notify_all();
    if (watchdog.joinable()) watchdog.join();
    sigaction(SIGINT, &g_previous_sigint, nullptr);
    g_cancel.store(nullptr);
  }
};

double timeout_from_environment() {
  const char* v = std::getenv("MY_MPS_OPS_EMULATOR_TIMEOUT");
  return v != nullptr && *v ? std::strtod(v, nullptr) : 0;
}

// --------------------------------------------------------------- executor

thread_local uint64_t t_runs = 0;  // launches run on this thread (for tests)

class Emulator final : public Executor {
 public:
  using Executor::pipeline_info;
  PipelineInfo pipeline_info(const std::string& library, const std::string& kernel,
                             const std::vector<metal::FunctionConstant>& constants) override {
    auto lib = find_library(library, constants);
    const mtl_emu_kernel& k = lib->kernel(library, kernel);
    PipelineInfo info;
    info.max_threads_per_threadgroup = g_pipeline_thread_limit.load();
    info.thread_execution_width = kSimdWidth;
    info.static_threadgroup_memory_length = static_cast<uint32_t>(k.threadgroup_layout(nullptr));
    return info;
  }

  void run(const Launch& launch) override { run(launch, RunOptions{}); }

  void run(const Launch& launch, const RunOptions& options) {
    ++t_runs;
    auto lib = find_library(launch.library, launch.constants);
    const mtl_emu_kernel& k = lib->kernel(launch.library, launch.kernel);
    const std::string where = "Metal emulator: kernel '" + launch.kernel + "'";

    uint64_t threads_per_group = 1;
    for (int d = 0; d < 3; ++d) {
      TORCH_CHECK(launch.group[d] >= 1, where, ": threadgroup size must be at least 1 in every dimension");
      threads_per_group *= launch.group[d];
    }
    TORCH_CHECK(threads_per_group <= kMaxThreadsPerThreadgroup, where, ": threadgroup of ", threads_per_group,
                " threads (", launch.group[0], "x", launch.group[1], "x", launch.group[2],
                ") exceeds the 1024 threads an Apple GPU threadgroup can have");
    const uint32_t limit = g_pipeline_thread_limit.load();
    TORCH_CHECK(threads_per_group <= limit, where, ": threadgroup of ", threads_per_group,
                " threads exceeds the ", limit, " its pipeline allows (maxTotalThreadsPerThreadgroup)");
    for (int d = 0; d < 3; ++d)
      if (launch.grid[d] == 0) return;  // an empty grid runs nothing

    mtl_emu_launch L{};
    L.kernel = &k;
    L.uniform = launch.grid_counts_threadgroups ? 1 : 0;
    L.strict_barriers = 1;
    for (int d = 0; d < 3; ++d) {
      L.grid[d] = launch.grid[d];
      L.group[d] = launch.group[d];
    }

    // Bindings, then the guarded copies of every buffer (one per overlapping
    // extents of a storage, so aliasing arguments stay aliased).
    enum class Bound { None, Tensor, Bytes };
    Bound bound[MTL_EMU_MAX_BINDINGS] = {};
    size_t bound_bytes[MTL_EMU_MAX_BINDINGS] = {};
    std::vector<std::vector<uint8_t>> scalar_storage;
    std::vector<std::unique_ptr<GuardedRegion>> regions;
    // A tensor binds its view's extent (from its storage offset to its last
    // element), not its whole storage. Bindings of one storage whose extents
    // overlap share one copy, so aliasing arguments stay aliased.
    struct PendingBuffer {
      int index;
      unsigned char* storage;
      size_t begin, end;  // byte range of the storage
      GuardedRegion* region = nullptr;
    };
    std::vector<PendingBuffer> pending;
    std::vector<std::string> labels(MTL_EMU_MAX_BINDINGS);
    for (int32_t i = 0; i < k.num_params; ++i)
      if (k.params[i].kind == MTL_EMU_PARAM_BUFFER && k.params[i].index < MTL_EMU_MAX_BINDINGS)
        labels[k.params[i].index] = std::string("buffer(") + std::to_string(k.params[i].index) + ") '" +
                                    k.params[i].name + "'";

    for (const Arg& arg : launch.args) {
      TORCH_CHECK(arg.index < MTL_EMU_MAX_BINDINGS, where, ": argument index ", arg.index, " is out of range");
      if (arg.kind == Arg::Kind::ThreadgroupMemory) {
        L.threadgroup_lengths[arg.index] = arg.threadgroup_length;
        continue;
      }
      if (arg.kind == Arg::Kind::Bytes) {
        scalar_storage.emplace_back(arg.bytes);
        scalar_storage.back().resize(std::max<size_t>(arg.bytes.size(), 16));
        L.buffers[arg.index] = scalar_storage.back().data();
        bound[arg.index] = Bound::Bytes;
        bound_bytes[arg.index] = arg.bytes.size();
        continue;
      }
      const at::Tensor& t = arg.tensor;
      TORCH_CHECK(t.defined(), where, ": buffer(", arg.index, ") is an undefined tensor");
      TORCH_CHECK(t.device().is_cpu(), where, ": buffer(", arg.index, ") is on ", t.device(),
                  "; the emulator runs cpu tensors");
      const auto& storage = t.storage();
      unsigned char* base = static_cast<unsigned char*>(storage.mutable_data());
      const size_t total = storage.nbytes();
      const size_t offset = static_cast<size_t>(t.storage_offset()) * t.element_size();
      size_t extent = 0;  // bytes from the first element to past the last one
      if (t.numel() > 0) {
        int64_t last = 0;
        for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
        extent = static_cast<size_t>(last + 1) * t.element_size();
      }
      TORCH_CHECK(offset + extent <= total, where, ": buffer(", arg.index, ") reaches past its storage");
      pending.push_back({static_cast<int>(arg.index), base, offset, offset + extent});
      bound[arg.index] = Bound::Tensor;
      bound_bytes[arg.index] = extent;
    }
    // Merge overlapping extents of one storage into one region each.
    std::vector<PendingBuffer*> order;
    for (PendingBuffer& b : pending) order.push_back(&b);
    std::sort(order.begin(), order.end(), [](const PendingBuffer* a, const PendingBuffer* b) {
      return a->storage != b->storage ? a->storage < b->storage : a->begin < b->begin;
    });
    for (size_t i = 0; i < order.size(); ++i) {
      PendingBuffer& b = *order[i];
      GuardedRegion* r = i > 0 ? order[i - 1]->region : nullptr;
      if (r != nullptr && r->storage == b.storage && b.begin < r->storage_begin + r->length) {
        r->length = std::max(r->length, b.end - r->storage_begin);
        if (!labels[b.index].empty() && r->label.find(labels[b.index]) == std::string::npos)
          r->label += " (shared with " + labels[b.index] + ")";
      } else {
        regions.push_back(std::make_unique<GuardedRegion>());
        r = regions.back().get();
        r->storage = b.storage;
        r->storage_begin = b.begin;
        r->source = b.storage + b.begin;
        r->length = b.end - b.begin;
        r->label = labels[b.index].empty() ? "buffer(" + std::to_string(b.index) + ")" : labels[b.index];
      }
      b.region = r;
    }

    size_t threadgroup_total = k.threadgroup_layout(nullptr);
    for (int32_t i = 0; i < k.num_params; ++i) {
      const mtl_emu_param& p = k.params[i];
      if (p.kind == MTL_EMU_PARAM_BUFFER) {
        TORCH_CHECK(p.index < MTL_EMU_MAX_BINDINGS && bound[p.index] != Bound::None, where, ": buffer(", p.index,
                    ") for parameter '", p.name, "' (", p.type, ") is not bound");
        if (p.bytes > 0 && bound[p.index] == Bound::Bytes) {
          TORCH_CHECK(bound_bytes[p.index] == p.bytes, where, ": the scalar argument at buffer(", p.index, ") has ",
                      bound_bytes[p.index], " bytes but parameter '", p.name, "' (", p.type, ") reads ", p.bytes,
                      " (pass the kernel's exact width, e.g. arg_casts)");
        } else if (p.bytes > 0) {
          TORCH_CHECK(bound_bytes[p.index] >= p.bytes, where, ": buffer(", p.index, ") has ", bound_bytes[p.index],
                      " bytes but parameter '", p.name, "' (", p.type, ") reads ", p.bytes);
        }
      } else if (p.kind == MTL_EMU_PARAM_THREADGROUP) {
        TORCH_CHECK(p.index < MTL_EMU_MAX_BINDINGS && L.threadgroup_lengths[p.index] > 0, where, ": threadgroup(",
                    p.index, ") for parameter '", p.name, "' has no memory length set");
        threadgroup_total += L.threadgroup_lengths[p.index];
      }
    }
    TORCH_CHECK(threadgroup_total <= kMaxThreadgroupMemory, where, ": ", threadgroup_total,
                " bytes of threadgroup memory exceed the 32 KB an Apple GPU threadgroup can have");

    std::lock_guard<std::mutex> launch_lock(g_launch_mutex);
    for (auto& r : regions) r->allocate();
    for (const PendingBuffer& b : pending) L.buffers[b.index] = b.region->data + (b.begin - b.region->storage_begin);
    for (int i = 0; i < MTL_EMU_MAX_BINDINGS; ++i) L.buffer_lengths[i] = bound_bytes[i];
    lib->bind(&L);
    if (lib->race_begin) lib->race_begin(&L, bound_bytes);

    FaultState fault;
    for (auto& r : regions) fault.regions.push_back(r.get());
    fault.current = lib->current;
    fault.kernel = k.host_name;

    uint64_t groups = 1;
    for (int d = 0; d < 3; ++d)
      groups *= L.uniform ? L.grid[d] : (L.grid[d] + L.group[d] - 1) / L.group[d];
    mtl_emu_error error{};
    std::mutex error_mutex;
    const double timeout = options.timeout_seconds > 0 ? options.timeout_seconds : timeout_from_environment();
    bool timed_out = false, interrupted = false;
    {
      StopScope stop(lib->cancel, timeout);
      SignalScope signals;
      g_fault = &fault;
      const int64_t workers = std::max<int64_t>(1, at::get_num_threads());
      const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(groups) / (4 * workers));
      at::parallel_for(0, static_cast<int64_t>(groups), grain, [&](int64_t first, int64_t last) {
        ensure_alternate_signal_stack();
        mtl_emu_error local{};
        sigjmp_buf recover;
        if (sigsetjmp(recover, 1) == 0) {
          tls_recover = &recover;
          lib->run(&L, static_cast<uint64_t>(first), static_cast<uint64_t>(last), &local);
        }
        tls_recover = nullptr;
        std::lock_guard<std::mutex> lock(error_mutex);
        if (local.failed && !error.failed) {
          error.failed = 1;
          std::memcpy(error.message, local.message, sizeof(error.message));
        }
        if (local.warnings && !error.warnings)
          std::memcpy(error.first_warning, local.first_warning, sizeof(error.first_warning));
        error.warnings += local.warnings;
      });
      g_fault = nullptr;
      std::lock_guard<std::mutex> lock(stop.mutex);
      timed_out = stop.timed_out;
      interrupted = g_interrupted != 0;
    }
    if (lib->race_end) lib->race_end(&L);
    if (lib->profile_result && !error.failed && !fault.faulted && !timed_out && !interrupted) {
      std::lock_guard<std::mutex> lock(g_profile_mutex);
      g_profile_records.push_back(lib->profile_result(&L));
    }
    if (interrupted) throw Interrupted(where + " interrupted (SIGINT): " + error.message);
    TORCH_CHECK(!timed_out, where, " ran longer than its ", timeout,
                " s timeout (timeout= or MY_MPS_OPS_EMULATOR_TIMEOUT) and was stopped: ", error.message);
    if (fault.faulted) {
      // The worker that faulted left its lanes mid-flight: the next run on it
      // abandons them (see metal_runtime.cpp).
      TORCH_CHECK(false, "Metal emulator: ", fault.message);
    }
    TORCH_CHECK(!error.failed, "Metal emulator: ", error.message);
    for (auto& r : regions) {
      TORCH_CHECK(r->canary_intact(), where, ": out-of-bounds write past the end of the ", r->length,
                  "-byte buffer bound at ", r->label);
      TORCH_CHECK(r->slack_intact(), where, ": out-of-bounds write before the start of the ", r->length,
                  "-byte buffer bound at ", r->label);
    }
    if (error.warnings) TORCH_WARN("Metal emulator: ", error.warnings, " warning(s); first: ", error.first_warning);
    for (auto& r : regions)
      if (r->length) std::memcpy(r->source, r->data, r->length);
  }
};

Emulator& emulator_instance() {
  static Emulator emulator;
  return emulator;
}

}  // namespace

metal::Executor& executor() { return emulator_instance(); }

void run(const metal::Launch& launch, const RunOptions& options) { emulator_instance().run(launch, options); }

uint64_t runs_on_this_thread() { return t_runs; }

std::vector<std::string> take_profile_records() {
  std::lock_guard<std::mutex> lock(g_profile_mutex);
  std::vector<std::string> out;
  out.swap(g_profile_records);
  return out;
}

void register_library(const std::string& library, const std::string& so_path) {
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  auto& libs = registry();
  auto it = libs.find(library);
  if (it != libs.end() && it->second->path == so_path) return;
  auto lib = std::make_shared<EmulatedLibrary>();
  lib->path = so_path;
  lib->handle = dlopen(so_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(lib->handle != nullptr, "Metal emulator: cannot load ", so_path, ": ", dlerror());
  auto list_kernels = reinterpret_cast<mtl_emu_kernels_fn>(dlsym(lib->handle, "mtl_emu_kernels"));
  lib->run = reinterpret_cast<mtl_emu_run_fn>(dlsym(lib->handle, "mtl_emu_run"));
  lib->current = reinterpret_cast<mtl_emu_current_fn>(dlsym(lib->handle, "mtl_emu_current"));
  lib->bind = reinterpret_cast<mtl_emu_bind_fn>(dlsym(lib->handle, "mtl_emu_bind"));
  lib->cancel = reinterpret_cast<mtl_emu_cancel_fn>(dlsym(lib->handle, "mtl_emu_cancel"));
  lib->race_begin = reinterpret_cast<mtl_emu_race_begin_fn>(dlsym(lib->handle, "mtl_emu_race_begin"));
  lib->race_end = reinterpret_cast<mtl_emu_race_end_fn>(dlsym(lib->handle, "mtl_emu_race_end"));
  lib->profile_result = reinterpret_cast<mtl_emu_profile_result_fn>(dlsym(lib->handle, "mtl_emu_profile_result"));
  TORCH_CHECK(list_kernels && lib->run && lib->current && lib->bind && lib->cancel, "Metal emulator: ", so_path,
              " is not an emulator library");
  int32_t abi = 0;
  lib->kernels = list_kernels(&lib->count, &abi);
  TORCH_CHECK(abi == MTL_EMU_ABI_VERSION, "Metal emulator: ", so_path, " was built for ABI ", abi, ", expected ",
              MTL_EMU_ABI_VERSION);
  libs[library] = lib;  // a replaced library stays loaded: launches may still hold it
}

std::vector<KernelInfo> kernels(const std::string& library) {
  auto lib = find_library(library);
  std::vector<KernelInfo> out;
  for (int32_t i = 0; i < lib->count; ++i) {
    const mtl_emu_kernel& k = lib->kernels[i];
    KernelInfo info;
    info.name = k.host_name;
    info.static_threadgroup_memory_length = k.threadgroup_layout(nullptr);
    for (int32_t j = 0; j < k.num_params; ++j) {
      const mtl_emu_param& p = k.params[j];
      info.params.push_back({p.name, p.type, p.kind == MTL_EMU_PARAM_BUFFER        ? "buffer"
                                             : p.kind == MTL_EMU_PARAM_THREADGROUP ? "threadgroup"
                                                                                   : "builtin",
                             p.index, p.bytes});
    }
    out.push_back(std::move(info));
  }
  return out;
}

void set_pipeline_thread_limit(uint32_t threads) {
  TORCH_CHECK(threads >= kSimdWidth && threads <= kMaxThreadsPerThreadgroup && threads % kSimdWidth == 0,
              "Metal emulator: the pipeline thread limit must be a multiple of ", kSimdWidth, " in [", kSimdWidth,
              ", ", kMaxThreadsPerThreadgroup, "], got ", threads);
  g_pipeline_thread_limit.store(threads);
}

uint32_t pipeline_thread_limit() { return g_pipeline_thread_limit.load(); }

std::string specialised_library_key(const std::string& library,
                                    const std::vector<metal::FunctionConstant>& constants) {
  return library + metal::function_constants_key(constants);
}

void set_library_resolver(LibraryResolver resolve) {
  std::lock_guard<std::mutex> lock(g_resolver_mutex);
  resolver() = std::move(resolve);
}

}  // namespace my_mps_ops::emulator
