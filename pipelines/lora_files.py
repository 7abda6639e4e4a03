"""A run saved as LoRA adapters alone (`erase --save lora`): the base model's pipeline with the adapters of the
run's `pytorch_lora_weights.safetensors` (the standard diffusers LoRA file) merged into its weights."""

from __future__ import annotations

from pathlib import Path

LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "erasure"


def apply_lora_file(pipe, folder: str | Path) -> None:
    """Load the run folder's adapters into `pipe` with diffusers' own loader and merge them into the weights."""
    from .logs import quiet_libraries

    with quiet_libraries():
        pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name=ADAPTER)
        pipe.fuse_lora(adapter_names=[ADAPTER])
        pipe.unload_lora_weights()
