"""Flash attention forward's projected fraction of FP16 peak, from the Metal emulator's counters.

    PYTHONPATH=. python benchmarks/flash_attention_projection.py [--chips "M1 Max,M4 Max"] [--scale 64]

PROJECTED, not measured (no Mac here): one forward launch per head dim (64, 128), causal and not, FP16,
batch 1, 4 q heads / 1 k/v head, seq 256, run on the emulator under my_mps_ops.emulator.profile(); its
counted bytes and simdgroup_matrix FLOPs, multiplied by --scale (more heads or batch: the work per head is
independent), go through the roofline model of my_mps_ops/emulator/projection.py. "counted" divides the
counted FLOPs by the projected time and the FP16 peak, "useful" the 4 B H L S D (halved when causal) an
attention needs. The model has no term for the softmax's ALU work, bank conflicts or occupancy: upper bounds.
"""

import argparse

import torch

import my_mps_ops
from my_mps_ops.emulator import profile
from my_mps_ops.emulator.projection import Model, find_chip
from my_mps_ops.testing import metal_emulation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chips", default="M1 Max,M4 Max")
    p.add_argument("--scale", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    models = [Model(find_chip(c)) for c in args.chips.split(",")]
    print(f"PROJECTED, not measured; scale x{args.scale}; " + "; ".join(m.describe() for m in models))
    print("| head dim | causal | counted / useful FLOPs | bytes / compulsory | coalescing | bank conflicts "
          "| threadgroup B | " + " | ".join(f"{m.chip.name}: counted, useful fraction of FP16 peak" for m in models) + " |")
    for d in (64, 128):
        for causal in (False, True):
            s = args.seq
            q = torch.randn(1, 4, s, d, dtype=torch.float16)
            k, v = torch.randn(1, 1, s, d, dtype=torch.float16), torch.randn(1, 1, s, d, dtype=torch.float16)
            with metal_emulation(), profile() as prof:
                my_mps_ops.flash_attention(q, k, v, causal=causal)
            (launch,) = prof.launches
            useful = 4.0 * q.numel() * s * (0.5 if causal else 1.0)
            cells = []
            for m in models:
                t = m.time(launch.bytes_moved * args.scale, launch.mma_flops * args.scale, 1, half=True)
                peak = m.peak(half=True)
                cells.append(f"{launch.mma_flops * args.scale / t / peak:.2f}, {useful * args.scale / t / peak:.2f}")
            print(f"| {d} | {causal} | {launch.mma_flops / useful:.2f} | {launch.bytes_ratio:.2f} | "
                  f"{100 * launch.coalescing:.0f}% | {launch.bank_conflicts} | {launch.threadgroup_memory_bytes} | "
                  + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
