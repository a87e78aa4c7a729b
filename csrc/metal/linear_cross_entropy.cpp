// Launch building for linear_cross_entropy's row pass
// (shaders/linear_cross_entropy.metal): one threadgroup per row of a chunk of
// float32 logits, each thread reading kLinearCrossEntropyReadsPerThread
// logits per pass.
#include "metal/linear_cross_entropy.h"

namespace my_mps_ops::metal {

void linear_cross_entropy_rows(const char* op, const LinearCrossEntropyRowsTensors& t,
                               const LinearCrossEntropyRowsOptions& o) {
  const int64_t rows = t.logits.size(0);
  if (rows == 0) return;
  const bool write_gradient = t.scale.defined();
  const shaders::LinearCrossEntropyParams p{o.ignore_index,
                                            checked_u32(t.logits.size(1), op, "number of classes"),
                                            write_gradient ? 1u : 0u,
                                            static_cast<float>(o.label_smoothing),
                                            static_cast<float>(o.softcap),
                                            static_cast<float>(o.z_loss),
                                            0u};
  Executor& executor = executor_for(t.logits.device());
  Launch launch("linear_cross_entropy", "linear_cross_entropy_rows");
  // Without a gradient the scale buffer is bound to the loss (never read).
  launch.buffer(t.logits).buffer(t.target).buffer(t.loss).buffer(t.lse)
      .buffer(write_gradient ? t.scale : t.loss).scalar(p);
  dispatch_row_threadgroups(launch, executor, uint64_t(rows), p.classes, shaders::kLinearCrossEntropyReadsPerThread);
  executor.run(launch);
}

}  // namespace my_mps_ops::metal
