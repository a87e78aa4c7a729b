// The MPS executor: encodes Launches on PyTorch's current MPS stream.
//
// Each embedded shader library is compiled once per process; pipeline states
// are cached per (library, kernel, function-constant values). Encoding
// follows PyTorch's rules for kernels that share its stream:
// encode inside a synchronous dispatch on the stream's serial queue, reuse
// the stream's shared compute encoder (never end it), never commit or wait
// (.cpu(), .item() and torch.mps.synchronize() do), and never call ATen MPS
// ops inside the block (they dispatch on the same queue: deadlock).
//
// Compiled without ARC (PyTorch's MPS headers use manual retain/release):
// objects from new/alloc are owned here, others are autoreleased.
#include "metal/embedded_shaders.h"
#include "metal/launch.h"

#include <ATen/mps/MPSDevice.h>
#include <ATen/mps/MPSStream.h>
#include <c10/util/Exception.h>

#include <dispatch/dispatch.h>
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

// Runs `block` synchronously on `queue` and rethrows, on the calling thread,
// a C++ exception the block threw (one escaping a GCD block aborts the
// process). PyTorch has the same helper, but it is not exported API and its
// namespace moved between releases (at::native::mps in 2.6, at::mps later).
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

// The MTLBuffer that backs an mps tensor's storage: the MPS allocator stores
// the buffer object itself as the storage's data pointer (this is what
// PyTorch's getMTLBufferStorage() returns; the tensor's own offset is added
// at bind time).
id<MTLBuffer> storage_buffer(const at::Tensor& t) {
  return __builtin_bit_cast(id<MTLBuffer>, t.storage().data());
}

std::string ns_error_text(NSError* error) {
  if (error == nil) return "(no error description)";
  const char* text = error.localizedDescription.UTF8String;
  return text != nullptr ? std::string(text) : std::string("(no error description)");
}

struct CompiledLibrary {
  std::mutex mutex;  // held while compiling, so concurrent first calls compile once
  id<MTLLibrary> library = nil;  // owned; lives as long as the process
};

struct CompiledPipeline {
  std::mutex mutex;
  id<MTLComputePipelineState> state = nil;  // owned; lives as long as the process
  PipelineInfo info;
};

class MPSExecutor final : public Executor {
 public:
  using Executor::pipeline_info;
  PipelineInfo pipeline_info(const std::string& library, const std::string& kernel,
                             const std::vector<FunctionConstant>& constants) override {
    return pipeline(library, kernel, constants).info;
  }

  void run(const Launch& launch) override {
    const std::string& kernel = launch.kernel;
    for (size_t i = 0; i < launch.args.size(); ++i) {
      const Arg& arg = launch.args[i];
      if (arg.kind == Arg::Kind::Buffer) {
        TORCH_CHECK(arg.tensor.defined(), "my_mps_ops: argument ", i, " of Metal kernel '", kernel,
                    "' is an undefined tensor");
        TORCH_CHECK(arg.tensor.device().is_mps(), "my_mps_ops: argument ", i, " of Metal kernel '", kernel,
                    "' is on ", arg.tensor.device(), "; the MPS kernel needs every tensor on mps");
      } else if (arg.kind == Arg::Kind::Bytes) {
        // Apple documents setBytes for constants under 4 KB; larger data
        // belongs in a tensor.
        TORCH_CHECK(!arg.bytes.empty() && arg.bytes.size() <= 4096, "my_mps_ops: argument ", i,
                    " of Metal kernel '", kernel, "' passes ", arg.bytes.size(),
                    " bytes by value (must be 1..4096)");
      }
    }

    const CompiledPipeline& compiled = pipeline(launch.library, kernel, launch.constants);
    const PipelineInfo& info = compiled.info;
    uint64_t threads_per_group = 1;
    for (uint64_t g : launch.group) {
      TORCH_CHECK(g >= 1, "my_mps_ops: Metal kernel '", kernel, "' launched with an empty threadgroup dimension");
      threads_per_group *= g;
    }
    TORCH_CHECK(threads_per_group <= info.max_threads_per_threadgroup, "my_mps_ops: Metal kernel '", kernel,
                "' launched with ", threads_per_group, " threads per threadgroup; its pipeline allows at most ",
                info.max_threads_per_threadgroup);

    uint64_t threadgroup_bytes = info.static_threadgroup_memory_length;
    for (const Arg& arg : launch.args) {
      if (arg.kind == Arg::Kind::ThreadgroupMemory) threadgroup_bytes += round_up_16(arg.threadgroup_length);
    }
    const uint64_t max_threadgroup_bytes = [device() maxThreadgroupMemoryLength];
    TORCH_CHECK(threadgroup_bytes <= max_threadgroup_bytes, "my_mps_ops: Metal kernel '", kernel, "' needs ",
                threadgroup_bytes, " bytes of threadgroup memory; the device has ", max_threadgroup_bytes);

    for (uint64_t n : launch.grid) {
      if (n == 0) return;  // an empty grid runs no thread: nothing to encode
    }

    at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
    TORCH_CHECK(stream != nullptr, "my_mps_ops: no current MPS stream");
    // Blocks capture by value: capture plain pointers, not the C++ reference.
    const Launch* launch_ptr = &launch;
    id<MTLComputePipelineState> state = compiled.state;
    // The pool drains what commandEncoder() autoreleases: dispatch_sync
    // usually runs the block on the calling thread, whose pool (Python's main
    // thread, autograd's workers) is never drained. PyTorch wraps its own
    // encoding blocks the same way.
    dispatch_sync_rethrowing(stream->queue(), ^{
      @autoreleasepool {
        id<MTLComputeCommandEncoder> encoder = stream->commandEncoder();
        [encoder setComputePipelineState:state];
        for (const Arg& arg : launch_ptr->args) {
          switch (arg.kind) {
            case Arg::Kind::Buffer: {
              const at::Tensor& t = arg.tensor;
              [encoder setBuffer:storage_buffer(t)
                          offset:static_cast<NSUInteger>(t.storage_offset() * t.element_size())
                         atIndex:arg.index];
              break;
            }
            case Arg::Kind::Bytes:
              [encoder setBytes:arg.bytes.data() length:arg.bytes.size() atIndex:arg.index];
              break;
            case Arg::Kind::ThreadgroupMemory:
              // Metal requires threadgroup memory lengths in multiples of 16 bytes.
              [encoder setThreadgroupMemoryLength:round_up_16(arg.threadgroup_length) atIndex:arg.index];
              break;
          }
        }
        const MTLSize grid = MTLSizeMake(launch_ptr->grid[0], launch_ptr->grid[1], launch_ptr->grid[2]);
        const MTLSize group = MTLSizeMake(launch_ptr->group[0], launch_ptr->group[1], launch_ptr->group[2]);
        if (launch_ptr->grid_counts_threadgroups) {
          [encoder dispatchThreadgroups:grid threadsPerThreadgroup:group];
        } else {
          [encoder dispatchThreads:grid threadsPerThreadgroup:group];
        }
      }
    });
  }

 private:
  static uint64_t round_up_16(uint64_t n) { return (n + 15) / 16 * 16; }

  static id<MTLDevice> device() {
    id<MTLDevice> device = at::mps::MPSDevice::getInstance()->device();
    TORCH_CHECK(device != nil, "my_mps_ops: no Metal device (torch.backends.mps.is_available() is False)");
    return device;
  }

  // The entry for `key` in `cache`, created empty on first use. Entries are
  // never erased, so the returned reference stays valid without the lock.
  template <typename Entry>
  Entry& entry(std::map<std::string, std::unique_ptr<Entry>>& cache, const std::string& key) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    std::unique_ptr<Entry>& slot = cache[key];
    if (!slot) slot = std::make_unique<Entry>();
    return *slot;
  }

  // `kernel` names the first kernel requested from the library, for the error message.
  id<MTLLibrary> library(const std::string& name, const std::string& kernel) {
    CompiledLibrary& compiled = entry(libraries_, name);
    std::lock_guard<std::mutex> lock(compiled.mutex);
    if (compiled.library == nil) compiled.library = compile_library(name, kernel);
    return compiled.library;
  }

  // MTLFunctionConstantValues holding `constants` (MTLFunctionConstantValues.h,
  // macOS 10.12+); owned by the caller.
  static MTLFunctionConstantValues* constant_values(const std::vector<FunctionConstant>& constants) {
    MTLFunctionConstantValues* values = [[MTLFunctionConstantValues alloc] init];
    for (const FunctionConstant& c : constants) {
      // Each value is read at the width of its MTLDataType: 1 byte for bool, 4 otherwise.
      const bool flag = c.bits != 0;
      const void* value = c.type == FunctionConstant::Type::Bool ? static_cast<const void*>(&flag)
                                                                 : static_cast<const void*>(&c.bits);
      MTLDataType type = MTLDataTypeUInt;
      switch (c.type) {
        case FunctionConstant::Type::Bool: type = MTLDataTypeBool; break;
        case FunctionConstant::Type::Int: type = MTLDataTypeInt; break;
        case FunctionConstant::Type::UInt: type = MTLDataTypeUInt; break;
        case FunctionConstant::Type::Float: type = MTLDataTypeFloat; break;
      }
      if (c.name.empty()) {
        [values setConstantValue:value type:type atIndex:c.index];
      } else {
        [values setConstantValue:value type:type withName:[NSString stringWithUTF8String:c.name.c_str()]];
      }
    }
    return values;
  }

  // The pipeline of `kernel` specialised with `constants`. Apple's
  // newFunctionWithName: documentation: a function that declares function
  // constants yields, through it, an object that cannot make a pipeline;
  // such a function is specialised with newFunctionWithName:constantValues:error:
  // even when the launch gives no values (constants it leaves undefined read
  // as is_function_constant_defined() false).
  const CompiledPipeline& pipeline(const std::string& library_name, const std::string& kernel,
                                   const std::vector<FunctionConstant>& constants) {
    const std::string constants_key = function_constants_key(constants);
    CompiledPipeline& compiled = entry(pipelines_, library_name + '\0' + kernel + '\0' + constants_key);
    std::lock_guard<std::mutex> lock(compiled.mutex);
    if (compiled.state != nil) return compiled;
    id<MTLLibrary> lib = library(library_name, kernel);
    id<MTLComputePipelineState> state = nil;
    bool found = false;
    std::string error_text;
    id<MTLDevice> metal_device = device();
    // Nothing throws inside the pool (an exception would skip draining it).
    @autoreleasepool {
      NSString* name = [NSString stringWithUTF8String:kernel.c_str()];
      id<MTLFunction> function = [lib newFunctionWithName:name];
      found = function != nil;
      if (found && (!constants.empty() || function.functionConstantsDictionary.count > 0)) {
        [function release];
        MTLFunctionConstantValues* values = constant_values(constants);
        NSError* error = nil;
        function = [lib newFunctionWithName:name constantValues:values error:&error];
        [values release];
        if (function == nil) error_text = "specialising it with function constants " + constants_key + ": " +
                                          ns_error_text(error);
      }
      if (function != nil) {
        NSError* error = nil;
        state = [metal_device newComputePipelineStateWithFunction:function error:&error];
        if (state == nil) error_text = ns_error_text(error);
        [function release];
      }
    }
    TORCH_CHECK(found, "my_mps_ops: Metal library '", library_name, "' has no kernel named '", kernel,
                "' (the [[host_name]] of an instantiation)");
    TORCH_CHECK(state != nil, "my_mps_ops: cannot create the pipeline of Metal kernel '", kernel, "' in library '",
                library_name, "': ", error_text);
    compiled.info.max_threads_per_threadgroup = static_cast<uint32_t>(state.maxTotalThreadsPerThreadgroup);
    compiled.info.thread_execution_width = static_cast<uint32_t>(state.threadExecutionWidth);
    compiled.info.static_threadgroup_memory_length = static_cast<uint32_t>(state.staticThreadgroupMemoryLength);
    compiled.state = state;
    return compiled;
  }

  static id<MTLLibrary> compile_library(const std::string& name, const std::string& kernel) {
    const std::string& source = my_mps_ops::embedded_shader(name);
    // bfloat needs Metal Shading Language 3.1 (macOS 14).
    if (@available(macOS 14.0, *)) {
      // supported
    } else {
      TORCH_CHECK(false, "my_mps_ops: the Metal kernels need macOS 14 or newer (Metal Shading Language 3.1)");
    }
    id<MTLDevice> metal_device = device();
    id<MTLLibrary> library = nil;
    std::string error_text;
    @autoreleasepool {
      MTLCompileOptions* options = [[MTLCompileOptions alloc] init];
      if (@available(macOS 14.0, *)) {  // always true here (checked above); guards the enum's use
        options.languageVersion = MTLLanguageVersion3_1;
      }
      // IEEE-conforming arithmetic and precise math functions (exp, log,
      // rsqrt...): results must match the CPU kernels and not change between
      // macOS releases. Since macOS 15, fastMathEnabled = NO is replaced by
      // two settings, and math functions default to their fast variants
      // unless mathFloatingPointFunctions says Precise; PyTorch's
      // MetalShaderLibrary (aten/src/ATen/native/mps/OperationUtils.mm) sets
      // both. The properties exist only in the macOS 15 SDK: the compile-time
      // guard keeps this file building with a macOS 14 SDK, where a runtime
      // @available check alone would not compile.
#if defined(__MAC_15_0) && __MAC_OS_X_VERSION_MAX_ALLOWED >= __MAC_15_0
      if (@available(macOS 15.0, *)) {
        options.mathMode = MTLMathModeSafe;
        options.mathFloatingPointFunctions = MTLMathFloatingPointFunctionsPrecise;
      } else
#endif
      {
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-declarations"
        options.fastMathEnabled = NO;
#pragma clang diagnostic pop
      }
      NSString* ns_source = [[NSString alloc] initWithBytes:source.data()
                                                     length:source.size()
                                                   encoding:NSUTF8StringEncoding];
      NSError* error = nil;
      library = [metal_device newLibraryWithSource:ns_source options:options error:&error];
      if (library == nil) error_text = ns_error_text(error);
      [ns_source release];
      [options release];
    }
    TORCH_CHECK(library != nil, "my_mps_ops: the Metal compiler rejected shader library '", name,
                "' (needed for kernel '", kernel, "'):\n", error_text);
    return library;
  }

  std::mutex cache_mutex_;  // guards the two maps, not the entries
  std::map<std::string, std::unique_ptr<CompiledLibrary>> libraries_;
  std::map<std::string, std::unique_ptr<CompiledPipeline>> pipelines_;
};

}  // namespace

Executor& mps_executor() {
  // Intentionally leaked: Metal objects must not be released during static
  // destruction, after the Metal device may be gone.
  static MPSExecutor* executor = new MPSExecutor();
  return *executor;
}

}  // namespace my_mps_ops::metal
