"""LoRA adapters over frozen (quantized) linear layers: my_mps_ops.lora's own
LoRALinear / add_lora, and PEFT's LoRA layers on QuantizedLinear through
peft_lora_config. References are float64 products with the dequantised weight."""

import copy
import importlib.util
import os
import warnings

import pytest
import torch

import my_mps_ops
from my_mps_ops.lora import LoRALinear, add_lora, lora_parameters, lora_state_dict, peft_lora_config
from my_mps_ops.models import TinyLlama, TinyLlamaConfig
from my_mps_ops.nn import QuantizedLinear, quantize_model
from my_mps_ops.testing import metal_emulation
from support import ROOT

HAS_PEFT = importlib.util.find_spec("peft") is not None
needs_peft = pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed (scripts/setup.sh installs it)")
TARGETS = ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]


def make_base(kind, in_features=64, out_features=48, dtype=torch.float32):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, dtype=dtype)
    if kind == "linear":
        return linear
    mode = "nf4" if kind == "nf4" else "affine"
    return QuantizedLinear.from_linear(linear, bits=4, group_size=32 if mode == "affine" else 64, mode=mode)


def base_weight64(base):
    if isinstance(base, torch.nn.Linear):
        return base.weight.detach().double()
    return my_mps_ops.dequantize(base.qweight, base.scales, base.biases, base.bits, base.group_size,
                                 base.mode).double()


@pytest.mark.parametrize("path", ["cpu", "metal_emulator"])
@pytest.mark.parametrize("kind", ["linear", "affine4", "nf4"])
def test_lora_linear_matches_float64(kind, path):
    base = make_base(kind)
    layer = LoRALinear(base, r=4, alpha=8.0)
    x = torch.randn(3, 5, 64)
    # A fresh adapter (B = 0) leaves the layer's output unchanged.
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    x.requires_grad_()
    with metal_emulation(path == "metal_emulator"):
        y = layer(x)
        grad = torch.randn_like(y)
        y.backward(grad)
    x64, a64, b64 = x.detach().double().requires_grad_(), layer.lora_A.detach().double().requires_grad_(), \
        layer.lora_B.detach().double().requires_grad_()
    y64 = x64 @ base_weight64(base).T + base.bias.detach().double() + (x64 @ a64.T @ b64.T) * 2.0
    y64.backward(grad.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    for got, want in ((x.grad, x64.grad), (layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for p in base.parameters()), "the base layer is frozen"


def test_adapters_keep_their_dtype_under_bfloat16_activations():
    base = make_base("affine4", dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and layer.lora_A.grad.dtype == torch.float32


def test_bad_arguments():
    with pytest.raises(TypeError, match="wraps nn.Linear or my_mps_ops.nn.QuantizedLinear"):
        LoRALinear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="rank r must be positive"):
        LoRALinear(make_base("linear"), r=0)


def tiny_quantized_llama():
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig())
    return model, quantize_model(copy.deepcopy(model), bits=4, group_size=32)


def test_add_lora_trains_only_the_adapters():
    _, qmodel = tiny_quantized_llama()
    model = add_lora(qmodel, r=4, alpha=8.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert not isinstance(model.lm_head, LoRALinear), "the output head is skipped by default"
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7 * model.cfg.n_layers
    tokens = torch.randint(0, model.cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model.loss(tokens)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items()), "only the adapters may change"
    # The adapters alone round-trip through their own state_dict.
    saved = lora_state_dict(model)
    assert set(saved) == {n for n in trainable}
    fresh = add_lora(tiny_quantized_llama()[1], r=4, alpha=8.0)
    fresh.load_state_dict(saved, strict=False)
    torch.testing.assert_close(fresh.loss(tokens), model.loss(tokens), rtol=0, atol=0)


@needs_peft
def test_peft_lora_on_quantized_linear_equals_ours():
    from peft import get_peft_model

    _, qmodel = tiny_quantized_llama()
    ours = add_lora(copy.deepcopy(qmodel), r=4, alpha=8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "unsupported layer type" warnings reach the user
        peft_model = get_peft_model(copy.deepcopy(qmodel),
                                    peft_lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    inner = peft_model.base_model.model
    # The same adapter values in both (B non-zero so that the update shows).
    for name, module in ours.named_modules():
        if isinstance(module, LoRALinear):
            with torch.no_grad():
                module.lora_B.normal_(std=0.1)
            peft_layer = inner.get_submodule(name)
            assert type(peft_layer).__name__ == "QuantizedLoraLinear"
            with torch.no_grad():
                peft_layer.lora_A["default"].weight.copy_(module.lora_A)
                peft_layer.lora_B["default"].weight.copy_(module.lora_B)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(2))
    loss_ours, loss_peft = ours.loss(tokens), inner.loss(tokens)
    torch.testing.assert_close(loss_peft, loss_ours, rtol=1e-6, atol=1e-6)
    loss_ours.backward()
    loss_peft.backward()
    for name, module in ours.named_modules():
        if isinstance(module, LoRALinear):
            peft_layer = inner.get_submodule(name)
            torch.testing.assert_close(peft_layer.lora_A["default"].weight.grad, module.lora_A.grad,
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(peft_layer.lora_B["default"].weight.grad, module.lora_B.grad,
                                       rtol=1e-5, atol=1e-6)
    # Adapters off: the quantized base model's loss; merging refuses (the weight is quantized).
    with torch.no_grad(), peft_model.disable_adapter():
        torch.testing.assert_close(inner.loss(tokens), qmodel.loss(tokens), rtol=0, atol=0)
    with pytest.raises(AttributeError, match="re-quantized"):
        peft_model.merge_and_unload()


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "demo")), reason="needs the source checkout's demo/")
def test_qlora_demo_runs_and_learns(capsys):
    """demo/finetune_qlora.py at a small size: every base (float32, 4-bit affine, NF4) learns the new task, and the
    4-bit bases hold the projections in at most 0.16x of the float32 bytes."""
    spec = importlib.util.spec_from_file_location("finetune_qlora", os.path.join(ROOT, "demo", "finetune_qlora.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--pretrain-steps", "40", "--steps", "40", "--batch", "8", "--seq", "32", "--device", "cpu",
                      "--tolerance", "0.5"]) == 0
    rows = {line.split(" base")[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if " base " in line and line.split()[-1].replace(".", "").isdigit()}
    for name in ("4-bit affine", "NF4"):
        ratio = next(tok for tok in rows[name] if tok.endswith("x"))
        assert float(ratio.rstrip("x")) <= 0.16, rows[name]
