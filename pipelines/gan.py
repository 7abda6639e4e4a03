"""GAN backend with the same face as the diffusion one: generate by seed, expose the parts a
method patches (mapping, synthesis, discriminator), save the patched generator."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .bounds import COUNT, TRUNCATION, check_number
from .cards import write_model_card
from .gan_checkpoints import load_any, save_gan
from .images import to_pil
from .loading import ModelSource


class GANModel:
    kind = "gan"

    def __init__(self, generator, discriminator, latent_avg, source: ModelSource):
        self.generator = generator
        self.discriminator = discriminator
        self.source = source
        self.latent_avg = latent_avg if latent_avg is not None else generator.mean_latent()

    @property
    def device(self) -> torch.device:
        return self.generator.input.input.device

    @property
    def family(self):
        """The model's family (pipelines/families): the prompts and judges of its world, and presets."""
        return self.source.family

    @property
    def resolution(self) -> int:
        """The side of the images it draws."""
        return self.generator.config.size

    def to(self, device) -> GANModel:
        self.generator.to(device)
        if self.discriminator is not None:
            self.discriminator.to(device)
        self.latent_avg = self.latent_avg.to(device)
        return self

    def latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """z [N, style_dim], one generator per seed: the same seed gives the same z everywhere."""
        dim = self.generator.config.style_dim
        z = [torch.randn(1, dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.cat(z).to(self.device)

    def images(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        """Images in [0, 1], [N, 3, S, S], with the generator's fixed noise (deterministic)."""
        out = self.generator(z, truncation, self.latent_avg, randomize_noise=False)
        return (out.clamp(-1, 1) + 1) / 2

    @torch.no_grad()
    def generate(self, seeds: Sequence[int], truncation: float = 1.0, batch_size: int = 64) -> list[Image.Image]:
        check_number("truncation", truncation, TRUNCATION)
        check_number("batch_size", batch_size, COUNT, integer=True)
        seeds = list(seeds)
        out: list[Image.Image] = []
        for i in range(0, len(seeds), batch_size):
            out += to_pil(self.images(self.latents(seeds[i : i + batch_size]), truncation))
        return out

    def save(self, directory: str | Path, card: dict | None = None, **how) -> dict[str, str]:
        """Save the generator (and discriminator) whole: a GAN folder is two files of a few MB, with no
        components to share with its base, so the `changed`/`mode` options of pipelines do not apply."""
        directory = Path(directory)
        save_gan(directory, self.generator, self.discriminator, self.latent_avg)
        write_model_card(directory, {**self.source.card, "family": self.family.name, **(card or {})})
        return {}


def load_gan(source: ModelSource, device: str = "cpu") -> GANModel:
    generator, discriminator, latent_avg = load_any(Path(source.path))
    return GANModel(generator.float(), discriminator.float() if discriminator is not None else None,
                    latent_avg.float() if latent_avg is not None else None, source).to(device)  # fmt: skip
