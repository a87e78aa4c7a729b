// Flash attention (FlashAttention-2 style), forward and backward.
//
// Inputs are contiguous (batch, heads, seq, D), or packed sequences read at
// their offsets cu_q / cu_k (FlashAttentionShape); k/v head = q head / group.
// Masks are aligned to the bottom right: query i, at a = i + (kv_len - q_len),
// sees keys a - window_left .. a + window_right (-1: unbounded; causal is
// window_right 0). Scores may be capped (softcap * tanh(s / softcap)), and a
// per-head sink logit may join each row's softmax denominator (it is part of
// lse, so the backward kernels never read it). A query row that sees no key
// gives output 0 and lse -inf (the sink with sinks).
//
// Every product runs on 8x8 simdgroup_float8x8 multiply-accumulates with float
// accumulation; tiles are converted to float as they are staged in
// threadgroup memory (so every matrix operand is float, whatever T is). A
// simdgroup owns 8 rows (queries, or keys in the dK/dV kernel); threadgroups
// have flash_simdgroups(D) of them, or fewer when the pipeline is specialised
// with the function constant below (flash_attention.h, which also gives the
// size of each [[threadgroup(n)]] buffer).
//
// No float atomics: dK/dV and dQ are separate kernels, each owning its rows;
// both recompute the probabilities from the saved log-sum-exp.
#include <metal_stdlib>
#include "flash_attention.h"
using namespace metal;

// Simdgroups per threadgroup: the host specialises the pipeline with fewer
// than flash_simdgroups(D) when it allows fewer threads per threadgroup.
constant uint flash_simdgroups_constant [[function_constant(0)]];
static_assert(kFlashSimdgroupsConstant == 0, "the index of flash_simdgroups_constant");

template <uint D>
inline uint kernel_simdgroups() {
  return is_function_constant_defined(flash_simdgroups_constant) ? flash_simdgroups_constant : flash_simdgroups(D);
}

// Loads rows [first_row, first_row + 8) x columns [col, col + 8) of a
// row-major matrix with `stride` columns and `rows` rows into a float matrix,
// times `factor`; rows past the end read as 0. Goes through 64 floats of
// per-simdgroup threadgroup memory; every lane of the simdgroup must call it.
template <typename T>
inline void load_block(thread simdgroup_float8x8& m, device const T* src, uint first_row, uint rows, uint col,
                       uint stride, float factor, threadgroup float* staging, uint lane) {
  for (uint e = lane * 2; e < lane * 2 + 2; ++e) {
    const uint row = first_row + e / 8;
    staging[e] = row < rows ? float(src[size_t(row) * stride + col + e % 8]) * factor : 0.0f;
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_load(m, staging, 8);
  simdgroup_barrier(mem_flags::mem_threadgroup);  // staging may be rewritten next
}

// The inverse for results: rows [first_row, first_row + 8) of `dst` (those
// before `rows`) get the matrix times `factor`, converted to T.
template <typename T>
inline void store_block(simdgroup_float8x8 m, device T* dst, uint first_row, uint rows, uint col, uint stride,
                        float factor, threadgroup float* staging, uint lane) {
  simdgroup_store(m, staging, 8);
  simdgroup_barrier(mem_flags::mem_threadgroup);
  for (uint e = lane * 2; e < lane * 2 + 2; ++e) {
    const uint row = first_row + e / 8;
    if (row < rows) {
      dst[size_t(row) * stride + col + e % 8] = T(staging[e] * factor);
    }
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
}

// Copies rows [first_row, first_row + count) of a (rows x D) matrix into a
// float tile in threadgroup memory (row-major, D columns), times `factor`,
// zero past the end. Every one of the threadgroup's `threads` threads takes part.
template <typename T, uint D>
inline void stage_rows(threadgroup float* tile, device const T* src, uint first_row, uint count, uint rows,
                       float factor, uint tid, uint threads) {
  for (uint idx = tid; idx < count * D; idx += threads) {
    const uint row = first_row + idx / D;
    tile[idx] = row < rows ? float(src[size_t(row) * D + idx % D]) * factor : 0.0f;
  }
}

// Keys [key_begin_of(query), key_end_of(query)) are visible to a query; both
// grow with the query, so a block of queries [first, last] sees keys
// [key_begin_of(first), key_end_of(last)) and the loops skip the rest.
inline uint key_begin_of(uint query, uint q_len, uint kv_len, int left) {
  if (left < 0) {
    return 0;
  }
  return uint(clamp(int(query) + int(kv_len) - int(q_len) - left, 0, int(kv_len)));
}

inline uint key_end_of(uint query, uint q_len, uint kv_len, int right) {
  if (right < 0) {
    return kv_len;
  }
  return uint(clamp(int(query) + int(kv_len) - int(q_len) + right + 1, 0, int(kv_len)));
}

// Queries [query_begin_of(k0), query_end_of(k1)) see some key of [k0, k1).
inline uint query_begin_of(uint k0, uint q_len, uint kv_len, int right) {
  if (right < 0) {
    return 0;
  }
  return uint(clamp(int(k0) - right - (int(kv_len) - int(q_len)), 0, int(q_len)));
}

inline uint query_end_of(uint k1, uint q_len, uint kv_len, int left) {
  if (left < 0) {
    return q_len;
  }
  return uint(clamp(int(k1) + left - (int(kv_len) - int(q_len)), 0, int(q_len)));
}

inline bool key_visible(uint query, uint key, uint q_len, uint kv_len, int left, int right) {
  if (query >= q_len || key >= kv_len) {
    return false;
  }
  const int aligned = int(query) + int(kv_len) - int(q_len);
  return (left < 0 || int(key) >= aligned - left) && (right < 0 || int(key) <= aligned + right);
}

// One sequence: its first q and k/v row (head 0) and its lengths.
struct SeqRows {
  uint q0;
  uint q_len;
  uint k0;
  uint kv_len;
};

inline SeqRows seq_rows(constant FlashAttentionShape& shape, device const int* cu_q, device const int* cu_k, uint b) {
  SeqRows s;
  if (shape.varlen != 0) {
    s.q0 = uint(cu_q[b]);
    s.q_len = uint(cu_q[b + 1]) - s.q0;
    s.k0 = uint(cu_k[b]);
    s.kv_len = uint(cu_k[b + 1]) - s.k0;
  } else {
    s.q0 = b * shape.q_heads * shape.q_len;
    s.q_len = shape.q_len;
    s.k0 = b * (shape.q_heads / shape.group) * shape.kv_len;
    s.kv_len = shape.kv_len;
  }
  return s;
}

// out = softmax(scale * q k^T) v and lse, per (block of ROWS queries, q head, sequence).
// threadgroup(0): the scaled queries, then each K tile, then each V tile;
// threadgroup(1): per simdgroup 8 x ROWS scores and an 8 x 8 diagonal.
template <typename T, uint D>
kernel void flash_attention_forward(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device const float* sinks [[buffer(3)]],
    device T* out [[buffer(4)]],
    device float* lse [[buffer(5)]],
    constant FlashAttentionShape& shape [[buffer(6)]],
    device const int* cu_q [[buffer(7)]],
    device const int* cu_k [[buffer(8)]],
    threadgroup float* tile [[threadgroup(0)]],
    threadgroup float* scratch [[threadgroup(1)]],
    uint3 block [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint SIMDGROUPS = kernel_simdgroups<D>();
  const uint ROWS = flash_block_rows(SIMDGROUPS);
  const uint THREADS = flash_block_threads(SIMDGROUPS);
  constexpr uint BLOCKS = D / 8;  // 8-wide column blocks of a head
  const uint group = shape.group;
  const float scale = shape.scale;
  const float softcap = shape.softcap;
  const int left = shape.window_left;
  const int right = shape.window_right;
  const float neg_inf = -INFINITY;
  const uint h = block.y;
  const SeqRows seq = seq_rows(shape, cu_q, cu_k, block.z);
  const uint q_len = seq.q_len;
  const uint kv_len = seq.kv_len;
  const uint q0 = block.x * ROWS;
  if (q0 >= q_len) {
    return;  // past this sequence's end: the whole threadgroup leaves
  }
  const size_t q_row0 = size_t(seq.q0) + size_t(h) * shape.q_head_stride;
  const size_t kv_offset = (size_t(seq.k0) + size_t(h / group) * shape.kv_head_stride) * D;
  device const T* qh = q + q_row0 * D;
  device const T* kh = k + kv_offset;
  device const T* vh = v + kv_offset;
  threadgroup float* scores = scratch + sg * flash_forward_scratch_floats(SIMDGROUPS);  // 8 x ROWS
  threadgroup float* diag = scores + 8 * ROWS;                                            // 8 x 8

  stage_rows<T, D>(tile, qh, q0, ROWS, q_len, scale, tid, THREADS);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 qf[BLOCKS];
  simdgroup_float8x8 acc[BLOCKS];
  for (uint dc = 0; dc < BLOCKS; ++dc) {
    simdgroup_load(qf[dc], tile + sg * 8 * D + dc * 8, D);
    acc[dc] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }

  // Row statistics: lanes 4r .. 4r+3 share row r of this simdgroup's 8.
  const uint row = lane / 4;
  const uint part = lane % 4;
  const uint query = q0 + sg * 8 + row;
  float row_max = neg_inf;
  float row_sum = 0.0f;

  const uint key_begin = key_begin_of(q0, q_len, kv_len, left) / ROWS * ROWS;
  const uint key_end = key_end_of(min(q_len, q0 + ROWS) - 1, q_len, kv_len, right);
  for (uint k0 = key_begin; k0 < key_end; k0 += ROWS) {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // everyone is done with the previous tile
    stage_rows<T, D>(tile, kh, k0, ROWS, kv_len, 1.0f, tid, THREADS);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // scores (8 x ROWS) = Q (8 x D) * K^T (D x ROWS)
    for (uint kc = 0; kc < ROWS / 8; ++kc) {
      simdgroup_float8x8 s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (uint dc = 0; dc < BLOCKS; ++dc) {
        simdgroup_float8x8 kt;
        simdgroup_load(kt, tile + kc * 8 * D + dc * 8, D, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(s, qf[dc], kt, s);
      }
      simdgroup_store(s, scores + kc * 8, ROWS);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);

    // Online softmax over this tile; masked scores are skipped, never -inf,
    // so no NaN reaches the matrices (a diagonal product mixes rows with 0 * x).
    // Each lane caps its own scores in place (softcap) and reads them back below.
    float tile_max = neg_inf;
    for (uint j = part; j < ROWS; j += 4) {
      if (key_visible(query, k0 + j, q_len, kv_len, left, right)) {
        float s = scores[row * ROWS + j];
        if (softcap > 0.0f) {
          s = softcap * tanh(s / softcap);
          scores[row * ROWS + j] = s;
        }
        tile_max = max(tile_max, s);
      }
    }
    tile_max = max(tile_max, simd_shuffle_xor(tile_max, ushort(1)));
    tile_max = max(tile_max, simd_shuffle_xor(tile_max, ushort(2)));
    const float new_max = max(row_max, tile_max);
    const float correction = new_max == neg_inf ? 1.0f : exp(row_max - new_max);
    float tile_sum = 0.0f;
    for (uint j = part; j < ROWS; j += 4) {
      const bool visible = key_visible(query, k0 + j, q_len, kv_len, left, right);
      const float p = visible ? exp(scores[row * ROWS + j] - new_max) : 0.0f;
      scores[row * ROWS + j] = p;
      tile_sum += p;
    }
    tile_sum += simd_shuffle_xor(tile_sum, ushort(1));
    tile_sum += simd_shuffle_xor(tile_sum, ushort(2));
    row_sum = row_sum * correction + tile_sum;
    row_max = new_max;
    for (uint c = part * 2; c < part * 2 + 2; ++c) {
      diag[row * 8 + c] = row == c ? correction : 0.0f;
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    // acc = diag(correction) * acc
    simdgroup_float8x8 rescale;
    simdgroup_load(rescale, diag, 8);
    for (uint dc = 0; dc < BLOCKS; ++dc) {
      simdgroup_multiply(acc[dc], rescale, acc[dc]);
    }

    threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with K
    stage_rows<T, D>(tile, vh, k0, ROWS, kv_len, 1.0f, tid, THREADS);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // acc += P (8 x ROWS) * V (ROWS x D)
    for (uint kc = 0; kc < ROWS / 8; ++kc) {
      simdgroup_float8x8 p;
      simdgroup_load(p, scores + kc * 8, ROWS);
      for (uint dc = 0; dc < BLOCKS; ++dc) {
        simdgroup_float8x8 vb;
        simdgroup_load(vb, tile + kc * 8 * D + dc * 8, D);
        simdgroup_multiply_accumulate(acc[dc], p, vb, acc[dc]);
      }
    }
  }

  // out = acc / row_sum (0 for rows that saw no key); lse = row_max + log(row_sum).
  // A sink adds exp(sink) to the denominator: lse = log(exp(lse) + exp(sink))
  // and out = acc * exp(row_max - lse).
  simdgroup_barrier(mem_flags::mem_threadgroup);
  float inv_sum = row_sum > 0.0f ? 1.0f / row_sum : 0.0f;
  float row_lse = row_sum > 0.0f ? row_max + log(row_sum) : neg_inf;
  if (shape.has_sinks != 0) {
    const float sink = sinks[h];
    const float m = max(row_lse, sink);
    if (m != neg_inf) {
      const float total = m + log(exp(row_lse - m) + exp(sink - m));
      if (row_sum > 0.0f) {
        inv_sum = exp(row_max - total);
      }
      row_lse = total;
    }
  }
  for (uint c = part * 2; c < part * 2 + 2; ++c) {
    diag[row * 8 + c] = row == c ? inv_sum : 0.0f;
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 normalise;
  simdgroup_load(normalise, diag, 8);
  device T* oh = out + q_row0 * D;
  for (uint dc = 0; dc < BLOCKS; ++dc) {
    simdgroup_float8x8 o;
    simdgroup_multiply(o, normalise, acc[dc]);
    store_block(o, oh, q0 + sg * 8, q_len, dc * 8, D, 1.0f, scores, lane);
  }
  if (part == 0 && query < q_len) {
    lse[q_row0 + query] = row_lse;
  }
}

// delta[row] = sum over the head of grad_out * out (FlashAttention-2's D), one
// SIMD group per row: lane c takes columns c, c + 32, ... so that each step
// reads 32 consecutive elements (one thread per row read 32 rows a head_dim
// apart per step: 3% coalescing by the emulator's profile()).
template <typename T>
kernel void flash_attention_backward_delta(
    device const T* grad_out [[buffer(0)]],
    device const T* out [[buffer(1)]],
    device float* delta [[buffer(2)]],
    constant FlashAttentionDeltaShape& shape [[buffer(3)]],
    uint gid [[thread_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint row = gid / 32;
  if (row >= shape.rows) {
    return;  // whole SIMD groups: the grid is rows * 32 threads
  }
  const size_t base = size_t(row) * shape.head_dim;
  float acc = 0.0f;
  for (uint c = lane; c < shape.head_dim; c += 32) {
    acc += float(grad_out[base + c]) * float(out[base + c]);
  }
  acc = simd_sum(acc);
  if (lane == 0) {
    delta[row] = acc;
  }
}

// dK, dV per (block of ROWS keys, k/v head, sequence): every q head of the group
// and every query that sees these keys, in tiles of 8 queries.
//   S^T = K (scale Q)^T, P^T = exp(S^T - lse), dV += P^T dO,
//   dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK += dS^T (scale Q).
// threadgroup(0): scaled Q and dO tiles (8 x D floats each), then 8 lse and
// 8 delta; threadgroup(1): per simdgroup two 8 x 8 blocks.
template <typename T, uint D>
kernel void flash_attention_backward_kv(
    device const T* grad_out [[buffer(0)]],
    device const T* q [[buffer(1)]],
    device const T* k [[buffer(2)]],
    device const T* v [[buffer(3)]],
    device const float* lse [[buffer(4)]],
    device const float* delta [[buffer(5)]],
    device T* dk [[buffer(6)]],
    device T* dv [[buffer(7)]],
    constant FlashAttentionShape& shape [[buffer(8)]],
    device const int* cu_q [[buffer(9)]],
    device const int* cu_k [[buffer(10)]],
    threadgroup float* stage [[threadgroup(0)]],
    threadgroup float* scratch [[threadgroup(1)]],
    uint3 block [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint SIMDGROUPS = kernel_simdgroups<D>();
  const uint ROWS = flash_block_rows(SIMDGROUPS);
  const uint THREADS = flash_block_threads(SIMDGROUPS);
  constexpr uint BLOCKS = D / 8;  // 8-wide column blocks of a head
  const uint group = shape.group;
  const float scale = shape.scale;
  const uint kv_h = block.y;
  const SeqRows seq = seq_rows(shape, cu_q, cu_k, block.z);
  const uint q_len = seq.q_len;
  const uint kv_len = seq.kv_len;
  const uint k0 = block.x * ROWS;  // the threadgroup's first key
  if (k0 >= kv_len) {
    return;  // past this sequence's end: the whole threadgroup leaves
  }
  const uint key0 = k0 + sg * 8;   // this simdgroup's first key
  const size_t kv_offset = (size_t(seq.k0) + size_t(kv_h) * shape.kv_head_stride) * D;
  threadgroup float* q_tile = stage;
  threadgroup float* do_tile = stage + 8 * D;
  threadgroup float* lse_tile = stage + 16 * D;
  threadgroup float* delta_tile = lse_tile + 8;
  threadgroup float* block_a = scratch + sg * kFlashBackwardScratchFloats;
  threadgroup float* block_b = block_a + 64;
  const float softcap = shape.softcap;
  const int left = shape.window_left;
  const int right = shape.window_right;

  simdgroup_float8x8 kf[BLOCKS];
  simdgroup_float8x8 vf[BLOCKS];
  simdgroup_float8x8 dkf[BLOCKS];
  simdgroup_float8x8 dvf[BLOCKS];
  for (uint dc = 0; dc < BLOCKS; ++dc) {
    load_block(kf[dc], k + kv_offset, key0, kv_len, dc * 8, D, 1.0f, block_a, lane);
    load_block(vf[dc], v + kv_offset, key0, kv_len, dc * 8, D, 1.0f, block_a, lane);
    dkf[dc] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    dvf[dc] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }

  // Only the queries that see some key of the threadgroup's block.
  const uint first_query = query_begin_of(k0, q_len, kv_len, right);
  const uint query_end = query_end_of(min(kv_len, k0 + ROWS), q_len, kv_len, left);
  for (uint hh = 0; hh < group; ++hh) {
    const size_t q_row0 = size_t(seq.q0) + size_t(kv_h * group + hh) * shape.q_head_stride;
    for (uint i0 = first_query / 8 * 8; i0 < query_end; i0 += 8) {
      threadgroup_barrier(mem_flags::mem_threadgroup);  // everyone is done with the previous tiles
      stage_rows<T, D>(q_tile, q + q_row0 * D, i0, 8, q_len, scale, tid, THREADS);
      stage_rows<T, D>(do_tile, grad_out + q_row0 * D, i0, 8, q_len, 1.0f, tid, THREADS);
      if (tid < 8) {
        const bool in = i0 + tid < q_len;
        lse_tile[tid] = in ? lse[q_row0 + i0 + tid] : 0.0f;
        delta_tile[tid] = in ? delta[q_row0 + i0 + tid] : 0.0f;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      simdgroup_float8x8 st = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      simdgroup_float8x8 dpt = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (uint dc = 0; dc < BLOCKS; ++dc) {
        simdgroup_float8x8 qt;
        simdgroup_float8x8 dot;
        simdgroup_load(qt, q_tile + dc * 8, D, ulong2(0, 0), true);
        simdgroup_load(dot, do_tile + dc * 8, D, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(st, kf[dc], qt, st);
        simdgroup_multiply_accumulate(dpt, vf[dc], dot, dpt);
      }
      simdgroup_store(st, block_a, 8);
      simdgroup_store(dpt, block_b, 8);
      simdgroup_barrier(mem_flags::mem_threadgroup);
      for (uint e = lane * 2; e < lane * 2 + 2; ++e) {
        const uint c = e % 8;  // query i0 + c, key key0 + e / 8
        const bool visible = key_visible(i0 + c, key0 + e / 8, q_len, kv_len, left, right);
        float s = block_a[e];
        float cap_grad = 1.0f;  // d softcap(s) / ds = 1 - tanh^2
        if (softcap > 0.0f) {
          const float t = tanh(s / softcap);
          s = softcap * t;
          cap_grad = 1.0f - t * t;
        }
        const float p = visible ? exp(s - lse_tile[c]) : 0.0f;
        block_a[e] = p;
        block_b[e] = p * (block_b[e] - delta_tile[c]) * cap_grad;
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      simdgroup_float8x8 pt;
      simdgroup_float8x8 dst;
      simdgroup_load(pt, block_a, 8);
      simdgroup_load(dst, block_b, 8);
      for (uint dc = 0; dc < BLOCKS; ++dc) {
        simdgroup_float8x8 dob;
        simdgroup_float8x8 qb;
        simdgroup_load(dob, do_tile + dc * 8, D);
        simdgroup_load(qb, q_tile + dc * 8, D);
        simdgroup_multiply_accumulate(dvf[dc], pt, dob, dvf[dc]);
        simdgroup_multiply_accumulate(dkf[dc], dst, qb, dkf[dc]);
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);  // block_a/b are rewritten next
    }
  }
  for (uint dc = 0; dc < BLOCKS; ++dc) {
    store_block(dkf[dc], dk + kv_offset, key0, kv_len, dc * 8, D, 1.0f, block_a, lane);
    store_block(dvf[dc], dv + kv_offset, key0, kv_len, dc * 8, D, 1.0f, block_a, lane);
  }
}

// dQ per (block of ROWS queries, q head, sequence), over tiles of 8 visible keys:
//   S = (scale Q) K^T, P = exp(S - lse), dP = dO V^T, dS = P * (dP - delta),
//   dQ = scale * dS K.
// threadgroup(0): K and V tiles (8 x D floats each); threadgroup(1): per
// simdgroup two 8 x 8 blocks.
template <typename T, uint D>
kernel void flash_attention_backward_q(
    device const T* grad_out [[buffer(0)]],
    device const T* q [[buffer(1)]],
    device const T* k [[buffer(2)]],
    device const T* v [[buffer(3)]],
    device const float* lse [[buffer(4)]],
    device const float* delta [[buffer(5)]],
    device T* dq [[buffer(6)]],
    constant FlashAttentionShape& shape [[buffer(7)]],
    device const int* cu_q [[buffer(8)]],
    device const int* cu_k [[buffer(9)]],
    threadgroup float* stage [[threadgroup(0)]],
    threadgroup float* scratch [[threadgroup(1)]],
    uint3 block [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint SIMDGROUPS = kernel_simdgroups<D>();
  const uint ROWS = flash_block_rows(SIMDGROUPS);
  const uint THREADS = flash_block_threads(SIMDGROUPS);
  constexpr uint BLOCKS = D / 8;  // 8-wide column blocks of a head
  const uint group = shape.group;
  const float scale = shape.scale;
  const uint h = block.y;
  const SeqRows seq = seq_rows(shape, cu_q, cu_k, block.z);
  const uint q_len = seq.q_len;
  const uint kv_len = seq.kv_len;
  const uint q0 = block.x * ROWS;
  if (q0 >= q_len) {
    return;  // past this sequence's end: the whole threadgroup leaves
  }
  const uint query0 = q0 + sg * 8;  // this simdgroup's first query
  const size_t q_row0 = size_t(seq.q0) + size_t(h) * shape.q_head_stride;
  const size_t kv_offset = (size_t(seq.k0) + size_t(h / group) * shape.kv_head_stride) * D;
  threadgroup float* k_tile = stage;
  threadgroup float* v_tile = stage + 8 * D;
  threadgroup float* block_a = scratch + sg * kFlashBackwardScratchFloats;
  threadgroup float* block_b = block_a + 64;
  const float softcap = shape.softcap;
  const int left = shape.window_left;
  const int right = shape.window_right;

  simdgroup_float8x8 qf[BLOCKS];
  simdgroup_float8x8 dof[BLOCKS];
  simdgroup_float8x8 dqf[BLOCKS];
  for (uint dc = 0; dc < BLOCKS; ++dc) {
    load_block(qf[dc], q + q_row0 * D, query0, q_len, dc * 8, D, scale, block_a, lane);
    load_block(dof[dc], grad_out + q_row0 * D, query0, q_len, dc * 8, D, 1.0f, block_a, lane);
    dqf[dc] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  // lse and delta of the two queries this lane's elements belong to (row e / 8).
  const uint my_query = query0 + lane / 4;
  const float my_lse = my_query < q_len ? lse[q_row0 + my_query] : 0.0f;
  const float my_delta = my_query < q_len ? delta[q_row0 + my_query] : 0.0f;

  const uint key_begin = key_begin_of(q0, q_len, kv_len, left) / 8 * 8;
  const uint key_end = key_end_of(min(q_len, q0 + ROWS) - 1, q_len, kv_len, right);
  for (uint k0 = key_begin; k0 < key_end; k0 += 8) {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // everyone is done with the previous tiles
    stage_rows<T, D>(k_tile, k + kv_offset, k0, 8, kv_len, 1.0f, tid, THREADS);
    stage_rows<T, D>(v_tile, v + kv_offset, k0, 8, kv_len, 1.0f, tid, THREADS);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    simdgroup_float8x8 dp = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint dc = 0; dc < BLOCKS; ++dc) {
      simdgroup_float8x8 kt;
      simdgroup_float8x8 vt;
      simdgroup_load(kt, k_tile + dc * 8, D, ulong2(0, 0), true);
      simdgroup_load(vt, v_tile + dc * 8, D, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(s, qf[dc], kt, s);
      simdgroup_multiply_accumulate(dp, dof[dc], vt, dp);
    }
    simdgroup_store(s, block_a, 8);
    simdgroup_store(dp, block_b, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    for (uint e = lane * 2; e < lane * 2 + 2; ++e) {  // query query0 + e / 8 = my_query, key k0 + e % 8
      const bool visible = key_visible(my_query, k0 + e % 8, q_len, kv_len, left, right);
      float s = block_a[e];
      float cap_grad = 1.0f;  // d softcap(s) / ds = 1 - tanh^2
      if (softcap > 0.0f) {
        const float t = tanh(s / softcap);
        s = softcap * t;
        cap_grad = 1.0f - t * t;
      }
      const float p = visible ? exp(s - my_lse) : 0.0f;
      block_b[e] = p * (block_b[e] - my_delta) * cap_grad;
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 ds;
    simdgroup_load(ds, block_b, 8);
    for (uint dc = 0; dc < BLOCKS; ++dc) {
      simdgroup_float8x8 kb;
      simdgroup_load(kb, k_tile + dc * 8, D);
      simdgroup_multiply_accumulate(dqf[dc], ds, kb, dqf[dc]);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);  // block_a/b are rewritten next
  }
  for (uint dc = 0; dc < BLOCKS; ++dc) {
    store_block(dqf[dc], dq + q_row0 * D, query0, q_len, dc * 8, D, scale, block_a, lane);
  }
}

#define INSTANTIATE_FLASH_ATTENTION(T, D)                               \
  MY_MPS_OPS_INSTANTIATE_KERNEL2(flash_attention_forward, T, D)     \
  MY_MPS_OPS_INSTANTIATE_KERNEL2(flash_attention_backward_kv, T, D) \
  MY_MPS_OPS_INSTANTIATE_KERNEL2(flash_attention_backward_q, T, D)

#define INSTANTIATE_FLASH_ATTENTION_TYPE(T)                    \
  MY_MPS_OPS_INSTANTIATE_KERNEL(flash_attention_backward_delta, T) \
  INSTANTIATE_FLASH_ATTENTION(T, 32)                           \
  INSTANTIATE_FLASH_ATTENTION(T, 64)                           \
  INSTANTIATE_FLASH_ATTENTION(T, 80)                           \
  INSTANTIATE_FLASH_ATTENTION(T, 96)                           \
  INSTANTIATE_FLASH_ATTENTION(T, 128)                          \
  INSTANTIATE_FLASH_ATTENTION(T, 256)

INSTANTIATE_FLASH_ATTENTION_TYPE(float)
INSTANTIATE_FLASH_ATTENTION_TYPE(half)
INSTANTIATE_FLASH_ATTENTION_TYPE(bfloat)
