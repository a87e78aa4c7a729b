"""my_mps_ops.quantized_linear: x @ W.T + bias with W the dequantized weight,
vs the float64 product, for every format on every backend; gradients of x and
bias; the weight frozen; registrations, compile, errors."""

import pytest
import torch

import my_mps_ops
from support import TOLERANCES

ops = torch.ops.my_mps_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (mode, bits, group_size)
FORMATS = [("affine", 4, 64), ("affine", 2, 32), ("affine", 3, 128), ("affine", 5, 32), ("affine", 6, 64),
           ("affine", 8, 32), ("nf4", 4, 64), ("fp4", 4, 32)]


def quantized(out_features, in_features, mode, bits, group_size, seed=0):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) / in_features ** 0.5
    return my_mps_ops.quantize(w, bits, group_size, mode)


def reference_weight(q, scales, biases, mode, bits, group_size):
    # the float64 weight the codes stand for
    if mode == "affine":
        return my_mps_ops.dequantize(q, scales.double(), biases.double(), bits, group_size, mode)
    return my_mps_ops.dequantize(q, scales, None, bits, group_size, mode).double()


def tol(dtype):
    return {k: v * 4 for k, v in TOLERANCES[dtype].items()}


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(map(str, f)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [(1,), (3, 6)], ids=["decode", "batch"])  # the fused products; the tiles
def test_values_and_gradients(backend, fmt, dtype, rows):
    mode, bits, group_size = fmt
    out_features, in_features = 40, 2 * 128
    q, scales, biases = quantized(out_features, in_features, mode, bits, group_size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*rows, in_features, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype)
    dev = backend.device
    xl, bl = x.to(dev).requires_grad_(), bias.to(dev).requires_grad_()
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    out = my_mps_ops.quantized_linear(xl, to(q), to(scales), to(biases), bl, bits, group_size, mode)
    w = reference_weight(q, scales, biases, mode, bits, group_size)
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref = x64 @ w.T + b64
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.cpu().double(), ref, **tol(dtype))
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(grad.to(device=dev, dtype=dtype))
    ref.backward(grad)
    torch.testing.assert_close(xl.grad.cpu().double(), x64.grad, **tol(dtype))
    torch.testing.assert_close(bl.grad.cpu().double(), b64.grad, **tol(dtype))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(map(str, f)))
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 4), (11,), (17,)], ids=["1", "3", "2x4", "11", "17"])
def test_fused_few_rows_and_tiles_vs_float64(backend, fmt, rows):
    # The fused products: forward up to 16 rows of x (8 a pass, so 11 takes
    # two), the transposed one for grad_x up to 8; more take the dequantized
    # tiles. 37 output features: not a
    # multiple of any block; 1152 inputs: more than the CPU's 1024-value chunks
    # and its 512-column blocks of grad_x, a multiple of neither.
    mode, bits, group_size = fmt
    out_features, in_features = 37, 1152
    q, scales, biases = quantized(out_features, in_features, mode, bits, group_size, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(*rows, in_features, generator=g)
    bias = torch.randn(out_features, generator=g)
    grad = torch.randn(*rows, out_features, generator=g)
    dev = backend.device
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    w = reference_weight(q, scales, biases, mode, bits, group_size)
    out = my_mps_ops.quantized_linear(to(x), to(q), to(scales), to(biases), to(bias), bits, group_size, mode)
    torch.testing.assert_close(out.cpu().double(), x.double() @ w.T + bias.double(), **tol(torch.float32))
    grad_x, grad_bias = ops.quantized_linear_backward(to(grad), to(q), to(scales), to(biases), group_size, bits, mode,
                                                      True)
    torch.testing.assert_close(grad_x.cpu().double(), grad.double() @ w, **tol(torch.float32))
    torch.testing.assert_close(grad_bias.cpu().double(), grad.double().reshape(-1, out_features).sum(0),
                               **tol(torch.float32))


def test_fused_x_at_any_offset(backend):
    # x a view starting one float into its storage (the Metal kernel reads
    # aligned float4s of x: such a view is copied first)
    q, scales, biases = quantized(12, 128, "nf4", 4, 64)
    flat = torch.randn(1 + 3 * 128, generator=torch.Generator().manual_seed(9))
    dev = backend.device
    x = flat.to(dev)[1:].view(3, 128)
    assert x.storage_offset() == 1
    out = my_mps_ops.quantized_linear(x, q.to(dev), scales.to(dev), None, None, 4, 64, "nf4")
    w = reference_weight(q, scales, biases, "nf4", 4, 64)
    torch.testing.assert_close(out.cpu().double(), flat[1:].view(3, 128).double() @ w.T, **tol(torch.float32))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(map(str, f)))
@pytest.mark.parametrize("rows", [1, 6, 8, 11, 17])
def test_float64_vs_the_float32_expanded_weight_cpu(fmt, rows):
    # float64 x: the weight expanded in float32 (as the tiles expand it),
    # products and sums in float64, on the fused paths and the tiles
    mode, bits, group_size = fmt
    q, scales, biases = quantized(21, 1152, mode, bits, group_size, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(rows, 1152, generator=g, dtype=torch.float64)
    grad = torch.randn(rows, 21, generator=g, dtype=torch.float64)
    bias = torch.randn(21, generator=g, dtype=torch.float64)
    w = my_mps_ops.dequantize(q, scales, biases, bits, group_size, mode, dtype=torch.float32).double()
    out = my_mps_ops.quantized_linear(x, q, scales, biases, bias, bits, group_size, mode)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x @ w.T + bias, atol=1e-6, rtol=1e-6)
    grad_x, _ = ops.quantized_linear_backward(grad, q, scales, biases, group_size, bits, mode, False)
    torch.testing.assert_close(grad_x, grad @ w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_results_do_not_depend_on_the_thread_count_cpu(dtype):
    q, scales, biases = quantized(300, 2048, "affine", 4, 64, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 2048, generator=g, dtype=dtype)
    grad = torch.randn(5, 300, generator=g, dtype=dtype)

    def run():
        return (my_mps_ops.quantized_linear(x, q, scales, biases),
                ops.quantized_linear_backward(grad, q, scales, biases, 64, 4, "affine", False)[0])

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(threads, 2))
        several = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, several):
        assert torch.equal(a, b)


def test_tiles_cover_many_output_rows_cpu():
    # More output rows than one dequantized tile holds (16 MiB of float32
    # rows), and more rows of x than the fused products take: the tiles.
    q, scales, biases = quantized(8200, 512, "affine", 4, 64, seed=2)
    x = torch.randn(17, 512, dtype=torch.float64)
    w = reference_weight(q, scales, biases, "affine", 4, 64)
    out = my_mps_ops.quantized_linear(x, q, scales, biases)
    # the weight is expanded in float32 (a float64 x keeps float64 products)
    torch.testing.assert_close(out, x @ w.T, atol=1e-6, rtol=1e-6)
    grad = torch.randn(17, 8200, dtype=torch.float64)
    grad_x, _ = ops.quantized_linear_backward(grad, q, scales, biases, 64, 4, "affine", False)
    torch.testing.assert_close(grad_x, grad @ w, atol=1e-6, rtol=1e-6)


def test_no_output_features_and_codes_at_an_unaligned_offset(backend):
    dev = backend.device
    # A weight with no rows: quantize, the forward and the backward give empty results.
    q, scales, biases = my_mps_ops.quantize(torch.randn(0, 64), 3, 32, "affine")
    x = torch.randn(2, 3, 64, device=dev, requires_grad=True)
    out = my_mps_ops.quantized_linear(x, q.to(dev), scales.to(dev), biases.to(dev), None, 3, 32, "affine")
    assert out.shape == (2, 3, 0)
    out.sum().backward()
    assert torch.equal(x.grad.cpu(), torch.zeros(2, 3, 64))
    # nf4 bytes starting one byte into their storage (the Metal path reads them as words)
    q, scales, _ = quantized(8, 64, "nf4", 4, 32)
    shifted = torch.empty(q.numel() + 1, dtype=torch.uint8)[1:].view(q.shape)
    shifted.copy_(q)
    x = torch.randn(3, 64)
    expected = my_mps_ops.quantized_linear(x, q, scales, None, None, 4, 32, "nf4")
    got = my_mps_ops.quantized_linear(x.to(dev), shifted.to(dev), scales.to(dev), None, None, 4, 32, "nf4")
    torch.testing.assert_close(got.cpu(), expected, **tol(torch.float32))


def test_opcheck_and_compile():
    q, scales, biases = quantized(24, 128, "affine", 4, 64)
    x = torch.randn(3, 128, requires_grad=True)
    torch.library.opcheck(ops.quantized_linear.default, (x, q, scales, biases, None, 64, 4, "affine"))
    torch.library.opcheck(ops.quantized_linear_backward.default,
                          (torch.randn(3, 24), q, scales, biases, 64, 4, "affine", True))

    def f(x):
        return my_mps_ops.quantized_linear(x, q, scales, biases, None, 4, 64, "affine").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for n in (3, 5):
        xs = torch.randn(n, 128, requires_grad=True)
        torch.testing.assert_close(compiled(xs), f(xs))
        torch.testing.assert_close(torch.autograd.grad(compiled(xs), xs)[0], torch.autograd.grad(f(xs), xs)[0])


def test_the_weight_is_frozen():
    q, scales, biases = quantized(8, 64, "affine", 4, 64)
    with pytest.raises(RuntimeError, match="the quantized weight is frozen"):
        my_mps_ops.quantized_linear(torch.randn(2, 64), q, scales.requires_grad_(), biases, None, 4, 64)


def test_bad_arguments_raise_naming_them():
    q, scales, biases = quantized(8, 64, "affine", 4, 64)
    x = torch.randn(2, 64)
    cases = [((x[:, :32], q, scales, biases), {}, "last dimension must be in_features = 64"),
             ((x, q, scales, None), {}, "affine mode needs biases"),
             ((x, q, scales, biases), dict(bits=3), "words per row"),
             ((x, q, scales, biases), dict(mode="int4"), "mode must be"),
             ((x, q.to(torch.int32), scales, biases), {}, "qweight must be uint32"),
             ((x, q, scales, biases, torch.randn(7)), {}, "bias must have shape")]
    for args, kwargs, message in cases:
        with pytest.raises(RuntimeError, match=message):
            my_mps_ops.quantized_linear(*args, **kwargs)


@pytest.mark.parametrize("mode,bits", [("affine", 4), ("nf4", 4), ("affine", 8)])
def test_quantize_model_replaces_linears_and_round_trips_its_state_dict(tmp_path, mode, bits):
    from my_mps_ops.models import TinyLlama, TinyLlamaConfig
    from my_mps_ops.nn import QuantizedLinear, quantize_model

    torch.manual_seed(0)
    cfg = TinyLlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=128, max_seq_len=32)
    model = TinyLlama(cfg, use_my_ops=False)
    tokens = torch.randint(0, 64, (2, 9))
    quantize_model(model, bits=bits, group_size=64, mode=mode)
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 2 * 4 + 2 * 3 and isinstance(model.lm_head, torch.nn.Linear)  # q,k,v,o + 3 MLP per block
    # the same model with each weight dequantized: the same logits
    reference = TinyLlama(cfg, use_my_ops=False)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if k in reference.state_dict()},
                              strict=False)
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            target = reference.get_submodule(name)
            target.weight.data = my_mps_ops.dequantize(m.qweight, m.scales, m.biases, m.bits, m.group_size, m.mode,
                                                       dtype=torch.float32)
    torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-5, rtol=1e-5)
    # 4-bit parameter memory of the quantized layers, scales included, vs float32
    if bits == 4:
        stored = sum(t.numel() * t.element_size() for m in linears for t in (m.qweight, m.scales, m.biases)
                     if t is not None)
        assert stored <= 0.16 * sum(m.in_features * m.out_features * 4 for m in linears)
    path = tmp_path / "q.pt"
    torch.save(model.state_dict(), path)
    fresh = quantize_model(TinyLlama(cfg, use_my_ops=False), bits=bits, group_size=64, mode=mode)
    fresh.load_state_dict(torch.load(path))
    torch.testing.assert_close(fresh(tokens), model(tokens))
    # training the rest (here the embeddings) through the frozen layers
    model(tokens).square().mean().backward()
    assert model.embed.weight.grad is not None and all(m.qweight.grad is None for m in linears)
