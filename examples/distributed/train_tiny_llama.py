"""Data-parallel training of the tiny Llama with my_mps_ops ops, on PyTorch's
own engine: DDP or FSDP2 (``fully_shard``), optionally with activation
checkpointing around each block. gloo, so it runs on CPUs (and Macs).

    torchrun --standalone --nproc-per-node 2 examples/distributed/train_tiny_llama.py --parallel ddp
    torchrun --standalone --nproc-per-node 2 examples/distributed/train_tiny_llama.py --parallel fsdp2 --checkpoint
    python examples/distributed/train_tiny_llama.py        # one process, the whole batch: the reference

Every rank takes its slice of the same global batch each step; the losses
printed (averaged over ranks) and the trained weights equal a single-process
run on the whole batch (test/integration/test_distributed.py checks this,
gradients included). ``--out FILE`` saves losses, gradients and weights.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import my_mps_ops
from my_mps_ops.models import TinyLlama, TinyLlamaConfig

CFG = TinyLlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=128, max_seq_len=32)


def build_model(kind: str, checkpoint: bool) -> torch.nn.Module:
    """`fused`: TinyLlama on my_mps_ops (rms_norm, rotary, flash_attention,
    swiglu, cross_entropy); `patched`: plain PyTorch TinyLlama after
    my_mps_ops.patch_model (fused RMSNorm and SwiGLU MLPs). Same weights on
    every rank (seeded)."""
    torch.manual_seed(0)
    model = TinyLlama(CFG, use_my_ops=(kind == "fused"), activation_checkpointing=checkpoint)
    if kind == "patched":
        my_mps_ops.patch_model(model, strict=True)
    return model


def batches(steps: int, global_batch: int, seq: int):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, CFG.vocab_size, (global_batch, seq + 1), generator=g) for _ in range(steps)]


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters and gradients are DTensors sharded over the ranks.
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(parallel: str = "none", kind: str = "fused", checkpoint: bool = False, steps: int = 3,
          global_batch: int = 4, seq: int = 16, lr: float = 0.05) -> dict:
    """Runs `steps` SGD steps; returns {"losses", "grads" (per step), "params"}
    as full tensors (on every rank). parallel: none (this process alone takes
    the whole batch), ddp or fsdp2 (in an initialised process group)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if parallel != "none" else (0, 1)
    assert global_batch % world == 0, "the global batch must split evenly over the ranks"
    model = build_model(kind, checkpoint)
    names = [n for n, _ in model.named_parameters()]
    if parallel == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = model
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    local = global_batch // world
    losses, grads = [], []
    for tokens in batches(steps, global_batch, seq):
        tokens = tokens[rank * local:(rank + 1) * local]
        # The model's loss on this rank's rows, through the wrapper's forward
        # (DDP's hooks and FSDP2's all-gathers run around forward and backward).
        logits = wrapped(tokens[:, :-1])
        flat, target = logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        loss = my_mps_ops.cross_entropy(flat, target) if kind == "fused" else \
            torch.nn.functional.cross_entropy(flat, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP and FSDP2 average the gradients over the ranks
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        losses.append(mean_loss.item())
        grads.append({n: _full(p.grad) for n, p in zip(names, model.parameters())})
        opt.step()
    params = {n: _full(p) for n, p in zip(names, model.parameters())}
    return {"losses": losses, "grads": grads, "params": params}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parallel", choices=["ddp", "fsdp2"], default="ddp",
                   help="under torchrun; run alone, the script trains in one process")
    p.add_argument("--model", choices=["fused", "patched"], default="fused")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing around each block")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--out", help="save losses, gradients and weights here (rank 0)")
    p.add_argument("--matrix", nargs="+", metavar="PARALLEL:MODEL[:checkpoint]",
                   help="several runs in one launch (the test's), saved under their names")
    args = p.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)  # two ranks on two cores
    runs = args.matrix or [f"{args.parallel}:{args.model}{':checkpoint' if args.checkpoint else ''}"]
    results = {}
    for run in runs:
        parallel, kind, *flags = run.split(":")
        results[run] = train(parallel if distributed else "none", kind, "checkpoint" in flags, args.steps,
                             args.global_batch)
        if not distributed or dist.get_rank() == 0:
            world = dist.get_world_size() if distributed else 1
            print(f"{run} on {world} process(es): losses " + " ".join(f"{v:.6f}" for v in results[run]["losses"]))
    if args.out and (not distributed or dist.get_rank() == 0):
        torch.save(results if args.matrix else results[runs[0]], args.out)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
