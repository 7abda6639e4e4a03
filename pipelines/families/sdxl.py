"""Stable Diffusion XL: two CLIP text encoders, a pooled text embedding and added time ids.

SDXL's UNet takes, besides the token embeddings of both encoders side by side, the second encoder's
pooled (projected) embedding and six "time ids" (original size, crop corner, target size). Methods hold
a conditioning as one tensor they expand, concatenate, index and compare; so that every such method
runs unchanged, this family packs what the UNet takes into one tensor [B, L + 1, D]: the L token rows,
then one row that carries the pooled embedding followed by the time ids (zero-padded to D). Only this
family (`denoise`) and the SDXL model's sampling read that last row; to the methods it is an opaque
conditioning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import InputError
from .stable_diffusion import StableDiffusionFamily

if TYPE_CHECKING:
    import torch

TIME_IDS = 6  # (original height, width, crop top, left, target height, width)
_TWO_ENCODERS = "it edits the input embeddings of one CLIP text encoder and SDXL has two (issue 40)"


def pack(token_embeds: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """[B, L, D] token embeddings, [B, P] pooled, [B, 6] time ids -> the family's conditioning [B, L + 1, D]."""
    import torch

    width = token_embeds.shape[-1]
    extra = torch.cat([pooled, time_ids.to(pooled.dtype)], dim=-1)
    if extra.shape[-1] > width:
        raise InputError(f"the pooled embedding ({pooled.shape[-1]}) and time ids do not fit a row of {width}")
    row = torch.nn.functional.pad(extra, (0, width - extra.shape[-1]))
    return torch.cat([token_embeds, row[:, None].to(token_embeds.dtype)], dim=1)


def pooled_width(unet) -> int:
    """The pooled embedding's width the UNet was built for (its added embedding minus the time ids')."""
    config = getattr(unet, "module", unet).config  # a network wrapped for several processes keeps its own
    return config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim


def unpack(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The family's conditioning -> (token embeddings, pooled embedding, time ids)."""
    row = cond[:, -1]
    return cond[:, :-1], row[:, :pooled_dim], row[:, pooled_dim : pooled_dim + TIME_IDS]


class SDXL(StableDiffusionFamily):
    name = "sdxl"
    summary = "Stable Diffusion XL base (CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 text encoders, 1024 px)"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoders = 2
    unsupported = {
        "advunlearn": _TWO_ENCODERS,
        "fewshot": _TWO_ENCODERS,
        "stereo": "its textual inversion learns a word of one CLIP text encoder and SDXL has two (issue 40)",
        "sfd": "its one-step generator does not yet pass SDXL's pooled embedding and time ids (issue 40)",
        "attacks": "the attacks edit the input embeddings of one CLIP text encoder and SDXL has two (issue 40)",
    }

    def tokenize(self, model, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids of the first tokenizer (the second pads with "!" where the first pads with its end token)."""
        return self._ids(model.tokenizer, prompts, model.device)

    @staticmethod
    def _ids(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
        return tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(device)  # fmt: skip

    def encode(self, model, prompts: Sequence[str], text_encoder=None) -> torch.Tensor:
        """The packed conditioning of `prompts`, as `StableDiffusionXLPipeline.encode_prompt` makes it: each
        encoder's penultimate hidden states side by side, the second's projected pooled output, the pipeline's
        default time ids; the empty prompt's embeddings (not its time ids) are zeros where the pipeline zeroes
        its negative prompt."""
        import torch

        if text_encoder is not None and text_encoder is not model.text_encoder:
            raise InputError("an SDXL conditioning comes from both of the model's own text encoders")
        device = model.device
        hidden, pooled = [], None
        for tokenizer, encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
            out = encoder(self._ids(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output
        token_embeds = torch.cat(hidden, dim=-1)
        size = model.pipe.default_sample_size * model.pipe.vae_scale_factor
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=device).expand(len(prompts), -1)
        if model.pipe.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=device)
            token_embeds = torch.where(empty[:, None, None], torch.zeros_like(token_embeds), token_embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return pack(token_embeds, pooled, time_ids)

    def denoise(self, unet, x_t: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        token_embeds, pooled, time_ids = unpack(cond, pooled_width(unet))
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return unet(x_t, t, token_embeds, added_cond_kwargs=added).sample

    def one_step(self, generator, alphas_cumprod, t_init, z, cond):
        raise InputError(f"one-step generators of {self.name} models: {self.unsupported['sfd']}")
