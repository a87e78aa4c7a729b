// The my_mps_ops._C Python module: importing it registers every operator
// (TORCH_LIBRARY blocks in the other translation units); these bindings
// expose what the Python layer needs beyond torch.ops.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include "metal/embedded_shaders.h"
#include "emulator/emulator.h"
#include "metal/launch.h"
#include "cpu/dispatch.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "my_mps_ops native library";
  // Transitional: the emulator still lives in this module.
  my_mps_ops::metal::set_cpu_executor(&my_mps_ops::metal::emulator_executor());
  m.def("embedded_shaders", [] {
    pybind11::dict out;
    for (const auto& [name, source] : my_mps_ops::embedded_shaders()) out[name.c_str()] = source;
    return out;
  }, "{library: Metal source} of the shaders compiled into this build");
  m.def("set_metal_emulation", &my_mps_ops::metal::set_metal_emulation_enabled);
  m.def("metal_emulation_enabled", &my_mps_ops::metal::metal_emulation_enabled);
  m.def("emulator_register_library", &my_mps_ops::metal::emulator_register_library,
        pybind11::arg("library"), pybind11::arg("so_path"));
  m.def("emulator_kernels", [](const std::string& library) {
    pybind11::list out;
    for (const auto& k : my_mps_ops::metal::emulator_kernels(library)) {
      pybind11::list params;
      for (const auto& p : k.params)
        params.append(pybind11::dict(pybind11::arg("name") = p.name, pybind11::arg("type") = p.type,
                                     pybind11::arg("kind") = p.kind, pybind11::arg("index") = p.index,
                                     pybind11::arg("bytes") = p.bytes));
      out.append(pybind11::dict(pybind11::arg("name") = k.name,
                                pybind11::arg("static_thread_group_memory_length") = k.static_threadgroup_memory_length,
                                pybind11::arg("uses_sync") = k.uses_sync, pybind11::arg("params") = params));
    }
    return out;
  }, "Kernels of a loaded emulator library with their declared parameters");
  m.def("emulator_launch", [](const std::string& library, const std::string& kernel, const pybind11::list& args,
                              std::array<uint64_t, 3> grid, std::array<uint64_t, 3> group, bool uniform,
                              std::vector<std::pair<int64_t, size_t>> threadgroup_memory) {
    my_mps_ops::metal::Launch launch(library, kernel);
    for (const auto& a : args) {
      if (THPVariable_Check(a.ptr())) {
        launch.buffer(THPVariable_Unpack(a.ptr()));
      } else {
        const std::string b = a.cast<pybind11::bytes>();
        launch.bytes(b.data(), b.size());
      }
    }
    for (const auto& [index, length] : threadgroup_memory) {
      (void)index;
      launch.threadgroup_memory(length);
    }
    if (uniform) launch.dispatch_threadgroups(grid, group);
    else launch.dispatch_threads(grid, group);
    // Emulator warnings become Python warnings (the handler needs the GIL back).
    HANDLE_TH_ERRORS
    pybind11::gil_scoped_release no_gil;
    my_mps_ops::metal::emulator_executor().run(launch);
    END_HANDLE_TH_ERRORS_PYBIND
  }, pybind11::arg("library"), pybind11::arg("kernel"), pybind11::arg("args"), pybind11::arg("grid"),
     pybind11::arg("group"), pybind11::arg("uniform") = false,
     pybind11::arg("threadgroup_memory") = std::vector<std::pair<int64_t, size_t>>{},
     "Runs one kernel of an emulator library: args are tensors (buffers) or bytes (scalars), in buffer-index order");
  m.def("cpu_isa", &my_mps_ops::cpu::cpu_isa_name,
        "Which copies of the CPU loops run: avx512, avx2 or baseline (capped by MY_MPS_OPS_CPU_ISA)");
  m.attr("built_with_mps") =
#ifdef MY_MPS_OPS_WITH_MPS
      true;
#else
      false;
#endif
}
