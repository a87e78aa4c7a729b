// The my_mps_ops._C Python module: importing it registers every operator
// (TORCH_LIBRARY blocks in the other translation units); these bindings
// expose what the Python layer needs beyond torch.ops.
#include <torch/extension.h>

#include "embedded_shaders.h"
#include "emulator/emulator.h"
#include "metal_launch.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "my_mps_ops native library";
  m.def("embedded_shaders", [] {
    pybind11::dict out;
    for (const auto& [name, source] : my_mps_ops::embedded_shaders()) out[name.c_str()] = source;
    return out;
  }, "{library: Metal source} of the shaders compiled into this build");
  m.def("set_metal_emulation", &my_mps_ops::metal::set_metal_emulation_enabled);
  m.def("metal_emulation_enabled", &my_mps_ops::metal::metal_emulation_enabled);
  m.def("emulator_register_library", &my_mps_ops::metal::emulator_register_library,
        pybind11::arg("library"), pybind11::arg("so_path"));
  m.attr("built_with_mps") =
#ifdef MY_MPS_OPS_WITH_MPS
      true;
#else
      false;
#endif
}
