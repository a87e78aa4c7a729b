// PLACEHOLDER until the emulator lands (issue 4): every call raises.
#include "emulator/emulator.h"

#include <c10/util/Exception.h>

namespace my_mps_ops::metal {

namespace {
class UnavailableEmulator final : public Executor {
 public:
  PipelineInfo pipeline_info(const std::string&, const std::string&) override {
    TORCH_CHECK(false, "my_mps_ops: the Metal emulator is not built yet");
  }
  void run(const Launch&) override { TORCH_CHECK(false, "my_mps_ops: the Metal emulator is not built yet"); }
};
}  // namespace

Executor& emulator_executor() {
  static UnavailableEmulator executor;
  return executor;
}

void emulator_register_library(const std::string&, const std::string&) {
  TORCH_CHECK(false, "my_mps_ops: the Metal emulator is not built yet");
}

}  // namespace my_mps_ops::metal
