"""Makes what examples/cpp/run_tiny_llama runs: an AOTInductor package of the
tiny Llama written with my_mps_ops ops (rms_norm, rotary_embedding_qk,
flash_attention, swiglu), and a reference: tokens and the eager model's logits.

    python examples/cpp/export_tiny_llama.py OUT_DIR     # OUT_DIR/tiny_llama.pt2, OUT_DIR/reference.pt
"""

import os
import sys

import torch

import my_mps_ops  # noqa: F401  registers the ops the export records
from my_mps_ops.models import TinyLlama, TinyLlamaConfig

CFG = TinyLlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=128, max_seq_len=64)


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    model = TinyLlama(CFG, use_my_ops=True).eval()
    tokens = torch.randint(0, CFG.vocab_size, (3, 17))
    exported = torch.export.export(model, (tokens,), dynamic_shapes={"tokens": {0: torch.export.Dim("batch", max=64)}})
    ops = sorted({str(n.target) for n in exported.graph.nodes if str(n.target).startswith("my_mps_ops.")})
    package = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(out_dir, "tiny_llama.pt2"))
    with torch.no_grad():
        logits = model(tokens)
    torch.save({"tokens": tokens, "logits": logits, "atol": 1e-5, "rtol": 1e-5}, os.path.join(out_dir, "reference.pt"))
    print(f"{package}: calls {', '.join(ops)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/cpp")
