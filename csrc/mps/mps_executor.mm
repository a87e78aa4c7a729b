// The MPS executor: encodes metal::Launch descriptions on PyTorch's current
// MPS stream.
//
// - One MTLLibrary per embedded shader library, compiled once per process
//   (Metal 3.1 for bfloat, fast math off); compiler errors reach Python.
// - Pipeline states cached per (library, kernel); concurrent first calls
//   compile once.
// - Encoding happens inside dispatch_sync on the stream's serial queue, on
//   the stream's shared compute encoder (kernel coalescing with PyTorch's own
//   kernels): no endEncoding, no commit, no wait, no ATen MPS op in the block.
//   Buffers are bound at storage_offset() * element_size().
// Compiled with -fno-objc-arc: objects we create are released by hand.
#include "metal_launch.h"
#include "embedded_shaders.h"

#include <ATen/mps/MPSStream.h>
#include <c10/util/Exception.h>

#include <Foundation/Foundation.h>
#include <Metal/Metal.h>

#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

namespace my_mps_ops::metal {
namespace {

// dispatch_sync that carries a C++ exception out of the block (one escaping
// a plain dispatch_sync block aborts the process).
void dispatch_sync_rethrowing(dispatch_queue_t queue, void (^block)()) {
  __block std::exception_ptr error;
  dispatch_sync(queue, ^{
    try {
      block();
    } catch (...) {
      error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
}

std::string describe(NSError* error) {
  if (error == nil) return "unknown error";
  const char* text = [[error localizedDescription] UTF8String];
  return text ? text : "unknown error";
}

struct Pipeline {
  id<MTLComputePipelineState> state = nil;
  PipelineInfo info;
};

class MPSExecutor final : public Executor {
 public:
  PipelineInfo pipeline_info(const std::string& library, const std::string& kernel) override {
    return pipeline(library, kernel).info;
  }

  void run(const Launch& launch) override {
    const Pipeline& p = pipeline(launch.library, launch.kernel);
    const std::string where = "my_mps_ops: kernel '" + launch.kernel + "'";
    uint64_t threads = 1;
    for (int d = 0; d < 3; ++d) {
      TORCH_CHECK(launch.group[d] >= 1, where, ": threadgroup size must be at least 1 in every dimension");
      threads *= launch.group[d];
      if (launch.grid[d] == 0) return;  // nothing to run
    }
    TORCH_CHECK(threads <= p.info.max_threads_per_threadgroup, where, ": threadgroup of ", threads,
                " threads exceeds the pipeline's maxTotalThreadsPerThreadgroup (", p.info.max_threads_per_threadgroup,
                ")");
    for (const Arg& arg : launch.args) {
      if (arg.kind != Arg::Kind::Buffer) continue;
      TORCH_CHECK(arg.tensor.defined(), where, ": buffer(", arg.index, ") is an undefined tensor");
      TORCH_CHECK(arg.tensor.device().is_mps(), where, ": buffer(", arg.index, ") is on ", arg.tensor.device(),
                  "; every tensor argument must be on mps");
    }

    at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
    TORCH_CHECK(stream != nullptr, "my_mps_ops: no current MPS stream");
    const Launch* l = &launch;
    id<MTLComputePipelineState> state = p.state;
    dispatch_sync_rethrowing(stream->queue(), ^() {
      id<MTLComputeCommandEncoder> encoder = stream->commandEncoder();
      [encoder setComputePipelineState:state];
      for (const Arg& arg : l->args) {
        switch (arg.kind) {
          case Arg::Kind::Buffer: {
            const at::Tensor& t = arg.tensor;
            id<MTLBuffer> buffer = (id<MTLBuffer>)t.storage().data();
            [encoder setBuffer:buffer offset:(NSUInteger)(t.storage_offset() * t.element_size()) atIndex:arg.index];
            break;
          }
          case Arg::Kind::Bytes:
            [encoder setBytes:arg.bytes.data() length:arg.bytes.size() atIndex:arg.index];
            break;
          case Arg::Kind::ThreadgroupMemory:
            // Metal wants threadgroup memory lengths in multiples of 16 bytes.
            [encoder setThreadgroupMemoryLength:(arg.threadgroup_length + 15) / 16 * 16 atIndex:arg.index];
            break;
        }
      }
      const MTLSize grid = MTLSizeMake(l->grid[0], l->grid[1], l->grid[2]);
      const MTLSize group = MTLSizeMake(l->group[0], l->group[1], l->group[2]);
      if (l->uniform) {
        [encoder dispatchThreadgroups:grid threadsPerThreadgroup:group];
      } else {
        [encoder dispatchThreads:grid threadsPerThreadgroup:group];
      }
    });
  }

 private:
  id<MTLLibrary> library(const std::string& name) {
    // Called with mutex_ held.
    auto it = libraries_.find(name);
    if (it != libraries_.end()) return it->second;
    const std::string& source = embedded_shader(name);
    id<MTLDevice> device = at::mps::getCurrentMPSStream()->device();
    TORCH_CHECK(device != nil, "my_mps_ops: no Metal device");
    MTLCompileOptions* options = [MTLCompileOptions new];
    options.languageVersion = MTLLanguageVersion3_1;  // bfloat
    options.fastMathEnabled = NO;  // IEEE results, like the CPU kernels
    NSError* error = nil;
    NSString* text = [NSString stringWithUTF8String:source.c_str()];
    id<MTLLibrary> lib = [device newLibraryWithSource:text options:options error:&error];
    [options release];
    TORCH_CHECK(lib != nil, "my_mps_ops: compiling the Metal library '", name, "' failed: ", describe(error));
    libraries_.emplace(name, lib);  // kept for the process's lifetime
    return lib;
  }

  const Pipeline& pipeline(const std::string& library_name, const std::string& kernel) {
    const std::string key = library_name + "::" + kernel;
    std::lock_guard<std::mutex> lock(mutex_);  // concurrent first calls compile once
    auto it = pipelines_.find(key);
    if (it != pipelines_.end()) return it->second;
    id<MTLLibrary> lib = library(library_name);
    NSString* fn_name = [NSString stringWithUTF8String:kernel.c_str()];
    id<MTLFunction> fn = [lib newFunctionWithName:fn_name];
    TORCH_CHECK(fn != nil, "my_mps_ops: no kernel named '", kernel, "' in the Metal library '", library_name, "'");
    NSError* error = nil;
    id<MTLComputePipelineState> state = [[lib device] newComputePipelineStateWithFunction:fn error:&error];
    [fn release];
    TORCH_CHECK(state != nil, "my_mps_ops: creating the pipeline for kernel '", kernel, "' failed: ",
                describe(error));
    Pipeline p;
    p.state = state;
    p.info.max_threads_per_threadgroup = static_cast<uint32_t>(state.maxTotalThreadsPerThreadgroup);
    p.info.thread_execution_width = static_cast<uint32_t>(state.threadExecutionWidth);
    p.info.static_threadgroup_memory_length = static_cast<uint32_t>(state.staticThreadgroupMemoryLength);
    return pipelines_.emplace(key, p).first->second;
  }

  std::mutex mutex_;
  std::map<std::string, id<MTLLibrary>> libraries_;
  std::map<std::string, Pipeline> pipelines_;  // node-based: references stay valid
};

}  // namespace

Executor& mps_executor() {
  static MPSExecutor executor;
  return executor;
}

}  // namespace my_mps_ops::metal
