"""Fused linear cross-entropy for Hugging Face causal LMs (patch_model's
``linear_cross_entropy`` switch): in training mode with ``labels``, the loss
comes from the last hidden states and ``lm_head``'s weight through
my_mps_ops.linear_cross_entropy, and the [batch, seq, vocab] logits are never
computed (the output's ``logits`` is None). In eval mode, or without labels,
the model runs as before.

How, without rewriting each family's forward: for the call, ``lm_head`` is
stood in for by a module that returns its input (the hidden states it would
have projected) and ``loss_function`` by one that projects and reduces them
with our op, with transformers' ForCausalLMLoss semantics (labels shifted by
one, ``ignore_index``, ``num_items_in_batch``, ``shift_labels``). A forward
that touches the logits between the head and the loss (a scale; Gemma 2's
final softcapping is handled through the op's ``logit_softcap``) or computes
its loss some other way is detected: patch_model's probe compares the loss
with the unpatched model's and leaves such models alone.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops import linear_cross_entropy

_SOFTCAP_ATTR = "final_logit_softcapping"


class _HiddenStatesHead(nn.Module):
    """lm_head's stand-in during a fused-loss forward: passes the hidden states
    through and remembers the tensor it returned."""

    def __init__(self):
        super().__init__()
        self.returned = None

    def forward(self, hidden_states):
        self.returned = hidden_states
        return hidden_states


class FusedLossNotApplicable(RuntimeError):
    """The model's forward did not hand the head's output to its loss_function unchanged."""


def _head_name(model: nn.Module, head: nn.Module) -> Optional[str]:
    for name, child in model.named_children():
        if child is head:
            return name
    return None


def _fused_loss(model, head: nn.Linear, stand_in: _HiddenStatesHead, softcap):
    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        if logits is not stand_in.returned:
            raise FusedLossNotApplicable("the forward changed lm_head's output before its loss")
        if shift_labels is None:
            labels = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        hidden = logits.reshape(-1, logits.shape[-1])
        target = shift_labels.reshape(-1).to(hidden.device)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = linear_cross_entropy(hidden, head.weight, target, head.bias, ignore_index, 0.0, reduction, softcap)
        if reduction == "sum":
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss
    return loss_function


def fused_loss_forward(model: nn.Module, *args, **kwargs):
    """model(*args, **kwargs) with the loss fused (labels must be given): the
    output's logits is None. Raises FusedLossNotApplicable when the forward
    does not pass lm_head's output to loss_function unchanged."""
    head = model.get_output_embeddings()
    name = _head_name(model, head)
    if not isinstance(head, nn.Linear) or name is None:
        raise FusedLossNotApplicable("the output embedding is not an nn.Linear child of the model")
    config = getattr(model, "config", None)
    softcap = getattr(config, _SOFTCAP_ATTR, None)
    stand_in = _HiddenStatesHead()
    had_loss = "_loss_function" in vars(model)
    previous_loss = vars(model).get("_loss_function")
    called = []

    base_loss = _fused_loss(model, head, stand_in, softcap)

    def loss_function(*a, **k):
        called.append(True)
        return base_loss(*a, **k)

    try:
        model._modules[name] = stand_in
        model.loss_function = loss_function
        if softcap is not None:
            # The op applies it, from the hidden states. object.__setattr__:
            # some configs validate the field's type on assignment.
            object.__setattr__(config, _SOFTCAP_ATTR, None)
        out = _original_forward(model)(*args, **kwargs)
    finally:
        model._modules[name] = head
        if had_loss:
            model._loss_function = previous_loss
        else:
            vars(model).pop("_loss_function", None)
        if softcap is not None:
            object.__setattr__(config, _SOFTCAP_ATTR, softcap)
    if not called:
        raise FusedLossNotApplicable("the forward did not call loss_function")
    if isinstance(out, tuple):
        return (out[0], None) + tuple(out[2:])
    out.logits = None
    return out


def _original_forward(model):
    return vars(model).get("_my_mps_ops_forward", model.forward)


def _patched_forward(model, *args, labels=None, **kwargs):
    if labels is None or not model.training:
        return _original_forward(model)(*args, labels=labels, **kwargs)
    return fused_loss_forward(model, *args, labels=labels, **kwargs)


def probe_mismatch(model: nn.Module) -> Optional[str]:
    """None if the fused loss equals the model's own on a probe batch (eval
    mode, so that dropout does not differ), else why not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or _head_name(model, head) is None:
        return "no nn.Linear lm_head among the model's children"
    if not hasattr(model, "loss_function"):
        return "not a transformers model (no loss_function)"
    vocab = head.out_features
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(min(3, vocab - 1), vocab, (2, 6), generator=gen).to(head.weight.device)
    labels = tokens.clone()
    labels[0, :2] = -100
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            ref = _original_forward(model)(input_ids=tokens, labels=labels, use_cache=False).loss
            ours = fused_loss_forward(model, input_ids=tokens, labels=labels, use_cache=False).loss
    except FusedLossNotApplicable as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot reproduce"
        return f"probe failed: {type(e).__name__}: {e}"
    finally:
        for m, flag in zip(model.modules(), flags):
            m.training = flag
    if ref is None or ours is None:
        return "the model returned no loss for labels"
    dtype = head.weight.dtype
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(ours.double(), ref.double(), rtol=tol, atol=tol):
        return f"loss {ours.item():.6g} differs from the model's {ref.item():.6g}"
    return None


def enable(model: nn.Module) -> None:
    """Routes model.forward through the fused loss (in place; idempotent)."""
    if "_my_mps_ops_forward" in vars(model):
        return
    model._my_mps_ops_forward = model.forward
    model.forward = functools.partial(_patched_forward, model)
