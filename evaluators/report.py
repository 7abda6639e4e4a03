"""The before/after protocol: both models draw the same (prompt, seed) grid and are scored alike.

For each concept: presence on target prompts (domain judge and CLIP zero-shot), preservation on
neighbour and unrelated prompts (judge accuracy in the digits world, CLIP score), and FID/KID
between the two models' preserved images and, where real data exists, against it. Every metric is
stored with the settings that produced it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from PIL import Image

from pipelines.files import slug
from pipelines.images import labelled_grid, to_pil, to_tensor

if TYPE_CHECKING:
    from pipelines.families import Family

from .clip_models import ClipScorer, load_clip
from .detect import CLIP_PRESENCE_RULE
from .features import FeatureExtractor, feature_extractor
from .judges import default_judge
from .metrics import (
    CLIP_SCORE_FORMULA,
    FID_MIN_SET,
    KID_MIN_SET,
    clip_score,
    fid_warning,
    frechet_distance,
    kernel_inception_distance,
    presence_warning,
    wasserstein_1d,
    zero_shot_presence,
)
from .report_format import FORMAT

GRID_PROMPTS, GRID_SEEDS = 6, 6
BATCH = 16  # images generated at once
DEGREE_OF_UNLEARNING = (
    "Wasserstein-1 distance between the before and after distributions of the CLIP cosine (of each sample's image "
    "embedding and the mean embedding of the concept prompts; not the score x 100): Text-to-Unlearn's degree of "
    "unlearning"
)


@dataclass
class Evaluation:
    report: dict
    grids: dict[str, Image.Image] = field(default_factory=dict)
    images: dict = field(default_factory=dict)  # (concept, part, "before"/"after") -> the images scored [N, 3, H, W]


@dataclass
class _Protocol:
    """What the text-to-image and the GAN protocol set up alike: seeds, CLIP, and per concept the
    domain judge, the FID features and the judge's real reference images, where it has them."""

    family: Family
    seed: int
    seeds: list[int]
    device: str
    clip: ClipScorer
    fid_features: str | None

    @classmethod
    def of(cls, before, samples: int, seed: int, clip, fid_features: str | None) -> _Protocol:
        device = str(before.device)
        if isinstance(clip, str) or clip is None:
            clip = load_clip(clip or before.family.default_clip, device)
        return cls(before.family, seed, list(range(seed, seed + samples)), device, clip, fid_features)

    def judge(self, concept: str):
        return default_judge(concept, self.family, self.device)

    def extractor(self, judge) -> FeatureExtractor:
        """The asked-for features; by default the judge's own where it has them, else CLIP's."""
        default = "judge" if hasattr(judge, "features") else "clip"
        return feature_extractor(self.fid_features or default, judge=judge, clip=self.clip, device=self.device)

    def real_features(self, judge, extractor: FeatureExtractor, without: str | None = None) -> torch.Tensor | None:
        """Features of the judge's held-out real images (`without` a concept), or None without any."""
        if not hasattr(judge, "real_images"):
            return None
        return extractor(judge.real_images(seed=self.seed, without=without))


def _pair(before: float | None, after: float | None, settings: dict) -> dict:
    difference = None if before is None or after is None else after - before
    return {"before": before, "after": after, "difference": difference, "settings": settings}


def _presence(before: float, after: float, settings: dict) -> dict:
    """A before/after share of images showing the concept, warned when the base showed it in too few of them."""
    return _warned(_pair(before, after, settings), presence_warning(before, settings["images"]))


def _warned(metric: dict, *warnings: str | None) -> dict:
    """`metric` with its warnings (those not None), which hold whether or not it has a value."""
    kept = [w for w in warnings if w]
    if kept:
        metric["warning"] = "; ".join(kept)
    return metric


def _fid(a: torch.Tensor, b: torch.Tensor) -> tuple[float | None, str | None]:
    """FID of two feature sets and its caveat (metrics.fid_warning); None below FID_MIN_SET images in a set."""
    n = min(len(a), len(b))
    return (frechet_distance(a, b) if n >= FID_MIN_SET else None), fid_warning(n, a.shape[1])


def _fid_pair(before: torch.Tensor, after: torch.Tensor, reference: torch.Tensor, settings: dict) -> dict:
    """FID of the base's and of the erased model's features against one reference, as a before/after metric
    (the two sets are drawn alike, so they have the same size and the same caveat)."""
    (fid_before, warning), (fid_after, _) = _fid(before, reference), _fid(after, reference)
    return _warned(_pair(fid_before, fid_after, settings), warning)


def _side_by_side(rows_before, rows_after, row_labels, column_labels, before_name, after_name) -> Image.Image:
    n_p, n_s = min(GRID_PROMPTS, len(row_labels)), min(GRID_SEEDS, len(column_labels))
    columns = column_labels[:n_s]
    left = labelled_grid([r[:n_s] for r in rows_before[:n_p]], row_labels[:n_p], columns)
    right = labelled_grid([r[:n_s] for r in rows_after[:n_p]], None, columns)
    header = 18
    canvas = Image.new("RGB", (left.width + right.width + 16, max(left.height, right.height) + header), "white")
    from PIL import ImageDraw

    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), f"before: {before_name}", fill=(0, 0, 0))
    draw.text((left.width + 16, 2), f"after: {after_name}", fill=(0, 0, 0))
    canvas.paste(left, (0, header))
    canvas.paste(right, (left.width + 16, header))
    return canvas


class Halves(NamedTuple):
    first: torch.Tensor  # image indices
    second: torch.Tensor
    same_prompts: bool  # False: the halves hold different prompts (one seed each)


def _indices(groups: list[list[int]]) -> torch.Tensor:
    """The image indices of (prompt, seed) pairs, each a list of indices (a file may list a pair twice), flattened."""
    return torch.tensor(sorted(i for group in groups for i in group), dtype=torch.long)


@dataclass
class PromptRows:
    """What one part of the protocol draws: each prompt with its own seeds and guidance (None: the default)."""

    texts: list[str]
    seeds: list[list[int]]
    guidance: list[float | None]

    @classmethod
    def uniform(cls, texts: list[str], seeds: list[int]) -> PromptRows:
        return cls(list(texts), [list(seeds) for _ in texts], [None] * len(texts))

    @classmethod
    def from_file(cls, rows: list, seeds: list[int]) -> PromptRows:
        """Rows of a prompt file (evaluators/prompt_files.py): a row's own seed, else the protocol's seeds."""
        return cls([r.text for r in rows], [[r.seed] if r.seed is not None else list(seeds) for r in rows],
                   [r.guidance for r in rows])  # fmt: skip

    @property
    def counts(self) -> list[int]:
        return [len(s) for s in self.seeds]

    def halves(self, seed: int = 0) -> Halves | None:
        """Indices of two independent halves of the images (before-vs-after distances take the base's images of
        the first, the erased model's of the second); None when either would hold fewer than KID_MIN_SET.

        No (prompt, seed) may be in both halves: the two models' images of it are not independent, which KID's
        unbiased estimator assumes (and FID of a model against itself would be 0 at any size, hiding its bias).
        And the halves should hold the same prompts: at the sizes evaluated, halves of different prompts differ
        more by their prompts than two models differ (the digits model against itself on its preserved prompts:
        FID ~37 on halves of the same prompts at 2 seeds each, several hundred on halves of different prompts).
        So each prompt's seeds are split between the halves (a prompt file may list a prompt once per seed), and a
        prompt with one seed is left out. Only when that leaves too few images are the prompts themselves split,
        at random (seeded) so that each half is a sample of the same prompts, and the metric warns of it.
        """
        by_prompt: dict = {}  # (text, guidance) -> {seed: [its image indices]}; the images are in row order
        jobs = [(key, s) for key, seeds in zip(zip(self.texts, self.guidance), self.seeds) for s in seeds]
        for i, (key, s) in enumerate(jobs):
            by_prompt.setdefault(key, {}).setdefault(s, []).append(i)
        prompts = [list(by_seed.values()) for by_seed in by_prompt.values()]  # per prompt: per seed, its images
        split = [(p[: len(p) // 2], p[len(p) // 2 :]) for p in prompts if len(p) >= 2]
        first, second = (_indices([pair for halves in split for pair in halves[k]]) for k in (0, 1))
        if min(len(first), len(second)) >= KID_MIN_SET:
            return Halves(first, second, True)
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
        first, second = (_indices([pair for j in part for pair in prompts[j]])
                         for part in (order[: len(order) // 2], order[len(order) // 2 :]))  # fmt: skip
        return Halves(first, second, False) if min(len(first), len(second)) >= KID_MIN_SET else None

    def describe(self) -> dict:
        out: dict = {"prompts": self.texts}
        if any(s != self.seeds[0] for s in self.seeds):
            out["seeds"] = self.seeds
        if any(g is not None for g in self.guidance):
            out["guidance"] = self.guidance
        return out


def _draw(model, rows: PromptRows, steps, guidance, progress: bool, desc: str) -> tuple[torch.Tensor, list]:
    """Images of every (prompt, seed) of `rows`, in row order; each prompt under its own guidance."""
    jobs = [(i, s) for i, seeds in enumerate(rows.seeds) for s in seeds]
    images: dict = {}
    for g in dict.fromkeys(rows.guidance):  # one call per guidance value, in order of appearance
        group = [job for job in jobs if rows.guidance[job[0]] == g]
        images.update(_generate_shared(model, rows.texts, group, steps, guidance if g is None else g, progress, desc))
    grid_rows = [[images[i, s] for s in seeds] for i, seeds in enumerate(rows.seeds)]
    return to_tensor([images[job] for job in jobs]), grid_rows


def _generate_shared(model, texts, jobs, steps, guidance, progress: bool, desc: str) -> dict:
    """{job: image}, the jobs split across the processes of `accelerate launch` / `torchrun` and gathered.

    The split is by whole batches of BATCH jobs, the batches a single process would draw: an image
    depends on the batch it is drawn in by a rounding step, so this keeps the report identical.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return dict(zip(jobs, model.generate_jobs(texts, jobs, steps=steps, guidance=guidance, batch_size=BATCH,
                                                  progress=progress, desc=desc)))  # fmt: skip
    batches = [jobs[i : i + BATCH] for i in range(0, len(jobs), BATCH)]
    with state.split_between_processes(batches) as mine:
        drawn = [
            pair
            for batch in mine
            for pair in zip(batch, model.generate_jobs(texts, batch, steps=steps, guidance=guidance, batch_size=BATCH,
                                                        progress=progress and state.is_main_process, desc=desc))
        ]  # fmt: skip
    return dict(gather_object(drawn))


def _grid_pages(name: str, rows: PromptRows, drawn_before, drawn_after, before_name, after_name) -> dict:
    """Side-by-side grids of every prompt, GRID_PROMPTS per page; the first GRID_SEEDS seeds of each."""
    uniform = all(s == rows.seeds[0] for s in rows.seeds)
    labels = (
        rows.texts if uniform else [f"{t} (seed {s[0]})" if len(s) == 1 else t for t, s in zip(rows.texts, rows.seeds)]
    )
    columns = [f"seed {s}" for s in rows.seeds[0]] if uniform else [f"#{j + 1}" for j in range(max(rows.counts))]
    pages = {}
    for page, first in enumerate(range(0, len(rows.texts), GRID_PROMPTS)):
        chunk = slice(first, first + GRID_PROMPTS)
        key = name if page == 0 else f"{name}-{page + 1}"
        pages[key] = _side_by_side(drawn_before[chunk], drawn_after[chunk], labels[chunk], columns, before_name,
                                   after_name)  # fmt: skip
    return pages


def evaluate(
    after,
    before,
    concepts: list[str],
    *,
    samples: int | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    clip: ClipScorer | str | None = None,
    neighbours: list[str] | None = None,
    fid_features: str | None = None,
    progress: bool = True,
    target_rows: list | None = None,
    preserved_rows: list | None = None,
) -> Evaluation:
    """Score text-to-image model `after` against `before` on `concepts`.

    `target_rows` / `preserved_rows` (read by evaluators/prompt_files.py) replace the built-in target and
    preserved prompts; `neighbours` adds neighbour concepts to the preserved ones.
    """
    started = time.time()
    family = before.family
    samples = samples or family.eval_samples
    protocol = _Protocol.of(before, samples, seed, clip, fid_features)
    seeds, clip = protocol.seeds, protocol.clip
    report: dict = {
        "format": FORMAT,
        "after": after.source.describe(), "before": before.source.describe(),
        "settings": {
            "seeds": seeds, "samples_per_prompt": samples, "steps": steps or before.sampling["steps"],
            "guidance": before.sampling["guidance"] if guidance is None else guidance, "clip": clip.describe(),
            "grids": f"every prompt, {GRID_PROMPTS} per page; the first {GRID_SEEDS} seeds of each",
        },
        "concepts": {},
    }  # fmt: skip
    grids: dict[str, Image.Image] = {}
    images: dict = {}
    for concept in concepts:
        prompts = family.prompt_set(concept, neighbours)
        parts = {
            "target": (PromptRows.from_file(target_rows, seeds) if target_rows
                       else PromptRows.uniform(prompts.target, seeds)),
            "preserved": (PromptRows.from_file(preserved_rows, seeds) if preserved_rows
                          else PromptRows.uniform(prompts.preserved, seeds)),
        }  # fmt: skip
        labelled = 0 if preserved_rows else len(prompts.preserved_labels)  # the user's prompts carry no labels
        judge = protocol.judge(concept)
        sections: dict = {"prompts": {**prompts.describe(), "target_prompts": parts["target"].describe(),
                                      "preserved_prompts": parts["preserved"].describe()},
                          "judge": judge.describe() if judge else None}  # fmt: skip
        drawn = {}  # (part, "before" | "after"): the images as a tensor
        for part, rows in parts.items():
            pictures = {}
            for name, model in (("before", before), ("after", after)):
                drawn[part, name], pictures[name] = _draw(model, rows, steps, guidance, progress,
                                                          f"{name}: {part} prompts")  # fmt: skip
                images[concept, part, name] = drawn[part, name]
            grids.update(_grid_pages(f"{slug(concept)}-{part}", rows, pictures["before"], pictures["after"],
                                     before.source.spec, after.source.spec))  # fmt: skip
        metrics = _clip_metrics(clip, prompts, parts, drawn)
        if judge is not None:
            metrics.update(_judge_metrics(judge, concept, prompts, parts, drawn, labelled))
        metrics.update(_feature_metrics(protocol, judge, concept, parts["preserved"], drawn, seed))
        sections["metrics"] = metrics
        report["concepts"][concept] = sections
    report["wall_time_s"] = round(time.time() - started, 2)
    return Evaluation(report, grids, images)


def _clip_metrics(clip: ClipScorer, prompts, parts: dict, drawn: dict) -> dict:
    """CLIP's zero-shot presence of the concept on the target images, and the CLIP score of both parts' images
    against their own prompts, before and after."""
    with torch.no_grad():
        features = {key: clip.image_features(images) for key, images in drawn.items()}
    target = {m: features["target", m] for m in ("before", "after")}
    metrics = {"target_presence_clip": _clip_presence(clip, prompts, target, sum(parts["target"].counts))[0]}
    for part, rows in parts.items():
        with torch.no_grad():
            text = clip.text_features(rows.texts)
            text = text.repeat_interleave(torch.tensor(rows.counts, device=text.device), dim=0)
        scores = [clip_score(features[part, m], text) for m in ("before", "after")]
        settings = {**clip.describe(), "formula": CLIP_SCORE_FORMULA, "images": sum(rows.counts)}
        metrics[f"{part}_clip_score"] = _pair(scores[0]["clip_score"], scores[1]["clip_score"], settings)
    return metrics


def _judge_metrics(judge, concept: str, prompts, parts: dict, drawn: dict, labelled: int) -> dict:
    """The domain judge's presence of the concept on the target images and, where the preserved prompts carry
    labels, its accuracy on them."""
    presence = [float(judge.detects(drawn["target", m], concept).float().mean()) for m in ("before", "after")]
    n_target = sum(parts["target"].counts)
    metrics = {"target_presence_judge": _presence(*presence, {**judge.describe(), "images": n_target})}
    if hasattr(judge, "predict") and labelled:
        metrics.update(_preserved_accuracy(judge, drawn, prompts, parts["preserved"].counts[:labelled]))
    return metrics


def _feature_metrics(protocol: _Protocol, judge, concept: str, preserved: PromptRows, drawn: dict, seed: int) -> dict:
    """FID / KID of the preserved images: against held-out real images where the family has them, and before
    against after."""
    extractor = protocol.extractor(judge)
    features = {m: extractor(drawn["preserved", m]) for m in ("before", "after")}
    metrics = {}
    # the preserved prompts leave the concept's class out, so the reference does too (as the GAN report's does)
    real = protocol.real_features(judge, extractor, without=concept)
    if real is not None:
        metrics["preserved_fid_vs_real"] = _fid_pair(
            features["before"], features["after"], real,
            {"features": extractor.name, "images": len(features["before"]),
             "real": f"{len(real)} held-out real images of {judge.name} without {concept}"},
        )  # fmt: skip
    metrics.update(_before_vs_after(features["before"], features["after"], preserved, extractor.name, seed))
    return metrics


PAIRING = (
    "independent halves: before on the first half of each prompt's seeds, after on the second (prompts with a single "
    "seed left out); with shared seeds the two sets would not be independent samples, which KID's unbiased "
    "estimator assumes"
)
PAIRING_BY_PROMPT = (
    "independent halves of different prompts: one seed per prompt, so the prompts were split at random, before on "
    "one half and after on the other"
)
DIFFERENT_PROMPTS = (
    "the halves hold different prompts (one seed per prompt): the distance includes the difference between the two "
    "sets of prompts, large even between identical models unless there are many prompts; 2 seeds per prompt "
    "(--samples 2, or a file listing each prompt with two seeds) compare like with like"
)


def _before_vs_after(before: torch.Tensor, after: torch.Tensor, rows: PromptRows, features: str, seed: int) -> dict:
    """FID and KID between the two models' preserved images, on independent halves (PromptRows.halves)."""
    halves = rows.halves(seed)
    if halves is None:
        warning = (
            f"needs two independent halves of at least {KID_MIN_SET} images: 2 seeds per prompt "
            "(--samples 2) or more prompts"
        )
        return {name: {"value": None, "warning": warning} for name in ("preserved_fid_before_vs_after",
                                                                       "preserved_kid_before_vs_after")}  # fmt: skip
    a, b = before[halves.first], after[halves.second]
    pairing, prompts_warning = (PAIRING, None) if halves.same_prompts else (PAIRING_BY_PROMPT, DIFFERENT_PROMPTS)
    settings = {"features": features, "images": [len(a), len(b)], "pairing": pairing}
    fid, size_warning = _fid(a, b)
    kid = kernel_inception_distance(a, b, seed=seed)
    kid_metric = {
        "value": kid["kid"], "std": kid["kid_std"],
        "settings": {**settings, "subsets": kid["subsets"], "subset_size": kid["subset_size"],
                     "kernel": "(x.y/d + 1)^3", "implementation": "torchmetrics poly_mmd"},
    }  # fmt: skip
    return {
        "preserved_fid_before_vs_after": _warned({"value": fid, "settings": settings}, size_warning, prompts_warning),
        "preserved_kid_before_vs_after": _warned(kid_metric, kid.get("warning"), prompts_warning),
    }


def _preserved_accuracy(judge, drawn: dict, prompts, counts: list[int]) -> dict:
    """Judge accuracy on the labelled preserved prompts (the first len(counts) rows): every head, and the
    concept's own head."""
    heads = list(prompts.preserved_labels[0])
    repeats = torch.tensor(counts)
    expected = {
        head: torch.tensor([label[head] for label in prompts.preserved_labels]).repeat_interleave(repeats)
        for head in heads
    }
    n = int(repeats.sum())
    out = {}
    predictions = {m: judge.predict(drawn["preserved", m][:n]) for m in ("before", "after")}
    for head in heads:
        accuracy = [
            float((predictions[m][head].argmax(-1) == expected[head]).float().mean()) for m in ("before", "after")
        ]
        name = "preserved_accuracy" if head == prompts.judged_head else f"preserved_accuracy_{head}"
        out[name] = _pair(*accuracy, {**judge.describe(), "head": head, "images": len(expected[head])})
    return out


def _clip_presence(clip: ClipScorer, prompts, features: dict, images: int) -> tuple[dict, dict, torch.Tensor]:
    """CLIP's zero-shot presence of the concept in the images whose `features` are given before and after: the
    metric, each image's presence, and the concept prompts' text features."""
    with torch.no_grad():
        concept_text = clip.text_features(prompts.clip_concept)
        anchor_text = clip.text_features(prompts.clip_anchors)
    presence = {m: zero_shot_presence(features[m], concept_text, anchor_text) for m in ("before", "after")}
    settings = {**clip.describe(), "rule": CLIP_PRESENCE_RULE, "images": images}
    metric = _presence(*(float(presence[m].float().mean()) for m in ("before", "after")), settings)
    return metric, presence, concept_text


def _gan_clip_metrics(clip: ClipScorer, prompts, features: dict, samples: int) -> tuple[dict, dict]:
    """CLIP's zero-shot presence of the concept in each model's samples, and the degree of unlearning (W1 between
    the two models' CLIP scores against the concept); with the presence of each sample, before and after."""
    presence_metric, presence, concept_text = _clip_presence(clip, prompts, features, samples)
    metrics = {"presence_clip": presence_metric}
    concept_mean = torch.nn.functional.normalize(concept_text.mean(0), dim=-1)
    scores = {m: (features[m] @ concept_mean).cpu() for m in features}
    metrics["degree_of_unlearning_w1"] = {
        "value": wasserstein_1d(scores["before"], scores["after"]),
        "before_mean_score": float(scores["before"].mean()), "after_mean_score": float(scores["after"].mean()),
        "settings": {**clip.describe(), "images": samples, "formula": DEGREE_OF_UNLEARNING},
    }  # fmt: skip
    return metrics, presence


def _gan_feature_metrics(protocol: _Protocol, judge, concept: str, images: dict, absent: torch.Tensor) -> dict:
    """FID of the erased samples against the base's samples without the concept (`absent`), and of both models'
    against held-out real images without it, where the family has them."""
    extractor = protocol.extractor(judge)
    feats = {m: extractor(images[m]) for m in images}
    fid, warning = _fid(feats["after"], feats["before"][absent])
    reference = f"{int(absent.sum())} base samples without the concept"
    metrics = {"fid_vs_base_without_concept": _warned(
        {"value": fid, "settings": {"features": extractor.name, "reference": reference}}, warning
    )}  # fmt: skip
    real_feats = protocol.real_features(judge, extractor, without=concept)
    if real_feats is not None:
        metrics["fid_vs_real_without_concept"] = _fid_pair(
            feats["before"], feats["after"], real_feats,
            {"features": extractor.name, "real": f"{len(real_feats)} held-out real images without {concept}"},
        )  # fmt: skip
    return metrics


def evaluate_gan(
    after,
    before,
    concepts: list[str],
    *,
    samples: int | None = None,
    seed: int = 0,
    clip: ClipScorer | str | None = None,
    fid_features: str | None = None,
    progress: bool = True,
) -> Evaluation:
    """Score GAN `after` against `before` on the same latent seeds (GANs take no prompts).

    Presence is the share of samples in which the judge (or CLIP zero-shot) sees the concept; the
    drop is Adapt-then-Unlearn's PUL. Quality is FID of the erased samples against the base
    model's samples that do not show the concept (and against real data without it, where known).
    """
    started = time.time()
    family = before.family
    samples = samples or 1000
    protocol = _Protocol.of(before, samples, seed, clip, fid_features)
    seeds, clip = protocol.seeds, protocol.clip
    images = {name: to_tensor(model.generate(seeds)) for name, model in (("before", before), ("after", after))}
    report: dict = {
        "format": FORMAT, "after": after.source.describe(), "before": before.source.describe(),
        "settings": {"seeds": [seeds[0], seeds[-1]], "samples": samples, "truncation": 1.0, "clip": clip.describe()},
        "concepts": {},
    }  # fmt: skip
    grids = {}
    with torch.no_grad():
        features = {m: clip.image_features(images[m]) for m in images}
    for concept in concepts:
        judge = protocol.judge(concept)
        metrics, presence = _gan_clip_metrics(clip, family.prompt_set(concept), features, samples)
        absent = ~presence["before"].cpu()  # it indexes the extractor's features, which are on the CPU
        if judge is not None:
            detected = {m: judge.detects(images[m], concept) for m in images}
            b, a = (float(detected[m].float().mean()) for m in ("before", "after"))
            metrics["presence_judge"] = _presence(b, a, {**judge.describe(), "images": samples})
            metrics["pul_percent"] = _pul(b, a, samples)
            absent = ~detected["before"].cpu()
        metrics |= _gan_feature_metrics(protocol, judge, concept, images, absent)
        report["concepts"][concept] = {"judge": judge.describe() if judge else None, "metrics": metrics}
    rows = {m: to_pil_rows(images[m][: GRID_SEEDS * GRID_PROMPTS], GRID_SEEDS) for m in images}
    # each row's label names the seeds it holds: the last row may be short, and there may be fewer rows
    row_labels = [_seed_range(seeds[GRID_SEEDS * r], len(row)) for r, row in enumerate(rows["before"])]
    columns = [f"+{j}" for j in range(len(rows["before"][0]))]
    grids["samples"] = _side_by_side(rows["before"], rows["after"], row_labels, columns, before.source.spec,
                                     after.source.spec)  # fmt: skip
    report["wall_time_s"] = round(time.time() - started, 2)
    return Evaluation(report, grids)


def _pul(before: float, after: float, samples: int) -> dict:
    """Adapt-then-Unlearn's PUL: the percentage of the concept's presence removed; undefined where the base never
    shows the concept (0 there would read as "nothing was erased")."""
    metric = {"value": None, "settings": {"formula": "100 * (before - after) / before, of presence_judge"}}
    if before == 0:
        return _warned(metric, "the base model never shows the concept in these samples: PUL is undefined")
    value = 100 * (before - after) / before
    negative = "negative: the erased model shows the concept more often than its base" if value < 0 else None
    return _warned({**metric, "value": value}, presence_warning(before, samples), negative)


def _seed_range(first: int, count: int) -> str:
    return f"seed {first}" if count == 1 else f"seeds {first}-{first + count - 1}"


def to_pil_rows(images: torch.Tensor, per_row: int) -> list[list[Image.Image]]:
    pil = to_pil(images)
    return [pil[i : i + per_row] for i in range(0, len(pil), per_row)]
