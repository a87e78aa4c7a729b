"""Property-based tests (hypothesis) of every op, on the CPU kernels and on
the Metal path through the emulator: random shapes (0 and 1 sizes included),
random strides and storage offsets (permuted, strided and stride-0 broadcast
views), every dtype of the path, random eps / scale / flags; values and
gradients against a float64 composite.

Bounded for CI: the `ci` profile (the default) draws MY_MPS_OPS_HYPOTHESIS_EXAMPLES
examples per test (default 12; a few minutes in all). `MY_MPS_OPS_HYPOTHESIS_PROFILE=long`
draws 300 per test (an hour or so). The example database (failures found, replayed
first next time) is kept out of the repository, beside the emulator's cache:
$MY_MPS_OPS_CACHE, else $XDG_CACHE_HOME/my_mps_ops, else ~/.cache/my_mps_ops, in
hypothesis/. The emulator runs without the race check here (the op tests run every
shader under it); a failure prints the `@reproduce_failure` blob.
"""

import itertools
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import pytest

hypothesis = pytest.importorskip("hypothesis")
import hypothesis.configuration  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

import my_mps_ops  # noqa: E402
from support import TOLERANCES  # noqa: E402


def _database_dir():
    root = os.environ.get("MY_MPS_OPS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "my_mps_ops")
    return os.path.join(root, "hypothesis")


# Hypothesis's other files (its constants cache) go there too, not to ./.hypothesis.
hypothesis.configuration.set_hypothesis_home_dir(_database_dir())
_COMMON = dict(deadline=None, database=DirectoryBasedExampleDatabase(_database_dir()), print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=int(os.environ.get("MY_MPS_OPS_HYPOTHESIS_EXAMPLES", "12")), **_COMMON)
settings.register_profile("long", max_examples=300, **_COMMON)
PROFILE = os.environ.get("MY_MPS_OPS_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

PATHS = ["cpu", "metal_emulator"]
DTYPES = {"cpu": [torch.float32, torch.float16, torch.bfloat16, torch.float64],
          "metal_emulator": [torch.float32, torch.float16, torch.bfloat16]}


def path_context(path):
    if path == "cpu":
        return nullcontext()
    from my_mps_ops.emulator import race_check
    from my_mps_ops.testing import metal_emulation

    class _Both:
        def __enter__(self):
            self._a, self._b = metal_emulation(), race_check(False)
            self._a.__enter__()
            self._b.__enter__()

        def __exit__(self, *exc):
            self._b.__exit__(*exc)
            return self._a.__exit__(*exc)

    return _Both()


# ---------------------------------------------------------------- layouts

@dataclass
class Layout:
    """How a tensor of a given shape sits in memory: dims permuted in storage,
    a step per dim (every 2nd element), stride-0 (broadcast) dims and a
    storage offset."""

    perm: tuple
    steps: tuple
    broadcast: tuple
    offset: int


@st.composite
def layouts(draw, ndim, broadcast=True):
    perm = tuple(draw(st.permutations(range(ndim)))) if draw(st.booleans()) else tuple(range(ndim))
    steps = tuple(draw(st.sampled_from((1, 1, 2))) for _ in range(ndim))
    bcast = tuple(broadcast and draw(st.integers(0, 3)) == 0 for _ in range(ndim))
    return Layout(perm, steps, bcast, draw(st.integers(0, 3)))


def make(shape, layout, dtype, gen, scale=1.0, shift=0.0):
    """A tensor of `shape` and `dtype` in `layout`, values ~ N(shift, scale)."""
    full = [1 if b else n * s for n, s, b in zip(shape, layout.steps, layout.broadcast)]
    stored = [full[p] for p in layout.perm]
    numel = math.prod(stored)
    storage = (torch.randn(numel + layout.offset, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)
    t = storage[layout.offset:].view(stored)
    inverse = sorted(range(len(shape)), key=lambda i: layout.perm[i])
    t = t.permute(inverse)
    t = t[tuple(slice(None, None, s) for s in layout.steps)]
    return t.expand(shape)


def place(t, layout):
    """t's values in `layout` (no broadcast dims: every element is t's own), for
    tensors whose values matter as they are (quantized codes and their scales)."""
    assert not any(layout.broadcast)
    full = [n * s for n, s in zip(t.shape, layout.steps)]
    stored = [full[p] for p in layout.perm]
    storage = torch.zeros(math.prod(stored) + layout.offset, dtype=t.dtype)
    view = storage[layout.offset:].view(stored).permute(sorted(range(t.dim()), key=lambda i: layout.perm[i]))
    view = view[tuple(slice(None, None, s) for s in layout.steps)]
    view.copy_(t)
    return view


def tol(dtype, factor):
    return {k: v * factor for k, v in TOLERANCES[dtype].items()}


def check(path, fn, ref, inputs, differentiable, dtype, gen, value_factor=2, grad_factor=8, out_dtype=None):
    """fn(*inputs) on `path` equals ref(*float64 copies) (outputs rounded to
    dtype once), and so do the gradients of every differentiable input for a
    random grad_output. Inputs are used as the views they are (a leaf that
    keeps its strides and storage offset). Outputs have `out_dtype` (default:
    the inputs' dtype)."""
    leaves = [t.detach().requires_grad_(i in differentiable) if isinstance(t, torch.Tensor) else t
              for i, t in enumerate(inputs)]
    ref_leaves = [t.detach().double().requires_grad_(i in differentiable)
                  if isinstance(t, torch.Tensor) and t.is_floating_point() else t for i, t in enumerate(inputs)]
    with path_context(path):
        if path == "metal_emulator":
            from my_mps_ops.testing import embedded_shaders_in_use

            assert embedded_shaders_in_use()
        out = fn(*leaves)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    expected = ref(*ref_leaves)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    for o, e in zip(outs, expected):
        assert o.shape == e.shape and o.dtype == (out_dtype or dtype)
        t = tol(dtype, value_factor)
        t["atol"] *= max(1.0, e.detach().abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(o.detach().double(), e.detach(), equal_nan=True, **t)
    wanted = [i for i in sorted(differentiable) if isinstance(leaves[i], torch.Tensor) and leaves[i].requires_grad]
    if not wanted:
        return
    grad_outs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    with path_context(path):
        grads = torch.autograd.grad(outs, [leaves[i] for i in wanted], grad_outs, allow_unused=True)
    ref_grads = torch.autograd.grad(expected, [ref_leaves[i] for i in wanted], [g.double() for g in grad_outs],
                                    allow_unused=True)
    for i, g, e in zip(wanted, grads, ref_grads):
        e = torch.zeros_like(ref_leaves[i]) if e is None else e
        g = torch.zeros_like(leaves[i]) if g is None else g
        assert g.shape == e.shape, (i, g.shape, e.shape)
        t = tol(dtype, grad_factor)
        t["atol"] *= max(1.0, e.abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(g.double(), e, equal_nan=True, msg=lambda m: f"gradient of input {i}: {m}", **t)


dims = st.integers(0, 5) | st.sampled_from([1, 1, 7, 33])
features = st.integers(0, 3) | st.integers(1, 80) | st.sampled_from([1, 127, 130])
seeds = st.integers(0, 2**31 - 1)


def common(draw, path):
    dtype = draw(st.sampled_from(DTYPES[path]))
    return dtype, torch.Generator().manual_seed(draw(seeds))


# ---------------------------------------------------------------- the ops

def ref_rms_norm(x, w, eps):
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_rms_norm(path, data):
    dtype, gen = common(data.draw, path)
    shape = tuple(data.draw(st.lists(dims, min_size=0, max_size=2))) + (data.draw(features),)
    x = make(shape, data.draw(layouts(len(shape))), dtype, gen)
    w = make(shape[-1:], data.draw(layouts(1)), dtype, gen) if data.draw(st.booleans()) else None
    eps = data.draw(st.sampled_from([1e-6, 1e-5]) | st.floats(1e-8, 1e-1))
    check(path, lambda x, w: my_mps_ops.rms_norm(x, w, eps), lambda x, w: ref_rms_norm(x, w, eps), [x, w], {0, 1},
          dtype, gen)


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_fused_add_rms_norm(path, data):
    dtype, gen = common(data.draw, path)
    shape = tuple(data.draw(st.lists(dims, min_size=0, max_size=2))) + (data.draw(features),)
    x = make(shape, data.draw(layouts(len(shape))), dtype, gen)
    r = make(shape, data.draw(layouts(len(shape))), dtype, gen)
    w = make(shape[-1:], data.draw(layouts(1)), dtype, gen) if data.draw(st.booleans()) else None
    eps = data.draw(st.floats(1e-8, 1e-1))

    def ref(x, r, w):
        h = x + r
        return ref_rms_norm(h, w, eps), h

    check(path, lambda x, r, w: my_mps_ops.fused_add_rms_norm(x, r, w, eps), ref, [x, r, w], {0, 1, 2}, dtype, gen)


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_layer_norm(path, data):
    dtype, gen = common(data.draw, path)
    shape = tuple(data.draw(st.lists(dims, min_size=0, max_size=2))) + (data.draw(features),)
    x = make(shape, data.draw(layouts(len(shape))), dtype, gen, shift=data.draw(st.sampled_from([0.0, 3.0])))
    w = make(shape[-1:], data.draw(layouts(1)), dtype, gen) if data.draw(st.booleans()) else None
    b = make(shape[-1:], data.draw(layouts(1)), dtype, gen) if data.draw(st.booleans()) else None
    eps = data.draw(st.floats(1e-8, 1e-1))
    check(path, lambda x, w, b: my_mps_ops.layer_norm(x, w, b, eps),
          lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, eps), [x, w, b], {0, 1, 2}, dtype, gen)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["swiglu", "geglu", "geglu_tanh"])
@given(data=st.data())
def test_glu(path, kind, data):
    dtype, gen = common(data.draw, path)
    shape = tuple(data.draw(st.lists(dims, min_size=0, max_size=3))) or (data.draw(features),)
    g = make(shape, data.draw(layouts(len(shape))), dtype, gen, scale=2.0)
    u = make(shape, data.draw(layouts(len(shape))), dtype, gen)
    if kind == "swiglu":
        fn, ref = my_mps_ops.swiglu, lambda g, u: F.silu(g) * u
    else:
        approximate = "tanh" if kind == "geglu_tanh" else "none"
        fn = lambda g, u: my_mps_ops.geglu(g, u, approximate)  # noqa: E731
        ref = lambda g, u: F.gelu(g, approximate=approximate) * u  # noqa: E731
    check(path, fn, ref, [g, u], {0, 1}, dtype, gen)


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_cross_entropy(path, data):
    dtype, gen = common(data.draw, path)
    n, v = data.draw(dims), data.draw(st.integers(1, 80) | st.sampled_from([1, 2, 300]))
    logits = make((n, v), data.draw(layouts(2)), dtype, gen, scale=data.draw(st.sampled_from([1.0, 4.0])))
    ignore_index = data.draw(st.sampled_from([-100, 0, 3]))
    target = torch.randint(0, v, (n,), generator=gen)
    if n and data.draw(st.booleans()):
        target[torch.rand(n, generator=gen) < 0.3] = ignore_index
    smoothing = data.draw(st.sampled_from([0.0, 0.1]) | st.floats(0.0, 0.9))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    check(path, lambda x, t: my_mps_ops.cross_entropy(x, t, ignore_index, smoothing, reduction),
          lambda x, t: F.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=smoothing,
                                       reduction=reduction), [logits, target], {0}, dtype, gen, 4, 8)


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_linear_cross_entropy(path, data):
    dtype, gen = common(data.draw, path)
    n, d, v = data.draw(dims), data.draw(st.integers(1, 40)), data.draw(st.integers(1, 70))
    hidden = make((n, d), data.draw(layouts(2)), dtype, gen)
    weight = make((v, d), data.draw(layouts(2)), dtype, gen, scale=1 / math.sqrt(d))
    bias = make((v,), data.draw(layouts(1)), dtype, gen) if data.draw(st.booleans()) else None
    target = torch.randint(0, v, (n,), generator=gen)
    if n and data.draw(st.booleans()):
        target[torch.rand(n, generator=gen) < 0.3] = -100
    smoothing = data.draw(st.sampled_from([0.0, 0.1]))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    softcap = data.draw(st.none() | st.floats(1.0, 30.0))
    z_loss = data.draw(st.sampled_from([0.0, 1e-4, 1e-2]))

    def fn(h, w, t, b):
        return my_mps_ops.linear_cross_entropy(h, w, t, b, -100, smoothing, reduction, softcap, z_loss)

    def ref(h, w, t, b):
        logits = h @ w.T + (b if b is not None else 0)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        rows = F.cross_entropy(logits, t, reduction="none", label_smoothing=smoothing)
        counted = t != -100
        rows = rows + z_loss * logits.logsumexp(-1).square() * counted
        if reduction == "none":
            return rows
        if reduction == "sum":
            return rows.sum()
        # mean over no counted row: NaN, with zero gradients (as F.cross_entropy)
        nan_if_none = float("nan") if not counted.any() else 0.0
        return rows.sum() / counted.sum().clamp_min(1) + nan_if_none

    # The logits are a matmul of rounded inputs rounded to the dtype, then reduced over V.
    # The loss of float16/bfloat16 inputs is float32 (their logits are upcast first).
    check(path, fn, ref, [hidden, weight, target, bias], {0, 1, 3}, dtype, gen, 8, 16,
          out_dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def ref_attention(q, k, v, causal, scale, window=(-1, -1), softcap=0.0, sinks=None):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    lq, lk = q.shape[2], k.shape[2]
    left, right = window
    right = 0 if causal else right
    aligned = torch.arange(lq)[:, None] + (lk - lq)
    key = torch.arange(lk)[None, :]
    mask = torch.ones(lq, lk, dtype=torch.bool)
    if left >= 0:
        mask &= key >= aligned - left
    if right >= 0:
        mask &= key <= aligned + right
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:  # a logit per head in the denominator, without a value
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows that see no key: 0
    return p[..., :lk] @ v


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_flash_attention(path, data):
    dtype, gen = common(data.draw, path)
    batch = data.draw(st.integers(0, 2))
    kv_heads = data.draw(st.integers(1, 2))
    q_heads = kv_heads * data.draw(st.sampled_from([1, 2, 3]))
    q_len, kv_len = data.draw(st.integers(0, 20)), data.draw(st.integers(0, 20))
    head_dim = data.draw(st.sampled_from([32, 32, 64, 80, 96, 128, 256]))
    causal = data.draw(st.booleans())
    scale = data.draw(st.none() | st.floats(0.05, 1.0))
    window = data.draw(st.none() | st.tuples(st.integers(-1, 8), st.integers(-1, 8)))
    softcap = data.draw(st.sampled_from([0.0, 0.0, 0.7, 3.0]))
    q = make((batch, q_heads, q_len, head_dim), data.draw(layouts(4)), dtype, gen)
    k = make((batch, kv_heads, kv_len, head_dim), data.draw(layouts(4)), dtype, gen)
    v = make((batch, kv_heads, kv_len, head_dim), data.draw(layouts(4)), dtype, gen)
    sinks = make((q_heads,), data.draw(layouts(1)), dtype, gen, shift=1.0) if data.draw(st.booleans()) else None
    w = (-1, -1) if window is None else window
    check(path, lambda q, k, v, sinks: my_mps_ops.flash_attention(q, k, v, causal, scale, window=window,
                                                                    softcap=softcap, sinks=sinks),
          lambda q, k, v, sinks: ref_attention(q, k, v, causal, scale, w, softcap, sinks), [q, k, v, sinks],
          {0, 1, 2, 3}, dtype, gen, 4, 16)


def _cumulative(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_flash_attention_varlen(path, data):
    dtype, gen = common(data.draw, path)
    batch = data.draw(st.integers(0, 3))
    q_lens = [data.draw(st.integers(0, 9)) for _ in range(batch)]
    k_lens = [data.draw(st.integers(0, 9)) for _ in range(batch)]
    kv_heads = data.draw(st.integers(1, 2))
    q_heads = kv_heads * data.draw(st.sampled_from([1, 2]))
    head_dim = data.draw(st.sampled_from([32, 64, 80]))
    causal = data.draw(st.booleans())
    scale = data.draw(st.none() | st.floats(0.05, 1.0))
    window = data.draw(st.none() | st.tuples(st.integers(-1, 6), st.integers(-1, 6)))
    softcap = data.draw(st.sampled_from([0.0, 0.0, 2.0]))
    q = make((sum(q_lens), q_heads, head_dim), data.draw(layouts(3)), dtype, gen)
    k = make((sum(k_lens), kv_heads, head_dim), data.draw(layouts(3)), dtype, gen)
    v = make((sum(k_lens), kv_heads, head_dim), data.draw(layouts(3)), dtype, gen)
    sinks = make((q_heads,), data.draw(layouts(1)), dtype, gen, shift=1.0) if data.draw(st.booleans()) else None
    cu_q, cu_k = _cumulative(q_lens), _cumulative(k_lens)
    w = (-1, -1) if window is None else window

    def ref(q, k, v, sinks):
        # Each sequence alone, through the dense reference ((total, heads, dim) <-> (1, heads, len, dim)).
        outs = [ref_attention(q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None],
                              v[c:d].transpose(0, 1)[None], causal, scale, w, softcap, sinks)[0].transpose(0, 1)
                for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())]
        return torch.cat(outs, 0) if outs else q.new_zeros(0, q_heads, head_dim) + q.sum() * 0  # keeps a grad_fn

    check(path, lambda q, k, v, sinks: my_mps_ops.flash_attention_varlen(
              q, k, v, cu_q, cu_k, max(q_lens, default=0), max(k_lens, default=0), causal, scale, window=window,
              softcap=softcap, sinks=sinks),
          ref, [q, k, v, sinks], {0, 1, 2, 3}, dtype, gen, 4, 16)


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_flash_attention_decode(path, data):
    dtype, gen = common(data.draw, path)
    batch = data.draw(st.integers(1, 3))
    kv_heads = data.draw(st.integers(1, 2))
    q_heads = kv_heads * data.draw(st.sampled_from([1, 2, 4]))
    head_dim = data.draw(st.sampled_from([32, 64, 128]))
    q_len = data.draw(st.integers(1, 4))
    cache_len = data.draw(st.integers(q_len, 40))
    lengths = [data.draw(st.integers(q_len, cache_len)) for _ in range(batch)]
    causal = data.draw(st.booleans())
    scale = data.draw(st.none() | st.floats(0.05, 1.0))
    window_left = data.draw(st.sampled_from([-1, -1, 0, 5]))
    softcap = data.draw(st.sampled_from([0.0, 0.0, 2.0]))
    q = make((batch, q_heads, q_len, head_dim), data.draw(layouts(4)), dtype, gen)
    # (no broadcast views for the caches: garbage is written into them below)
    k = make((batch, kv_heads, cache_len, head_dim), data.draw(layouts(4, broadcast=False)), dtype, gen)
    v = make((batch, kv_heads, cache_len, head_dim), data.draw(layouts(4, broadcast=False)), dtype, gen)
    with torch.no_grad():  # past each sequence's length the cache holds garbage, never read
        for b, n in enumerate(lengths):
            k[b, :, n:] = float("nan")
            v[b, :, n:] = float("nan")
    sinks = make((q_heads,), data.draw(layouts(1)), dtype, gen, shift=1.0) if data.draw(st.booleans()) else None
    seqlens = torch.tensor(lengths, dtype=data.draw(st.sampled_from([torch.int32, torch.int64])))

    def ref(q, k, v, sinks):
        return torch.cat([ref_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal, scale,
                                        (window_left, -1), softcap, sinks) for b, n in enumerate(lengths)], 0)

    check(path, lambda q, k, v, sinks: my_mps_ops.flash_attention_decode(
              q, k, v, seqlens, causal, scale, window_left, softcap or None, sinks),
          ref, [q, k, v, sinks], set(), dtype, gen, 4, 16)


def ref_rotary(x, cos, sin, interleaved, seq_dim):
    c, s = cos.double(), sin.double()
    if c.dim() == 2:
        c, s = c[None], s[None]
    c, s = (c[:, :, None], s[:, :, None]) if seq_dim == 1 else (c[:, None], s[:, None])
    half = c.shape[-1]
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    if interleaved:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    else:
        x0, x1 = rot[..., :half], rot[..., half:]
        out = torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1)
    return torch.cat((out, rest), dim=-1)


@st.composite
def rotary_case(draw, path):
    dtype, gen = common(draw, path)
    batch, seq, heads = draw(st.integers(0, 3)), draw(st.integers(0, 9)), draw(st.integers(1, 4))
    head_dim = 2 * draw(st.integers(1, 40))
    half = draw(st.integers(0, head_dim // 2)) if draw(st.booleans()) else head_dim // 2
    seq_dim = draw(st.sampled_from([1, 2]))
    interleaved = draw(st.booleans())
    per_batch = draw(st.booleans())
    table_dtype = draw(st.sampled_from([torch.float32, dtype]))
    angles = torch.rand(((batch,) if per_batch else ()) + (seq, half), generator=gen, dtype=torch.float64) * 6
    cos, sin = angles.cos().to(table_dtype), angles.sin().to(table_dtype)
    shape = (batch, seq, heads, head_dim) if seq_dim == 1 else (batch, heads, seq, head_dim)
    return dtype, gen, shape, cos, sin, seq_dim, interleaved


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_rotary_embedding(path, data):
    dtype, gen, shape, cos, sin, seq_dim, interleaved = data.draw(rotary_case(path))
    x = make(shape, data.draw(layouts(4)), dtype, gen)
    if dtype == torch.float64:
        cos, sin = cos.double(), sin.double()
    check(path, lambda x: my_mps_ops.rotary_embedding(x, cos, sin, interleaved, seq_dim),
          lambda x: ref_rotary(x, cos, sin, interleaved, seq_dim), [x], {0}, dtype, gen)


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_rotary_embedding_qk(path, data):
    dtype, gen, shape, cos, sin, seq_dim, interleaved = data.draw(rotary_case(path))
    q = make(shape, data.draw(layouts(4)), dtype, gen)
    k_shape = list(shape)
    k_shape[3 - seq_dim] = data.draw(st.integers(1, 3))  # the heads dim: k may have fewer heads
    k = make(tuple(k_shape), data.draw(layouts(4)), dtype, gen)
    if dtype == torch.float64:
        cos, sin = cos.double(), sin.double()
    check(path, lambda q, k: my_mps_ops.rotary_embedding_qk(q, k, cos, sin, interleaved, seq_dim),
          lambda q, k: (ref_rotary(q, cos, sin, interleaved, seq_dim), ref_rotary(k, cos, sin, interleaved, seq_dim)),
          [q, k], {0, 1}, dtype, gen)


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_quantized_linear(path, data):
    dtype, gen = common(data.draw, path)
    mode = data.draw(st.sampled_from(["affine", "affine", "nf4", "fp4"]))
    bits = data.draw(st.sampled_from(my_mps_ops.quantization.AFFINE_BITS)) if mode == "affine" else 4
    group_size = data.draw(st.sampled_from(my_mps_ops.quantization.AFFINE_GROUP_SIZES))
    in_features = group_size * data.draw(st.integers(1, 3))
    out_features = data.draw(st.integers(0, 5) | st.sampled_from([1, 7, 33, 40]))
    # The stored weight's dtype is the scales' (affine); independent of x's.
    w_dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    w = (torch.randn(out_features, in_features, generator=gen, dtype=torch.float64) / math.sqrt(in_features)).to(w_dtype)
    qweight, scales, biases = my_mps_ops.quantize(w, bits, group_size, mode)
    qweight, scales = place(qweight, data.draw(layouts(2, False))), place(scales, data.draw(layouts(2, False)))
    if biases is not None:
        biases = place(biases, data.draw(layouts(2, False)))
    shape = tuple(data.draw(st.lists(dims, min_size=0, max_size=2))) + (in_features,)
    x = make(shape, data.draw(layouts(len(shape))), dtype, gen)
    bias = make((out_features,), data.draw(layouts(1)), dtype, gen) if data.draw(st.booleans()) else None

    def fn(x, qweight, scales, biases, bias):
        return my_mps_ops.quantized_linear(x, qweight, scales, biases, bias, bits, group_size, mode)

    def ref(x, qweight, scales, biases, bias):
        # scales / biases arrive as float64 copies: the weight the codes stand for, in float64
        # (the codebooks' values are float32 numbers)
        weight = my_mps_ops.dequantize(qweight, scales, biases, bits, group_size, mode).double()
        out = x @ weight.T
        return out + bias if bias is not None else out

    # The op expands the weight in float32 (a rounding of about 6e-8 relative per
    # weight): for float64 x that, not float64's own rounding, bounds the error.
    factors = (1e4, 1e4) if dtype == torch.float64 else (4, 8)
    check(path, fn, ref, [x, qweight, scales, biases, bias], {0, 4}, dtype, gen, *factors)
