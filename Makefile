# The README's commands. Each does all set-up first (scripts/setup.sh).
PYTHON ?= python3

.PHONY: setup demo qlora test wheel bench mac-check

setup:
	bash scripts/setup.sh

# Main job: train a tiny Llama-style model with my_mps_ops and with plain PyTorch.
demo: setup
	$(PYTHON) demo/train_tiny_llama.py

# QLoRA-style fine-tuning: LoRA adapters on a 4-bit base next to a float one.
qlora: setup
	$(PYTHON) demo/finetune_qlora.py

# The whole test suite (cpu, Metal emulator; mps cases run on a Mac).
test: setup
	$(PYTHON) -m pytest test -q -ra

# sdist and wheel (dist/), the wheel installed into a fresh venv outside the
# checkout and tested there (scripts/test_wheel.sh; PROFILE=full: every test).
PROFILE ?= quick
wheel: setup
	bash scripts/test_wheel.sh $(PROFILE)

bench: setup
	$(PYTHON) benchmarks/bench_ops.py

# On a Mac: the whole suite on MPS under Metal's validation layers, the
# benchmark on mps and cpu, and one report file (mac_check_report.md).
mac-check: setup
	$(PYTHON) scripts/mac_check.py
