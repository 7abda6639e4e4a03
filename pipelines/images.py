"""Image helpers shared by sampling, evaluation and the preview: tensors <-> PIL, labelled grids."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import InputError


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [0, 1] -> PIL images. Images with NaN or infinite values are refused (`InputError`): cast to
    bytes they would come out black, and an evaluation would score a broken model's black images as an erasure."""
    images = images.detach().float().cpu()
    broken = (~torch.isfinite(images)).flatten(1).any(1)
    if broken.any():
        raise InputError(
            f"the model drew {int(broken.sum())} of {len(images)} image(s) with NaN or infinite values: its weights "
            "are broken (a diverged run?) or its numbers overflowed (half precision, an extreme --guidance); try "
            "--dtype fp32 or a lower --guidance"
        )
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


# Images per VAE decode. On CPU a 16-image chunk of the decoder's activations stays in cache: digits-sd
# decodes 64 latents in 0.066 s as four chunks and in 0.086 s at once (benchmarks/RESULTS.md, SFD speed).
DECODE_CHUNK = 16

# The most pixels the VAE encodes at once. SD's VAE encoder holds about 660 MB of activations per 512-px image in
# float32 (benchmarks/RESULTS.md), so 64 images at once, as the digits world's 32-px ones are encoded, would take
# 21 GB in float16 at 512 px and four times that at 1024: 4 images at 512 px, 1 at 768 or more.
ENCODE_PIXELS = 4 * 512 * 512


@torch.no_grad()
@contextmanager
def vae_precision(vae, upcast: bool):
    """Within the block, a float16 VAE whose config asks for it (`force_upcast`) runs in float32 when `upcast`:
    SDXL's VAE overflows in float16, and SDXL's pipelines upcast it (SD 1.x's decode in float16)."""
    upcast = upcast and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield vae
    finally:
        if upcast:
            vae.to(torch.float16)


def decode_latents(vae, latents: torch.Tensor, chunk: int = DECODE_CHUNK, upcast: bool = False) -> list[Image.Image]:
    """Clean latents (in the UNet's scaled space) -> PIL images, through the VAE, `chunk` at a time (`upcast`: see
    `vae_precision`)."""
    images = []
    with vae_precision(vae, upcast):
        for part in latents.split(chunk):
            decoded = vae.decode(part.to(vae.dtype) / vae.config.scaling_factor).sample
            images += to_pil(decoded.float() / 2 + 0.5)
    return images


@torch.no_grad()
def encode_latents(model, images: torch.Tensor, generator: torch.Generator | None = None, chunk: int = 64
                   ) -> torch.Tensor:  # fmt: skip
    """VAE latents, scaled as the denoiser sees them, of images in [0, 1], at most `chunk` images at a time, and
    fewer where they would hold more than `ENCODE_PIXELS`. With `generator`: a draw from the VAE's posterior in the
    VAE's dtype, as training takes them (the run's seed); without: the posterior's mean in float32, the attacks'
    fixed references. SDXL's VAE encodes in float32 (`vae_precision`), as diffusers' SDXL img2img does."""
    dtype, latents = model.vae.dtype, []
    chunk = max(1, min(chunk, ENCODE_PIXELS // (images.shape[-2] * images.shape[-1])))
    with vae_precision(model.vae, getattr(model, "upcast_vae", False)) as vae:
        for start in range(0, len(images), chunk):
            pixels = (images[start : start + chunk] * 2 - 1).to(model.device, vae.dtype)
            posterior = vae.encode(pixels).latent_dist
            latents.append(posterior.mean.float() if generator is None else posterior.sample(generator).to(dtype))
    return model.family.scale_latents(model, torch.cat(latents))


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images (same size) -> [N, 3, H, W] float in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# The longest side each grid format can encode (PNG's is beyond any grid's memory).
FORMAT_SIDE_LIMITS = {"WEBP": 16383, "JPEG": 65500}


@dataclass(frozen=True)
class GridLayout:
    """Where `labelled_grid` puts things: the row labels' width, the column labels' height, the whole size."""

    label_width: int
    header_height: int
    width: int
    height: int
    cell: int
    pad: int = 4

    @classmethod
    def of(cls, n_rows: int, n_cols: int, cell: int, row_labels=None, column_labels=None) -> GridLayout:
        pad, font = cls.pad, ImageFont.load_default()
        label_width = min(360, 8 + max(int(font.getlength(label)) for label in row_labels)) if row_labels else 0
        header_height = 16 if column_labels else 0
        return cls(label_width, header_height, label_width + n_cols * (cell + pad) + pad,
                   header_height + n_rows * (cell + pad) + pad, cell, pad)  # fmt: skip

    def check_format(self, image_format: str, what: str) -> None:
        """Refuse, before anything is drawn, a grid too large for `image_format` to encode."""
        limit = FORMAT_SIDE_LIMITS.get(image_format)
        if limit is not None and max(self.width, self.height) > limit:
            raise InputError(f"{what} would be a {self.width}x{self.height} grid, and {image_format} holds at most "
                             f"{limit} pixels a side: write a .png, or a folder of images")  # fmt: skip


def grid_cell(image_side: int) -> int:
    """A grid's cell for images of `image_side`: small images (the digits world's 32x32) are upscaled so the grid
    stays readable."""
    return max(image_side, 96)


def labelled_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    cell: int | None = None,
) -> Image.Image:
    """A grid with one row per label (e.g. a prompt) and one column per label (e.g. a seed).

    Small images are upscaled with nearest-neighbour to `cell` pixels (default: `grid_cell`)."""
    layout = GridLayout.of(len(rows), max(len(r) for r in rows), cell or grid_cell(rows[0][0].width), row_labels,
                           column_labels)  # fmt: skip
    font, pad, cell, label_w = ImageFont.load_default(), layout.pad, layout.cell, layout.label_width
    grid = Image.new("RGB", (layout.width, layout.height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(column_labels or []):
        draw.text((label_w + pad + j * (cell + pad), 2), label, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = layout.header_height + pad + i * (cell + pad)
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


def image_folder_files(folder: str | Path, count: int = 0) -> list[Path]:
    """The image files of `folder` (the first `count` in name order; all when 0), checked before
    any model loads: every file must open as an image, and there must be enough of them."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise InputError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder (give a folder of images)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    unreadable = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:
            unreadable.append(path.name)
    if unreadable:
        shown = ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        raise InputError(f"{folder} holds files that are not readable images: {shown}")
    if not files:
        raise InputError(f"image folder {folder} is empty")
    if count > len(files):
        raise InputError(f"{folder} holds {len(files)} images, fewer than the {count} asked for")
    return files[:count] if count else files


def load_square_images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """Images of any format and size -> [N, 3, size, size] in [0, 1]: the shorter side resized to
    `size` (antialiased), then the centre cropped."""
    out = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.BICUBIC, reducing_gap=None)
            left, top = (w - size) // 2, (h - size) // 2
            out.append(image.crop((left, top, left + size, top + size)))
    return to_tensor(out)
