"""A one-step text-to-image pipeline: the generator that Score Forgetting Distillation produces.

The generator is a UNet of the teacher's architecture, applied once: latent noise `z` is scaled to
the noise level of timestep `t_init` (x = sqrt(1 - abar) z, the noisy latent of a zero image),
the UNet predicts eps there, and the implied clean latent

    x0 = (x - sqrt(1 - abar) * eps) / sqrt(abar)     (from v: x0 = sqrt(abar) x - sqrt(1 - abar) v)

is decoded by the VAE; an SDXL generator also takes the pooled text embedding and time ids.
Classifier-free guidance was distilled into the weights, so sampling costs one UNet evaluation and
takes no guidance scale. Every part is a standard diffusers/transformers class saved in the usual
layout (model_index.json, safetensors per component); `t_init` lives in model_index.json. A plain diffusers
user can rebuild the same step from those parts (README).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .images import decode_latents
from .tokenizer import padded_ids


def x0_from_prediction(x_t: torch.Tensor, out: torch.Tensor, abar: torch.Tensor, prediction: str = "epsilon"):
    """The clean sample a UNet's output implies (abar broadcasts over x_t): from eps,
    x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); from v (SD 2.x at 768 px), x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    if prediction == "v_prediction":
        return abar.sqrt() * x_t - (1 - abar).sqrt() * out
    return (x_t - (1 - abar).sqrt() * out) / abar.sqrt()


def one_step_sample(unet, alphas_cumprod: torch.Tensor, t_init: int, z: torch.Tensor, embeds: torch.Tensor,
                    added_cond_kwargs: dict | None = None, prediction: str = "epsilon"):  # fmt: skip
    """The generator's clean latent for noise `z` under prompt embeddings `embeds` (SDXL: with its pooled
    embedding and time ids as `added_cond_kwargs`); differentiable."""
    abar = alphas_cumprod[t_init].to(z.device, torch.float32)
    dtype = next(unet.parameters()).dtype  # also for a DistributedDataParallel-wrapped UNet
    x = ((1 - abar).sqrt() * z).to(dtype)
    t = torch.full((len(z),), t_init, device=z.device, dtype=torch.long)
    added = {k: v.to(dtype) for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
    out = unet(x, t, embeds.to(dtype), added_cond_kwargs=added).sample
    return x0_from_prediction(x.float(), out.float(), abar, prediction)


def seed_noise(seeds, shape, device) -> torch.Tensor:
    """The initial noise the pipelines draw for each seed (one CPU generator per image), stacked."""
    rows = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.cat(rows).to(device)


# The same step with plain diffusers/transformers classes (README, Hub model cards; tested):
# `{folder}` is a Python expression for the model folder, `{prompt}` the prompt.
PLAIN_DIFFUSERS_RECIPE = """\
import json, os, torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from transformers import CLIPTextModel, CLIPTokenizer

folder = {folder}
unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
t_init = json.load(open(os.path.join(folder, "model_index.json")))["t_init"]
scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
abar = scheduler.alphas_cumprod[t_init]

ids = tokenizer(["{prompt}"], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
size = unet.config.sample_size
with torch.no_grad():
    z = torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    x = (1 - abar).sqrt() * z  # the noisy latent of a zero image at t_init
    out = unet(x, t_init, text_encoder(ids.input_ids)[0]).sample
    if scheduler.config.prediction_type == "v_prediction":  # SD 2.x at 768 px predicts v
        latent = abar.sqrt() * x - (1 - abar).sqrt() * out
    else:  # one step to a clean latent from the predicted noise
        latent = (x - (1 - abar).sqrt() * out) / abar.sqrt()
    decoded = vae.decode(latent / vae.config.scaling_factor).sample
image = VaeImageProcessor().postprocess(decoded)[0]
image.save("sample.png")
"""

# SDXL's one-step generator: both encoders' penultimate layers, the second's pooled output and six time ids.
PLAIN_DIFFUSERS_RECIPE_XL = """\
import json, os, torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

folder = {folder}
unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")]
tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=name) for name in ("tokenizer", "tokenizer_2")]
t_init = json.load(open(os.path.join(folder, "model_index.json")))["t_init"]
scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
abar = scheduler.alphas_cumprod[t_init]

size = unet.config.sample_size
pixels = size * 2 ** (len(vae.config.block_out_channels) - 1)
with torch.no_grad():
    outs = [encoder(tokenizer(["{prompt}"], padding="max_length", max_length=tokenizer.model_max_length,
                              return_tensors="pt").input_ids, output_hidden_states=True)
            for tokenizer, encoder in zip(tokenizers, encoders)]
    tokens = torch.cat([out.hidden_states[-2] for out in outs], dim=-1)
    added = {{"text_embeds": outs[1].text_embeds, "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]])}}
    z = torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    x = (1 - abar).sqrt() * z  # the noisy latent of a zero image at t_init
    out = unet(x, t_init, tokens, added_cond_kwargs=added).sample
    if scheduler.config.prediction_type == "v_prediction":
        latent = abar.sqrt() * x - (1 - abar).sqrt() * out
    else:  # one step to a clean latent from the predicted noise
        latent = (x - (1 - abar).sqrt() * out) / abar.sqrt()
    decoded = vae.decode(latent / vae.config.scaling_factor).sample
image = VaeImageProcessor().postprocess(decoded)[0]
image.save("sample.png")
"""


class OneStepPipeline(DiffusionPipeline):
    """Text-to-image in one UNet evaluation (guidance distilled in); see the module docstring. With a second
    tokenizer and text encoder it is SDXL's: the UNet also takes the pooled embedding and time ids."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["tokenizer_2", "text_encoder_2"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, t_init: int = 625, tokenizer_2=None,
                 text_encoder_2=None):  # fmt: skip
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)  # fmt: skip
        self.register_to_config(t_init=int(t_init))
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def _ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return padded_ids(tokenizer, prompts).to(self._execution_device)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token embeddings, SDXL's pooled embedding or None)."""
        if self.text_encoder_2 is None:
            return self.text_encoder(self._ids(self.tokenizer, prompts))[0], None
        first = self.text_encoder(self._ids(self.tokenizer, prompts), output_hidden_states=True)
        second = self.text_encoder_2(self._ids(self.tokenizer_2, prompts), output_hidden_states=True)
        return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds

    def time_ids(self, n: int) -> torch.Tensor:
        """SDXL's added time ids for a full, uncropped image of the UNet's size."""
        from .families.sdxl import default_time_ids

        return default_time_ids(self.unet.config.sample_size * self.vae_scale_factor, n, self._execution_device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either `prompt` or `prompt_embeds`")
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(prompts)
        if (self.text_encoder_2 is not None) != (pooled_prompt_embeds is not None):
            raise ValueError(
                "an SDXL one-step pipeline takes `pooled_prompt_embeds` with `prompt_embeds` (and only it)"
            )
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        added = None
        if pooled_prompt_embeds is not None:
            pooled = pooled_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            added = {"text_embeds": pooled, "time_ids": self.time_ids(len(pooled))}
        size = self.unet.config.sample_size
        shape = (len(prompt_embeds), self.unet.config.in_channels, size, size)
        device = self._execution_device
        # The same per-image generators as StableDiffusionPipeline, so a seed means the same noise.
        z = latents if latents is not None else randn_tensor(shape, generator=generator, device=device)
        alphas = self.scheduler.alphas_cumprod
        clean = one_step_sample(self.unet, alphas, self.config.t_init, z.to(device), prompt_embeds, added,
                                self.scheduler.config.prediction_type)  # fmt: skip
        if output_type == "latent":
            images = clean
        elif output_type == "pil":
            images = decode_latents(self.vae, clean, upcast=self.text_encoder_2 is not None)
        else:
            decoded = self.vae.decode(clean.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


__all__ = ["PLAIN_DIFFUSERS_RECIPE", "PLAIN_DIFFUSERS_RECIPE_XL", "OneStepPipeline", "one_step_sample", "seed_noise",
           "x0_from_prediction"]  # fmt: skip
