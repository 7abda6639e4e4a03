"""Generative-model backends: resolve a model name, load it, generate, swap parts, save.

Importing this package is cheap; torch and diffusers load when a model does.
"""

from __future__ import annotations

import logging

from .errors import InputError
from .loading import ModelSource, resolve

__all__ = ["InputError", "ModelSource", "resolve", "load_model"]

log = logging.getLogger(__name__)


def load_model(spec, device: str = "cpu", single_file_config=None, dtype=None):
    """Load any supported model (name, path, Hub id or ModelSource) as its backend; `dtype` (a torch dtype,
    default float32) is that of a diffusion model's weights (a GAN's stay float32)."""
    import torch

    source = spec if isinstance(spec, ModelSource) else resolve(spec)
    dtype = dtype or torch.float32
    log.info("loading model %s (%s, %s, %s)", source.spec, source.kind, source.origin, dtype)
    if source.kind == "text-to-image":
        from .diffusion import load_text_to_image

        return load_text_to_image(source, device=device, dtype=dtype, single_file_config=single_file_config)
    if source.kind == "one-step":
        from .diffusion import load_one_step

        return load_one_step(source, device=device, dtype=dtype)
    if source.kind == "gan":
        from .gan import load_gan

        return load_gan(source, device=device)
    raise InputError(f"{source.spec}: loading {source.kind} models is not available in this version")
