"""Image helpers shared by sampling, evaluation and the preview: tensors <-> PIL, labelled grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [0, 1] -> PIL images."""
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images (same size) -> [N, 3, H, W] float in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def labelled_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    cell: int | None = None,
) -> Image.Image:
    """A grid with one row per label (e.g. a prompt) and one column per label (e.g. a seed).

    Small images (the digits world's 32x32) are upscaled with nearest-neighbour to `cell` pixels so
    the grid stays readable.
    """
    n_cols = max(len(r) for r in rows)
    first = rows[0][0]
    cell = cell or max(first.width, 96)
    font = ImageFont.load_default()
    pad = 4
    label_w = 0
    if row_labels:
        label_w = min(360, 8 + max(int(font.getlength(label)) for label in row_labels))
    header_h = 16 if column_labels else 0
    width = label_w + n_cols * (cell + pad) + pad
    height = header_h + len(rows) * (cell + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(column_labels or []):
        draw.text((label_w + pad + j * (cell + pad), 2), label, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = header_h + pad + i * (cell + pad)
        if row_labels:
            draw.text((4, y + cell // 2 - 6), _fit(row_labels[i], font, label_w - 8), fill=(0, 0, 0), font=font)
        for j, image in enumerate(row):
            resample = Image.NEAREST if image.width < cell else Image.BICUBIC
            grid.paste(image.convert("RGB").resize((cell, cell), resample), (label_w + pad + j * (cell + pad), y))
    return grid


def _fit(text: str, font: ImageFont.ImageFont, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
