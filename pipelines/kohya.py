"""A diffusers LoRA file rewritten in the kohya (sd-scripts) layout that A1111 and ComfyUI load.

Each adapted layer is one flat name (`lora_unet_...`, `lora_te_...`; SDXL: `lora_te1_`, `lora_te2_`) with
`.lora_down.weight` (peft's A), `.lora_up.weight` (B) and a scalar `.alpha`. The names follow what sd-scripts
writes: for SD 1.x / 2.x the UNet's diffusers module names, for SDXL its SGM names (`input_blocks_4_1_...`,
`label_emb_0_0`); the text encoders' Hugging Face CLIP names under `text_model.`. Diffusers' own converter
(`load_lora_weights` on a non-diffusers file) reads such a file back, which the tests use to check it.

FLUX's transformer is written in sd-scripts' FLUX layout, which names the layers of Black Forest Labs' own
checkpoint (`double_blocks_0_img_attn_qkv`, `single_blocks_0_linear1`, ...), for the blocks' layers only:
diffusers' converter hands the embedders' and the final layer's adapters back without their component, and they
are dropped, so they are refused. In that layout one Linear holds what diffusers splits in several (q, k and v;
a single-stream block's q, k, v and MLP input): the adapters of the parts become one adapter of the fused
layer, the A matrices stacked and the B matrices on the block diagonal, whose product is each part's update in
its own rows (a part without an adapter adds no rank and zero rows). The scale alpha / rank is folded into B
and alpha written equal to the rank, since a fused layer's rank is the sum of its parts'.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import InputError

# FLUX's diffusers Linear layers -> sd-scripts' name, and for a part of a fused layer its place among the parts
# (the parts' output widths in units of the block's width: a single-stream block's MLP input is 4x, FluxSingle-
# TransformerBlock's fixed mlp_ratio).
FLUX_BLOCK_LAYERS = [
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", "double_blocks_{}_img_attn_qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", "double_blocks_{}_txt_attn_qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks_{}_img_attn_proj"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "double_blocks_{}_txt_attn_proj"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "double_blocks_{}_img_mlp_0"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "double_blocks_{}_img_mlp_2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "double_blocks_{}_txt_mlp_0"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "double_blocks_{}_txt_mlp_2"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "double_blocks_{}_img_mod_lin"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "double_blocks_{}_txt_mod_lin"),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])", "single_blocks_{}_linear1"),
    (r"single_transformer_blocks\.(\d+)\.(proj_mlp)", "single_blocks_{}_linear1"),
    (r"single_transformer_blocks\.(\d+)\.proj_out", "single_blocks_{}_linear2"),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", "single_blocks_{}_modulation_lin"),
]
FUSED_PARTS = {"q": 0, "k": 1, "v": 2, "proj_mlp": 3}
PART_WIDTHS = (1, 1, 1, 4)


def _read_lora(lora_file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    return state, metadata


def _alpha(lora_file: Path, metadata: dict, component: str) -> float:
    alpha = metadata.get(f"{component}.lora_alpha", metadata.get(f"{component}.r"))
    if alpha is None:
        raise InputError(f"{lora_file} records no LoRA alpha for {component}")
    return float(alpha)


def kohya_state(lora_file: Path, family, unet=None) -> dict[str, torch.Tensor]:
    """The kohya state dict of the diffusers LoRA file `lora_file` of a model of `family`; SDXL's needs its `unet`
    (whose block layout gives the SGM names)."""
    state, metadata = _read_lora(lora_file)
    xl = family.text_encoders == 2
    flux = family.name == "flux"
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if xl else "lora_te", "text_encoder_2": "lora_te2"}
    out: dict[str, torch.Tensor] = {}
    transformer: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        if ".lora_" not in rest or component not in (("transformer", "text_encoder") if flux else prefixes):
            raise InputError(f"{lora_file}: {key} is not a LoRA weight of a {family.name} model's denoiser or text "
                             "encoder")  # fmt: skip
        module, kind = rest.split(".lora_", 1)
        if component == "transformer":
            transformer.setdefault(module, {})[kind[0]] = value
            continue
        if component == "unet" and xl:
            from .single_file import unet_key_to_ldm

            module = unet_key_to_ldm(unet, f"{module}.weight").removesuffix(".weight")
        elif component.startswith("text_encoder") and not module.startswith("text_model."):
            module = f"text_model.{module}"  # transformers >= 5.6 flattened CLIPTextModel; the layout keeps the level
        name = f"{prefixes[component]}_{module.replace('.', '_')}"
        out[f"{name}.lora_{'down' if kind.startswith('A.') else 'up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(_alpha(lora_file, metadata, component))
    if transformer:
        out.update(flux_transformer_state(transformer, _alpha(lora_file, metadata, "transformer")))
    return out


def flux_transformer_state(adapters: dict[str, dict[str, torch.Tensor]], alpha: float) -> dict[str, torch.Tensor]:
    """sd-scripts' FLUX names for the adapters {diffusers module: {"A": down, "B": up}} of a FluxTransformer2DModel
    trained at `alpha`."""
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for module, pair in adapters.items():
        down, up = pair["A"], pair["B"] * (alpha / pair["A"].shape[0])
        name, part = flux_layer_name(module)
        if part is None:
            _put(out, f"lora_unet_{name}", down, up)
        else:
            fused.setdefault(name, {})[part] = (down, up)
    for name, parts in fused.items():
        some_down = next(iter(parts.values()))[0]
        width = some_down.shape[1]  # every part reads the block's hidden state
        count = 4 if name.endswith("linear1") else 3
        downs, ups = [], []
        for index in range(count):
            rows = width * PART_WIDTHS[index]
            down, up = parts.get(index, (some_down.new_zeros(0, width), some_down.new_zeros(rows, 0)))
            if up.shape[0] != rows:
                raise InputError(f"{name}: part {index} has {up.shape[0]} outputs, not the {rows} of FLUX's layout")
            downs.append(down)
            ups.append(up)
        _put(out, f"lora_unet_{name}", torch.cat(downs), torch.block_diag(*ups))
    return out


def flux_layer_name(module: str) -> tuple[str, int | None]:
    """sd-scripts' name of the FLUX transformer's layer `module` (diffusers' name), and its part in a fused layer."""
    for pattern, name in FLUX_BLOCK_LAYERS:
        match = re.fullmatch(pattern, module)
        if match:
            part = match.group(2) if match.lastindex == 2 else None
            return name.format(match.group(1)), None if part is None else FUSED_PARTS[part]
    raise InputError(f"--lora-format kohya writes FLUX's block layers; the adapter of {module} would be lost: "
                     "diffusers' converter (0.42) keeps no adapter of the embedders or the final layer in that "
                     "layout. Train on the blocks (lora_targets; EraseAnything's preset does) or share the diffusers "
                     "LoRA file")  # fmt: skip


def check_flux_layers(lora_file: Path) -> None:
    """Refuse, before anything is written, a FLUX LoRA file with a transformer layer outside the blocks."""
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        for key in f.keys():
            if key.startswith("transformer."):
                flux_layer_name(key.removeprefix("transformer.").split(".lora_")[0])


def _put(out: dict[str, torch.Tensor], name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    out[f"{name}.lora_down.weight"] = down.contiguous()
    out[f"{name}.lora_up.weight"] = up.contiguous()
    out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # the scale is folded into up


def write_kohya(lora_file: Path, family, unet, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(kohya_state(lora_file, family, unet), str(path), metadata={"ss_network_module": "networks.lora"})
    return path
