"""What the GAN methods share: StyleGAN2's adversarial step on the shared training loop, and the
generator's own samples split by a concept detector. The digits-gan recipe (zoo/gan_recipe.py)
trains with the same step.

The adversarial step is StyleGAN2's (Karras et al., CVPR 2020): non-saturating logistic loss, lazy
R1 penalty on real images every `r1_every` steps (with the matching correction of the
discriminator's Adam), optional instance noise on every discriminator input, and optionally a
second, vision-aided critic (Kumari et al., CVPR 2022: a small head on a frozen CLIP vision tower).
"Real" images are whatever the method trains towards: negatives when adapting, positives when
unlearning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.errors import InputError

from .training import Network, RunContext, TrainingLoop

CLIP_HEAD_WIDTH = 256

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


class CLIPFeatureDiscriminator(torch.nn.Module):
    """A small trainable head on frozen CLIP image features: the vision-aided discriminator of
    Kumari et al. (CVPR 2022), trained beside StyleGAN2's own. The pretrained features tell the
    generator about content (digit shape in the digits world) from the first steps.

    `preprocess` maps images in [-1, 1] to the vision tower's pixel values; None passes them as
    they are (digits-clip normalises with mean = std = 0.5, so [-1, 1] are its pixel values)."""

    def __init__(self, vision_model, head: torch.nn.Module, preprocess=None):
        super().__init__()
        self.vision = vision_model.eval().requires_grad_(False)
        self.head = head
        self.preprocess = preprocess

    @staticmethod
    def new_head(vision_model, hidden: int = CLIP_HEAD_WIDTH) -> torch.nn.Module:
        """The head's input: class token and mean patch token of every layer."""
        layers, width = vision_model.config.num_hidden_layers, vision_model.config.hidden_size
        return torch.nn.Sequential(
            torch.nn.Linear(width * 2 * layers, hidden), torch.nn.LeakyReLU(0.2), torch.nn.Linear(hidden, 1)
        )

    @classmethod
    def from_clip(cls, scorer, head: torch.nn.Module | None = None) -> CLIPFeatureDiscriminator:
        """On the vision tower of a transformers CLIP loaded by `evaluators.clip_models.load_clip`."""
        if scorer.model is None:
            raise InputError(f"the vision-aided critic needs a transformers CLIP, not {scorer.name!r}")
        vision = scorer.model.vision_model
        return cls(vision, head or cls.new_head(vision), lambda images: scorer.preprocess((images + 1) / 2))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, 1], the vision tower's pooled output [N, D]) for images in [-1, 1]."""
        pixels = images if self.preprocess is None else self.preprocess(images)
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        features = [torch.cat([h[:, 0], h[:, 1:].mean(1)], -1) for h in out.hidden_states[1:]]
        return self.head(torch.cat(features, -1)), out.pooler_output


def adversarial_networks(run: RunContext, generator, discriminator, settings: AdversarialSettings,
                         critic: CLIPFeatureDiscriminator | None = None) -> dict[str, Network]:  # fmt: skip
    """The generator, the discriminator (and the vision-aided critic's head) as networks of the
    shared loop, with StyleGAN2's Adam settings (the discriminator's corrected for the lazy R1
    steps). No gradient clipping."""
    lazy = settings.r1_every / (settings.r1_every + 1)
    beta1, beta2 = settings.betas
    g_params = [p for p in generator.parameters() if p.requires_grad]
    g_optim = run.adam(g_params, settings.lr, (beta1, beta2))
    d_optim = run.adam(discriminator.parameters(), settings.lr * lazy, (beta1**lazy, beta2**lazy))
    networks = {"generator": Network(generator, g_optim, None), "discriminator": Network(discriminator, d_optim, None)}
    if critic is not None:
        h_optim = run.adam(critic.head.parameters(), settings.lr, (beta1, beta2))
        networks["clip_head"] = Network(critic.head, h_optim, None)
    return networks


GeneratorTerm = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def adversarial_step(loop: TrainingLoop, real: torch.Tensor, step: int, settings: AdversarialSettings,
                     generator_term: GeneratorTerm | None = None,
                     critic: CLIPFeatureDiscriminator | None = None) -> dict[str, float]:  # fmt: skip
    """One discriminator update on `real` ([B, 3, S, S] in [-1, 1], this process's rows) against
    fresh samples (and one of the vision-aided critic's head, whose prepared module `critic.head`
    must be), then one generator update. `generator_term(images, pooled)` adds to the generator's
    loss: `images` are the generator's samples of this update (before instance noise), `pooled` the
    vision-aided critic's pooled CLIP features of them (after it; None without a critic)."""
    generator, discriminator = loop.modules["generator"], loop.modules["discriminator"]
    run, style_dim = loop.run, _unwrap(generator).config.style_dim

    def global_randn(*local_shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Noise drawn for the global batch (every process draws the same), this process's rows of it:
        N processes draw what one process draws for the whole batch."""
        rows, *rest = local_shape
        return run.shard(torch.randn(rows * run.num_processes, *rest, device=real.device, dtype=dtype))

    def noisy(images: torch.Tensor) -> torch.Tensor:
        if settings.instance_noise <= 0:
            return images
        return images + settings.instance_noise * global_randn(*images.shape, dtype=images.dtype)

    def generate(rows: int) -> torch.Tensor:
        """Samples with fresh latents and per-layer noise maps, drawn for the global batch in the order the
        generator would draw them itself."""
        z = global_randn(rows, style_dim)
        maps = [global_randn(rows, *fixed.shape[1:]) for fixed in _unwrap(generator).fixed_noise()]
        return generator(z, noise=maps)

    def logistic(critic_fn, fake_images, real_images) -> torch.Tensor:
        return F.softplus(critic_fn(noisy(fake_images))).mean() + F.softplus(-critic_fn(noisy(real_images))).mean()

    with torch.no_grad():
        fake = generate(len(real))
    logs = {}
    if critic is not None:
        loss_head = logistic(lambda x: critic(x)[0], fake, real)
        loop.update("clip_head", loss_head)
        logs["clip"] = loss_head.detach()
    loss_d = logistic(discriminator, fake, real)
    logs["d"] = loss_d.detach()
    if settings.r1 > 0 and step % settings.r1_every == 0:
        real = real.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(discriminator(noisy(real)).sum(), real, create_graph=True)
        r1 = grad.pow(2).sum([1, 2, 3]).mean()
        loss_d = loss_d + settings.r1 / 2 * r1 * settings.r1_every
        logs["r1"] = r1.detach()
    loop.update("discriminator", loss_d)

    critics = [discriminator] + ([critic.head] if critic is not None else [])
    for module in critics:  # frozen while the generator steps
        module.requires_grad_(False)
    images = generate(len(real))
    fake = noisy(images)
    loss_g = F.softplus(-discriminator(fake)).mean()
    pooled = None
    if critic is not None:
        critic_logits, pooled = critic(fake)
        loss_g = loss_g + F.softplus(-critic_logits).mean()
    logs["g"] = loss_g.detach()
    if generator_term is not None:
        term = generator_term(images, pooled)
        logs["term"] = term.detach()
        loss_g = loss_g + term
    loop.update("generator", loss_g)
    for module in critics:
        module.requires_grad_(True)
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
