// The my_mps_ops._C Python module: importing it registers every operator
// (TORCH_LIBRARY blocks in the other translation units); these bindings
// expose what the Python layer needs beyond torch.ops.
// Plain pybind11: nothing here passes tensors, and torch/extension.h (the
// whole C++ frontend) would make this the slowest file of the build.
#include <pybind11/pybind11.h>

#include "cpu/dispatch.h"
#include "metal/embedded_shaders.h"
#include "metal/executor_capsule.h"
#include "metal/launch.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "my_mps_ops native library";
  m.def("embedded_shaders", [] {
    pybind11::dict out;
    for (const auto& [name, source] : my_mps_ops::embedded_shaders()) out[name.c_str()] = source;
    return out;
  }, "{library: Metal source} of the shaders compiled into this build");
  m.def("_set_cpu_executor", [](const pybind11::object& executor) {
    if (executor.is_none()) {
      my_mps_ops::metal::set_cpu_executor(nullptr);
      return;
    }
    const char* name = my_mps_ops::metal::kExecutorCapsuleName;
    if (!PyCapsule_IsValid(executor.ptr(), name))
      throw pybind11::type_error(std::string("_set_cpu_executor takes a capsule named '") + name + "' or None");
    my_mps_ops::metal::set_cpu_executor(static_cast<my_mps_ops::metal::Executor*>(
        PyCapsule_GetPointer(executor.ptr(), name)));
  }, pybind11::arg("executor"),
     "Makes the executor in a capsule (my_mps_ops._emulator.executor()) run Metal launches on cpu tensors; "
     "None unregisters it");
  m.def("set_metal_emulation", &my_mps_ops::metal::set_metal_emulation_enabled);
  m.def("metal_emulation_enabled", &my_mps_ops::metal::metal_emulation_enabled);
  m.def("cpu_isa", &my_mps_ops::cpu::cpu_isa_name,
        "Which copies of the CPU loops run: avx512, avx2 or baseline (capped by MY_MPS_OPS_CPU_ISA)");
  m.attr("built_with_mps") =
#ifdef MY_MPS_OPS_WITH_MPS
      true;
#else
      false;
#endif
}
