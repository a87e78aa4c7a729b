// One Metal kernel launch, described portably.
//
// Op code builds a Launch and hands it to an Executor. Two executors exist:
// the MPS executor (csrc/mps/, Objective-C++) encodes it on PyTorch's current
// MPS stream, and the Metal emulator (csrc/emulator/) runs the same kernel on
// CPU threads. Because op code is identical for both, the emulator's tests
// cover the argument packing and grid choice that a Mac runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
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

struct Launch {
  std::string library;  // embedded shader file stem, e.g. "rms_norm"
  std::string kernel;   // the [[host_name]] of the instantiation
  std::vector<Arg> args;
  // uniform == true: grid counts threadgroups (dispatchThreadgroups);
  // uniform == false: grid counts threads (dispatchThreads, non-uniform).
  std::array<uint64_t, 3> grid{1, 1, 1};
  std::array<uint64_t, 3> group{1, 1, 1};
  bool uniform = true;

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
  Launch& threadgroup_memory(size_t length) {
    args.push_back({Arg::Kind::ThreadgroupMemory, next_threadgroup_index_++, {}, {}, length});
    return *this;
  }
  Launch& dispatch_threadgroups(std::array<uint64_t, 3> groups, std::array<uint64_t, 3> threads_per_group) {
    grid = groups;
    group = threads_per_group;
    uniform = true;
    return *this;
  }
  Launch& dispatch_threads(std::array<uint64_t, 3> threads, std::array<uint64_t, 3> threads_per_group) {
    grid = threads;
    group = threads_per_group;
    uniform = false;
    return *this;
  }

 private:
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
  virtual PipelineInfo pipeline_info(const std::string& library, const std::string& kernel) = 0;
  // Encodes (MPS) or runs (emulator) one launch. Inputs must already be in
  // the layout the kernel expects; outputs must already be allocated.
  virtual void run(const Launch& launch) = 0;
};

// The executor for tensors on `device`: the MPS executor for mps tensors, the
// Metal emulator for cpu tensors. Throws with a clear message otherwise.
Executor& executor_for(const c10::Device& device);

// True while my_mps_ops.testing.metal_emulation() is active: CPU kernels then
// take their Metal path through the emulator instead of the native C++ kernel.
bool metal_emulation_enabled();
void set_metal_emulation_enabled(bool enabled);

}  // namespace my_mps_ops::metal
