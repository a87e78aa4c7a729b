"""The main job: train a tiny Llama-style model with my_mps_ops ops and with
plain PyTorch, from the same weights and data, and compare.

Runs on mps when available, else cpu. Prints loss agreement, tokens/s and peak
memory, and writes demo_output/tiny_llama.png (loss curves and step times).
Exits non-zero if the two runs disagree or the loss did not go down.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time

import torch

import my_mps_ops
from my_mps_ops.memory import peak_allocated_mb
from my_mps_ops.models import TinyLlama, TinyLlamaConfig


def synthetic_batches(cfg: TinyLlamaConfig, batch: int, seq: int, steps: int, seed: int = 0, a: int = 5, b: int = 3):
    """Sequences from a fixed noisy affine recurrence t -> a t + b (mod vocabulary): learnable, made on the fly."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
        for t in range(seq):
            noise = (torch.rand(batch, generator=g) < 0.1) * torch.randint(0, cfg.vocab_size, (batch,), generator=g)
            tokens[:, t + 1] = (a * tokens[:, t] + b + noise) % cfg.vocab_size
        yield tokens


def progress(iterable, total, desc):
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False)
    except ImportError:
        return iterable


def peak_memory_mb(device: str) -> str:
    if device == "mps":
        return f"{torch.mps.driver_allocated_memory() / 2**20:.0f} MB (mps driver)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (process max RSS)"


def step_peak_memory_mb(model, tokens, device) -> float:
    """Memory allocated at the peak of one forward + backward of model.loss,
    above what existed before (my_mps_ops.memory.peak_allocated_mb)."""
    model.zero_grad(set_to_none=True)
    peak = peak_allocated_mb(lambda: model.loss(tokens).backward(), device)
    model.zero_grad(set_to_none=True)
    return peak


def loss_memory_report(cfg: TinyLlamaConfig, tokens: int, vocab: int, device: str) -> str:
    """Peak memory of the loss alone (lm_head + cross-entropy, forward and
    backward) at a real vocabulary size: logits materialised vs
    linear_cross_entropy."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, cfg.dim, generator=g).to(device).requires_grad_()
    weight = (0.02 * torch.randn(vocab, cfg.dim, generator=g)).to(device).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=g).to(device)

    class Head(torch.nn.Module):
        def __init__(self, fused):
            super().__init__()
            self.fused = fused

        def loss(self, _):
            if self.fused:
                return my_mps_ops.linear_cross_entropy(hidden, weight, target)
            return torch.nn.functional.cross_entropy(hidden @ weight.T, target)

        def zero_grad(self, set_to_none=True):
            hidden.grad = weight.grad = None

    plain, fused = (step_peak_memory_mb(Head(f), None, device) for f in (False, True))
    return (f"loss head alone at vocabulary {vocab} ({tokens} tokens x {cfg.dim}, float32, forward+backward): "
            f"logits + F.cross_entropy {plain:.0f} MB, linear_cross_entropy {fused:.0f} MB "
            f"({plain / max(fused, 1e-9):.1f}x less)")


def train(model, batches, device, lr, desc):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, times = [], []
    for tokens in progress(batches, len(batches), desc):
        tokens = tokens.to(device)
        start = time.perf_counter()
        loss = model.loss(tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "mps":
            torch.mps.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="mps" if torch.backends.mps.is_available() else "cpu")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--memory-vocab", type=int, default=128256, help="vocabulary of the loss-memory comparison")
    p.add_argument("--tolerance", type=float, default=2e-2, help="max |loss difference| allowed between the runs")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    cfg = TinyLlamaConfig()
    batches = list(synthetic_batches(cfg, args.batch, args.seq, args.steps))
    reference = TinyLlama(cfg, use_my_ops=False).to(args.device)
    ours = TinyLlama(cfg, use_my_ops=True).to(args.device)
    ours.load_state_dict(copy.deepcopy(reference.state_dict()))

    print(f"tiny Llama: {sum(p.numel() for p in ours.parameters()) / 1e6:.2f} M parameters, {args.steps} steps of "
          f"{args.batch}x{args.seq} tokens on {args.device} (my_mps_ops {my_mps_ops.__version__}, torch {torch.__version__})")
    results = {}
    for name, model in (("plain PyTorch", reference), ("my_mps_ops", ours)):
        losses, times = train(model, batches, args.device, args.lr, name)
        steady = times[len(times) // 4:] or times
        tokens_per_s = args.batch * args.seq / (sum(steady) / len(steady))
        results[name] = (losses, times, tokens_per_s, peak_memory_mb(args.device))

    step_memory = {name: step_peak_memory_mb(model, batches[0].to(args.device), args.device)
                   for name, model in (("plain PyTorch", reference), ("my_mps_ops", ours))}
    print(f"\n{'run':<14} {'loss first':>10} {'loss last':>10} {'tokens/s':>10} {'step peak':>10}  process peak")
    for name, (losses, times, tps, mem) in results.items():
        print(f"{name:<14} {losses[0]:>10.4f} {losses[-1]:>10.4f} {tps:>10.0f} {step_memory[name]:>7.1f} MB  {mem}")
    print("step peak: memory allocated at the peak of one training step's forward+backward (my_mps_ops takes the "
          "loss with linear_cross_entropy: no logits)")
    print(loss_memory_report(cfg, args.batch * args.seq, args.memory_vocab, args.device))
    ref_losses, our_losses = results["plain PyTorch"][0], results["my_mps_ops"][0]
    max_diff = max(abs(a - b) for a, b in zip(ref_losses, our_losses))
    print(f"max |loss difference| over {args.steps} steps: {max_diff:.2e} (tolerance {args.tolerance:g})")
    print("note: process peak is the process's high-water mark after both runs on cpu; it is not per run.")

    os.makedirs(args.out, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for name, (losses, times, _, _) in results.items():
            ax1.plot(losses, label=name)
            ax2.plot([t * 1000 for t in times], label=name)
        ax1.set(title="training loss", xlabel="step", ylabel="cross-entropy")
        ax2.set(title=f"step time on {args.device}", xlabel="step", ylabel="ms")
        ax1.legend()
        ax2.legend()
        fig.tight_layout()
        path = os.path.join(args.out, "tiny_llama.png")
        fig.savefig(path, dpi=100)
        print(f"wrote {path}")
    except ImportError:
        print("matplotlib not installed: no plot written")

    ok = max_diff <= args.tolerance and our_losses[-1] < our_losses[0] * 0.8
    print("OK: the runs agree and the loss went down" if ok else "FAILED: runs disagree or the loss did not go down")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
