// Loads an AOTInductor package of the tiny Llama (made by export_tiny_llama.py),
// runs it on the saved tokens and compares the logits with the saved
// reference (the eager PyTorch model's). No Python runs: the package's
// compiled code calls my_mps_ops's operators through the dispatcher, which
// knows them because the op library is linked (and so loaded) here.
//
//   run_tiny_llama PACKAGE.pt2 REFERENCE.pt
#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " PACKAGE.pt2 REFERENCE.pt\n";
    return 2;
  }
  std::ifstream file(argv[2], std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  // torch.save({"tokens": ..., "logits": ..., "atol": ..., "rtol": ...})
  auto reference = torch::jit::pickle_load(bytes).toGenericDict();
  at::Tensor tokens = reference.at("tokens").toTensor();
  at::Tensor expected = reference.at("logits").toTensor();
  double atol = reference.at("atol").toDouble(), rtol = reference.at("rtol").toDouble();

  c10::InferenceMode no_autograd;
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<at::Tensor> outputs = loader.run({tokens});
  if (outputs.size() != 1 || !outputs[0].sizes().equals(expected.sizes())) {
    std::cerr << "unexpected outputs\n";
    return 1;
  }
  double max_diff = (outputs[0] - expected).abs().max().item<double>();
  bool close = at::allclose(outputs[0], expected, rtol, atol);
  std::cout << "logits " << outputs[0].sizes() << " max |diff| vs reference " << max_diff << ": "
            << (close ? "match" : "MISMATCH") << std::endl;
  return close ? 0 : 1;
}
