// Small row-major matrix products on a CPU copy's vectors, shared by the
// attention loop files (flash_attention_kernels.cpp,
// attention_decode_kernels.cpp). Included inside a copy's namespace, after
// MY_MPS_OPS_CPU_KERNELS_BEGIN (it uses the copy's `vec::` and `Vec`): once per
// translation unit, so the unity build's files share one definition.
#pragma once

// The copy's vector of A: Vec for float32, the double vector of Vec's width for float64.
template <typename A>
using VecOf = std::conditional_t<std::is_same_v<A, double>, vec::DoubleLanes<Vec>::type, Vec>;

// C[0:R, 0:2L] += A[0:R, 0:k] * B[0:k, 0:2L] with L lanes per vector V: the
// 2R accumulators stay in registers over the whole k loop.
template <typename A, typename V, int R>
__attribute__((always_inline)) inline void matmul_acc_tile(A* C, int64_t ldc, const A* Am, int64_t lda, const A* B,
                                                           int64_t ldb, int64_t k) {
  constexpr int64_t L = vec::kLanes<V>;
  V c[R][2];
  for (int r = 0; r < R; ++r) {
    c[r][0] = vec::loadv<V>(C + r * ldc);
    c[r][1] = vec::loadv<V>(C + r * ldc + L);
  }
  for (int64_t p = 0; p < k; ++p) {
    const V b0 = vec::loadv<V>(B + p * ldb), b1 = vec::loadv<V>(B + p * ldb + L);
    for (int r = 0; r < R; ++r) {
      const A a = Am[r * lda + p];
      c[r][0] += a * b0;
      c[r][1] += a * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    vec::storev(C + r * ldc, c[r][0]);
    vec::storev(C + r * ldc + L, c[r][1]);
  }
}

// C[m, n] += A[m, k] * B[k, n], row-major with leading dimensions lda, ldb, ldc:
// strips of two vectors of columns, four rows at a time, then the leftovers.
template <typename A>
void matmul_acc(A* C, int64_t ldc, const A* Am, int64_t lda, const A* B, int64_t ldb, int64_t m, int64_t n,
                int64_t k) {
  using V = VecOf<A>;
  constexpr int64_t W = 2 * vec::kLanes<V>;
  int64_t j0 = 0;
  for (; j0 + W <= n; j0 += W) {
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) matmul_acc_tile<A, V, 4>(C + i * ldc + j0, ldc, Am + i * lda, lda, B + j0, ldb, k);
    for (; i < m; ++i) matmul_acc_tile<A, V, 1>(C + i * ldc + j0, ldc, Am + i * lda, lda, B + j0, ldb, k);
  }
  if (j0 == n) return;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) {
      const A a0 = Am[i * lda + p];
      for (int64_t j = j0; j < n; ++j) C[i * ldc + j] += a0 * B[p * ldb + j];
    }
  }
}
