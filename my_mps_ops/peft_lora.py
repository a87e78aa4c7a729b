"""PEFT's LoRA on my_mps_ops QuantizedLinear modules (imported only when
``peft`` is): a LoRA layer type following PEFT's conventions for layers over
a frozen quantized weight (PEFT's own adapters, dropout, scaling and adapter
switching; no merging, which would need the weight re-quantized), registered
through ``LoraConfig._register_custom_module``."""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer

from .nn import QuantizedLinear


class QuantizedLoraLinear(torch.nn.Module, LoraLayer):
    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1,
                 **kwargs) -> None:
        if config.use_dora:
            raise ValueError("my_mps_ops QuantizedLinear: PEFT's DoRA is not supported, set use_dora=False")
        super().__init__()
        with warnings.catch_warnings():
            # PEFT warns about a layer type it does not know; this class is what handles it.
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            update = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise AttributeError("my_mps_ops QuantizedLinear: merging a LoRA adapter into a quantized weight is not "
                             "supported (it would need the weight re-quantized)")

    def unmerge(self) -> None:
        raise AttributeError("my_mps_ops QuantizedLinear: LoRA adapters are never merged into it")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def lora_config(**kwargs) -> LoraConfig:
    config = LoraConfig(**kwargs)
    config._register_custom_module({QuantizedLinear: QuantizedLoraLinear})
    return config
