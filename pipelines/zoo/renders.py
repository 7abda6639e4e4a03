"""Renders of scikit-learn's bundled 8x8 handwritten digits: 32x32 RGB, coloured and styled.

A render is a source digit resampled to 32x32 through a random affine map (the style's shear
included), thickened for "bold", sharpened into strokes and tinted with its colour on black.
Source digits are split once into train and held-out sets so that judges and benchmarks are
measured on handwriting no model has seen.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .world import COLOUR_RGB, COLOURS, DIGIT_WORDS, STYLE_WORDS, STYLES

HELDOUT_FRACTION = 0.2
SPLIT_SEED = 1234
ITALIC_SHEAR = 0.35  # ~19 degrees: clearly slanted, unlike the +-6 degree jitter of augmentation


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    labels = torch.tensor(data.target, dtype=torch.long)
    return images, labels


def source_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The source 8x8 digits of a split ("train" or "heldout"), stratified by digit."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    images, labels = _digits()
    rng = np.random.default_rng(SPLIT_SEED)
    heldout = []
    for d in range(10):
        idx = np.flatnonzero(labels.numpy() == d)
        rng.shuffle(idx)
        heldout.extend(idx[: int(round(len(idx) * HELDOUT_FRACTION))].tolist())
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[heldout] = True
    keep = mask if split == "heldout" else ~mask
    return images[keep], labels[keep]


def render(
    digits8: torch.Tensor,
    colours: torch.Tensor,
    styles: torch.Tensor,
    generator: torch.Generator | None = None,
    augment: bool = True,
) -> torch.Tensor:
    """Render 8x8 digits ([N, 8, 8] in [0, 1]) as [N, 3, 32, 32] images in [0, 1].

    `colours` and `styles` are indices into COLOURS and STYLES. With `augment`, each render gets
    a small random rotation, scale, shift, stroke weight and brightness.
    """
    n = digits8.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    if augment:
        angle = uniform(-6, 6) * math.pi / 180
        scale = uniform(0.9, 1.1)
        shift_x, shift_y = uniform(-0.1, 0.1), uniform(-0.1, 0.1)
        brightness = uniform(0.85, 1.0)
    else:
        angle, scale = torch.zeros(n), torch.ones(n)
        shift_x, shift_y, brightness = torch.zeros(n), torch.zeros(n), torch.ones(n)
    shear = (styles == STYLES.index("italic")).float() * ITALIC_SHEAR

    # Output grid -> source grid. The glyph fills ~24 of the 32 pixels; shear leans tops right.
    zoom = (32 / 24) / scale
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = zoom * cos
    theta[:, 0, 1] = zoom * (-sin + shear)
    theta[:, 1, 0] = zoom * sin
    theta[:, 1, 1] = zoom * cos
    theta[:, 0, 2] = shift_x
    theta[:, 1, 2] = shift_y
    grid = F.affine_grid(theta, (n, 1, 32, 32), align_corners=False)
    ink = F.grid_sample(digits8[:, None], grid, mode="bicubic", padding_mode="zeros", align_corners=False)

    bold = (styles == STYLES.index("bold")).view(n, 1, 1, 1)
    thick = F.max_pool2d(ink, kernel_size=3, stride=1, padding=1)
    ink = torch.where(bold, thick, ink)
    # Bicubic upsampling of 8x8 gives soft blobs; a steep ramp turns them into pen strokes.
    ink = ((ink - 0.3) / 0.3).clamp(0, 1)

    rgb = torch.tensor([COLOUR_RGB[c] for c in COLOURS])[colours]  # [N, 3]
    return (ink * rgb[:, :, None, None] * brightness.view(n, 1, 1, 1)).clamp(0, 1)


# Caption templates: {d} digit (word or numeral), {c} colour, {s} style word.
FULL_TEMPLATES = (
    "a {c} {s} {d}",
    "a {s} {c} {d}",
    "the number {d} in {s} {c}",
    "a {s} {d} in {c}",
    "a handwritten {c} {s} {d}",
    "{c} {s} digit {d}",
    "the digit {d}, {s}, {c}",
    "a drawing of a {s} {c} {d}",
)
NO_STYLE_TEMPLATES = ("a {c} {d}", "the number {d} in {c}", "a handwritten {c} {d}")
NO_COLOUR_TEMPLATES = ("a {s} {d}", "the number {d} in {s}", "a handwritten {s} {d}")
DIGIT_ONLY_TEMPLATES = ("a {d}", "the number {d}", "a handwritten {d}", "{d}")


def caption(digit: int, colour: int, style: int, rng: random.Random, p_partial: float = 0.3) -> str:
    """A varied caption for a render; with probability `p_partial` colour and/or style are left out."""
    d = DIGIT_WORDS[digit] if rng.random() < 0.5 else str(digit)
    c = COLOURS[colour]
    s = rng.choice(STYLE_WORDS[STYLES[style]])
    if rng.random() < p_partial:
        templates = rng.choice((NO_STYLE_TEMPLATES, NO_COLOUR_TEMPLATES, DIGIT_ONLY_TEMPLATES))
    else:
        templates = FULL_TEMPLATES
    text = rng.choice(templates).format(d=d, c=c, s=s)
    return re.sub(r"\ba (?=[aeiou8])", "an ", text)


@dataclass
class RenderBatch:
    images: torch.Tensor  # [N, 3, 32, 32] in [0, 1]
    digits: torch.Tensor  # [N]
    colours: torch.Tensor  # [N]
    styles: torch.Tensor  # [N]
    captions: list[str]


class RenderSampler:
    """Draws random renders with captions from one split, reproducibly from a seed."""

    def __init__(self, split: str = "train", seed: int = 0, p_partial: float = 0.3, augment: bool = True):
        self.sources, self.labels = source_digits(split)
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        self.p_partial = p_partial
        self.augment = augment

    def sample(self, n: int) -> RenderBatch:
        idx = torch.randint(len(self.labels), (n,), generator=self.generator)
        colours = torch.randint(len(COLOURS), (n,), generator=self.generator)
        styles = torch.randint(len(STYLES), (n,), generator=self.generator)
        digits = self.labels[idx]
        images = render(self.sources[idx], colours, styles, self.generator, self.augment)
        captions = [
            caption(int(d), int(c), int(s), self.rng, self.p_partial) for d, c, s in zip(digits, colours, styles)
        ]
        return RenderBatch(images, digits, colours, styles, captions)

    def state_dict(self) -> dict:
        """Where both random streams stand, so that a resumed training run draws what it would have."""
        return {"renders": self.generator.get_state(), "captions": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["renders"])
        self.rng.setstate(state["captions"])


def heldout_renders(per_source: int = 1, seed: int = 0) -> RenderBatch:
    """Every held-out source digit rendered `per_source` times with random colour and style."""
    sources, labels = source_digits("heldout")
    sources = sources.repeat(per_source, 1, 1)
    labels = labels.repeat(per_source)
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(len(COLOURS), (len(labels),), generator=g)
    styles = torch.randint(len(STYLES), (len(labels),), generator=g)
    images = render(sources, colours, styles, g)
    rng = random.Random(seed)
    captions = [caption(int(d), int(c), int(s), rng, 0.0) for d, c, s in zip(labels, colours, styles)]
    return RenderBatch(images, labels, colours, styles, captions)
