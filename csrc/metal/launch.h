// One Metal kernel launch, described portably.
//
// Launch building (csrc/metal/<family>.cpp) makes a Launch and hands it to an
// Executor. Two executors exist: the MPS executor (metal/mps_executor.mm)
// encodes it on PyTorch's current MPS stream, and the Metal emulator (its own
// extension module, my_mps_ops._emulator, registered at run time as the
// executor for cpu tensors) runs the same kernel on CPU threads. Because the
// launch building is identical for both, the emulator's tests cover the
// argument packing and grid choice that a Mac runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace my_mps_ops::metal {

struct Arg {
  enum class Kind : uint8_t { Buffer, Bytes, ThreadgroupMemory };
  Kind kind;
  // Buffer and Bytes share Metal's [[buffer(n)]] index space; threadgroup
  // memory has its own [[threadgroup(n)]] space.
  uint32_t index;
  at::Tensor tensor;           // Buffer: bound at storage_offset() * element_size()
  std::vector<uint8_t> bytes;  // Bytes: exactly the width the kernel declares
  size_t threadgroup_length = 0;  // ThreadgroupMemory: bytes
};

// The value of one of the kernel's `[[function_constant(index)]]`
// declarations, or of one named `name` (index unused then): a pipeline is
// specialised with them (newFunctionWithName:constantValues:error: on MPS, a
// library compiled with them on the emulator). Types are the MSL scalar
// types a function constant may have that ops use.
struct FunctionConstant {
  enum class Type : uint8_t { Bool, Int, UInt, Float };
  std::string name;    // empty: by index
  uint32_t index = 0;
  Type type = Type::UInt;
  uint32_t bits = 0;   // the value's bytes (bool: 0 or 1)

  // "3:uint=2" or "use_bias:bool=1": a key for pipeline caches and error messages.
  std::string key() const {
    static const char* const names[] = {"bool", "int", "uint", "float"};
    std::string value;
    if (type == Type::Float) {
      float f;
      std::memcpy(&f, &bits, sizeof(f));
      value = std::to_string(f) + "/" + std::to_string(bits);  // the bits keep distinct floats distinct
    } else if (type == Type::Int) {
      value = std::to_string(static_cast<int32_t>(bits));
    } else {
      value = std::to_string(bits);
    }
    return (name.empty() ? std::to_string(index) : name) + ":" + names[static_cast<int>(type)] + "=" + value;
  }
};

// "" without constants, else "{0:uint=2,use_bias:bool=1}" in the order given.
inline std::string function_constants_key(const std::vector<FunctionConstant>& constants) {
  if (constants.empty()) return "";
  std::string key = "{";
  for (size_t i = 0; i < constants.size(); ++i) key += (i ? "," : "") + constants[i].key();
  return key + "}";
}

struct Launch {
  std::string library;  // embedded shader file stem, e.g. "rms_norm"
  std::string kernel;   // the [[host_name]] of the instantiation
  std::vector<Arg> args;
  // Function-constant values the pipeline is specialised with; none: the
  // kernel as written (is_function_constant_defined() false for any it declares).
  std::vector<FunctionConstant> constants;
  // grid_counts_threadgroups: dispatchThreadgroups; otherwise grid counts
  // threads (dispatchThreads, edge threadgroups may be partial).
  std::array<uint64_t, 3> grid{1, 1, 1};
  std::array<uint64_t, 3> group{1, 1, 1};
  bool grid_counts_threadgroups = true;

  Launch(std::string library_, std::string kernel_)
      : library(std::move(library_)), kernel(std::move(kernel_)) {}

  Launch& buffer(const at::Tensor& t) {
    args.push_back({Arg::Kind::Buffer, next_buffer_index_++, t, {}, 0});
    return *this;
  }
  // Scalars are passed by value at their exact C++ width: the caller picks
  // the type the kernel declares (uint32_t for `constant uint&`, float, ...).
  template <typename T>
  Launch& scalar(T value) {
    static_assert(std::is_trivially_copyable_v<T>, "scalar must be POD");
    std::vector<uint8_t> b(sizeof(T));
    std::memcpy(b.data(), &value, sizeof(T));
    args.push_back({Arg::Kind::Bytes, next_buffer_index_++, {}, std::move(b), 0});
    return *this;
  }
  // Raw bytes at their exact width (e.g. from Python's compile_shader binding rules).
  Launch& bytes(const void* data, size_t length) {
    const auto* p = static_cast<const uint8_t*>(data);
    args.push_back({Arg::Kind::Bytes, next_buffer_index_++, {}, std::vector<uint8_t>(p, p + length), 0});
    return *this;
  }
  // The value of [[function_constant(index)]] (or of the one named `name`):
  // bool, int32_t, uint32_t or float, the MSL type the shader declares it with.
  template <typename T>
  Launch& constant(uint32_t index, T value) {
    return add_constant(FunctionConstant{"", index, constant_type<T>(), constant_bits(value)});
  }
  template <typename T>
  Launch& constant(const std::string& name, T value) {
    TORCH_CHECK(!name.empty(), "Launch::constant: empty function-constant name");
    return add_constant(FunctionConstant{name, 0, constant_type<T>(), constant_bits(value)});
  }
  Launch& threadgroup_memory(size_t length) {
    args.push_back({Arg::Kind::ThreadgroupMemory, next_threadgroup_index_++, {}, {}, length});
    return *this;
  }
  Launch& dispatch_threadgroups(std::array<uint64_t, 3> groups, std::array<uint64_t, 3> threads_per_group) {
    grid = groups;
    group = threads_per_group;
    grid_counts_threadgroups = true;
    return *this;
  }
  Launch& dispatch_threads(std::array<uint64_t, 3> threads, std::array<uint64_t, 3> threads_per_group) {
    grid = threads;
    group = threads_per_group;
    grid_counts_threadgroups = false;
    return *this;
  }

 private:
  template <typename T>
  static constexpr FunctionConstant::Type constant_type() {
    static_assert(std::is_same_v<T, bool> || std::is_same_v<T, int32_t> || std::is_same_v<T, uint32_t> ||
                      std::is_same_v<T, float>,
                  "function constants are bool, int32_t, uint32_t or float");
    if constexpr (std::is_same_v<T, bool>) return FunctionConstant::Type::Bool;
    else if constexpr (std::is_same_v<T, int32_t>) return FunctionConstant::Type::Int;
    else if constexpr (std::is_same_v<T, uint32_t>) return FunctionConstant::Type::UInt;
    else return FunctionConstant::Type::Float;
  }
  template <typename T>
  static uint32_t constant_bits(T value) {
    if constexpr (std::is_same_v<T, bool>) {
      return value ? 1u : 0u;
    } else {
      uint32_t bits;
      std::memcpy(&bits, &value, sizeof(bits));
      return bits;
    }
  }
  Launch& add_constant(FunctionConstant c) {
    for (const FunctionConstant& other : constants)
      TORCH_CHECK(other.name != c.name || (c.name.empty() && other.index != c.index),
                  "Launch: function constant ", c.key(), " of kernel '", kernel, "' is given twice");
    constants.push_back(std::move(c));
    return *this;
  }

  uint32_t next_buffer_index_ = 0;
  uint32_t next_threadgroup_index_ = 0;
};

// What a compiled pipeline allows; op code sizes threadgroups from it.
struct PipelineInfo {
  uint32_t max_threads_per_threadgroup = 1024;
  uint32_t thread_execution_width = 32;
  uint32_t static_threadgroup_memory_length = 0;
};

class Executor {
 public:
  virtual ~Executor() = default;
  // The pipeline of `kernel` specialised with `constants` (none: as written).
  virtual PipelineInfo pipeline_info(const std::string& library, const std::string& kernel,
                                     const std::vector<FunctionConstant>& constants) = 0;
  PipelineInfo pipeline_info(const std::string& library, const std::string& kernel) {
    return pipeline_info(library, kernel, {});
  }
  // The pipeline `launch` runs: its library, kernel and function constants.
  PipelineInfo pipeline_info(const Launch& launch) {
    return pipeline_info(launch.library, launch.kernel, launch.constants);
  }
  // Encodes (MPS) or runs (emulator) one launch. Inputs must already be in
  // the layout the kernel expects; outputs must already be allocated.
  virtual void run(const Launch& launch) = 0;
};

// The executor for tensors on `device`: the MPS executor for mps tensors, the
// registered CPU-side executor (the Metal emulator) for cpu tensors. Throws
// with a clear message otherwise.
Executor& executor_for(const c10::Device& device);

// Makes `executor` the one executor_for() returns for cpu tensors (importing
// my_mps_ops.emulator hands it the emulator's, through _C._set_cpu_executor
// and metal/executor_capsule.h; it must outlive its use). nullptr unregisters.
void set_cpu_executor(Executor* executor);

// The MSL element type name used in [[host_name]] suffixes, e.g. "rms_norm_forward_bfloat".
inline const char* metal_type_name(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return "float";
    case at::kHalf: return "half";
    case at::kBFloat16: return "bfloat";
    default: TORCH_CHECK(false, "my_mps_ops: no Metal kernels for dtype ", dt);
  }
}

// `value` as the 32-bit unsigned integer a kernel parameter holds; an error
// naming `what` when it does not fit.
inline uint32_t checked_u32(int64_t value, const char* op, const char* what) {
  TORCH_CHECK(value >= 0 && value <= int64_t(UINT32_MAX), op, ": ", what, " ", value,
              " is too large for the Metal kernel");
  return static_cast<uint32_t>(value);
}

// Threads for a threadgroup that owns one row of n elements, each thread
// reading `per_thread` of them per pass: a multiple of the SIMD width, at most
// the pipeline's limit.
inline uint32_t row_threadgroup_size(int64_t n, int64_t per_thread, uint32_t max_threads, uint32_t simd_width) {
  const int64_t wanted = (n + per_thread - 1) / per_thread;
  int64_t threads = ((wanted + simd_width - 1) / simd_width) * simd_width;
  threads = std::max<int64_t>(threads, simd_width);
  const int64_t cap = (max_threads / simd_width) * simd_width;
  return static_cast<uint32_t>(std::min<int64_t>(threads, cap));
}

// Makes `launch` one threadgroup per row, `rows` rows of `row_length`
// elements, each threadgroup of row_threadgroup_size threads for the
// launch's pipeline on `executor`.
inline void dispatch_row_threadgroups(Launch& launch, Executor& executor, uint64_t rows, int64_t row_length,
                                      int64_t per_thread) {
  const PipelineInfo info = executor.pipeline_info(launch);
  const uint32_t threads =
      row_threadgroup_size(row_length, per_thread, info.max_threads_per_threadgroup, info.thread_execution_width);
  launch.dispatch_threadgroups({rows, 1, 1}, {threads, 1, 1});
}

// True while my_mps_ops.testing.metal_emulation() is active on the calling
// thread: CPU kernels then take their Metal path through the emulator instead
// of the native C++ kernel.
bool metal_emulation_enabled();
void set_metal_emulation_enabled(bool enabled);

// Sets the calling thread's metal-emulation switch for a scope.
class MetalEmulationScope {
 public:
  explicit MetalEmulationScope(bool enabled) : previous_(metal_emulation_enabled()) {
    set_metal_emulation_enabled(enabled);
  }
  ~MetalEmulationScope() { set_metal_emulation_enabled(previous_); }
  MetalEmulationScope(const MetalEmulationScope&) = delete;
  MetalEmulationScope& operator=(const MetalEmulationScope&) = delete;

 private:
  bool previous_;
};

}  // namespace my_mps_ops::metal
