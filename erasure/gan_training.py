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

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.devices import to_device
from pipelines.errors import InputError
from pipelines.stylegan2 import minibatch_stddev_group

from .training import Network, RunContext, TrainingLoop

log = logging.getLogger(__name__)

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


def stddev_chunks(samples: int, group: int, chunk: int) -> list[list[int]]:
    """The samples' indices split into chunks of about `chunk` (0: one chunk) on which the discriminator computes
    what it computes on all of them: its minibatch-stddev layer groups sample j with j + m, j + 2m, ... (m =
    samples / group), so a chunk takes whole groups, in that order. Samples that form no such groups stay whole."""
    if not chunk or chunk >= samples or minibatch_stddev_group(samples, group) != group:
        return [list(range(samples))]
    m, per = samples // group, max(1, chunk // group)
    return [[g * m + j for g in range(group) for j in range(start, min(start + per, m))] for start in range(0, m, per)]


def stddev_shard(run: RunContext, batch: torch.Tensor, group: int) -> torch.Tensor:
    """This process's rows of a global batch the discriminator sees: whole minibatch-stddev groups, in
    `stddev_chunks`' order, so that N processes compute what one process computes on the whole batch (`run.shard`'s
    consecutive rows would group other samples together). A batch that cannot be so split is split as `run.shard`
    splits it, with a warning when that changes the groups."""
    count = run.num_processes
    if count == 1:
        return batch
    run.check_divisible("the batch", len(batch))
    chunks = stddev_chunks(len(batch), group, len(batch) // count)
    if len(chunks) == count:
        return batch[torch.tensor(chunks[run.accelerator.process_index], device=batch.device)]
    if minibatch_stddev_group(len(batch), group) != minibatch_stddev_group(len(batch) // count, group):
        _warn_regrouped(len(batch), count, group)
    return run.shard(batch)


@functools.cache
def _warn_regrouped(batch: int, count: int, group: int) -> None:
    """Once per setting: sharding this batch changes which images the discriminator's stddev layer groups."""
    log.warning("batch_size = %d on %d processes: the discriminator's minibatch-stddev groups differ from one "
                "process's, so the run is not one process's; a multiple of %d keeps them", batch, count,
                group * count)  # fmt: skip


def adversarial_step(loop: TrainingLoop, real: torch.Tensor, step: int, settings: AdversarialSettings,
                     generator_term: GeneratorTerm | None = None, critic: CLIPFeatureDiscriminator | None = None,
                     micro_batch: int = 0) -> dict[str, float]:  # fmt: skip
    """One discriminator update on `real` ([B, 3, S, S] in [-1, 1], this process's rows) against
    fresh samples (and one of the vision-aided critic's head, whose prepared module `critic.head`
    must be), then one generator update. `generator_term(images, pooled)` adds to the generator's
    loss: `images` are the generator's samples of this update (before instance noise), `pooled` the
    vision-aided critic's pooled CLIP features of them (after it; None without a critic); it must be
    a mean over the images, or not depend on them.

    `micro_batch` > 0: each update's forward and backward passes take about that many images at a
    time, the gradients accumulated (each part's loss weighted by its share of the batch), so that
    only one part's graph is held. The parts are whole minibatch-stddev groups of the discriminator,
    and every random draw is made for the whole batch first, in the same order: the update is the
    whole batch's up to rounding; under several processes gradients are exchanged after the last part only.
    0, or a batch without such groups: the whole batch at once."""
    updates = _AdversarialUpdates(loop, real, settings, micro_batch)
    logs = {}
    with torch.no_grad():
        fake = updates.fakes()
    if critic is not None:
        logs["clip"] = updates.critic_head(critic, fake)
    logs.update(updates.discriminator(fake, penalised=settings.r1 > 0 and step % settings.r1_every == 0))
    logs.update(updates.generator(fake, generator_term, critic))
    return logs


class _AdversarialUpdates:
    """The three updates of one adversarial step, each over the step's parts (micro-batches of whole
    minibatch-stddev groups, with their shares of the batch). The random draws happen in the order the updates are
    called, each for the global batch: N processes, or a batch in parts, draw what one process draws for it whole."""

    def __init__(self, loop: TrainingLoop, real: torch.Tensor, settings: AdversarialSettings, micro_batch: int):
        self.loop, self.real, self.settings = loop, real, settings
        self.generator_module, self.discriminator_module = loop.modules["generator"], loop.modules["discriminator"]
        self.group = _unwrap(self.discriminator_module).stddev_group
        self.chunks = stddev_chunks(len(real), self.group, micro_batch)
        one = len(self.chunks) == 1
        self.parts = [(slice(None), 1.0)] if one else [(rows, len(rows) / len(real)) for rows in self.chunks]

    def _parts(self, network: str):
        """(rows, share, context) of each part: the context exchanges `network`'s gradients after the last only."""
        for i, (rows, share) in enumerate(self.parts):
            yield rows, share, self.loop.micro_batch(network, last=i == len(self.parts) - 1)

    def _global_randn(self, *local_shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Noise drawn for the global batch (every process draws the same), this process's rows of it."""
        run = self.loop.run
        rows, *rest = local_shape
        drawn = torch.randn(rows * run.num_processes, *rest, device=self.real.device, dtype=dtype)
        return stddev_shard(run, drawn, self.group)

    def _jitter(self, like: torch.Tensor) -> torch.Tensor | float:
        """Instance noise for images shaped as `like`."""
        if self.settings.instance_noise <= 0:
            return 0.0
        return self.settings.instance_noise * self._global_randn(*like.shape, dtype=like.dtype)

    def _noisy(self, images: torch.Tensor, noise: torch.Tensor | float, rows) -> torch.Tensor:
        return images if self.settings.instance_noise <= 0 else images + noise[rows]

    def _latents(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Fresh latents and per-layer noise maps for the global batch, in the order the generator would draw them
        itself."""
        generator = _unwrap(self.generator_module)
        z = self._global_randn(len(self.real), generator.config.style_dim)
        return z, [self._global_randn(len(self.real), *fixed.shape[1:]) for fixed in generator.fixed_noise()]

    def _generate(self, drawn, rows) -> torch.Tensor:
        z, maps = drawn
        return self.generator_module(z[rows], noise=[m[rows] for m in maps])

    def _logistic(self, critic_fn, fake: torch.Tensor, fake_noise, real_noise, rows) -> torch.Tensor:
        return (F.softplus(critic_fn(self._noisy(fake[rows], fake_noise, rows))).mean()
                + F.softplus(-critic_fn(self._noisy(self.real[rows], real_noise, rows))).mean())  # fmt: skip

    def fakes(self) -> torch.Tensor:
        """The generator's samples the critics train against, in batch order."""
        drawn = self._latents()
        fake = torch.cat([self._generate(drawn, rows) for rows, _ in self.parts])
        if len(self.parts) == 1:
            return fake
        return fake[torch.argsort(to_device(torch.tensor(sum(self.chunks, [])), fake.device))]

    def critic_head(self, critic: CLIPFeatureDiscriminator, fake: torch.Tensor) -> torch.Tensor:
        """One update of the vision-aided critic's head; its loss."""
        noises, total = (self._jitter(fake), self._jitter(self.real)), 0.0
        for rows, share, context in self._parts("clip_head"):
            with context:
                loss = share * self._logistic(lambda x: critic(x)[0], fake, *noises, rows)
                self.loop.accumulate("clip_head", loss)
            total += loss.detach()
        self.loop.update("clip_head")
        return total

    def discriminator(self, fake: torch.Tensor, penalised: bool) -> dict:
        """One update of StyleGAN2's discriminator, with the lazy R1 penalty on the real images when `penalised`."""
        settings, discriminator = self.settings, self.discriminator_module
        noises = self._jitter(fake), self._jitter(self.real)
        r1_noise = self._jitter(self.real) if penalised else 0.0
        logs = {"d": 0.0, **({"r1": 0.0} if penalised else {})}
        for rows, share, context in self._parts("discriminator"):
            with context:
                loss = share * self._logistic(discriminator, fake, *noises, rows)
                logs["d"] += loss.detach()
                if penalised:
                    real_rows = self.real[rows].detach().requires_grad_(True)
                    scores = discriminator(self._noisy(real_rows, r1_noise, rows)).sum()
                    (grad,) = torch.autograd.grad(scores, real_rows, create_graph=True)
                    r1 = share * grad.pow(2).sum([1, 2, 3]).mean()
                    loss = loss + settings.r1 / 2 * r1 * settings.r1_every
                    logs["r1"] += r1.detach()
                self.loop.accumulate("discriminator", loss)
        self.loop.update("discriminator")
        return logs

    def generator(self, fake: torch.Tensor, term_fn: GeneratorTerm | None,
                  critic: CLIPFeatureDiscriminator | None) -> dict:  # fmt: skip
        """One update of the generator against the critics, frozen meanwhile, plus `term_fn`'s term."""
        critics = [self.discriminator_module] + ([critic.head] if critic is not None else [])
        for module in critics:
            module.requires_grad_(False)
        drawn, noise = self._latents(), self._jitter(fake)
        logs = {"g": 0.0, **({"term": 0.0} if term_fn is not None else {})}
        for rows, share, context in self._parts("generator"):
            with context:
                images = self._generate(drawn, rows)
                seen = self._noisy(images, noise, rows)
                loss = F.softplus(-self.discriminator_module(seen)).mean()
                pooled = None
                if critic is not None:
                    critic_logits, pooled = critic(seen)
                    loss = loss + F.softplus(-critic_logits).mean()
                logs["g"] += share * loss.detach()
                if term_fn is not None:
                    term = term_fn(images, pooled)
                    logs["term"] += share * term.detach()
                    loss = loss + term
                self.loop.accumulate("generator", share * loss)
        self.loop.update("generator")
        for module in critics:
            module.requires_grad_(True)
        return logs


def real_batch(images: torch.Tensor, batch: int, run: RunContext, group: int) -> torch.Tensor:
    """A global batch drawn with replacement from `images` ([N, 3, S, S] in [0, 1]), this process's
    rows of it (`stddev_shard`, for a discriminator of minibatch-stddev `group`), in [-1, 1]."""
    rows = stddev_shard(run, torch.randint(0, len(images), (batch,)), group)
    return images[rows.to(images.device)] * 2 - 1


@torch.no_grad()
def sample_pool(gan, count: int, batch: int = 250) -> torch.Tensor:
    """`count` samples of the generator ([count, 3, S, S] in [0, 1], on the CPU) from the fixed
    latent seeds POOL_SEED_OFFSET + i, with the generator's fixed noise."""
    check_pool_memory(count, gan.generator.config.size)
    seeds = range(POOL_SEED_OFFSET, POOL_SEED_OFFSET + count)
    chunks = [gan.images(gan.latents(seeds[i : i + batch])).cpu() for i in range(0, count, batch)]
    return torch.cat(chunks)


def check_pool_memory(count: int, size: int, available: int | None = None) -> None:
    """Refuse, before drawing, a pool the host cannot hold: it is kept as float images (at 1024 px a pool of 2,000,
    Text-to-Unlearn's default, takes 25 GB), and running out of memory would end the run minutes later without a
    word."""
    needed = count * 3 * size * size * 4
    available = available_host_memory() if available is None else available
    if available is not None and needed > 0.8 * available:
        raise InputError(f"a pool of {count} samples at {size} px takes {needed / 2**30:.1f} GiB of host memory, "
                         f"and {available / 2**30:.1f} GiB is available: lower it with --set pool=N")  # fmt: skip


def available_host_memory() -> int | None:
    """Bytes of host memory available (Linux's MemAvailable), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def split_pool(images: torch.Tensor, detected: torch.Tensor, negatives: int | None, positives: int, concept: str,
               ) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """(negatives, positives): the first `negatives` images the detector flagged (0: all of them;
    None: none wanted) and the first `positives` it did not (0: all); refused when the pool holds
    too few of either."""
    flagged = detected.nonzero().flatten()
    clean = (~detected).nonzero().flatten()
    if negatives is not None and len(flagged) < max(negatives, 1):
        asked = f"fewer than the {negatives} negatives asked for" if negatives else "no negative to adapt to"
        raise InputError(
            f"only {len(flagged)} of {len(images)} generator samples show {concept!r}, {asked}: raise `pool`, "
            "lower `num_negatives`, or give a folder with --set negatives=DIR"
        )
    if len(clean) < max(positives, 1):
        asked = f"fewer than the {positives} positives asked for" if positives else "no positive to keep"
        raise InputError(f"only {len(clean)} of {len(images)} generator samples do not show {concept!r}, {asked}: "
                         "raise `pool`, lower `num_positives`, or give a folder with --set positives=DIR")
    chosen = None if negatives is None else images[flagged[: negatives or len(flagged)]]
    return chosen, images[clean[: positives or len(clean)]]


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the network in .module
