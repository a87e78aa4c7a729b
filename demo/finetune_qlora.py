"""QLoRA-style fine-tuning of the tiny Llama: the base model's linear layers
frozen in 4 bits (my_mps_ops.quantize_model: quantized_linear does the
products) with trainable LoRA adapters (my_mps_ops.lora), next to the same
adapters on the float32 base.

1. A float tiny Llama is pretrained on one synthetic task (t -> 5t + 3).
2. It is fine-tuned on another (t -> 7t + 11) with LoRA adapters of rank 8 on
   every attention and MLP projection, three times from the same adapter
   initialisation: on the float32 base, on a 4-bit affine base and on an NF4
   base (groups of 64).
Prints the linear layers' weight memory (float32 vs 4-bit, scales included),
trainable parameters, the peak memory of one training step and the losses.
Exits non-zero if a 4-bit run does not learn the new task or ends far from
the float run.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import my_mps_ops  # noqa: E402
from my_mps_ops.lora import add_lora, lora_parameters  # noqa: E402
from my_mps_ops.memory import peak_allocated_mb  # noqa: E402
from my_mps_ops.models import TinyLlama, TinyLlamaConfig  # noqa: E402
from my_mps_ops.nn import QuantizedLinear, quantize_model  # noqa: E402
from train_tiny_llama import synthetic_batches  # noqa: E402


def linear_weight_mb(model: torch.nn.Module) -> float:
    """Bytes of the attention and MLP projections' weights (codes, scales and
    affine biases for quantized ones), in MB; the output head is left out."""
    total = 0
    for name, module in model.named_modules():
        if "lm_head" in name:
            continue
        if isinstance(module, QuantizedLinear):
            total += sum(t.numel() * t.element_size() for t in (module.qweight, module.scales, module.biases)
                         if t is not None)
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total / 2**20


def train(model, params, batches, device, lr):
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for tokens in batches:
        loss = model.loss(tokens.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--steps", type=int, default=80, help="fine-tuning steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="mps" if torch.backends.mps.is_available() else "cpu")
    p.add_argument("--tolerance", type=float, default=0.25,
                   help="max final-loss difference between a 4-bit run and the float run")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    cfg = TinyLlamaConfig(hidden_dim=384)  # every projection's input a multiple of the groups of 64
    base = TinyLlama(cfg).to(args.device)
    pretrain = list(synthetic_batches(cfg, args.batch, args.seq, args.pretrain_steps, seed=0, a=5, b=3))
    train(base, base.parameters(), pretrain, args.device, 3e-3)
    finetune = list(synthetic_batches(cfg, args.batch, args.seq, args.steps, seed=1, a=7, b=11))
    print(f"tiny Llama pretrained {args.pretrain_steps} steps on t -> 5t + 3; fine-tuning {args.steps} steps of "
          f"{args.batch}x{args.seq} tokens on t -> 7t + 11 with LoRA rank {args.rank} on {args.device} "
          f"(my_mps_ops {my_mps_ops.__version__}, torch {torch.__version__})")

    runs = {}
    for name, bits_mode in (("float32 base", None), ("4-bit affine base", ("affine", 64)), ("NF4 base", ("nf4", 64))):
        model = copy.deepcopy(base)
        if bits_mode is not None:
            quantize_model(model, bits=4, group_size=bits_mode[1], mode=bits_mode[0])
        weight_mb = linear_weight_mb(model)
        torch.manual_seed(1)  # the same adapter initialisation in every run
        add_lora(model, r=args.rank, alpha=2.0 * args.rank)
        params = list(lora_parameters(model))
        step_mb = peak_allocated_mb(lambda: model.loss(finetune[0].to(args.device)).backward(), args.device)
        model.zero_grad(set_to_none=True)
        losses = train(model, params, finetune, args.device, 1e-2)
        runs[name] = (weight_mb, sum(p.numel() for p in params), step_mb, losses)

    float_mb = runs["float32 base"][0]
    print(f"\n{'run':<18} {'weights MB':>10} {'vs float':>8} {'trainable':>9} {'step peak MB':>12} "
          f"{'loss first':>10} {'loss last':>9}")
    for name, (weight_mb, trainable, step_mb, losses) in runs.items():
        print(f"{name:<18} {weight_mb:>10.3f} {weight_mb / float_mb:>7.3f}x {trainable:>9} {step_mb:>12.1f} "
              f"{losses[0]:>10.4f} {losses[-1]:>9.4f}")
    print("weights: the attention and MLP projections (codes, scales and biases for 4-bit); step peak: memory "
          "allocated at the peak of one fine-tuning step's forward+backward")

    float_last = runs["float32 base"][3][-1]
    ok = True
    for name, (_, _, _, losses) in runs.items():
        learned = losses[-1] < 0.8 * losses[0]
        close = abs(losses[-1] - float_last) <= args.tolerance
        if not (learned and close):
            print(f"FAILED: {name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} (float run ends at {float_last:.4f})")
            ok = False
    print("OK: every base learned the new task, the 4-bit ones as well as the float one" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
