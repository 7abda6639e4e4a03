"""Text-to-Unlearn (Nagasubramaniam et al., "Prompting Forgetting: Unlearning in GANs via Textual
Guidance", 2025): unlearning a concept from a GAN when the only input about it is text. The paper
has no public code; this follows its description:

1. A concept direction `i` in CLIP's image-embedding space, either
   - `text` (the cheap default, StyleGAN-NADA's): the normalised difference of the mean CLIP text
     embeddings of prompts that name the concept and of prompts that do not (its neighbours); or
   - `mapper` (StyleCLIP's latent mapper): a small MLP `M` trained so that `w + 0.1 M(w)` renders
     images CLIP matches with the concept (an L2 term keeps the edits small); `i` is the mean
     normalised difference of the CLIP image embeddings of the edited and the original renders.
2. Directional unlearning: a copy `G_t` of the generator (mapping network and ToRGB layers frozen,
   as StyleGAN-NADA) is trained so that, on latent codes whose renders show the concept (CLIP
   zero-shot, on the frozen generator `G_f`), images move *against* `i`:

       L_dir = 1 - cos(E_I(G_t(w)) - E_I(G_f(w)), -i)

   while on codes whose renders do not show it they stay put: the pixel MSE and the CLIP-feature
   distance between `G_t(w)` and `G_f(w)`. L_dir only asks the renders to move *towards* -i, not
   how far; `push_weight` adds the distance moved along i, <E_I(G_t(w)) - E_I(G_f(w)), i>.
   (The paper's identity-feature distance on faces is not here: no face model ships or loads offline.)
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from evaluators.clip_models import check_clip_available, check_clip_name
from evaluators.detect import ConceptDetector
from pipelines.errors import InputError

from .config import MethodConfig
from .gan_training import POOL_SEED_OFFSET, check_pool_memory, sample_pool
from .training import ErasureResult, Network, RunContext, TrainingLoop

MAPPER_STEP = 0.1  # StyleCLIP's w + 0.1 M(w)


@dataclass
class TextToUnlearnConfig(MethodConfig):
    # Defaults: StyleGAN-NADA's nominal optimiser settings (the paper has no public code; NADA's train.py scales
    # them by StyleGAN2's lazy-regularisation ratio 4/5: lr 0.0016, betas (0, 0.99^0.8)).
    steps: int = field(default=300, metadata={"bounds": "[1, inf)", "help": "generator updates"})
    lr: float = field(default=0.002, metadata={"bounds": "(0, inf)", "help": "Adam learning rate (StyleGAN-NADA's "
                                               "nominal one)"})  # fmt: skip
    batch_size: int = field(
        default=8, metadata={"bounds": "[2, inf)", "help": "codes per update, half with the concept, half without "
                                                      "(the mapper direction: also its batch of random codes)"}
    )
    adam_betas: list[float] = field(
        default_factory=lambda: [0.0, 0.99], metadata={"bounds": "[0, 1)", "length": 2, "help": "Adam betas"}
    )
    prompt_templates: list[str] = field(
        default_factory=list,
        metadata={"templates": True, "help": "prompts naming the concept, for its direction ('{}' = the concept; "
                  "default: the evaluation's CLIP ensemble for it)"},
    )  # fmt: skip
    clip: str | None = field(
        default=None, metadata={"help": "CLIP that guides (default: the model family's, digits-clip for digits, "
                                "openai/clip-vit-large-patch14 otherwise; or open_clip:NAME:WEIGHTS)"},
    )  # fmt: skip
    direction: Literal["text", "mapper"] = field(
        default="text", metadata={"help": "concept direction: text (prompt embeddings) or mapper (a latent "
                                  "mapper trained to add the concept; CLIP image embeddings)"},
    )  # fmt: skip
    neutral_prompts: list[str] = field(
        default_factory=list, metadata={"help": "text direction: prompts without the concept (default: the "
                                             "evaluation's anchor prompts; the pool's labels keep comparing with "
                                             "those)"}
    )
    pool: int = field(
        default=2000,
        metadata={"bounds": "[1, inf)", "help": "latent codes labelled by CLIP zero-shot (concept or not)"},
    )
    direction_weight: float = field(default=1.0, metadata={"bounds": "[0, inf)", "help": "weight of L_dir"})
    push_weight: float = field(
        default=0.0, metadata={"bounds": "[0, inf)", "help": "weight of <E_I(G_t(w)) - E_I(G_f(w)), i>: how far, not "
                               "only which way, the concept's renders move against i (L_dir, a cosine, rewards "
                               "the way alone)"},
    )  # fmt: skip
    push_stop: bool = field(
        default=False, metadata={"help": "stop pushing a render once its projection on i is down to the mean "
                                 "projection of the pool's renders without the concept (a hinge, not a push "
                                 "without end)"},
    )  # fmt: skip
    preserve_pixel: float = field(
        default=1.0, metadata={"bounds": "[0, inf)", "help": "weight of the pixel MSE on codes without it"}
    )
    preserve_clip: float = field(
        default=1.0, metadata={"bounds": "[0, inf)", "help": "weight of 1 - cos of CLIP features without it"}
    )
    augment: int = field(
        default=0, metadata={"help": "random shifts (up to 1/8 of the side) of each render CLIP scores, averaged: "
                             "a change must survive them, which small adversarial pixel edits do not"},
    )  # fmt: skip
    resolutions: list[int] = field(
        default_factory=list, metadata={"help": "train only the synthesis convolutions of these resolutions, e.g. "
                                        "[4, 8] (default: all)"},
    )  # fmt: skip
    lr_decay: float = field(
        default=0.0, metadata={"bounds": "[0, 1]", "help": "share of the updates, at the end, over which the "
                               "learning rate falls linearly to zero"},
    )  # fmt: skip
    train_mapping: bool = field(default=False, metadata={"help": "also train the mapping network"})
    train_torgb: bool = field(default=False, metadata={"help": "also train the ToRGB layers"})
    mapper_steps: int = field(default=200, metadata={"bounds": "[1, inf)", "help": "mapper direction: mapper updates"})
    mapper_lr: float = field(
        default=0.01, metadata={"bounds": "(0, inf)", "help": "mapper direction: Adam learning rate"}
    )
    mapper_l2: float = field(
        default=0.8, metadata={"bounds": "[0, inf)", "help": "mapper direction: weight of the mean of (w_hat - w)^2"}
    )
    mapper_samples: int = field(
        default=256, metadata={"bounds": "[1, inf)", "help": "mapper direction: renders averaged into i"}
    )

    def check(self, family, concepts) -> None:
        check_clip_available(self.clip or family.default_clip)  # the direction's CLIP, before the GAN loads

    def __post_init__(self) -> None:
        if self.clip is not None:
            check_clip_name(self.clip)
        if self.batch_size % 2:
            raise ValueError("batch_size must be even (half with the concept, half without)")
        for resolution in self.resolutions:
            if resolution < 4 or resolution & (resolution - 1):
                raise ValueError(f"resolutions: {resolution} is not a power of two from 4 up")


CONFIG = TextToUnlearnConfig
TEST_SETTINGS = {"steps": 3, "pool": 200, "batch_size": 4, "lr": 0.01}


# --- the concept direction -----------------------------------------------------------------------


def text_direction(clip, concept_prompts: list[str], neutral_prompts: list[str]) -> torch.Tensor:
    """normalise(mean E_T(concept prompts) - mean E_T(neutral prompts)), [D]."""
    with torch.no_grad():
        concept = clip.text_features(concept_prompts).mean(0)
        neutral = clip.text_features(neutral_prompts).mean(0)
    return F.normalize(concept - neutral, dim=-1)


class LatentMapper(torch.nn.Module):
    """StyleCLIP's global mapper, one MLP for all of w: w -> an edit of w."""

    def __init__(self, dim: int, layers: int = 4):
        super().__init__()
        blocks = []
        for _ in range(layers - 1):
            blocks += [torch.nn.Linear(dim, dim), torch.nn.LeakyReLU(0.2)]
        self.net = torch.nn.Sequential(*blocks, torch.nn.Linear(dim, dim))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + MAPPER_STEP * self.net(w)


def mapper_direction(generator, clip, concept_prompts: list[str], config: TextToUnlearnConfig, run: RunContext,
                     stage: str = "mapper") -> torch.Tensor:  # fmt: skip
    """Train a latent mapper to add the concept to the frozen generator's renders; the direction is
    the mean normalised CLIP image-embedding difference of edited and original renders, [D].

    The mapper trains on the shared loop as a stage of its own (checkpoints in `stage/` of the run's),
    from the run's seed, without disturbing the random streams of what follows."""
    device = run.torch_device
    folder = run.checkpoint_dir / stage if run.checkpoint_dir is not None else None
    # seed=None: the stream continues from the mapper's initialisation, drawn from the run's seed here
    mapper_run = dataclasses.replace(run, seed=None, checkpoint_dir=folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        mapper = LatentMapper(generator.config.style_dim).to(device)
        with torch.no_grad():
            target = F.normalize(clip.text_features(concept_prompts).mean(0), dim=-1)
        optimizer = torch.optim.Adam(mapper.parameters(), lr=config.mapper_lr)
        loop = TrainingLoop(mapper_run, {"mapper": Network(mapper, optimizer, None)}, desc=f"text2unlearn: {stage}",
                            fingerprint={"stage": stage})  # fmt: skip
        mapper_train = loop.modules["mapper"]
        noise = generator.fixed_noise()

        def step_fn(step: int) -> dict[str, float]:
            with torch.no_grad():
                w = generator.mapping(torch.randn(config.batch_size, generator.config.style_dim, device=device))
            edited = mapper_train(w)
            image = clip.image_features(_unit(generator.synthesis(edited, noise)))
            loss = (1 - image @ target).mean() + config.mapper_l2 * (edited - w).pow(2).mean()
            loop.update("mapper", loss)
            return {"mapper": loss.detach()}

        loop.fit(step_fn, config.mapper_steps)
        with torch.no_grad():
            z = torch.randn(config.mapper_samples, generator.config.style_dim, device=device)
            w = generator.mapping(z)
            before = clip.image_features(_unit(generator.synthesis(w, noise)))
            after = clip.image_features(_unit(generator.synthesis(mapper(w), noise)))
    return F.normalize(F.normalize(after - before, dim=-1).mean(0), dim=-1)


# --- the unlearning -------------------------------------------------------------------------------


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(-1, 1) + 1) / 2


class FixedNoiseSynthesis(torch.nn.Module):
    """w -> images with the generator's fixed noise, as a module of its own so that the shared loop
    (and DistributedDataParallel) sees the forward pass that trains."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.generator.synthesis(w, self.generator.fixed_noise())


def synthesis_layers(generator, resolution: int) -> list[torch.nn.Module]:
    """The synthesis network's constant input and convolutions working at `resolution` (4, 8, ...)."""
    if resolution == 4:
        return [generator.input, generator.conv1]
    level = resolution.bit_length() - 4  # 8 -> 0, 16 -> 1, ...
    if resolution & (resolution - 1) or not 0 <= level < len(generator.convs) // 2:
        raise InputError(f"resolutions: {resolution} is not a resolution of this {generator.config.size}px generator "
                         f"(4 to {generator.config.size}, powers of two)")  # fmt: skip
    return [generator.convs[2 * level], generator.convs[2 * level + 1]]


def select_trainable_layers(generator, train_mapping: bool, train_torgb: bool, resolutions=()) -> int:
    """Freeze the mapping network and the ToRGB layers unless asked, and the synthesis layers outside
    `resolutions` when some are named; returns the trainable count."""
    generator.requires_grad_(True)
    if resolutions:
        for layer in [generator.input, generator.conv1, *generator.convs]:
            layer.requires_grad_(False)
        for resolution in resolutions:
            for layer in synthesis_layers(generator, resolution):
                layer.requires_grad_(True)
    if not train_mapping:
        generator.style.requires_grad_(False)
    if not train_torgb:
        generator.to_rgb1.requires_grad_(False)
        generator.to_rgbs.requires_grad_(False)
    return sum(p.numel() for p in generator.parameters() if p.requires_grad)


def shifted_features(clip, images: list[torch.Tensor], views: int) -> list[torch.Tensor]:
    """CLIP image embeddings of each batch in `images` ([N, 3, S, S] in [0, 1]), averaged over
    `views` random shifts of up to 1/8 of the side (replicated edges; the same shifts for every
    batch, so that their differences compare like with like), normalised; unshifted when 0."""
    if views == 0:
        return [clip.image_features(x) for x in images]
    side = images[0].shape[-1]
    pad = max(1, side // 8)
    offsets = [torch.randint(0, 2 * pad + 1, (2,)).tolist() for _ in range(views)]
    out = []
    for x in images:
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        shifted = torch.cat([padded[..., dy : dy + side, dx : dx + side] for dy, dx in offsets])
        features = clip.image_features(shifted).view(views, len(x), -1).mean(0)
        out.append(F.normalize(features, dim=-1))
    return out


# Below this length a row's CLIP embedding has not moved, and its cosine has no direction to follow
UNMOVED = 1e-6


def directional_loss(student: torch.Tensor, frozen: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student - frozen, -direction) over rows (CLIP image embeddings); a row that has not moved
    counts as cos 0, without a gradient. At the first step the student is the frozen generator: the cosine of a
    zero vector through torch's eps has a gradient of ~1e8, and that one step filled Adam's second moment so that
    every later update was ~1e-4 of its size (the run stalled after its first step)."""
    moved = student - frozen
    length = moved.norm(dim=-1)
    live = length > UNMOVED
    cos = (moved @ -F.normalize(direction, dim=-1)) / torch.where(live, length, torch.ones_like(length))
    return (1 - torch.where(live, cos, torch.zeros_like(cos))).mean()


def push_term(features: torch.Tensor, moved: torch.Tensor, direction: torch.Tensor, floor: float | None):
    """How far renders sit along the concept direction, to be minimised: the mean of <moved, i>
    (without end), or with a `floor`, of relu(<E_I(G_t(w)), i> - floor), which stops pushing a
    render once it projects no higher than the renders without the concept."""
    if floor is None:
        return (moved @ direction).mean()
    return F.relu(features @ direction - floor).mean()


def push_floors(clip, absent: torch.Tensor, directions: list[torch.Tensor], views: int) -> list[float]:
    """Where renders without the concept (`absent`) sit along each direction, on average: the push's floors. They
    are seen as the push term sees renders, through `views` shifted views, whose own shifts leave the caller's
    random numbers as they were."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        (features,) = shifted_features(clip, [absent], views)
    return [(features @ d.to(features.device)).mean().item() for d in directions]


def _concept_directions(model, frozen, clip, concepts: list[str], pool_images: torch.Tensor,
                        config: TextToUnlearnConfig, run: RunContext) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """Each concept's CLIP direction (of its prompts against neutral ones, or of a trained mapper's images), which
    of the pool's samples CLIP sees it in ([pool, concepts]), and the prompts used (for the run's record)."""
    family, device = model.family, run.torch_device
    directions, flagged, used = [], [], {}
    for k, concept in enumerate(concepts):
        prompts = family.prompt_set(concept)
        concept_prompts = [p.format(concept) for p in config.prompt_templates] or prompts.clip_concept
        neutral_prompts = config.neutral_prompts or prompts.clip_anchors
        used[concept] = {"concept_prompts": concept_prompts}
        if config.direction == "text":  # the mapper's direction is of images: no neutral prompt enters it
            used[concept]["neutral_prompts"] = neutral_prompts
            directions.append(text_direction(clip, concept_prompts, neutral_prompts))
        else:
            directions.append(mapper_direction(frozen, clip, concept_prompts, config, run, f"mapper-{k}"))
        # the pool is labelled with the prompts that give the direction, so that the two name the same concept
        detector = ConceptDetector(concept, family, str(device), clip, classifier="clip",
                                   templates=config.prompt_templates)  # fmt: skip
        flagged.append(detector(pool_images))
    return directions, torch.stack(flagged, 1), used


def _unlearn_loss(images, frozen_images, features, frozen_features, has: torch.Tensor, global_has: torch.Tensor,
                  directions: list[torch.Tensor], floors: list[float] | None, config: TextToUnlearnConfig,
                  num_processes: int) -> tuple[torch.Tensor, dict]:
    """This process's loss and logs for its rows: each concept's directional and push terms on the rows that bear
    it, and the keep terms on the rows that bear none. `has`: (rows, concepts) for this process's rows;
    `global_has`: the same for the global batch, by which each term's mean is shared."""
    device = features.device

    def share(local: torch.Tensor, of_global: torch.Tensor) -> float:
        """A term is a mean over its rows of the global batch: this process's mean counts by its share of
        those rows, times the processes (whose gradients are averaged); 1 on one process."""
        return float(local.sum()) * num_processes / max(float(of_global.sum()), 1.0)

    # Every process logs every term (0 where it has none of its rows), so that their means agree.
    logs: dict[str, float] = {}
    loss = torch.zeros((), device=device)
    for k, direction in enumerate(directions):
        logs[f"dir_{k}"] = logs[f"push_{k}"] = 0.0
        if has[:, k].any():
            weight = share(has[:, k], global_has[:, k])
            now, before = features[has[:, k]], frozen_features[has[:, k]]  # the rows that bear concept k
            term = directional_loss(now, before, direction.to(device))
            push = push_term(now, now - before, direction.to(device), None if floors is None else floors[k])
            loss = loss + weight * config.direction_weight * term + weight * config.push_weight * push
            logs[f"dir_{k}"], logs[f"push_{k}"] = weight * term.detach(), weight * push.detach()
    keep = ~has.any(1)
    logs |= {"keep_pixel": 0.0, "keep_clip": 0.0}
    if keep.any():
        weight = share(keep, ~global_has.any(1))
        pixel = F.mse_loss(images[keep], frozen_images[keep])
        clip_distance = (1 - (features[keep] * frozen_features[keep]).sum(-1)).mean()
        loss = loss + weight * config.preserve_pixel * pixel + weight * config.preserve_clip * clip_distance
        logs |= {"keep_pixel": weight * pixel.detach(), "keep_clip": weight * clip_distance.detach()}
    return loss, logs


def erase(model, concepts: list[str], config: TextToUnlearnConfig, run: RunContext) -> ErasureResult:
    """Unlearn `concepts` from the GAN `model` from their names alone, guided by CLIP."""
    from evaluators.clip_models import load_clip

    family = model.family
    run.check_divisible("half the batch_size", config.batch_size // 2)
    check_pool_memory(config.pool, model.generator.config.size)  # before its codes are drawn, one seed at a time
    device = run.torch_device
    model.to(device)
    clip = load_clip(config.clip or family.default_clip, str(device))
    frozen = model.generator.eval().requires_grad_(False)

    pool_z = model.latents(range(POOL_SEED_OFFSET, POOL_SEED_OFFSET + config.pool))
    pool_images = sample_pool(model, config.pool)
    directions, flagged, used = _concept_directions(model, frozen, clip, concepts, pool_images, config, run)
    bearing, absent = flagged.any(1).nonzero().flatten(), (~flagged.any(1)).nonzero().flatten()
    if len(bearing) == 0 or len(absent) == 0:
        what = "none" if len(bearing) == 0 else "all"
        raise InputError(f"CLIP sees {' / '.join(concepts)} in {what} of {config.pool} samples: nothing to "
                         "unlearn from, or nothing to keep; raise `pool` or name the concept otherwise")  # fmt: skip

    floors = None
    if config.push_stop:
        floors = push_floors(clip, pool_images[absent].to(device), directions, config.augment)

    student = copy.deepcopy(frozen).train()
    trainable = select_trainable_layers(student, config.train_mapping, config.train_torgb, config.resolutions)
    synthesis = FixedNoiseSynthesis(student)
    optimizer = run.adam([p for p in student.parameters() if p.requires_grad], config.lr, config.adam_betas)
    loop = TrainingLoop(run, {"generator": Network(synthesis, optimizer, None)}, desc="text2unlearn")  # fmt: skip
    synthesis_train = loop.modules["generator"]
    half = config.batch_size // 2
    noise = frozen.fixed_noise()

    def step_fn(step: int) -> dict[str, float]:
        if config.lr_decay:  # a function of the step alone, so a resumed run takes the same rates
            remaining = (config.steps - step) / (config.steps * config.lr_decay)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * min(1.0, remaining)
        # Each process keeps its share of both halves, so that its loss has every term the global one has.
        with_concept = bearing[torch.randint(0, len(bearing), (half,))]
        without = absent[torch.randint(0, len(absent), (half,))]
        rows = torch.cat([run.shard(with_concept), run.shard(without)])
        z = pool_z[rows.to(pool_z.device)]
        mapping = student if config.train_mapping else frozen
        w = mapping.mapping(z)
        with torch.no_grad():
            frozen_images = frozen.synthesis(frozen.mapping(z), noise)
        images = synthesis_train(w)
        fork = torch.get_rng_state()  # the same shifts for both
        with torch.no_grad():
            (frozen_features,) = shifted_features(clip, [_unit(frozen_images)], config.augment)
        torch.set_rng_state(fork)
        (features,) = shifted_features(clip, [_unit(images)], config.augment)
        has = flagged[rows].to(device)
        global_has = flagged[torch.cat([with_concept, without])]
        loss, logs = _unlearn_loss(images, frozen_images, features, frozen_features, has, global_has, directions,
                                   floors, config, run.num_processes)  # fmt: skip
        loop.update("generator", loss)
        return logs

    logs = loop.fit(step_fn, config.steps)
    student.eval().requires_grad_(False)
    model.generator = student
    if config.train_mapping:  # else the mapping, and the checkpoint's tracked truncation centre, are unchanged
        model.latent_avg = student.mean_latent()
    outcome = {"text2unlearn": {
        "direction": config.direction, "pool": config.pool, "concept_bearing_codes": len(bearing),
        "codes_without": len(absent), "clip": clip.describe(), "prompts": used, "push_floors": floors,
    }}  # fmt: skip
    return ErasureResult(model, ["generator"], trainable, logs, outcome)
