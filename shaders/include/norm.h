// Norms over the last dimension (rms_norm, fused_add_rms_norm, layer_norm):
// the launch parameters shared by shaders/rms_norm.metal,
// shaders/layer_norm.metal and their launch building (csrc/metal/norm.cpp).
#pragma once

#include "common.h"

MY_MPS_OPS_SHADER_NAMESPACE_BEGIN

// Elements each thread of a row kernel reads per pass over the row (one
// threadgroup per row), a threadgroup's width apart: thread t reads t,
// t + threads, ... so that a SIMD group's lanes read consecutive elements.
MY_MPS_OPS_CONSTANT uint32_t kNormReadsPerThread = 4;

// Bits of the kernels' `flags`: which optional tensors are bound for real
// (an absent one is bound to a stand-in that is neither read nor written).
MY_MPS_OPS_CONSTANT uint32_t kNormHasWeight = 1u << 0;
MY_MPS_OPS_CONSTANT uint32_t kNormHasBias = 1u << 1;
MY_MPS_OPS_CONSTANT uint32_t kNormWantGradInput = 1u << 2;
MY_MPS_OPS_CONSTANT uint32_t kNormWantGradWeight = 1u << 3;
MY_MPS_OPS_CONSTANT uint32_t kNormWantGradBias = 1u << 4;
// fused_add_rms_norm's backward: grad_residual_out is added to grad_input.
MY_MPS_OPS_CONSTANT uint32_t kNormAddGradResidualOut = 1u << 5;

// The row kernels: threadgroup g normalises the contiguous rows
// [g * rows_per_group, min(rows, (g + 1) * rows_per_group)) of `cols`
// elements, one after another, so that a row that fits one pass (cols <=
// threads * kNormReadsPerThread) reads the weight (and bias) once per
// threadgroup, not once per row.
struct NormRowParams {
  float eps;
  uint32_t cols;
  uint32_t flags;
  uint32_t rows;
  uint32_t rows_per_group;
};

// Rows per threadgroup: the most that still leaves kNormMinRowGroups
// threadgroups (enough to occupy every core of the largest Apple GPUs a few
// times over), at most kNormMaxRowsPerGroup.
MY_MPS_OPS_CONSTANT uint32_t kNormMinRowGroups = 64;
MY_MPS_OPS_CONSTANT uint32_t kNormMaxRowsPerGroup = 8;

// Rows whose statistics the parameter-gradient kernels stage in threadgroup
// memory at a time.
MY_MPS_OPS_CONSTANT uint32_t kNormStagedRows = 256;

// The parameter-gradient kernels over contiguous rows of `cols` elements:
// first one thread per (column, chunk of rows_per_chunk rows) writes a
// partial sum, then one thread per column sums the `chunks` partials.
struct NormColumnParams {
  uint32_t cols;
  uint32_t rows;
  uint32_t rows_per_chunk;
  uint32_t chunks;
  uint32_t flags;
};

#ifdef __METAL__
// The rows [x, y) threadgroup `group` normalises.
inline uint2 norm_group_rows(constant NormRowParams& p, uint group) {
  const uint first = group * p.rows_per_group;
  return uint2(first, metal::min(p.rows, first + p.rows_per_group));
}

// A row's slice that thread `tid` holds when the row fits one pass: elements
// tid + k * threads (0 past the row's end).
template <typename T>
inline void norm_load_slice(device const T* row, uint n, uint tid, uint threads, thread float* v) {
  for (uint k = 0; k < kNormReadsPerThread; ++k) {
    const uint i = tid + k * threads;
    v[k] = i < n ? float(row[i]) : 0.0f;
  }
}

// An optional parameter's slice (weight or bias), or `absent` everywhere.
template <typename T>
inline void norm_load_param_slice(bool present, device const T* param, uint n, uint tid, uint threads,
                                  float absent, thread float* v) {
  if (present) {
    norm_load_slice(param, n, tid, threads, v);
  } else {
    for (uint k = 0; k < kNormReadsPerThread; ++k) v[k] = absent;
  }
}
#endif

MY_MPS_OPS_SHADER_NAMESPACE_END
