"""The recipe that trains the embedded digits world from a seed (`erasure zoo build`).

Order matters: the judge first (it scores everything after it), then digits-clip (its text tower
becomes digits-sd's frozen text encoder, as CLIP's is for Stable Diffusion), the VAE, and last the
UNet of digits-sd on VAE latents of renders with caption dropout for classifier-free guidance.
Each step trains on freshly drawn renders of the train split only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipelines.zoo.judge import JudgeNetwork
from pipelines.zoo.renders import RenderSampler

CLIP_CONTEXT = 24  # captions are short (<= 14 tokens); SD's 77 would only cost compute
CAPTION_DROPOUT = 0.1


@dataclass
class RecipeSteps:
    """Optimiser steps per model; `scaled(0.001)` gives the few-step smoke run the tests use."""

    judge: int = 2000
    clip: int = 3000
    vae: int = 1500
    unet: int = 5000
    gan: int = 54000
    gan_sharpen: int = 8000
    gan_distil: int = 3000
    batch: int = 128  # judge
    clip_batch: int = 128
    vae_batch: int = 32
    unet_batch: int = 64
    gan_batch: int = 32

    def scaled(self, factor: float) -> RecipeSteps:
        if factor >= 1:
            return self
        return RecipeSteps(
            judge=max(2, int(self.judge * factor)),
            clip=max(2, int(self.clip * factor)),
            vae=max(2, int(self.vae * factor)),
            unet=max(2, int(self.unet * factor)),
            gan=max(2, int(self.gan * factor)),
            gan_sharpen=max(2, int(self.gan_sharpen * factor)),
            gan_distil=max(2, int(self.gan_distil * factor)),
            batch=8,
            clip_batch=8,
            vae_batch=8,
            unet_batch=8,
            gan_batch=8,
        )


def _cosine_lr(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 100):
    warmup = min(warmup, max(1, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur and noise a random half of a batch, so that the judge also reads imperfect samples."""
    n = images.shape[0]
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1)
    pick = (torch.rand(n, 1, 1, 1, generator=generator) < 0.3).float()
    images = pick * blurred + (1 - pick) * images
    noise = torch.randn(images.shape, generator=generator) * 0.05
    noisy = (torch.rand(n, 1, 1, 1, generator=generator) < 0.3).float()
    return (images + noisy * noise).clamp(0, 1)


def train_judge(out_dir: Path, steps: int, batch: int, seed: int) -> JudgeNetwork:
    torch.manual_seed(seed)
    sampler = RenderSampler("train", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = JudgeNetwork()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = _cosine_lr(optimizer, steps)
    model.train()
    for _ in tqdm(range(steps), desc="digits-judge", unit="step"):
        b = sampler.sample(batch)
        logits = model(_degrade(b.images, g))
        loss = sum(
            F.cross_entropy(logits[head], target, label_smoothing=0.05)
            for head, target in (("digit", b.digits), ("colour", b.colours), ("style", b.styles))
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    model.save_pretrained(out_dir, {"seed": seed, "steps": steps})
    return model


def digits_clip_config():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    from pipelines.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE

    text = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=CLIP_CONTEXT, projection_dim=64,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, hidden_act="quick_gelu",
    )  # fmt: skip
    vision = CLIPVisionConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=64, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, projection_dim=64, hidden_act="quick_gelu",
    )  # fmt: skip
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """digits-clip's image preprocessing: [0, 1] -> [-1, 1] (mean 0.5, std 0.5 per channel)."""
    return images * 2 - 1


def _save_image_processor(out_dir: Path) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out_dir)  # fmt: skip


def train_clip(out_dir: Path, steps: int, batch: int, seed: int):
    from transformers import CLIPModel

    from pipelines.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(CLIP_CONTEXT)
    model = CLIPModel(digits_clip_config())
    sampler = RenderSampler("train", seed=seed + 10, p_partial=0.15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98))
    schedule = _cosine_lr(optimizer, steps, warmup=200)
    model.train()
    bar = tqdm(range(steps), desc="digits-clip", unit="step")
    for _ in bar:
        b = sampler.sample(batch)
        ids = tokenizer(b.captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
        out = model(input_ids=ids, pixel_values=clip_pixels(b.images), return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.eval()
    model.save_pretrained(out_dir)
    _save_image_processor(out_dir)
    return model


def digits_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32,
    )  # fmt: skip


def train_vae(out_dir: Path, steps: int, batch: int, seed: int):
    torch.manual_seed(seed)
    vae = digits_vae()
    sampler = RenderSampler("train", seed=seed + 20)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = _cosine_lr(optimizer, steps)
    vae.train()
    bar = tqdm(range(steps), desc="digits-sd vae", unit="step")
    for _ in bar:
        x = sampler.sample(batch).images * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # L1 keeps strokes sharp; the KL weight only keeps the latent scale tame, as in SD's VAE.
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():  # SD rescales latents to unit variance; measure the factor on renders
        latents = torch.cat([vae.encode(sampler.sample(128).images * 2 - 1).latent_dist.mean for _ in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(out_dir)
    return vae


def digits_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=2, norm_num_groups=32,
    )  # fmt: skip


def digits_scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion's own noise schedule, so methods see the same timesteps as on SD 1.x.
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip


def train_unet(out_dir: Path, text_encoder, tokenizer, vae, steps: int, batch: int, seed: int):
    """Train digits-sd's UNet (eps-prediction, SD noise schedule) with an EMA of its weights."""
    torch.manual_seed(seed)
    unet = digits_unet()
    ema = digits_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    scheduler = digits_scheduler()
    alphas = scheduler.alphas_cumprod
    sampler = RenderSampler("train", seed=seed + 30)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-4, weight_decay=0.0)
    schedule = _cosine_lr(optimizer, steps, warmup=200)
    text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    unet.train()
    bar = tqdm(range(steps), desc="digits-sd unet", unit="step")
    for step in bar:
        b = sampler.sample(batch)
        captions = ["" if rng.random() < CAPTION_DROPOUT else c for c in b.captions]
        with torch.no_grad():
            ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
            cond = text_encoder(ids).last_hidden_state
            latents = vae.encode(b.images * 2 - 1).latent_dist.sample() * vae.config.scaling_factor
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(latents)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, cond).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.eval()
    ema.save_pretrained(out_dir)
    return ema
