"""What the GAN erasure methods share: StyleGAN2's adversarial step on the shared training loop,
and the generator's own samples split by a concept detector.

The adversarial step is StyleGAN2's (Karras et al., CVPR 2020): non-saturating logistic loss, lazy
R1 penalty on real images every `r1_every` steps (with the matching correction of the
discriminator's Adam), optional instance noise on every discriminator input. "Real" images are
whatever the method trains towards: negatives when adapting, positives when unlearning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.errors import InputError

from .training import Network, RunContext, TrainingLoop

# The pool of samples a method labels is drawn from latent seeds far from the evaluation's
# (0, 1, 2, ...), so that no evaluated latent was ever a training image.
POOL_SEED_OFFSET = 1_000_000


@dataclass(frozen=True)
class AdversarialSettings:
    lr: float
    betas: tuple[float, float]
    r1: float
    r1_every: int
    instance_noise: float


def adversarial_networks(generator, discriminator, settings: AdversarialSettings) -> dict[str, Network]:
    """The generator and discriminator as networks of the shared loop, with StyleGAN2's Adam
    settings (the discriminator's corrected for the lazy R1 steps). No gradient clipping."""
    lazy = settings.r1_every / (settings.r1_every + 1)
    beta1, beta2 = settings.betas
    g_params = [p for p in generator.parameters() if p.requires_grad]
    g_optim = torch.optim.Adam(g_params, lr=settings.lr, betas=(beta1, beta2))
    d_optim = torch.optim.Adam(discriminator.parameters(), lr=settings.lr * lazy, betas=(beta1**lazy, beta2**lazy))
    return {"generator": Network(generator, g_optim, None), "discriminator": Network(discriminator, d_optim, None)}


def adversarial_step(loop: TrainingLoop, real: torch.Tensor, step: int, settings: AdversarialSettings,
                     generator_term: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:  # fmt: skip
    """One discriminator update on `real` ([B, 3, S, S] in [-1, 1], this process's rows) against
    fresh samples, then one generator update; `generator_term()` adds to the generator's loss."""
    generator, discriminator = loop.modules["generator"], loop.modules["discriminator"]
    batch, style_dim = len(real), _unwrap(generator).config.style_dim

    def noisy(images: torch.Tensor) -> torch.Tensor:
        if settings.instance_noise <= 0:
            return images
        return images + settings.instance_noise * torch.randn_like(images)

    with torch.no_grad():
        fake = generator(torch.randn(batch, style_dim, device=real.device))
    loss_d = F.softplus(discriminator(noisy(fake))).mean() + F.softplus(-discriminator(noisy(real))).mean()
    logs = {"d": loss_d.item()}
    if settings.r1 > 0 and step % settings.r1_every == 0:
        real = real.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(discriminator(noisy(real)).sum(), real, create_graph=True)
        r1 = grad.pow(2).sum([1, 2, 3]).mean()
        loss_d = loss_d + settings.r1 / 2 * r1 * settings.r1_every
        logs["r1"] = r1.item()
    loop.update("discriminator", loss_d)

    discriminator.requires_grad_(False)  # frozen while the generator steps
    images = generator(torch.randn(batch, style_dim, device=real.device))
    loss_g = F.softplus(-discriminator(noisy(images))).mean()
    logs["g"] = loss_g.item()
    if generator_term is not None:
        term = generator_term()
        logs["term"] = term.item()
        loss_g = loss_g + term
    loop.update("generator", loss_g)
    discriminator.requires_grad_(True)
    return logs


def real_batch(images: torch.Tensor, batch: int, run: RunContext) -> torch.Tensor:
    """A global batch drawn with replacement from `images` ([N, 3, S, S] in [0, 1]), this process's
    rows of it, in [-1, 1]."""
    rows = run.shard(torch.randint(0, len(images), (batch,)))
    return images[rows.to(images.device)] * 2 - 1


@torch.no_grad()
def sample_pool(gan, count: int, batch: int = 250) -> torch.Tensor:
    """`count` samples of the generator ([count, 3, S, S] in [0, 1], on the CPU) from the fixed
    latent seeds POOL_SEED_OFFSET + i, with the generator's fixed noise."""
    seeds = range(POOL_SEED_OFFSET, POOL_SEED_OFFSET + count)
    chunks = [gan.images(gan.latents(seeds[i : i + batch])).cpu() for i in range(0, count, batch)]
    return torch.cat(chunks)


def split_pool(images: torch.Tensor, detected: torch.Tensor, negatives: int | None, positives: int, concept: str,
               ) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """(negatives, positives): the first `negatives` images the detector flagged (0: all of them;
    None: none wanted) and the first `positives` it did not (0: all); refused when the pool holds
    too few of either."""
    flagged = detected.nonzero().flatten()
    clean = (~detected).nonzero().flatten()
    if negatives is not None and len(flagged) < max(negatives, 1):
        raise InputError(
            f"only {len(flagged)} of {len(images)} generator samples show {concept!r}, fewer than the {negatives} "
            "negatives asked for: raise `pool`, lower `num_negatives`, or give a folder with --set negatives=DIR"
        )
    if len(clean) == 0:
        raise InputError(f"every one of {len(images)} generator samples shows {concept!r}: no positives to keep")
    chosen = None if negatives is None else images[flagged[: negatives or len(flagged)]]
    return chosen, images[clean[: positives or len(clean)]]


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the network in .module
