"""The emulator's Metal standard library: atomics from several threads, mem_flags and
memory orders (programs built by stdlib_harness).
"""

from stdlib_harness import run_program, needs_gxx

pytestmark = needs_gxx


# Atomics -------------------------------------------------------------------------------------------


ATOMIC_WORKERS = r"""
#include <thread>
#include <vector>
struct Shared {
  uint counter; int signed_counter; float fsum; int imin; int imax; uint bits_or; uint bits_and; uint bits_xor;
  uint lock; long protected_count; uint exchanged; ulong wide;
};
// Each worker is one "thread" of a kernel working on device memory through atomic_* pointers.
static void worker(Shared* s, int id, int iterations) {
  atomic_uint* counter = reinterpret_cast<atomic_uint*>(&s->counter);
  volatile atomic_int* signed_counter = reinterpret_cast<volatile atomic_int*>(&s->signed_counter);
  atomic_float* fsum = reinterpret_cast<atomic_float*>(&s->fsum);
  atomic_int* imin = reinterpret_cast<atomic_int*>(&s->imin);
  atomic_int* imax = reinterpret_cast<atomic_int*>(&s->imax);
  atomic_uint* bor = reinterpret_cast<atomic_uint*>(&s->bits_or);
  atomic_uint* band = reinterpret_cast<atomic_uint*>(&s->bits_and);
  atomic_uint* bxor = reinterpret_cast<atomic_uint*>(&s->bits_xor);
  atomic_uint* lock = reinterpret_cast<atomic_uint*>(&s->lock);
  atomic_uint* ex = reinterpret_cast<atomic_uint*>(&s->exchanged);
  atomic_ulong* wide = reinterpret_cast<atomic_ulong*>(&s->wide);
  for (int i = 0; i < iterations; ++i) {
    atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed);
    atomic_fetch_sub_explicit(signed_counter, 2, memory_order_relaxed);
    atomic_fetch_add_explicit(fsum, 0.5f, memory_order_relaxed);
    atomic_fetch_min_explicit(imin, id * 1000 - i, memory_order_relaxed);
    atomic_fetch_max_explicit(imax, id * 1000 + i, memory_order_relaxed);
    atomic_fetch_add_explicit(wide, 1ul << 32, memory_order_relaxed);
    // A spin lock from compare-exchange guards a plain read-modify-write.
    uint expected = 0;
    while (!atomic_compare_exchange_weak_explicit(lock, &expected, 1u, memory_order_relaxed, memory_order_relaxed)) {
      expected = 0;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    s->protected_count = s->protected_count + 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    atomic_store_explicit(lock, 0u, memory_order_relaxed);
  }
  atomic_fetch_or_explicit(bor, 1u << id, memory_order_relaxed);
  atomic_fetch_and_explicit(band, ~(1u << id), memory_order_relaxed);
  for (int k = 0; k <= id; ++k) atomic_fetch_xor_explicit(bxor, 1u << id, memory_order_relaxed);
  atomic_exchange_explicit(ex, uint(id + 1), memory_order_relaxed);
}
"""


def test_atomics_from_several_threads(tmp_path):
    threads, iterations = 4, 20000
    v = run_program(
        tmp_path,
        rf"""
        Shared s{{}};
        s.imin = 1 << 30; s.imax = -(1 << 30); s.bits_and = 0xFFFFFFFFu;
        std::vector<std::thread> pool;
        for (int id = 0; id < {threads}; ++id) pool.emplace_back(worker, &s, id, {iterations});
        for (auto& t : pool) t.join();
        atomic_uint* counter = reinterpret_cast<atomic_uint*>(&s.counter);
        out("counter", atomic_load_explicit(counter, memory_order_relaxed));
        out("signed_counter", s.signed_counter); out("fsum", s.fsum);
        out("imin", s.imin); out("imax", s.imax);
        out("or", s.bits_or); out("and", s.bits_and); out("xor", s.bits_xor);
        out("protected", s.protected_count); out("lock", s.lock); out("wide", s.wide);
        out("exchanged_in_range", s.exchanged >= 1 && s.exchanged <= {threads});
        // compare-exchange: success stores desired; failure loads the current value into expected
        uint expected = 5;
        bool ok_fail = atomic_compare_exchange_weak_explicit(counter, &expected, 1u, memory_order_relaxed,
                                                             memory_order_relaxed);
        out("cas_fail", ok_fail); out("cas_expected", expected);
        bool ok = atomic_compare_exchange_weak_explicit(counter, &expected, 7u, memory_order_relaxed,
                                                        memory_order_relaxed);
        out("cas_ok", ok); out("after_cas", s.counter);
        out("old_from_exchange", atomic_exchange_explicit(counter, 11u, memory_order_relaxed));
        out("after_exchange", s.counter);
        atomic_int ai; atomic_store_explicit(&ai, -4, memory_order_relaxed);
        out("store_load", atomic_load_explicit(&ai, memory_order_relaxed));
        out("fetch_returns_old", atomic_fetch_add_explicit(&ai, 10, memory_order_relaxed));
        out("sizeof_atomic_uint", sizeof(atomic_uint)); out("sizeof_atomic_float", sizeof(atomic_float));
        // atomic_bool occupies 4 bytes in Metal
        uint flag_word = 0xFFFFFFFFu;
        atomic_bool* flag = reinterpret_cast<atomic_bool*>(&flag_word);
        atomic_store_explicit(flag, false, memory_order_relaxed);
        out("bool_word_after_store", flag_word);
        out("bool_exchange_old", atomic_exchange_explicit(flag, true, memory_order_relaxed));
        bool expected_flag = false;
        out("bool_cas", atomic_compare_exchange_weak_explicit(flag, &expected_flag, false, memory_order_relaxed,
                                                              memory_order_relaxed));
        out("bool_cas_expected", expected_flag); out("bool_load", atomic_load_explicit(flag, memory_order_relaxed));
        out("sizeof_atomic_bool", sizeof(atomic_bool));
        """,
        globals_src=ATOMIC_WORKERS,
        extra_flags=("-pthread",),
    )
    total = threads * iterations
    assert v["counter"] == total and v["signed_counter"] == -2 * total
    assert v["fsum"] == 0.5 * total  # every partial sum is exact in float, so no rounding
    assert v["imin"] == -(iterations - 1) and v["imax"] == (threads - 1) * 1000 + iterations - 1
    assert v["or"] == (1 << threads) - 1 and v["and"] == 0xFFFFFFFF & ~((1 << threads) - 1)
    # thread id xors its bit id+1 times: set for even ids
    assert v["xor"] == sum(1 << i for i in range(threads) if i % 2 == 0)
    assert v["protected"] == total and v["lock"] == 0 and v["wide"] == total << 32
    assert v["exchanged_in_range"] == 1
    assert v["cas_fail"] == 0 and v["cas_expected"] == total
    assert v["cas_ok"] == 1 and v["after_cas"] == 7
    assert v["old_from_exchange"] == 7 and v["after_exchange"] == 11
    assert v["store_load"] == -4 and v["fetch_returns_old"] == -4
    assert v["sizeof_atomic_uint"] == 4 and v["sizeof_atomic_float"] == 4
    assert v["bool_word_after_store"] == 0 and v["bool_exchange_old"] == 0
    assert v["bool_cas"] == 0 and v["bool_cas_expected"] == 1 and v["bool_load"] == 1
    assert v["sizeof_atomic_bool"] == 4


def test_mem_flags_and_memory_order(tmp_path):
    v = run_program(
        tmp_path,
        r"""
        mem_flags f = mem_flags::mem_threadgroup | mem_flags::mem_device;
        out("flags", (unsigned)f);
        out("has_tg", (unsigned)(f & mem_flags::mem_threadgroup) != 0);
        out("none", (unsigned)mem_flags::mem_none);
        out("relaxed", (int)memory_order_relaxed == __ATOMIC_RELAXED);
        atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
        """,
    )
    assert v["flags"] == 3 and v["has_tg"] == 1 and v["none"] == 0 and v["relaxed"] == 1
