"""What several methods share: trainable-scope selection, frozen copies, concepts and their prompts, the attack on
adversarial word embeddings (AdvUnlearn, STEREO) and the denoising loss of real images (few-shot erasing, STEREO).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipelines.errors import InputError

# --- trainable scopes -------------------------------------------------------------------------

TEXT_ENCODER_SCOPES = "full | attn | mlp | layers=i..j, each also after one encoder's name: text_encoder_2:attn"
UNET_SCOPES = "xattn | noxattn | attn | full"
# A block of a CLIP text encoder (`encoder.layers.i.`: `self_attn`, `mlp`) or of T5's (FLUX's second encoder,
# `encoder.block.i.`: `SelfAttention`, `DenseReluDense`).
_LAYER = re.compile(r"encoder\.(?:layers|block)\.(\d+)\.")
_ATTENTION = (".self_attn.", ".SelfAttention.")
_MLP = (".mlp.", ".DenseReluDense.")


def _text_encoder_rule(scope: str):
    if scope == "full":  # every transformer block and the final LayerNorm; embeddings stay frozen
        return lambda n: bool(_LAYER.search(n)) or "final_layer_norm" in n
    if scope == "attn":
        return lambda n: bool(_LAYER.search(n)) and any(a in n for a in _ATTENTION)
    if scope == "mlp":
        return lambda n: bool(_LAYER.search(n)) and any(m in n for m in _MLP)
    if scope == "mlp+last-attn":  # few-shot erasing's choice: every MLP and the last block's attention
        return None
    match = re.fullmatch(r"layers=(\d+)(?:\.\.|-)(\d+)", scope)
    if match:
        lo, hi = int(match.group(1)), int(match.group(2))
        return lambda n: (m := _LAYER.search(n)) is not None and lo <= int(m.group(1)) <= hi
    raise InputError(f"unknown text-encoder scope {scope!r}; choose one of: {TEXT_ENCODER_SCOPES}")


def _unet_rule(scope: str):
    if scope == "xattn":  # ESD-x: cross-attention only
        return lambda n: ".attn2." in n
    if scope == "noxattn":  # ESD-u: all but cross-attention (and, as in ESD, not the time embedding/output)
        return lambda n: ".attn2." not in n and not n.startswith(("time_embedding", "conv_out", "conv_norm_out"))
    if scope == "attn":  # every attention layer (a UNet's self- and cross-attention; FLUX's joint attention)
        return lambda n: ".attn" in n
    if scope == "full":
        return lambda n: True
    raise InputError(f"unknown UNet scope {scope!r}; choose one of: {UNET_SCOPES}")


def split_encoder_scope(scope: str) -> tuple[str | None, str]:
    """`text_encoder_2:attn` -> ("text_encoder_2", "attn"): a text-encoder scope may name one encoder of a
    family that has several (SDXL); without a name it spans all of them."""
    if ":" in scope:
        name, rest = scope.split(":", 1)
        return name, rest
    return None, scope


def select_trainable(module: torch.nn.Module, component: str, scope: str) -> int:
    """Freeze `module` except the parameters in `scope`; returns how many parameters train. A text tower of
    several encoders (`named_encoders()`) applies the scope to each encoder it names (all, by default)."""
    if component != "unet":
        chosen, inner = split_encoder_scope(scope)
        parts = module.named_encoders() if hasattr(module, "named_encoders") else {"text_encoder": module}
        if chosen is not None and chosen not in parts:
            raise InputError(f"scope names {chosen!r}; this model's text encoders are: {', '.join(parts)}")
        # Weights that never reach the UNet (SDXL: the first encoder's last block) neither train nor count as
        # an encoder's "last" block.
        inert = {id(p) for p in (module.inert_parameters() if hasattr(module, "inert_parameters") else ())}
        module.requires_grad_(False)
        count = sum(_select(part, component, inner, inert) for name, part in parts.items() if chosen in (None, name))
    else:
        count = _select(module, component, scope)
    if count == 0:
        raise InputError(f"scope {scope!r} selects no parameter of the {component}")
    return count


def _select(module: torch.nn.Module, component: str, scope: str, inert: set[int] = frozenset()) -> int:
    rule = _unet_rule(scope) if component == "unet" else _text_encoder_rule(scope)
    if rule is None:
        named = module.named_parameters()
        layers = [int(m.group(1)) for n, p in named if (m := _LAYER.search(n)) and id(p) not in inert]
        last = max(layers, default=-1)

        def rule(name: str) -> bool:
            layer = _LAYER.search(name)
            return layer is not None and (any(m in name for m in _MLP) or
                                          (any(a in name for a in _ATTENTION) and int(layer.group(1)) == last))

    count = 0
    for name, param in module.named_parameters():
        param.requires_grad_(rule(name) and id(param) not in inert)
        count += param.numel() if param.requires_grad else 0
    return count


def validate_scope(component: str, scope: str) -> None:
    """Raise InputError for a scope that can never be valid (checked before any loading)."""
    if component == "unet":
        _unet_rule(scope)
    else:
        _text_encoder_rule(split_encoder_scope(scope)[1])


def check_encoder_scope(family, scope: str) -> None:
    """Refuse, before loading, a scope that names a text encoder `family`'s models do not have."""
    chosen, _ = split_encoder_scope(scope)
    if chosen is not None and chosen not in family.text_encoder_names:
        raise InputError(f"scope {scope!r} names {chosen!r}; {family.name} models have: "
                         f"{', '.join(family.text_encoder_names)}")  # fmt: skip


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with gradients off: the 'original model' of a loss."""
    clone = copy.deepcopy(module).eval()
    clone.requires_grad_(False)
    return clone


# --- concepts and prompts ----------------------------------------------------------------------


def check_concepts(concepts: str | Sequence[str]) -> list[str]:
    """The concepts stripped, or InputError; one string is one concept (from Python, not its letters)."""
    if isinstance(concepts, str):
        concepts = [concepts]
    if not all(isinstance(c, str) for c in concepts):
        raise InputError(f"concepts must be strings, not {concepts!r}")
    cleaned = [c.strip() for c in concepts]
    if not cleaned or any(not c for c in cleaned):
        raise InputError("a concept is empty; pass --concept TEXT")
    twice = next((c for i, c in enumerate(cleaned) if c in cleaned[:i]), None)
    if twice is not None:  # it would weigh double in the losses and fill the report twice
        raise InputError(f"the concept {twice!r} is given twice")
    return cleaned


def concept_prompts(concepts: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every concept ("{}" is the concept itself)."""
    return [t.format(c) for c in concepts for t in templates]


# --- ESD's objective (ESD, AdvUnlearn, STEREO) ---------------------------------------------------


def esd_target(eps_empty: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """Negative guidance: eps*(c0) - eta * (eps*(c) - eps*(c0)) - the prediction to move towards."""
    return eps_empty - eta * (eps_concept - eps_empty)


# --- adversarial word embeddings (AdvUnlearn, STEREO) -------------------------------------------

FAST_AT_STEP_TO_RADIUS = 1.25  # Wong, Rice & Kolter 2020: step alpha = 1.25 epsilon after a uniform start


def fast_at_start(adv: torch.Tensor, lr: float) -> torch.Tensor:
    """Fast AT's random start: a uniform point within lr / 1.25 of `adv`."""
    radius = lr / FAST_AT_STEP_TO_RADIUS
    return adv + torch.empty_like(adv).uniform_(-radius, radius)


def attack_embeddings(loss_of: callable, adv: torch.Tensor, mode: str, steps: int, lr: float) -> torch.Tensor:
    """Minimise `loss_of(adv)` over the adversarial embeddings only; returns the new `adv` (detached).
    fast-at takes one sign step from `adv` (give it `fast_at_start(...)` for the random start)."""
    adv = adv.detach().clone()
    if mode == "fast-at":
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(adv), adv)
        return (adv - lr * grad.sign()).detach()
    adv.requires_grad_(True)
    optimizer = torch.optim.Adam([adv], lr=lr)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(loss_of(adv), adv)
        adv.grad = grad
        optimizer.step()
    return adv.detach()


# --- the denoising loss on real images (few-shot erasing, STEREO) ----------------------------------


def denoising_loss(model, latents: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   unet=None) -> torch.Tensor:  # fmt: skip
    """The ordinary denoising loss of `latents` under conditioning `cond` for `unet` (default: the model's;
    eps- or v-prediction, as the model's scheduler says; FLUX: the flow's velocity)."""
    noisy, target = model.family.noised(model, latents, noise, t)
    return F.mse_loss(model.family.denoise(unet if unet is not None else model.unet, noisy, t, cond), target)
