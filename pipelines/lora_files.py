"""A run's diffusers LoRA file (`pytorch_lora_weights.safetensors`) applied to the base model's pipeline and merged
into its weights: a `--save lora` run, a LoRA run at a chosen strength, stacked erasures, a one-step run's adapters."""

from __future__ import annotations

from pathlib import Path

LORA_FILE = "pytorch_lora_weights.safetensors"
# Beyond the widths of the models' layers (SD's 1280, FLUX's 3072 attention) a rank only pads every layer with
# zeros, and its adapters' memory grows with it: a typo such as 100000 would exhaust the machine's memory.
MAX_LORA_RANK = 1024
LORA_FORMATS = ("diffusers", "kohya")  # export's --lora-format: diffusers' file, and also the kohya / sd-scripts one
ADAPTER = "erasure"


def apply_lora_files(pipe, folders: list[str | Path], strengths: list[float] | None = None) -> None:
    """Load each folder's adapters into `pipe` with diffusers' own loader (at its strength, default 1) and merge
    them all into the weights: one run's erasure, or several stacked."""
    from .logs import quiet_libraries

    names = [f"{ADAPTER}_{i}" for i in range(len(folders))]
    with quiet_libraries():
        for name, folder in zip(names, folders):
            pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name=name)
        pipe.set_adapters(names, adapter_weights=strengths or [1.0] * len(names))
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()
