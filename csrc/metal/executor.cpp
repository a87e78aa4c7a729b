// Chooses the executor for a device, and holds the metal-emulation switch.
#include "metal/launch.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace my_mps_ops::metal {

#ifdef MY_MPS_OPS_WITH_MPS
Executor& mps_executor();  // metal/mps_executor.mm
#endif

namespace {
std::atomic<Executor*> g_cpu_executor{nullptr};
// Per thread, so that threads that do not ask for it keep the native kernels;
// autograd Functions carry their forward's setting to their backward
// (ops/autograd_emulation.h), which may run on another thread.
thread_local bool t_metal_emulation = false;
}  // namespace

Executor& executor_for(const c10::Device& device) {
  if (device.is_mps()) {
#ifdef MY_MPS_OPS_WITH_MPS
    return mps_executor();
#else
    TORCH_CHECK(false, "my_mps_ops was built without MPS support (build it on macOS to run on mps tensors)");
#endif
  }
  TORCH_CHECK(device.is_cpu(), "my_mps_ops: no Metal executor for device ", device,
              " (mps tensors run on the GPU, cpu tensors on the Metal emulator)");
  Executor* cpu = g_cpu_executor.load();
  TORCH_CHECK(cpu != nullptr, "my_mps_ops: Metal kernels on cpu tensors run on the Metal emulator, which is not "
              "loaded (use my_mps_ops.testing.metal_emulation() or import my_mps_ops.emulator)");
  return *cpu;
}

void set_cpu_executor(Executor* executor) { g_cpu_executor.store(executor); }

bool metal_emulation_enabled() { return t_metal_emulation; }
void set_metal_emulation_enabled(bool enabled) { t_metal_emulation = enabled; }

}  // namespace my_mps_ops::metal
