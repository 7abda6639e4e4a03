"""Score distillation from digits-sd, a generator term for digits-gan's last stage.

Score distillation sampling (Poole et al., DreamFusion, ICLR 2023) uses a frozen text-to-image
diffusion model as a critic of single images: noise the image's latent at a random timestep, let
the UNet predict the noise with classifier-free guidance, and push the latent along the difference
between predicted and added noise. Here each generated sample's caption names the digit that
digits-clip's zero-shot classifier reads in it, so the push is towards a cleaner drawing of the
digit the sample already shows, not towards another one.
"""

from __future__ import annotations

import torch

from pipelines.zoo.world import COLOURS, DIGIT_WORDS, STYLES


class ScoreDistillation:
    """`loss(images, digit, colour, style)`: a surrogate whose gradient on the latents is digits-sd's
    guided score-distillation gradient, with DreamFusion's weighting w(t) = 1 - alpha_bar_t.

    `styled`: the caption names the style too (`a red bold seven`), else only colour and digit.
    `colour_blind`: the model sees the brightest channel of each pixel, as a white drawing, and the
    caption says white; its gradient can then reshape the strokes but not move their hue."""

    def __init__(self, pipe, guidance: float = 5.0, t_range: tuple[float, float] = (0.02, 0.98),
                 styled: bool = True, colour_blind: bool = False):  # fmt: skip
        self.settings = {"guidance": guidance, "t_range": list(t_range), "styled": styled, "colour_blind": colour_blind}
        self.unet = pipe.unet.eval().requires_grad_(False)
        self.vae = pipe.vae.eval().requires_grad_(False)
        self.guidance, self.colour_blind = guidance, colour_blind
        steps = pipe.scheduler.config.num_train_timesteps
        self.t_low, self.t_high = int(t_range[0] * steps), int(t_range[1] * steps)
        self.alphas = pipe.scheduler.alphas_cumprod.float()
        self.styles = STYLES if styled else ("",)
        captions = [" ".join(f"a {c} {s} {d}".split()) for d in DIGIT_WORDS for c in COLOURS for s in self.styles]
        ids = pipe.tokenizer([""] + captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            self.captions = pipe.text_encoder(ids)[0]  # [1 + digits * colours * styles, L, D]; 0 is unconditional

    def _caption_index(self, digit: torch.Tensor, colour: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if self.colour_blind:
            colour = torch.zeros_like(colour)  # COLOURS[0], white
        if len(self.styles) == 1:
            style = torch.zeros_like(style)
        return 1 + (digit * len(COLOURS) + colour) * len(self.styles) + style

    def loss(self, images: torch.Tensor, digit: torch.Tensor, colour: torch.Tensor, style: torch.Tensor):
        """`images` in [-1, 1], [N, 3, H, W]; labels [N] (long). Differentiable only through `images`."""
        if self.colour_blind:
            images = images.amax(1, keepdim=True).expand_as(images)
        latents = self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor
        n = latents.shape[0]
        t = torch.randint(self.t_low, self.t_high + 1, (n,))
        noise = torch.randn_like(latents)
        alpha = self.alphas[t].view(n, 1, 1, 1)
        noisy = alpha.sqrt() * latents.detach() + (1 - alpha).sqrt() * noise
        captions = self.captions[self._caption_index(digit, colour, style)]
        text = torch.cat([self.captions[:1].expand(n, -1, -1), captions])
        with torch.no_grad():
            uncond, cond = self.unet(torch.cat([noisy, noisy]), torch.cat([t, t]), text).sample.chunk(2)
        grad = (1 - alpha) * (uncond + self.guidance * (cond - uncond) - noise)
        # the UNet is not differentiated (as in DreamFusion): d/d latents of this sum is grad / n
        return (grad * latents).sum() / n
