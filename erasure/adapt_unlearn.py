"""Adapt-then-Unlearn (Tiwary, Guha et al., "Adapt then Unlearn: Exploring Parameter Space Semantics
for Unlearning in Generative Adversarial Networks", TMLR 2025): unlearning a feature of a GAN with
no real data, from the generator's own samples.

The samples are split by a detector (the domain judge, else CLIP zero-shot) into negatives, which
show the concept, and positives, which do not; either set may instead be a folder of images.

Stage 1, adapt: a copy of the generator is adapted to the negatives, as few-shot GAN adaptation:
the pretrained discriminator, StyleGAN2's losses, and an EWC penalty (Li et al., NeurIPS 2020)

    ewc = ewc_weight / 2 * sum_i F_i (theta_i - theta0_i)^2

with F the diagonal Fisher information of the discriminator's logit of a few generated samples, over the
synthesis convolutions (as the paper's code), so that the parameters the output depends on most stay near
theta0. The adapted parameters theta_N then sit away from theta0 in the direction that adds the concept.
Several adapted models (different seeds) may be trained.

Stage 2, unlearn: the *original* generator is trained adversarially on the positives, plus a
repulsion from every adapted model. With d = sum over adapted models of the mean over parameter
tensors of mean((theta - theta_N)^2):

    IL2 = 1 / (alpha d),   NL2 = -alpha d,   EL2 = exp(-alpha d)     (times repulsion_weight)

The paper's code: EL2 with weight 100, alpha ("gamma") 1, 2,000 adaptation and 1,000 unlearning
iterations at batch 16 and learning rate 0.002, EWC weight 5e8 with the Fisher of 32 samples, R1 10.
Its EMA copy of the generator (decay 0.5^(32/10^4) per step) is the adapted model repelled from and the
unlearned model evaluated; so it is here (`ema_decay`; the digits preset: 0, the trained weights).
Where it differs from what is here:
- its d is K/2 times this one (K adapted models; `value/2*len(ckpt_gens)`), so its gamma is alpha = gamma K / 2
  here for EL2 and NL2, and its IL2 is gamma / d (alpha = K / (2 gamma) here);
- its Adam continues the pretrained checkpoint's state at StyleGAN2's lazy-regularisation ratios; here it starts
  fresh at `lr`;
- its style mixing and path-length regularisation are left out here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from evaluators.clip_models import check_clip_available, check_clip_name
from evaluators.detect import check_classifier, clip_needed, concept_detectors
from pipelines.errors import InputError
from pipelines.images import image_folder_files, load_square_images

from .config import MethodConfig
from .gan_training import (
    AdversarialSettings,
    CLIPFeatureDiscriminator,
    adversarial_networks,
    adversarial_step,
    real_batch,
    sample_pool,
    split_pool,
    stddev_chunks,
)
from .training import (
    EMA,
    ErasureResult,
    RunContext,
    TrainingLoop,
    load_finished_stage,
    save_finished_stage,
    trainable_parameters,
)  # fmt: skip

REPULSIONS = ("el2", "il2", "nl2")
PAPER_REPULSION_WEIGHT = {"el2": 100.0, "il2": 1.0, "nl2": 1.0}
# The authors' code averages its generator with this decay per step (rosinality's StyleGAN2 `accum`).
EMA_DECAY = 0.5 ** (32 / 10_000)


@dataclass
class AdaptUnlearnConfig(MethodConfig):
    # Defaults: the paper's code (MNIST and CelebA-HQ StyleGAN2, rosinality's trainer).
    steps: int = field(default=1000, metadata={"bounds": "[1, inf)", "help": "stage 2 (unlearning) iterations"})
    lr: float = field(
        default=0.002, metadata={"bounds": "(0, inf)", "help": "Adam learning rate of generator and discriminator"}
    )
    batch_size: int = field(default=16, metadata={"bounds": "[1, inf)", "help": "images per iteration"})
    adam_betas: list[float] = field(
        default_factory=lambda: [0.0, 0.99], metadata={"bounds": "[0, 1)", "length": 2, "help": "Adam betas"}
    )
    prompt_templates: list[str] = field(
        default_factory=list,
        metadata={"templates": True, "help": "prompts naming the concept for the clip classifier ('{}' = the "
                  "concept; default: the evaluation's CLIP ensemble for it)"},
    )  # fmt: skip
    negatives: str | None = field(
        default=None, metadata={"help": "folder of images that show the concept (default: the generator's own "
                                "samples the classifier flags)", "input": True},
    )  # fmt: skip
    positives: str | None = field(
        default=None, metadata={"help": "folder of images without the concept (default: the generator's own "
                                "samples the classifier does not flag)", "input": True},
    )  # fmt: skip
    classifier: str = field(
        default="auto", metadata={"help": "what labels the generator's samples: auto (the domain judge where the "
                                  "family has one, else CLIP zero-shot), judge, clip, or image-classifier:PATH "
                                  "(a transformers image classifier; see classifier_label)"},
    )  # fmt: skip
    classifier_label: str | None = field(
        default=None, metadata={"help": "the image classifier's label that means the concept"}
    )
    clip: str | None = field(
        default=None, metadata={"help": "CLIP of the clip classifier (default: the model family's, digits-clip for "
                                "digits, openai/clip-vit-large-patch14 otherwise; or open_clip:NAME:WEIGHTS)"},
    )  # fmt: skip
    pool: int = field(
        default=4000,
        metadata={"bounds": "[1, inf)", "help": "generator samples labelled to find negatives and positives"},
    )
    num_negatives: int = field(
        default=200,
        metadata={"help": "negatives to adapt on (0: every flagged sample); from a folder, at most this many"},
    )
    num_positives: int = field(
        default=0,
        metadata={"help": "positives to unlearn on (0: every other sample); from a folder, at most this many"},
    )
    adapted_models: int = field(
        default=1, metadata={"bounds": "[1, inf)", "help": "adapted models to repel from (each its own seed; the "
                             "authors' MNIST runs repel from 5, each a full stage 1)"}
    )
    adapt_steps: int = field(
        default=2000, metadata={"bounds": "[1, inf)", "help": "stage 1 iterations per adapted model"}
    )
    unlearn_lr: float | None = field(
        default=None, metadata={"bounds": "(0, inf)", "help": "stage 2's learning rate (none: lr)"}
    )
    r1: float = field(
        default=10.0, metadata={"bounds": "[0, inf)", "help": "R1 penalty weight (lazy, every r1_every iterations)"}
    )
    r1_every: int = field(default=16, metadata={"bounds": "[1, inf)", "help": "iterations between R1 penalties"})
    instance_noise: float = field(
        default=0.0, metadata={"bounds": "[0, inf)", "help": "std of the noise added to discriminator inputs"}
    )
    vision_aided: str | None = field(
        default=None, metadata={"help": "a transformers CLIP whose frozen vision tower feeds a second, trained "
                                "critic head (Kumari et al. 2022), e.g. digits-clip; none: StyleGAN2's alone"},
    )  # fmt: skip
    ewc_weight: float = field(
        default=5e8, metadata={"bounds": "[0, inf)", "help": "EWC penalty weight (lambda) in stage 1"}
    )
    fisher_samples: int = field(
        default=32, metadata={"bounds": "[1, inf)", "help": "samples of the Fisher information estimate"}
    )
    fisher_batch: int = field(
        default=8,
        metadata={"bounds": "[0, inf)", "help": "images whose graph is held at once for the Fisher's per-sample "
                  "gradients (0: all; whole minibatch-stddev groups, so the same Fisher up to rounding)"},
    )  # fmt: skip
    micro_batch: int = field(
        default=0,
        metadata={"bounds": "[0, inf)", "help": "images per forward and backward pass of a training step, the "
                  "gradients accumulated (0: the whole batch; whole minibatch-stddev groups, so the same update up to "
                  "rounding): the activations of a batch that does not fit at once"},
    )  # fmt: skip
    repulsion: Literal["el2", "il2", "nl2"] = field(
        default="el2", metadata={"help": "repulsion form: el2 = exp(-alpha d), il2 = 1/(alpha d), nl2 = -alpha d"}
    )
    repulsion_weight: float | None = field(
        default=None,
        metadata={
            "bounds": "[0, inf)",
            "help": "weight of the repulsion (none: the paper's, 100 for el2, 1 otherwise)",
        },
    )
    ema_decay: float = field(
        default=EMA_DECAY,
        metadata={"bounds": "[0, 1)", "help": "decay per step of the generator's EMA, in both stages: the adapted "
                  "models are their EMA's weights, and so is the unlearned generator (the authors' code: "
                  "0.5^(32/10^4); 0: none, the trained weights themselves)"},
    )  # fmt: skip
    alpha: float = field(
        default=1.0, metadata={"bounds": "(0, inf)", "help": "scale of the parameter distance d in the repulsion (the "
                               "paper's code's gamma with K adapted models: alpha = gamma K / 2 for el2 and nl2)"}
    )

    def check(self, family, concepts) -> None:
        """The CLIPs it will load are to be had (offline: in the local cache) before the GAN loads."""
        if (self.negatives is None or self.positives is None) and clip_needed(concepts, family, self.classifier):
            check_clip_available(self.clip or family.default_clip)
        if self.vision_aided is not None:
            check_clip_available(self.vision_aided)

    def __post_init__(self) -> None:
        check_classifier(self.classifier, self.classifier_label)
        if self.clip is not None:
            check_clip_name(self.clip)
        if self.vision_aided is not None:
            check_clip_name(self.vision_aided, transformers_only=True)
        for folder in (self.negatives, self.positives):
            if folder is not None:
                image_folder_files(folder, 0)  # every file readable, at least one

    @property
    def weight(self) -> float:
        return PAPER_REPULSION_WEIGHT[self.repulsion] if self.repulsion_weight is None else self.repulsion_weight

    def adversarial(self, stage: str = "adapt") -> AdversarialSettings:
        lr = self.unlearn_lr if stage == "unlearn" and self.unlearn_lr is not None else self.lr
        return AdversarialSettings(lr, tuple(self.adam_betas), self.r1, self.r1_every, self.instance_noise)


CONFIG = AdaptUnlearnConfig
# A batch of 10: the discriminator's minibatch-stddev groups are single images both on one process and on
# two (neither 10 nor 5 is a multiple of its group of 4), so that two processes compute what one does.
TEST_SETTINGS = {"adapt_steps": 3, "steps": 3, "adapted_models": 2, "batch_size": 10, "pool": 200,
                 "num_negatives": 4, "num_positives": 8, "fisher_samples": 2}  # fmt: skip


# --- the two regularisers ------------------------------------------------------------------------


# The paper's code estimates the Fisher, and so applies EWC, over the synthesis convolutions alone (its Generator's
# `convs`): the mapping network, the constant input, the first layer and the ToRGB layers adapt unpenalised. Over
# the whole of digits-gan, 60% of the Fisher's mass sat on the ToRGB layers.
EWC_LAYERS = "convs."


def fisher_diagonal(generator, discriminator, samples: int, seed: int, instance_noise: float = 0.0,
                    chunk: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """Diagonal Fisher information of the generator's trainable synthesis convolutions (`EWC_LAYERS`): the mean
    over `samples` generated images of the squared gradient of the discriminator's logit of each.
    The graph of `chunk` images at a time is held for their per-sample backward passes (0: all)."""
    params = {n: p for n, p in trainable_parameters(generator).items() if n.startswith(EWC_LAYERS)}
    device = next(iter(params.values())).device
    noise = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, generator.config.style_dim, generator=noise).to(device)
    size = generator.config.size
    jitter = instance_noise * torch.randn((samples, 3, size, size), generator=noise).to(device) if instance_noise > 0 \
        else None  # fmt: skip
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for rows in stddev_chunks(samples, discriminator.stddev_group, chunk):
        images = generator(z[rows], randomize_noise=False)
        if jitter is not None:
            images = images + jitter[rows]
        logits = discriminator(images).flatten()
        for i in range(len(rows)):
            grads = torch.autograd.grad(logits[i], list(params.values()), retain_graph=i < len(rows) - 1,
                                        allow_unused=True)  # fmt: skip
            for (name, _), grad in zip(params.items(), grads):
                if grad is not None:
                    fisher[name] += grad.detach() ** 2 / samples
    return fisher


def ewc_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                fisher: dict[str, torch.Tensor], weight: float) -> torch.Tensor:  # fmt: skip
    """weight / 2 * sum_i F_i (theta_i - anchor_i)^2 over the parameters named in `fisher`."""
    total = sum((fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in fisher)
    return weight / 2 * total


def parameter_distance(params: dict[str, torch.Tensor], adapted: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """d: over adapted models, the sum of the mean over parameter tensors of mean((theta - theta_N)^2)."""
    names = list(adapted[0])
    return sum(sum(((params[n] - theta[n]) ** 2).mean() for n in names) / len(names) for theta in adapted)


def repulsion(distance: torch.Tensor, form: str, alpha: float) -> torch.Tensor:
    """The paper's three repulsions of a parameter distance; each falls as the distance grows."""
    if form == "il2":
        return 1 / (alpha * distance)
    if form == "nl2":
        return -alpha * distance
    if form == "el2":
        return torch.exp(-alpha * distance)
    raise ValueError(f"repulsion must be one of {', '.join(REPULSIONS)}, not {form!r}")


# --- the two stages --------------------------------------------------------------------------------


def _critic(clip, run: RunContext) -> CLIPFeatureDiscriminator | None:
    """A vision-aided critic with a fresh head (drawn from the stage's seed) on `clip`, if given."""
    if clip is None:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        return CLIPFeatureDiscriminator.from_clip(clip)


def _adversarial_stage(generator, discriminator, images: torch.Tensor, settings, config: AdaptUnlearnConfig,
                       run: RunContext, fingerprint: dict, desc: str, clip, steps: int, term_of: Callable,
                       ) -> tuple[dict[str, float], EMA | None, dict[str, torch.Tensor]]:  # fmt: skip
    """The loop both stages run: the GAN's adversarial training on `images` (with the vision-aided critic on `clip`,
    and an EMA copy of the generator under `ema_decay`), plus the stage's own term of the generator's loss, which
    `term_of(trained tensors)` makes (None: no term; a term's `logs` join the step's). Returns the last logs, the
    EMA (or None) and the trained tensors."""
    critic = _critic(clip, run)
    ema = EMA(generator, config.ema_decay) if config.ema_decay > 0 else None
    loop = TrainingLoop(run, adversarial_networks(run, generator, discriminator, settings, critic), desc=desc,
                        fingerprint=fingerprint, state={"ema": ema} if ema is not None else None)  # fmt: skip
    if critic is not None:
        critic.head = loop.modules["clip_head"]
    params = trainable_parameters(generator)  # the same tensors the prepared module trains
    images = images.to(run.torch_device)
    term = term_of(params)

    def step_fn(step: int) -> dict[str, float]:
        real = real_batch(images, config.batch_size, run, discriminator.stddev_group)
        logs = adversarial_step(loop, real, step, settings, term, critic, config.micro_batch)
        if ema is not None:
            ema.update(generator)
        return {**logs, **getattr(term, "logs", {})}

    return loop.fit(step_fn, steps), ema, params


def adapt(generator, discriminator, negatives: torch.Tensor, fisher: dict[str, torch.Tensor] | None,
          config: AdaptUnlearnConfig, run: RunContext, fingerprint: dict, desc: str, clip=None,
          ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Stage 1 for one adapted model: copies of `generator` and `discriminator` adapted to
    `negatives` under the EWC penalty (none without a Fisher); returns the adapted generator's trainable
    parameters."""
    generator, discriminator = copy.deepcopy(generator).train(), copy.deepcopy(discriminator).train()
    anchor = {n: p.detach().clone() for n, p in trainable_parameters(generator).items()}

    def ewc_of(params: dict[str, torch.Tensor]) -> Callable | None:
        if not fisher:
            return None
        return lambda images, pooled: ewc_penalty(params, anchor, fisher, config.ewc_weight)

    _, ema, params = _adversarial_stage(generator, discriminator, negatives, config.adversarial(), config, run,
                                        fingerprint, desc, clip, config.adapt_steps, ewc_of)  # fmt: skip
    if ema is not None:
        return {n: t.clone() for n, t in ema.shadow.items()}
    return {n: p.detach().clone() for n, p in params.items()}


class _Repulsion:
    """Stage 2's term: the weighted repulsion of the trained parameters from the adapted models' (its distance to
    them goes into the step's logs)."""

    def __init__(self, params: dict[str, torch.Tensor], adapted: list[dict[str, torch.Tensor]],
                 config: AdaptUnlearnConfig):  # fmt: skip
        self.params, self.adapted, self.config, self.logs = params, adapted, config, {}

    def __call__(self, images, pooled) -> torch.Tensor:
        distance = parameter_distance(self.params, self.adapted)
        self.logs = {"distance": distance.detach()}
        return self.config.weight * repulsion(distance, self.config.repulsion, self.config.alpha)


def unlearn(generator, discriminator, positives: torch.Tensor, adapted: list[dict[str, torch.Tensor]],
            config: AdaptUnlearnConfig, run: RunContext, fingerprint: dict, clip=None) -> dict[str, float]:  # fmt: skip
    """Stage 2: `generator` itself (in place) trained on `positives` with the repulsion from
    `adapted`; `discriminator` is trained beside it."""
    generator.train()
    discriminator.train()
    adapted = [{n: t.to(run.torch_device) for n, t in theta.items()} for theta in adapted]
    logs, ema, _ = _adversarial_stage(generator, discriminator, positives, config.adversarial("unlearn"), config, run,
                                      fingerprint, "adapt-unlearn: unlearn", clip, config.steps,
                                      lambda params: _Repulsion(params, adapted, config))  # fmt: skip
    if ema is not None:  # the repulsion moved the trained weights; the generator kept is their average
        ema.copy_to(generator)
    return logs


# --- the method ---------------------------------------------------------------------------------


def _adapted_file(run: RunContext, k: int) -> Path | None:
    return run.checkpoint_dir / f"adapted-{k}.safetensors" if run.checkpoint_dir is not None else None


def _samples(model, concepts: list[str], config: AdaptUnlearnConfig, detectors: dict | None,
             ) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """(negatives, positives, pool size used) in [0, 1] at the generator's resolution."""
    size = model.generator.config.size
    given = {}
    for name, folder, count in (("negatives", config.negatives, config.num_negatives),
                                ("positives", config.positives, config.num_positives)):  # fmt: skip
        if folder is not None:
            files = image_folder_files(Path(folder), 0)
            given[name] = load_square_images(files[: count or len(files)], size)
    if len(given) == 2:
        return given["negatives"], given["positives"], 0
    pool = sample_pool(model, config.pool)
    flagged = _flagged(pool, detectors)
    wanted = None if "negatives" in given else config.num_negatives
    kept = 0 if "positives" in given else config.num_positives  # a folder's count was applied to the folder
    negatives, positives = split_pool(pool, flagged, wanted, kept, " / ".join(concepts))
    return given.get("negatives", negatives), given.get("positives", positives), config.pool


def concept_share(model, theta: dict[str, torch.Tensor], detectors: dict, samples: int = 256) -> float:
    """The share of `samples` pool samples of the generator with parameters `theta` in which a
    detector sees its concept: how far stage 1 moved towards the negatives."""
    adapted = copy.copy(model)
    adapted.generator = copy.deepcopy(model.generator)
    with torch.no_grad():
        for name, p in adapted.generator.named_parameters():
            if name in theta:
                p.copy_(theta[name])
    return round(float(_flagged(sample_pool(adapted, samples), detectors).float().mean()), 4)


def _flagged(images: torch.Tensor, detectors: dict) -> torch.Tensor:
    """Per image: whether any detector sees its concept."""
    flagged = torch.zeros(len(images), dtype=torch.bool)
    for detector in detectors.values():
        flagged |= detector(images)
    return flagged


def erase(model, concepts: list[str], config: AdaptUnlearnConfig, run: RunContext) -> ErasureResult:
    """Unlearn `concepts` from the GAN `model`: adapt copies to negatives, then repel from them."""
    if model.discriminator is None:
        raise InputError(f"adapt-unlearn trains against the GAN's discriminator, and {model.source.spec} has none")
    run.check_divisible("batch_size", config.batch_size)
    device = run.torch_device
    model.to(device)
    model.generator.requires_grad_(True)
    model.discriminator.requires_grad_(True)
    detectors = None
    if config.negatives is None or config.positives is None:
        detectors = concept_detectors(concepts, model.family, str(device), config.clip, config.classifier,
                                      config.classifier_label, config.prompt_templates)  # fmt: skip
    negatives, positives, pool = _samples(model, concepts, config, detectors)
    clip = None
    if config.vision_aided is not None:
        from evaluators.clip_models import load_clip

        clip = load_clip(config.vision_aided, str(device))
    fingerprint = dict(run.fingerprint)  # the adapted models saved between stages are checked against it too

    seconds, shares = {}, []
    adapted = []
    fisher = None
    for k in range(config.adapted_models):
        stage = {**fingerprint, "stage": f"adapt-{k}"}
        saved = load_finished_stage(_adapted_file(run, k), stage) if run.resume else None
        if saved is not None:
            theta, seconds[f"adapt_{k}"] = saved[0], float(saved[1]["seconds"])
        else:
            started = time.time()
            if fisher is None and config.ewc_weight > 0:
                fisher = fisher_diagonal(model.generator, model.discriminator, config.fisher_samples, run.seed,
                                         config.instance_noise, config.fisher_batch)  # fmt: skip
            desc = "adapt-unlearn: adapt" + (f" {k + 1}/{config.adapted_models}" if config.adapted_models > 1 else "")
            theta = adapt(model.generator, model.discriminator, negatives, fisher, config,
                          run.stage(f"adapt-{k}", 1 + k), stage, desc, clip)  # fmt: skip
            seconds[f"adapt_{k}"] = round(time.time() - started, 2)
            if run.is_main:
                save_finished_stage(_adapted_file(run, k), theta, stage, seconds=str(seconds[f"adapt_{k}"]))
        adapted.append({n: t.to(device) for n, t in theta.items()})
        if detectors is not None:
            shares.append(concept_share(model, theta, detectors))

    started = time.time()
    logs = unlearn(model.generator, model.discriminator, positives, adapted, config,
                   run.stage("unlearn"), {**fingerprint, "stage": "unlearn"}, clip)  # fmt: skip
    seconds["unlearn"] = round(time.time() - started, 2)
    model.generator.eval().requires_grad_(False)
    model.discriminator.eval().requires_grad_(False)
    model.latent_avg = model.generator.mean_latent()  # the truncation centre moved with the mapping
    trained = sum(p.numel() for p in model.generator.parameters()) + sum(
        p.numel() for p in model.discriminator.parameters()
    )
    outcome = {"adapt_unlearn": {"negatives": len(negatives), "positives": len(positives), "pool": pool,
                                 "adapted_models": config.adapted_models, "adapted_concept_share": shares,
                                 "stage_seconds": seconds}}  # fmt: skip
    return ErasureResult(model, ["generator", "discriminator"], trained, logs, outcome)
