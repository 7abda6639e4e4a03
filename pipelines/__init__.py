"""Generative-model backends: resolve a model name, load it, generate, swap parts, save.

Importing this package is cheap; torch and diffusers load when a model does.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from .errors import InputError
from .loading import ModelSource, resolve

if TYPE_CHECKING:
    import torch

    from .diffusion import TextToImageModel
    from .gan import GANModel

__all__ = ["InputError", "ModelSource", "resolve", "load_model"]

log = logging.getLogger(__name__)

# Held while a model loads (and by erasure's `erase` and `evaluate` for their whole call): diffusers builds modules on
# the meta device by patching torch for the whole process, which would empty a module another thread builds meanwhile.
MODEL_WORK = threading.RLock()


def load_model(
    spec: str | os.PathLike | ModelSource,
    device: str = "auto",
    single_file_config: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> TextToImageModel | GANModel:
    """Load any supported model (name, path, Hub id or ModelSource) as its backend, on `device` (auto: CUDA when
    there is one, as `erase` and `evaluate` choose); `dtype` (a torch dtype, default float32) is that of a
    diffusion model's weights (a GAN's stay float32)."""
    import torch

    from .devices import resolve_device

    device = resolve_device(device)
    source = spec if isinstance(spec, ModelSource) else resolve(spec)
    with MODEL_WORK:
        return _load(source, device, single_file_config, dtype or torch.float32)


def _load(source: ModelSource, device: str, single_file_config, dtype):
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
