"""my_mps_ops: fused PyTorch operators for Apple GPUs (MPS).

Importing the package loads the native library, which registers the
operators under ``torch.ops.my_mps_ops``. The functions here are thin
wrappers; ``my_mps_ops.nn`` has drop-in modules.
"""

import torch  # noqa: F401  (the native library links against torch)

from . import _C  # noqa: F401  registers torch.ops.my_mps_ops.*
from .ops import (cross_entropy, flash_attention, flash_attention_decode, flash_attention_varlen,
                  fused_add_rms_norm, geglu, layer_norm, linear_cross_entropy, quantized_linear, rms_norm,
                  rotary_embedding, rotary_embedding_qk, swiglu)
from . import nn
from .nn import quantize_model
from .quantization import dequantize, quantize
from .patch import patch_model
from ._info import info
from ._version import __version__

__all__ = ["rms_norm", "fused_add_rms_norm", "layer_norm", "swiglu", "geglu", "cross_entropy", "linear_cross_entropy",
           "flash_attention", "flash_attention_decode", "flash_attention_varlen",
           "rotary_embedding", "rotary_embedding_qk",
           "quantize", "dequantize", "quantized_linear", "quantize_model", "nn", "patch_model", "info", "__version__"]
