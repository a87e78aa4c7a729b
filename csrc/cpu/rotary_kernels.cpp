// cpu copies: baseline avx2
// CPU loop of rotary_embedding: each row of head_dim elements rotates its
// first 2 * pairs elements by its position's angles and copies the rest.
// float32 / float64 rows are rotated in place of the output, by tables of
// their own type; float16 / bfloat16 rows are widened into a float32 row and
// narrowed back. The NeoX loop (contiguous halves) vectorises as written.
#include "cpu/dispatch.h"
#include "cpu/parallel.h"
#include "cpu/rotary.h"

#include <type_traits>
#include <vector>

MY_MPS_OPS_CPU_KERNELS_BEGIN
namespace {

// One row in the accumulation type S, on 32-bit indices (the ops file checks
// that tensors have fewer than 2^32 elements). They keep the roundings of the
// AVX2 copy: with 64-bit ones GCC vectorises the interleaved loop and fuses
// other products of the rotation into FMAs.
template <typename S>
__attribute__((always_inline)) inline void rotate_row(const S* xr, S* yr, const S* c, const S* sn,
                                                      const RotaryArgs& p) {
  const S sign = p.conj ? S(-1) : S(1);
  const uint32_t pairs = static_cast<uint32_t>(p.pairs), head_dim = static_cast<uint32_t>(p.head_dim);
  if (p.interleaved) {
    for (uint32_t i = 0; i < pairs; ++i) {
      const S x0 = xr[2 * i], x1 = xr[2 * i + 1], cv = c[i], sv = sign * sn[i];
      yr[2 * i] = x0 * cv - x1 * sv;
      yr[2 * i + 1] = x1 * cv + x0 * sv;
    }
  } else {
    for (uint32_t i = 0; i < pairs; ++i) {
      const S x0 = xr[i], x1 = xr[i + pairs], cv = c[i], sv = sign * sn[i];
      yr[i] = x0 * cv - x1 * sv;
      yr[i + pairs] = x1 * cv + x0 * sv;
    }
  }
  for (uint32_t i = 2 * pairs; i < head_dim; ++i) yr[i] = xr[i];
}

// Rows [begin, end); `row` holds 2 * head_dim floats for the narrow types.
template <typename T>
__attribute__((always_inline)) inline void rotate_rows(const RotaryArgs& p, int64_t begin, int64_t end, float* row) {
  const auto* x = static_cast<const T*>(p.x);
  auto* out = static_cast<T*>(p.out);
  for (int64_t r = begin; r < end; ++r) {
    int64_t b, s;
    if (p.seq_dim == 1) {
      s = (r / p.heads) % p.seq;
      b = r / (p.heads * p.seq);
    } else {
      s = r % p.seq;
      b = r / (p.seq * p.heads);
    }
    using Table = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const Table* c = static_cast<const Table*>(p.cos) + b * p.cos_batch_stride + s * p.pairs;
    const Table* sn = static_cast<const Table*>(p.sin) + b * p.cos_batch_stride + s * p.pairs;
    const T* xr = x + r * p.head_dim;
    T* yr = out + r * p.head_dim;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      rotate_row<T>(xr, yr, c, sn, p);
    } else {
      vec::widen(xr, row, p.head_dim);
      rotate_row<float>(row, row + p.head_dim, c, sn, p);
      vec::narrow(row + p.head_dim, yr, p.head_dim);
    }
  }
}

template <typename T>
void rotate(const RotaryArgs& p) {
  constexpr bool kWidened = !(std::is_same_v<T, float> || std::is_same_v<T, double>);
  const int64_t rows = p.batch * p.seq * p.heads;
  at::parallel_for(0, rows, cpu::row_grain(p.head_dim), [&](int64_t begin, int64_t end) {
    std::vector<float> row(kWidened ? 2 * p.head_dim : 0);
    rotate_rows<T>(p, begin, end, row.data());
  });
}

}  // namespace

void rotary(c10::ScalarType dtype, const RotaryArgs& args) {
  cpu::visit_float_dtype(dtype, "rotary_embedding", [&](auto type_tag) { rotate<decltype(type_tag)>(args); });
}

MY_MPS_OPS_CPU_KERNELS_END

MY_MPS_OPS_REGISTER_CPU_KERNEL(my_mps_ops::cpu::rotary_stub, rotary);
