// Launch building for rotary_embedding (shaders/rotary.metal): a SIMD group's
// width of threads per position (batch, seq), rotating every head there.
#include "metal/rotary.h"

#include <algorithm>
#include <string>

namespace my_mps_ops::metal {
namespace {

constexpr const char* kRotaryLibrary = "rotary";
using shaders::RotaryShape;

RotaryShape shape_of(const char* op, const at::Tensor& x, const RotaryOptions& o) {
  const int64_t seq = x.size(o.seq_dim), pairs = o.cos.size(-1);
  return RotaryShape{checked_u32(x.size(0), op, "batch"),
                     checked_u32(seq, op, "sequence length"),
                     checked_u32(x.size(o.seq_dim == 1 ? 2 : 1), op, "heads"),
                     checked_u32(x.size(3), op, "head_dim"),
                     checked_u32(pairs, op, "rotary pairs"),
                     checked_u32(o.cos.dim() == 3 ? seq * pairs : 0, op, "cos batch stride"),
                     static_cast<uint32_t>(o.seq_dim),
                     static_cast<uint32_t>(o.interleaved),
                     static_cast<uint32_t>(o.conj)};
}

uint64_t positions_of(const RotaryShape& s) { return uint64_t(s.batch) * s.seq; }

// Grid (kRotaryThreadsPerRow, positions): each position's pairs split among
// kRotaryThreadsPerRow threads, which rotate every head's row there;
// threadgroups of up to 256 threads (fewer if the pipeline allows fewer).
void dispatch_positions(Launch& launch, Executor& executor, uint64_t positions) {
  const PipelineInfo info = executor.pipeline_info(launch.library, launch.kernel);
  const uint64_t width = shaders::kRotaryThreadsPerRow;
  const uint64_t group_rows = std::max<uint64_t>(
      1, std::min<uint64_t>({uint64_t(info.max_threads_per_threadgroup) / width, 256 / width, positions}));
  launch.dispatch_threads({width, positions, 1}, {width, group_rows, 1});
}

}  // namespace

void rotary(const char* op, const RotaryTensors& x, const RotaryOptions& o) {
  const RotaryShape shape = shape_of(op, x.x, o);
  Executor& executor = executor_for(x.x.device());
  Launch launch(kRotaryLibrary, std::string("rotary_") + metal_type_name(x.x.scalar_type()));
  launch.buffer(x.x).buffer(x.out).buffer(o.cos).buffer(o.sin).scalar(shape);
  dispatch_positions(launch, executor, positions_of(shape));
  executor.run(launch);
}

void rotary_qk(const char* op, const RotaryTensors& q, const RotaryTensors& k, const RotaryOptions& o) {
  const RotaryShape pq = shape_of(op, q.x, o), pk = shape_of(op, k.x, o);
  TORCH_INTERNAL_ASSERT(pq.batch == pk.batch && pq.seq == pk.seq, op, ": q and k positions differ");
  Executor& executor = executor_for(q.x.device());
  Launch launch(kRotaryLibrary, std::string("rotary_qk_") + metal_type_name(q.x.scalar_type()));
  launch.buffer(q.x).buffer(q.out).buffer(k.x).buffer(k.out).buffer(o.cos).buffer(o.sin).scalar(pq).scalar(pk);
  dispatch_positions(launch, executor, positions_of(pq));
  executor.run(launch);
}

}  // namespace my_mps_ops::metal
