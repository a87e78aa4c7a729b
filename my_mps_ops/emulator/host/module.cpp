// The my_mps_ops._emulator Python module: the emulator's executor (handed to
// _C by my_mps_ops.emulator on import) and what compile_shader needs.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "emulator.h"
#include "metal/executor_capsule.h"

#include <array>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace emulator = my_mps_ops::emulator;

pybind11::list kernels(const std::string& library) {
  pybind11::list out;
  for (const auto& k : emulator::kernels(library)) {
    pybind11::list params;
    for (const auto& p : k.params)
      params.append(pybind11::dict(pybind11::arg("name") = p.name, pybind11::arg("type") = p.type,
                                   pybind11::arg("kind") = p.kind, pybind11::arg("index") = p.index,
                                   pybind11::arg("bytes") = p.bytes));
    out.append(pybind11::dict(pybind11::arg("name") = k.name,
                              pybind11::arg("static_thread_group_memory_length") = k.static_threadgroup_memory_length,
                              pybind11::arg("params") = params));
  }
  return out;
}

void launch_kernel(const std::string& library, const std::string& kernel, const pybind11::list& args,
            std::array<uint64_t, 3> grid, std::array<uint64_t, 3> group, bool uniform,
            const std::vector<std::pair<int64_t, size_t>>& threadgroup_memory, double timeout) {
  my_mps_ops::metal::Launch launch(library, kernel);
  for (const auto& a : args) {
    if (THPVariable_Check(a.ptr())) {
      launch.buffer(THPVariable_Unpack(a.ptr()));
    } else {
      const std::string b = a.cast<pybind11::bytes>();
      launch.bytes(b.data(), b.size());
    }
  }
  // Launch numbers threadgroup memory in the order it is added, as it does buffers.
  for (size_t i = 0; i < threadgroup_memory.size(); ++i) {
    const auto& [index, length] = threadgroup_memory[i];
    if (index != static_cast<int64_t>(i))
      throw pybind11::value_error("threadgroup_memory entry " + std::to_string(i) + " is for threadgroup(" +
                                  std::to_string(index) + "); entries must give indices 0, 1, ... in order " +
                                  "(a length of 0 fills an index the kernel does not use)");
    launch.threadgroup_memory(length);
  }
  if (uniform) launch.dispatch_threadgroups(grid, group);
  else launch.dispatch_threads(grid, group);
  // Emulator warnings become Python warnings (the handler needs the GIL back).
  HANDLE_TH_ERRORS
  std::string interrupted;
  {
    pybind11::gil_scoped_release no_gil;
    try {
      emulator::run(launch, emulator::RunOptions{timeout});
    } catch (const emulator::Interrupted& e) {
      interrupted = e.what();
    }
  }
  if (!interrupted.empty()) {
    // Python's SIGINT handler (KeyboardInterrupt, or the program's own) runs now.
    if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
    PyErr_SetString(PyExc_KeyboardInterrupt, interrupted.c_str());
    throw pybind11::error_already_set();
  }
  END_HANDLE_TH_ERRORS_PYBIND
}

// {index or name: value} for the Python resolver (translate.py's function_constants).
pybind11::dict constants_dict(const std::vector<my_mps_ops::metal::FunctionConstant>& constants) {
  using Type = my_mps_ops::metal::FunctionConstant::Type;
  pybind11::dict out;
  for (const auto& c : constants) {
    pybind11::object key = c.name.empty() ? pybind11::object(pybind11::int_(c.index)) : pybind11::str(c.name);
    switch (c.type) {
      case Type::Bool: out[key] = pybind11::bool_(c.bits != 0); break;
      case Type::Int: out[key] = pybind11::int_(static_cast<int32_t>(c.bits)); break;
      case Type::UInt: out[key] = pybind11::int_(c.bits); break;
      case Type::Float: {
        float f;
        std::memcpy(&f, &c.bits, sizeof(f));
        out[key] = pybind11::float_(f);
        break;
      }
    }
  }
  return out;
}

// resolve(library, key, constants) -> path of the library compiled with them;
// None unsets it. Called from whichever thread launches (the GIL is taken).
void set_library_resolver(const pybind11::object& resolve) {
  if (resolve.is_none()) {
    emulator::set_library_resolver(nullptr);
    return;
  }
  // Kept for the life of the process: the executor may call it from any thread until exit.
  auto* fn = new pybind11::object(resolve);
  emulator::set_library_resolver([fn](const std::string& library, const std::string& key,
                                      const std::vector<my_mps_ops::metal::FunctionConstant>& constants) {
    pybind11::gil_scoped_acquire gil;
    try {
      return (*fn)(library, key, constants_dict(constants)).cast<std::string>();
    } catch (pybind11::error_already_set& e) {
      throw std::runtime_error("Metal emulator: building library " + key + " failed: " + e.what());
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "my_mps_ops Metal emulator: runs Metal kernels on cpu tensors";
  m.def("executor", [] {
    void* executor = static_cast<my_mps_ops::metal::Executor*>(&emulator::executor());
    PyObject* capsule = PyCapsule_New(executor, my_mps_ops::metal::kExecutorCapsuleName, nullptr);
    if (capsule == nullptr) throw pybind11::error_already_set();
    return pybind11::reinterpret_steal<pybind11::object>(capsule);
  }, "The emulator's executor, as the capsule _C._set_cpu_executor takes");
  m.def("set_pipeline_thread_limit", &emulator::set_pipeline_thread_limit, pybind11::arg("threads"));
  m.def("pipeline_thread_limit", &emulator::pipeline_thread_limit);
  m.def("runs_on_this_thread", &emulator::runs_on_this_thread,
        "How many launches the calling thread has run on the emulator");
  m.def("take_profile_records", &emulator::take_profile_records,
        "The counters (JSON strings) of launches run from profile libraries since the last call");
  m.def("register_library", &emulator::register_library, pybind11::arg("library"), pybind11::arg("so_path"));
  m.def("set_library_resolver", &set_library_resolver, pybind11::arg("resolve"),
        "resolve(library, key, constants) -> path: builds the library specialised with function constants "
        "({index or name: value}) that a launch asks for; it is registered under key");
  m.def("kernels", &kernels, pybind11::arg("library"),
        "Kernels of a loaded emulator library with their declared parameters");
  m.def("launch", &launch_kernel, pybind11::arg("library"), pybind11::arg("kernel"), pybind11::arg("args"),
        pybind11::arg("grid"), pybind11::arg("group"), pybind11::arg("uniform") = false,
        pybind11::arg("threadgroup_memory") = std::vector<std::pair<int64_t, size_t>>{},
        pybind11::arg("timeout") = 0.0,
        "Runs one kernel of an emulator library: args are tensors (buffers) or bytes (scalars), in buffer-index "
        "order; threadgroup_memory is [(index, bytes)] in index order; timeout: seconds (0: none)");
}
