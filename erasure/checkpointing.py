"""Gradient checkpointing that survives switches.

A method that queries one network in several roles flips switches between the queries: SFD's teacher is
its generator with the LoRA adapters off, and its fake score is queried with its weights frozen. A
checkpointed block is recomputed during the backward pass, after the switches were flipped back, and
recomputed differently (other adapters, other tensors kept for the weights' gradients). The checkpointing
function here records each block's switches when its forward pass runs and sets them again, for that
block alone, while it is recomputed: the backward pass then sees what the forward pass computed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint


def _switches(block: torch.nn.Module) -> tuple[list, list]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = [(layer, layer.disable_adapters) for layer in block.modules() if isinstance(layer, BaseTunerLayer)]
    grads = [(param, param.requires_grad) for param in block.parameters()]
    return adapters, grads


def _set(switches: tuple[list, list]) -> None:
    adapters, grads = switches
    for layer, disabled in adapters:
        layer.enable_adapters(not disabled)
    for param, flag in grads:  # after the adapters: switching them also sets their parameters' flags
        param.requires_grad_(flag)


@contextlib.contextmanager
def _as_recorded(block: torch.nn.Module, recorded: tuple[list, list]):
    now = _switches(block)
    _set(recorded)
    try:
        yield
    finally:
        _set(now)


def checkpoint_with_switches(block: torch.nn.Module, *args):
    """For `ModelMixin.enable_gradient_checkpointing(gradient_checkpointing_func=...)`: `block` checkpointed,
    recomputed under the adapters and gradient flags it ran with."""
    recorded = _switches(block)
    return torch.utils.checkpoint.checkpoint(
        block.__call__, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _as_recorded(block, recorded)),
    )  # fmt: skip
