"""FLUX.1: a rectified-flow transformer conditioned on T5 token embeddings and CLIP's pooled embedding.

The denoiser is `FluxTransformer2DModel` (the pipeline's `transformer`; to the methods it plays the UNet's part,
`model.unet`); it predicts the velocity `noise - x0` at noise level sigma (timestep = 1000 sigma) on latents
packed into 2x2 patches, and FLUX.1 [dev] takes its guidance as an input (guidance-distilled: no
classifier-free pass). So that methods hold one conditioning tensor, this family packs the T5 token embeddings
and the pooled CLIP embedding into [B, L + 1, D] (the last row carries the pooled embedding, zero-padded), as
the SDXL family does; latents stay [B, C, H, W] outside `denoise`, which packs them for the transformer.

ESD runs on FLUX (EraseAnything's setting: LoRA on the double-stream blocks' text projections), few-shot
erasing on its two text encoders (CLIP's pooled embedding, T5's tokens), and the embedding attack on both
encoders at once; AdvUnlearn, STEREO, SFD and the other two attacks are refused before loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import InputError
from .stable_diffusion import StableDiffusionFamily

if TYPE_CHECKING:
    import torch

# FLUX.1 [dev]'s embedded guidance while ESD samples x_t and queries the frozen model (EraseAnything's
# start_guidance); sampling takes the model's own guidance setting.
TRAIN_GUIDANCE = 3.0
NATIVE_RESOLUTION = 1024  # what FluxPipeline draws by default (128 latent pixels x the VAE's 8)
TRAIN_RESOLUTION = 512  # EraseAnything's training resolution
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length


def pack(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """[B, L, D] T5 embeddings and [B, P] pooled CLIP embedding (P <= D) -> the family's conditioning [B, L + 1, D]."""
    import torch

    width = tokens.shape[-1]
    if pooled.shape[-1] > width:
        raise InputError(f"the pooled embedding ({pooled.shape[-1]}) does not fit a row of {width}")
    row = torch.nn.functional.pad(pooled, (0, width - pooled.shape[-1]))
    return torch.cat([tokens, row[:, None].to(tokens.dtype)], dim=1)


def unpack(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def pooled_width(transformer) -> int:
    return getattr(transformer, "module", transformer).config.pooled_projection_dim


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> the transformer's sequence of 2x2 patches [B, HW/4, 4C] (FluxPipeline's packing)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpatchify(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Each patch's (0, row, column): the positions FLUX's rotary embedding reads."""
    import torch

    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    columns = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)


class Flux(StableDiffusionFamily):
    name = "flux"
    summary = "FLUX.1 (CLIP ViT-L/14 pooled + T5-XXL text encoders, rectified-flow transformer, 1024 px)"
    pipeline_class = "FluxPipeline"
    denoiser = "transformer"
    text_encoders = 2
    text_encoder_names = ("text_encoder", "text_encoder_2")
    # EraseAnything (Gao et al., ICML 2025), config/config.yaml and train_flux_lora.py: rank-8 LoRA (alpha 8) on the
    # double-stream blocks' add_q_proj / add_k_proj, lr 1e-3, 200 steps, ESD's loss with eta 1, x_t from 28 steps
    # at guidance 3. (Their AdamW's weight decay 1e-5 is left out, and so are their attention and bi-level terms.)
    presets = {"esd": {"lora_rank": 8, "lora_alpha": 8, "lora_targets": ["attn.add_q_proj", "attn.add_k_proj"],
                       "scope": "attn", "lr": 1e-3, "steps": 200, "ddim_steps": 28, "sample_guidance": TRAIN_GUIDANCE,
                       "negative_guidance": 1.0}}  # fmt: skip
    preset_papers = {"esd": "eraseanything"}
    lora_components = ("transformer", "text_encoder")  # FluxPipeline's LoRA file has no place for T5's adapters
    unsupported = {
        "advunlearn": "its adversarial prompts are CLIP text-encoder words; FLUX's prompt reaches the transformer "
        "through T5, which this version does not train",
        "stereo": "its textual inversion is not available for FLUX's T5 encoder in this version",
        "sfd": "its one-step generator distils a UNet's noise prediction, not a rectified-flow transformer",
        "attack:unlearndiffatk": "its discrete words come from one tokenizer, and FLUX's CLIP and T5 share none; "
        "use --attack embedding",
        "attack:textual-inversion": "its learnt word is not available for FLUX's T5 encoder in this version; "
        "use --attack embedding",
    }

    def tokenize(self, model, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP's ids and T5's ids side by side [B, 77 + L] (T5's length: FluxPipeline's 512, or its tokenizer's)."""
        import torch

        from ..devices import to_device
        from ..tokenizer import padded_ids

        length = min(MAX_SEQUENCE_LENGTH, model.pipe.tokenizer_2.model_max_length)
        t5 = padded_ids(model.pipe.tokenizer_2, prompts, length)
        return to_device(torch.cat([padded_ids(model.tokenizer, prompts), t5], dim=1), model.device)

    def text_tower(self, model):
        from ..text_embeddings import FluxTextTower

        return FluxTextTower(model.text_encoder, model.text_encoder_2, model.tokenizer.model_max_length)

    def encode(self, model, prompts: Sequence[str], text_encoder=None) -> torch.Tensor:
        """The packed conditioning of `prompts`, as `FluxPipeline.encode_prompt` makes it (the same prompt to both
        encoders), from `text_encoder` (a text tower; default: the model's encoders)."""
        tower = text_encoder if text_encoder is not None else self.text_tower(model)
        tokens, pooled = tower(self.tokenize(model, prompts))
        return pack(tokens, pooled)

    def encode_inserted(self, model, tower, ids, inserted):
        """Free words ([B or 1, k, D1 + D2]: a CLIP part, a T5 part) in both encoders' sequences (`FluxTextTower`)."""
        tokens, pooled = tower(ids, inserted)
        return pack(tokens, pooled)

    def vocabulary(self, model, tower):
        """A word per CLIP token [V, D1 + D2]: its CLIP input embedding beside the T5 input embedding of the same
        text's first T5 piece (the tokenizers share no vocabulary), so that a random start is a word in both."""
        import torch

        from ..text_embeddings import token_embeddings

        encoders = getattr(tower, "module", tower).named_encoders()
        clip_ids = torch.arange(len(model.tokenizer), device=model.device)
        t5_ids = self.t5_ids_of_clip_tokens(model).to(model.device)
        clip = token_embeddings(encoders["text_encoder"], clip_ids)
        t5 = encoders["text_encoder_2"].get_input_embeddings()(t5_ids)
        return torch.cat([clip.float(), t5.float()], dim=-1)

    def word_parts(self, model) -> tuple[int, ...]:
        # T5-XXL's input embeddings are two orders of magnitude larger than CLIP's
        return (model.text_encoder.config.hidden_size, model.text_encoder_2.config.d_model)

    @staticmethod
    def t5_ids_of_clip_tokens(model) -> torch.Tensor:
        """[V]: for each CLIP token, the first T5 piece of its text (T5's unknown token where it has none)."""
        import torch

        clip, t5 = model.tokenizer, model.pipe.tokenizer_2
        tokens = clip.convert_ids_to_tokens(range(len(clip)))
        texts = [clip.convert_tokens_to_string([token]).strip() for token in tokens]
        pieces = t5(texts, add_special_tokens=False, truncation=True, max_length=4).input_ids  # the first is read
        return torch.tensor([p[0] if p else t5.unk_token_id for p in pieces], dtype=torch.long)

    def image_resolution(self, model) -> int:
        """Training images' side: EraseAnything's 512 px, or the model's own size if smaller."""
        return min(TRAIN_RESOLUTION, model.resolution)

    def latent_shape(self, model, batch: int) -> tuple[int, ...]:
        side = self.image_resolution(model) // model.pipe.vae_scale_factor
        return (batch, model.unet.config.in_channels // 4, side, side)

    def scale_latents(self, model, latents):
        config = model.vae.config
        return (latents - config.shift_factor) * config.scaling_factor

    def noised(self, model, x0, noise, t):
        """Rectified flow: x_t = (1 - sigma) x0 + sigma noise at sigma = t / 1000; the transformer predicts the
        velocity noise - x0."""
        sigma = (t.to(x0.dtype) / model.scheduler.config.num_train_timesteps).view(-1, *[1] * (x0.dim() - 1))
        return (1 - sigma) * x0 + sigma * noise, noise - x0

    def sampling_scheduler(self, model, steps: int, device):
        """The model's flow-matching scheduler, with FluxPipeline's shift for the training resolution."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
        _, _, h, w = self.latent_shape(model, 1)
        config = scheduler.config
        mu = calculate_shift(h * w // 4, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))  # fmt: skip
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
        return scheduler

    def denoise(self, unet, x_t: torch.Tensor, t, cond: torch.Tensor, guidance: float = TRAIN_GUIDANCE):
        """The transformer's velocity for latents `x_t` [B, C, H, W] at timestep(s) `t` (1000 sigma)."""
        import torch

        tokens, pooled = unpack(cond, pooled_width(unet))
        b, _, h, w = x_t.shape
        config = getattr(unet, "module", unet).config
        t = torch.as_tensor(t, device=x_t.device, dtype=x_t.dtype).expand(b)
        embedded = torch.full((b,), guidance, device=x_t.device, dtype=x_t.dtype) if config.guidance_embeds else None
        out = unet(
            hidden_states=patchify(x_t), timestep=t / 1000, guidance=embedded, pooled_projections=pooled,
            encoder_hidden_states=tokens, txt_ids=tokens.new_zeros(tokens.shape[1], 3),
            img_ids=image_ids(h, w, x_t.device, x_t.dtype), return_dict=False,
        )[0]  # fmt: skip
        return unpatchify(out, h, w)

    def trajectory(self, unet, scheduler, cond, uncond, stop, guidance, latents):
        """Euler steps of the flow from noise `latents` for `stop` steps at embedded guidance `guidance` (FLUX.1
        [dev] has no unconditional pass: `uncond` is unused). Returns (x_t, t, t_next): x_t's timestep and the
        noisier end of its step's window, where ESD queries the model."""
        import torch

        sigmas = scheduler.sigmas
        x = latents
        with torch.no_grad():
            for i in range(stop):
                velocity = self.denoise(unet, x, sigmas[i] * 1000, cond.expand(len(x), -1, -1), guidance)
                x = x + (sigmas[i + 1] - sigmas[i]) * velocity
        t = int(sigmas[stop] * 1000)
        t_next = int(sigmas[stop - 1] * 1000) if stop > 0 else 1000
        return x, t, max(t_next, t + 1)

    def one_step(self, *args, **kwargs):
        raise InputError(self.unsupported["sfd"])
