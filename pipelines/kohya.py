"""A diffusers LoRA file rewritten in the kohya (sd-scripts) layout that A1111 and ComfyUI load.

Each adapted layer is one flat name (`lora_unet_...`, `lora_te_...`; SDXL: `lora_te1_`, `lora_te2_`) with
`.lora_down.weight` (peft's A), `.lora_up.weight` (B) and a scalar `.alpha`. The names follow what sd-scripts
writes: for SD 1.x / 2.x the UNet's diffusers module names, for SDXL its SGM names (`input_blocks_4_1_...`,
`label_emb_0_0`); the text encoders' Hugging Face CLIP names under `text_model.`. Diffusers' own converter
(`load_lora_weights` on a non-diffusers file) reads such a file back, which the tests use to check it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import InputError


def kohya_state(lora_file: Path, family, unet=None) -> dict[str, torch.Tensor]:
    """The kohya state dict of the diffusers LoRA file `lora_file` of a model of `family`; SDXL's needs its `unet`
    (whose block layout gives the SGM names)."""
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    xl = family.text_encoders == 2
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if xl else "lora_te", "text_encoder_2": "lora_te2"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        if component not in prefixes or ".lora_" not in rest:
            raise InputError(f"{lora_file}: {key} is not a LoRA weight of a UNet or text encoder")
        module, kind = rest.split(".lora_", 1)
        if component == "unet" and xl:
            from .single_file import unet_key_to_ldm

            module = unet_key_to_ldm(unet, f"{module}.weight").removesuffix(".weight")
        elif component.startswith("text_encoder") and not module.startswith("text_model."):
            module = f"text_model.{module}"  # transformers >= 5.6 flattened CLIPTextModel; the layout keeps the level
        name = f"{prefixes[component]}_{module.replace('.', '_')}"
        out[f"{name}.lora_{'down' if kind.startswith('A.') else 'up'}.weight"] = value.contiguous()
        alpha = metadata.get(f"{component}.lora_alpha", metadata.get(f"{component}.r"))
        if alpha is None:
            raise InputError(f"{lora_file} records no LoRA alpha for {component}")
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def write_kohya(lora_file: Path, family, unet, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(kohya_state(lora_file, family, unet), str(path), metadata={"ss_network_module": "networks.lora"})
    return path
