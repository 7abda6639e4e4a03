"""Stable Diffusion XL: two CLIP text encoders, a pooled text embedding and added time ids.

SDXL's UNet takes, besides the token embeddings of both encoders side by side, the second encoder's
pooled (projected) embedding and six "time ids" (original size, crop corner, target size). Methods hold
a conditioning as one tensor they expand, concatenate, index and compare; so that every such method
runs unchanged, this family packs what the UNet takes into one tensor [B, L + 1, D]: the L token rows,
then one row that carries the pooled embedding followed by the time ids (zero-padded to D). Only this
family (`denoise`, `one_step`) and the SDXL models' sampling read that last row; to the methods it is an
opaque conditioning. The two text encoders are one text tower (`SDXLTextTower`) to the methods that train
or reach into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..devices import to_device
from ..errors import InputError
from .stable_diffusion import StableDiffusionFamily

if TYPE_CHECKING:
    import torch

TIME_IDS = 6  # (original height, width, crop top, left, target height, width)

def pack(token_embeds: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """[B, L, D] token embeddings, [B, P] pooled, [B, 6] time ids -> the family's conditioning [B, L + 1, D]."""
    import torch

    width = token_embeds.shape[-1]
    extra = torch.cat([pooled, time_ids.to(pooled.dtype)], dim=-1)
    if extra.shape[-1] > width:
        raise InputError(f"the pooled embedding ({pooled.shape[-1]}) and time ids do not fit a row of {width}")
    row = torch.nn.functional.pad(extra, (0, width - extra.shape[-1]))
    return torch.cat([token_embeds, row[:, None].to(token_embeds.dtype)], dim=1)


def default_time_ids(pixels: int, n: int, device) -> torch.Tensor:
    """The time ids [n, 6] the SDXL pipelines add by default: a full, uncropped image of `pixels` square (the
    UNet's sample size times the VAE's scale factor)."""
    import torch

    return to_device(torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]]), device).expand(n, -1)


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
    text_encoder_names = ("text_encoder", "text_encoder_2")
    # The ESD authors' SDXL script (esd_sdxl.py): ESD-x for 200 iterations at lr 2e-4, x_t drawn with guidance 2
    # (for its experimental other scopes they drop the lr to 1e-5: ESD refuses lr 2e-4 with another scope; --set
    # another lr). No other method's paper ran on SDXL: they keep their SD 1.x defaults.
    presets = {"esd": {"steps": 200, "lr": 2e-4, "sample_guidance": 2.0}}

    def tokenize(self, model, prompts: Sequence[str]) -> torch.Tensor:
        """Both tokenizers' ids side by side [B, L1 + L2] (the second pads with "!" where the first pads with
        its end token); to the methods, as opaque as the packed conditioning."""
        import torch

        from ..tokenizer import padded_ids

        ids = torch.cat([padded_ids(model.tokenizer, prompts), padded_ids(model.tokenizer_2, prompts)], dim=1)
        return to_device(ids, model.device)

    def text_tower(self, model):
        if len(model.tokenizer) != len(model.tokenizer_2):
            raise InputError("the two SDXL tokenizers have different vocabularies; a word cannot be inserted in both")
        from ..text_embeddings import SDXLTextTower

        return SDXLTextTower(model.text_encoder, model.text_encoder_2, model.tokenizer.model_max_length)

    def vocabulary(self, model, tower) -> torch.Tensor:
        """Each token's input embeddings in both encoders, side by side [V, D1 + D2] (the tokenizers share CLIP's
        vocabulary): a free word is one vector whose parts enter each encoder."""
        import torch

        from ..text_embeddings import token_embeddings

        ids = torch.arange(len(model.tokenizer), device=model.device)
        encoders = getattr(tower, "module", tower).named_encoders().values()  # a wrapped network keeps its own
        return torch.cat([token_embeddings(e, ids) for e in encoders], dim=-1).float()

    def encode(self, model, prompts: Sequence[str], text_encoder=None) -> torch.Tensor:
        """The packed conditioning of `prompts`, as `StableDiffusionXLPipeline.encode_prompt` makes it: each
        encoder's penultimate hidden states side by side, the second's projected pooled output, the pipeline's
        default time ids; the empty prompt's embeddings (not its time ids) are zeros where the pipeline zeroes
        its negative prompt. `text_encoder`: a text tower (`text_tower`; default: the model's encoders)."""
        import torch

        tower = self._tower(model, text_encoder)
        token_embeds, pooled = tower(self.tokenize(model, prompts))
        # (a one-step pipeline has no negative and zeroes nothing: "" is encoded, as its recipe encodes it)
        if getattr(model.pipe.config, "force_zeros_for_empty_prompt", False):
            empty = to_device(torch.tensor([p == "" for p in prompts]), token_embeds.device)
            token_embeds = torch.where(empty[:, None, None], torch.zeros_like(token_embeds), token_embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return pack(token_embeds, pooled, self._time_ids(model, len(prompts), token_embeds.device))

    def encode_inserted(self, model, tower, ids: torch.Tensor, inserted: torch.Tensor) -> torch.Tensor:
        """Free words ([B or 1, k, D1 + D2]) after the start token of both encoders' sequences; the pooled
        embedding is read at the end token, k places further on."""
        token_embeds, pooled = tower(ids, inserted)
        return pack(token_embeds, pooled, self._time_ids(model, len(ids), token_embeds.device))

    def _tower(self, model, given):
        if given is None:
            return self.text_tower(model)
        from ..text_embeddings import SDXLTextTower

        if not isinstance(getattr(given, "module", given), SDXLTextTower):
            raise InputError("an SDXL conditioning comes from both text encoders: pass the family's text_tower")
        return given

    @staticmethod
    def _time_ids(model, n: int, device) -> torch.Tensor:
        return default_time_ids(model.unet.config.sample_size * model.pipe.vae_scale_factor, n, device)

    def denoise(self, unet, x_t: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        token_embeds, pooled, time_ids = unpack(cond, pooled_width(unet))
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return unet(x_t, t, token_embeds, added_cond_kwargs=added).sample

    def one_step(self, generator, alphas_cumprod, t_init, z, cond, prediction: str = "epsilon"):
        from ..one_step import one_step_sample

        token_embeds, pooled, time_ids = unpack(cond, pooled_width(generator))
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return one_step_sample(generator, alphas_cumprod, t_init, z, token_embeds, added, prediction)
