"""Model families: one object per family says everything that differs between models (see base.py).

Adding a family is adding a module with a `Family` subclass, a line in `FAMILIES`, and, when its
models can be recognised from their files, a rule in `detect`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .base import Family, PromptSet
from .digits import Digits
from .flux import Flux
from .sdxl import SDXL
from .stable_diffusion import SD1, SD2, StableDiffusionFamily
from .stylegan2 import StyleGAN2

FAMILIES: dict[str, Family] = {}
for _family in (Digits(), SD1(), SD2(), SDXL(), Flux(), StyleGAN2()):
    if _family.name in FAMILIES:
        raise RuntimeError(f"family {_family.name!r} registered twice")
    FAMILIES[_family.name] = _family

# Names that runs recorded before the families had their own (erasure.json's base_model.family).
RENAMED = {"sd": "sd1"}


def get_family(name: str | Family) -> Family:
    """The family of a name (a family passes through)."""
    if isinstance(name, Family):
        return name
    name = RENAMED.get(name, name)
    if name not in FAMILIES:
        raise InputError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect(kind: str, path: Path, declared: str | None = None) -> Family:
    """The family of a model of `kind` at `path`: the one its card declares, else what its files say.

    SDXL has a second text encoder (single files: the `conditioner.embedders.` of its two); Stable
    Diffusion 2.x is told from 1.x by its OpenCLIP text tower (GELU, where OpenAI's CLIP uses
    quick-GELU; 1024-wide cross-attention at full size); a single file, by its OpenCLIP weight names.
    """
    if declared:
        return get_family(declared)
    if kind == "gan":
        return FAMILIES["stylegan2"]
    if path.is_dir():
        if (path / "transformer").is_dir() and _json(path / "model_index.json").get("_class_name") == "FluxPipeline":
            return FAMILIES["flux"]
        if (path / "text_encoder_2").is_dir():
            return FAMILIES["sdxl"]
        text = _json(path / "text_encoder" / "config.json")
        unet = _json(path / "unet" / "config.json")
        openclip = text.get("hidden_act") == "gelu" or unet.get("cross_attention_dim") == 1024
        return FAMILIES["sd2" if openclip else "sd1"]
    if path.suffix in (".safetensors", ".ckpt"):
        try:
            keys = _single_file_keys(path)
        except Exception:  # a damaged file: loading it says so, with the file's name
            keys = []
        if any(key.startswith("conditioner.embedders.") for key in keys):
            return FAMILIES["sdxl"]
        if any(key.startswith("cond_stage_model.model.") for key in keys):
            return FAMILIES["sd2"]
    return FAMILIES["sd1"]


def _single_file_keys(path: Path) -> list[str]:
    """The weight names of a single-file checkpoint, read without running any code from it and, where the format
    allows (safetensors; a `.ckpt` in torch's zip format, memory-mapped), without reading its tensors."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    import torch

    from ..safe_load import check_torch_file

    check_torch_file(path, str(path))  # compressed entries would be inflated before anything is read
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # torch's legacy (pre-zip) format cannot be mapped: read it whole
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    weights = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    return [key for key in weights if isinstance(key, str)] if isinstance(weights, dict) else []


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


__all__ = ["FAMILIES", "Family", "PromptSet", "StableDiffusionFamily", "detect", "get_family"]
