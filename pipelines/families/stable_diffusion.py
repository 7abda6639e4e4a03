"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden states condition a UNet.

What a method needs to drive such a model - prompts to conditioning, one denoiser evaluation, a
partial DDIM trajectory (ESD's data-free `x_t`), the one-step generator's single evaluation - lives
here, so that a family whose UNet takes more (SDXL's pooled embeddings and added time ids) is a
subclass that overrides these, not a branch in every method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from .base import Family

if TYPE_CHECKING:
    import torch


def ddim_sampler(scheduler_config):
    """DDIM with a model's noise schedule. A config that does not say (Euler's, as diffusers saves it; SDXL's
    single-file config) gets latent diffusion's settings, not DDIM's pixel-space defaults: a clipped x0 would
    distort every trajectory whose latents leave [-1, 1], as SDXL's do."""
    from diffusers import DDIMScheduler

    unsaid = {key: False for key in ("clip_sample", "set_alpha_to_one") if key not in scheduler_config}
    return DDIMScheduler.from_config(scheduler_config, **unsaid)


class StableDiffusionFamily(Family):
    """The conditioning and sampling of a `StableDiffusionPipeline`-shaped model."""

    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"  # the diffusers class its models load as
    denoiser: ClassVar[str] = "unet"  # the pipeline component that denoises (model.unet, whatever its name)
    text_encoders: ClassVar[int] = 1

    def tokenize(self, model, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids padded to the tokenizer's length, as the pipeline would make them."""
        from ..devices import to_device
        from ..tokenizer import padded_ids

        return to_device(padded_ids(model.tokenizer, prompts), model.device)

    def encode(self, model, prompts: Sequence[str], text_encoder=None) -> torch.Tensor:
        """The denoiser's conditioning for `prompts`: embeddings [B, L, D] from `text_encoder` (a text tower,
        default: the model's own)."""
        encoder = text_encoder if text_encoder is not None else model.text_encoder
        return encoder(self.tokenize(model, prompts))[0]

    # --- the text tower: what the text-encoder methods train and the attacks reach into -------------

    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def text_tower(self, model):
        """The module that turns token ids into the conditioning's text part: what a text-encoder method trains
        (as one network), copies frozen, and hands to `encode` / `encode_inserted`. Here the one text encoder."""
        return model.text_encoder

    def tower_components(self, scope: str) -> list[str]:
        """The pipeline components a text-tower method with `scope` changes (`name:scope` picks one)."""
        chosen = scope.split(":", 1)[0] if ":" in scope else None
        return [name for name in self.text_encoder_names if chosen in (None, name)]

    def vocabulary(self, model, tower) -> torch.Tensor:
        """The input word embedding [V, D] of every token of the tokenizer, in float32 (free words are optimised
        there, whatever the model's precision): where inserted words start from."""
        import torch

        from ..text_embeddings import token_embeddings

        return token_embeddings(tower, torch.arange(len(model.tokenizer), device=model.device)).float()

    def word_parts(self, model) -> tuple[int, ...]:
        """The widths of a free word's parts that live at different scales (one part per vocabulary whose
        embeddings differ in size): an attack steps each part in units of its own RMS. () is one part."""
        return ()

    def encode_inserted(self, model, tower, ids: torch.Tensor, inserted: torch.Tensor) -> torch.Tensor:
        """The conditioning of token ids `ids` (from `tokenize`) with free word embeddings `inserted`
        ([B or 1, k, D], D as `vocabulary`'s) placed after the start token."""
        from ..text_embeddings import encode_with_inserted

        return encode_with_inserted(tower, ids, inserted)

    def latent_shape(self, model, batch: int) -> tuple[int, ...]:
        """The shape of `batch` latents the denoiser trains on (data-free methods start from such noise)."""
        config = model.unet.config
        return (batch, config.in_channels, config.sample_size, config.sample_size)

    def image_resolution(self, model) -> int:
        """The side of the images a method trains on (few-shot's real images are resized to it)."""
        return model.resolution

    def scale_latents(self, model, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents as the denoiser sees them."""
        return latents * model.vae.config.scaling_factor

    def noised(
        self, model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, what the denoiser should predict there): the model's forward process at timesteps `t` (eps, or v on
        a v-prediction model), from the schedule's alphas_cumprod. Not the model's own scheduler's add_noise: a
        sampler such as SDXL's Euler noises to x0 + sigma * noise, which the UNet never sees (it takes the scaled
        input), and PNDM has no get_velocity."""
        abar = model.scheduler.alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, *[1] * (x0.dim() - 1))
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        if model.scheduler.config.prediction_type == "v_prediction":
            return noisy, abar.sqrt() * noise - (1 - abar).sqrt() * x0
        return noisy, noise

    def sampling_scheduler(self, model, steps: int, device):
        """A fresh DDIM scheduler with the model's noise schedule, set to `steps` (the model's own is untouched):
        what `trajectory` walks."""
        scheduler = ddim_sampler(model.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        return scheduler

    def denoise(self, unet, x_t: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (eps or v, as its scheduler says) for `x_t` at timestep(s) `t`."""
        return unet(x_t, t, cond).sample

    def trajectory(self, unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, stop: int, guidance: float,
                   latents: torch.Tensor) -> tuple[torch.Tensor, int, int]:  # fmt: skip
        """Run DDIM with classifier-free guidance from noise `latents` for `stop` steps.

        `scheduler` comes from `sampling_scheduler`. Returns (x_t, t, t_next): the latent after
        `stop` steps sits at noise level `t` = timesteps[stop]; ESD then queries the UNet at a DDPM
        timestep drawn in [t, t + 1000/N), the window of that DDIM step. No gradient flows.
        """
        x = self.trajectories(unet, scheduler, cond, uncond, [stop] * len(latents), guidance, latents)
        return x, *self.timestep_window(scheduler, stop)

    def timestep_window(self, scheduler, stop: int) -> tuple[int, int]:
        """[t, t_next): the DDPM timesteps of DDIM step `stop`'s window, where ESD queries the UNet on the x_t
        that `stop` steps of `scheduler` reach."""
        t = int(scheduler.timesteps[stop])
        window = scheduler.config.num_train_timesteps // len(scheduler.timesteps)
        return t, min(t + window, scheduler.config.num_train_timesteps)

    def trajectories(self, unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, stops: Sequence[int],
                     guidance: float, latents: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """`trajectory` for rows that stop at steps of their own: row i of `latents` takes `stops[i]` DDIM steps
        (`cond`: one row, or one per latent). Every row still running shares each UNet call, so a bank of
        trajectories costs max(stops) calls rather than their sum. Returns x_t, row for row."""
        import torch

        # Rows sorted by stop, longest first (stably): those still running are then always a prefix.
        order = sorted(range(len(stops)), key=lambda i: -stops[i])
        reordered = order != list(range(len(order)))
        stops = [stops[i] for i in order]
        with torch.no_grad():
            x = latents * scheduler.init_noise_sigma
            cond = cond.expand(len(x), -1, -1)
            if reordered:
                x, cond = x[order], cond[order]
            for i, t in enumerate(scheduler.timesteps[: max(stops, default=0)]):
                running = sum(stop > i for stop in stops)
                embeds = torch.cat([uncond.expand(running, -1, -1), cond[:running]])
                eps_uncond, eps_cond = self.denoise(unet, torch.cat([x[:running]] * 2), t, embeds).chunk(2)
                step = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, x[:running]).prev_sample
                x = step if running == len(x) else torch.cat([step, x[running:]])
            if reordered:
                x = x[sorted(range(len(order)), key=order.__getitem__)]  # back to the callers' order
        return x

    def one_step(self, generator, alphas_cumprod: torch.Tensor, t_init: int, z: torch.Tensor, cond: torch.Tensor,
                 prediction: str = "epsilon") -> torch.Tensor:  # fmt: skip
        """A one-step generator's clean latent for noise `z` (pipelines/one_step.py; differentiable); `prediction`:
        what its UNet predicts (its scheduler's `prediction_type`)."""
        from ..one_step import one_step_sample

        return one_step_sample(generator, alphas_cumprod, t_init, z, cond, prediction=prediction)


class SD1(StableDiffusionFamily):
    name = "sd1"
    summary = "Stable Diffusion 1.x (CLIP ViT-L/14 text encoder, 512 px) and its fine-tunes"


class SD2(StableDiffusionFamily):
    name = "sd2"
    summary = "Stable Diffusion 2.x (OpenCLIP ViT-H/14 text encoder; 768 px v-prediction or 512 px eps)"
