"""What the methods truly share: trainable-scope selection, frozen copies, concepts and their prompts,
and a fresh DDIM scheduler for ESD's partial trajectory (the trajectory itself is the family's).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch

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


def ddim_scheduler(model):
    """A fresh DDIM scheduler with the model's noise schedule (the model's own is left untouched)."""
    from pipelines.families.stable_diffusion import ddim_sampler

    return ddim_sampler(model.scheduler.config)


# --- a denoiser's repeated calls, compiled ----------------------------------------------------------

COMPILE_CHOICES = ("none", "cudagraphs", "reduce-overhead", "inductor", "aot_eager")
_CUDA_GRAPHS = ("cudagraphs", "reduce-overhead")


class StepDenoiser:
    """`family.denoise(unet, x_t, t, cond)` for the calls a training step repeats with the same shapes, compiled
    by torch.compile as `choice` says ("none": as is).

    A small model's step on a GPU is bound by kernel launches, not arithmetic. `cudagraphs` traces each shape's
    forward and backward once (seconds) and replays their kernels as one CUDA graph; that backend takes the
    weights for inputs, so each graph holds a copy of them and each replay refreshes it: for a small model only.
    `reduce-overhead` (inductor's fused kernels in CUDA graphs, weights in place) and `inductor` compile for
    minutes (on a CPU more than a digits run's calls win back, `benchmarks/compile_speed.py`); `aot_eager`
    traces without changing a kernel, the check that a family's denoiser compiles as one graph. `close()` when
    done: the graphs stay cached in the process otherwise, and a UNet on xformers stays on SDPA.
    """

    def __init__(self, family, unet, choice: str, device: torch.device):
        if choice not in COMPILE_CHOICES:
            raise InputError(f"unknown compile choice {choice!r}; choose one of: {', '.join(COMPILE_CHOICES)}")
        if choice in _CUDA_GRAPHS and device.type != "cuda":
            raise InputError(f"compile_unet={choice} needs a CUDA device (this run is on {device.type})")
        self.choice = choice

        def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return family.denoise(unet, x_t, t, cond)

        self._code, self._unet, self._processors = denoise.__code__, unet, None
        if choice == "none":
            self._call = denoise
            return
        self._processors = _attention_without_xformers(unet)  # xformers' kernels are opaque to the tracer
        how = {"mode": choice} if choice == "reduce-overhead" else {"backend": choice}
        self._call = torch.compile(denoise, fullgraph=True, dynamic=False, **how)
        self._skips_before = self._skips()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._call(x_t, t, cond)

    def new_step(self) -> None:
        """Declare every earlier call's outputs dead and its backward pass done. A CUDA graph's replay reuses its
        outputs' memory; without the mark a second call of a shape records a second graph beside the first."""
        if self.choice in _CUDA_GRAPHS:
            torch.compiler.cudagraph_mark_step_begin()

    def close(self) -> None:
        """Drop the compiled graphs and the CUDA graphs' memory. Every run's `denoise` shares one code object, so
        runs in one process (the preview, a benchmark) would add to one cache, which `fullgraph` turns into an
        error at its recompile limit (8); the trees' step marks would also reach other compiled models."""
        if self.choice == "none":
            return
        if self._processors is not None:  # the UNet's own attention back, for what the process does next
            self._unet.set_attn_processor(self._processors)
        torch._dynamo.reset_code(self._code)
        if self.choice in _CUDA_GRAPHS:
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()

    @staticmethod
    def _skips() -> int:
        from torch._dynamo.utils import counters

        return counters["inductor"]["cudagraph_skips"]

    def record(self) -> dict:
        """What `erasure.json` keeps of the compiling: the choice and, with CUDA graphs, how many of the graphs
        compiled in this process since the run began fell back to launching kernels one by one."""
        if self.choice not in _CUDA_GRAPHS:
            return {"choice": self.choice}
        return {"choice": self.choice, "cudagraph_skips": self._skips() - self._skips_before}


def _attention_without_xformers(unet) -> dict | None:
    """A UNet that the loader gave xformers' attention (the `gpu` extra) on PyTorch's SDPA instead, which is as fast
    and which the tracer sees through; returns the processors it had (None: nothing changed)."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        return None
    processors = unet.attn_processors
    if not any("XFormers" in type(processor).__name__ for processor in processors.values()):
        return None
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return processors
