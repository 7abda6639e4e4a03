"""Write a Stable Diffusion 1.x, 2.x or SDXL pipeline as one original-layout (LDM / SGM) checkpoint.

The reverse of diffusers' `from_single_file`: UIs such as A1111 and ComfyUI take this layout, and
tests use it to exercise the single-file loading path with tiny models. SD 1.x's CLIP text encoder is
written as `cond_stage_model.transformer.*`; SDXL's two as `conditioner.embedders.0.transformer.*`
(the same HF layout) and `conditioner.embedders.1.model.*` (OpenCLIP's: fused q/k/v, `resblocks`,
the projection transposed); SD 2.x's OpenCLIP tower as `cond_stage_model.model.*`. Diffusers keeps
only the 23 blocks of SD 2.x's 24 that its penultimate-layer conditioning runs, so the file holds
those 23: the 24th never reaches the UNet (diffusers' converter and the original `FrozenOpenCLIPEmbedder`
with `layer="penultimate"` skip it).
"""

from __future__ import annotations

from pathlib import Path

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        key = key.replace(f".{new}.", f".{old}.")
    return key


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    return {"model.diffusion_model." + unet_key_to_ldm(unet, key): value for key, value in unet.state_dict().items()}


def unet_key_to_ldm(unet, key: str) -> str:
    """A diffusers UNet parameter's name in the LDM / SGM layout (without `model.diffusion_model.`); kohya LoRA
    files name SDXL's layers this way."""
    cfg = unet.config
    per_block = cfg.layers_per_block + 1  # resnets per down block plus its downsampler slot
    parts = key.split(".")
    if key.startswith("add_embedding."):  # SDXL's pooled-text and time-id embedding
        new = key.replace("add_embedding.linear_", "label_emb.0.linear_")
        new = new.replace("label_emb.0.linear_1", "label_emb.0.0").replace("label_emb.0.linear_2", "label_emb.0.2")
    elif key.startswith("time_embedding."):
        new = key.replace("time_embedding.linear_1", "time_embed.0").replace("time_embedding.linear_2", "time_embed.2")
    elif key.startswith("conv_in."):
        new = key.replace("conv_in", "input_blocks.0.0")
    elif key.startswith("conv_norm_out."):
        new = key.replace("conv_norm_out", "out.0")
    elif key.startswith("conv_out."):
        new = key.replace("conv_out", "out.2")
    elif key.startswith("down_blocks."):
        i, sub, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if sub == "downsamplers":
            new = f"input_blocks.{per_block * (i + 1)}.0.op.{rest.split('.', 1)[1]}"
        else:
            slot = 0 if sub == "resnets" else 1
            new = f"input_blocks.{per_block * i + j + 1}.{slot}.{rest}"
    elif key.startswith("mid_block."):
        sub, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        new = f"middle_block.{1 if sub == 'attentions' else 2 * j}.{rest}"
    elif key.startswith("up_blocks."):
        i, sub, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if sub == "upsamplers":
            has_attention = hasattr(unet.up_blocks[i], "attentions")
            new = f"output_blocks.{per_block * i + cfg.layers_per_block}.{2 if has_attention else 1}.{rest}"
        else:
            new = f"output_blocks.{per_block * i + j}.{0 if sub == 'resnets' else 1}.{rest}"
    else:
        raise KeyError(f"no LDM name for UNet key {key}")
    if ".resnets." in key:
        new = _rename("." + new + ".", _RESNET).strip(".")
    return new


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n_up = len(vae.decoder.up_blocks)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        new = key
        parts = key.split(".")
        if parts[1] == "down_blocks":
            i, sub, rest = parts[2], parts[3], ".".join(parts[5:])
            new = (
                f"encoder.down.{i}.downsample.{rest}"
                if sub == "downsamplers"
                else f"encoder.down.{i}.block.{parts[4]}.{rest}"
            )
        elif parts[1] == "up_blocks":
            i, sub, rest = n_up - 1 - int(parts[2]), parts[3], ".".join(parts[5:])
            new = (
                f"decoder.up.{i}.upsample.{rest}" if sub == "upsamplers" else f"decoder.up.{i}.block.{parts[4]}.{rest}"
            )
        elif parts[1] == "mid_block":
            sub, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            new = f"{parts[0]}.mid.{'attn_1' if sub == 'attentions' else f'block_{j + 1}'}.{rest}"
        new = new.replace("conv_norm_out", "norm_out")
        table = _VAE_ATTENTION if ".attentions." in key else _VAE_RESNET
        new = _rename("." + new + ".", table).strip(".")
        if ".attn_1." in new and value.ndim == 2:  # LDM's VAE attention uses 1x1 convolutions
            value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    state = text_encoder.state_dict()
    # transformers >= 5.6 flattened CLIPTextModel; the LDM layout keeps the `text_model.` level.
    return {
        "cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in state.items()
    }


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip


def open_clip_text_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in OpenCLIP's layout (SDXL's second embedder, SD 2.x's text tower)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:  # SDXL's second encoder projects its pooled output; SD 2.x's does not
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
            for new, old in _OPEN_CLIP_LAYER.items():
                out[f"{block}{old}.{kind}"] = state.pop(f"{layer}{new}.{kind}")
    state.pop("embeddings.position_ids", None)  # a buffer, rebuilt on load
    if state:
        raise KeyError(f"no OpenCLIP name for text encoder keys {sorted(state)[:3]}")
    return out


# The model families whose layout `save_single_file` writes (digits-sd is built as SD 1.x).
SINGLE_FILE_FAMILIES = ("digits", "sd1", "sd2", "sdxl")


def save_single_file(model, path: str | Path) -> None:
    """Write the pipeline of a `TextToImageModel` (SD 1.x, 2.x or SDXL) as one `.safetensors` file."""
    from safetensors.torch import save_file

    pipe = model.pipe
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        first = text_encoder_to_ldm(pipe.text_encoder)
        prefix = "conditioner.embedders.0.transformer."
        state.update({prefix + k.removeprefix("cond_stage_model.transformer."): v for k, v in first.items()})
        state.update(open_clip_text_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    elif model.family.name == "sd2":
        state.update(open_clip_text_to_ldm(pipe.text_encoder, "cond_stage_model.model."))
    else:
        state.update(text_encoder_to_ldm(pipe.text_encoder))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
