// Launch building for cross_entropy (shaders/cross_entropy.metal): one
// threadgroup per row of logits, each thread reading
// kCrossEntropyReadsPerThread logits per pass.
#include "metal/cross_entropy.h"

#include <string>

namespace my_mps_ops::metal {
namespace {

constexpr const char* kCrossEntropyLibrary = "cross_entropy";
using shaders::CrossEntropyParams;
using shaders::kCrossEntropyReadsPerThread;

CrossEntropyParams params(const char* op, const at::Tensor& logits, int64_t ignore_index, double label_smoothing) {
  return CrossEntropyParams{ignore_index, checked_u32(logits.size(1), op, "number of classes"),
                            static_cast<float>(label_smoothing)};
}

std::string cross_entropy_kernel_name(const char* direction, const at::Tensor& logits) {
  return std::string("cross_entropy_") + direction + metal_type_name(logits.scalar_type());
}

}  // namespace

void cross_entropy_forward(const char* op, const CrossEntropyForwardTensors& t, int64_t ignore_index,
                           double label_smoothing) {
  const CrossEntropyParams p = params(op, t.logits, ignore_index, label_smoothing);
  Executor& executor = executor_for(t.logits.device());
  Launch launch(kCrossEntropyLibrary, cross_entropy_kernel_name("forward_", t.logits));
  launch.buffer(t.logits).buffer(t.target).buffer(t.loss).buffer(t.lse).scalar(p);
  dispatch_row_threadgroups(launch, executor, uint64_t(t.logits.size(0)), p.classes, kCrossEntropyReadsPerThread);
  executor.run(launch);
}

void cross_entropy_backward(const char* op, const CrossEntropyBackwardTensors& t, int64_t ignore_index,
                            double label_smoothing) {
  const CrossEntropyParams p = params(op, t.logits, ignore_index, label_smoothing);
  Executor& executor = executor_for(t.logits.device());
  Launch launch(kCrossEntropyLibrary, cross_entropy_kernel_name("backward_", t.logits));
  launch.buffer(t.logits).buffer(t.target).buffer(t.lse).buffer(t.scale).buffer(t.grad_logits).scalar(p);
  dispatch_row_threadgroups(launch, executor, uint64_t(t.logits.size(0)), p.classes, kCrossEntropyReadsPerThread);
  executor.run(launch);
}

}  // namespace my_mps_ops::metal
