"""CLIP models for scoring, behind one small interface.

`load_clip(name)` accepts:
- `digits-clip` (embedded) or a local transformers CLIP folder, or a Hub id of one (e.g.
  `openai/clip-vit-large-patch14`, from the local cache when offline);
- `open_clip:<model>` with random weights (tests), `open_clip:<model>:<pretrained tag or .pt/.bin/.safetensors
  file>` (e.g. `open_clip:ViT-B-32:laion2b_s34b_b79k`, which open_clip downloads when online).

Images go in as [N, 3, H, W] tensors in [0, 1]; features come out L2-normalised. Preprocessing is
done on tensors (resize + normalise) so the same scorer also serves gradient-based methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.errors import InputError
from pipelines.tokenizer import padded_ids

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipScorer:
    name: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _encode_image: object = field(repr=False)
    _encode_text: object = field(repr=False)
    version: str = ""
    device: str = "cpu"
    model: object = field(default=None, repr=False)  # the transformers CLIPModel (None for open_clip)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            )
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def image_features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] of images in [0, 1]."""
        chunks = [
            self._encode_image(self.preprocess(images[i : i + batch_size])) for i in range(0, len(images), batch_size)
        ]
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D]."""
        return F.normalize(self._encode_text(list(texts)).float(), dim=-1)

    def describe(self) -> dict:
        return {"model": self.name, "version": self.version, "image_size": self.image_size}


def check_clip_name(name: str, transformers_only: bool = False) -> None:
    """Refuse a CLIP name `load_clip` could not resolve, before any model loads."""
    from pipelines.zoo import models as zoo

    if not name.strip():  # Path("") is the working folder, which would pass for a CLIP folder
        raise InputError("an empty CLIP name: use digits-clip, a CLIP folder, a Hub id or open_clip:<name>")
    if name.startswith("open_clip:"):
        if transformers_only:
            raise InputError(f"{name!r}: a transformers CLIP is needed here (digits-clip, a CLIP folder or a Hub id)")
        return
    known = zoo.canonical_name(name) == "digits-clip" or Path(name).expanduser().is_dir()
    if not known and not ("/" in name and not Path(name).exists()):
        raise InputError(f"unknown CLIP model {name!r}: use digits-clip, a CLIP folder, a Hub id or open_clip:<name>")


def check_clip_available(name: str) -> None:
    """Refuse, before any model loads, a CLIP Hub id that is neither in the local cache nor downloadable now
    (offline): found only when the CLIP loads, it would come after both models. Fetches it when online."""
    from pipelines.loading import hub_snapshot
    from pipelines.zoo import models as zoo

    check_clip_name(name)
    if not (name.startswith("open_clip:") or zoo.canonical_name(name) == "digits-clip"
            or Path(name).expanduser().is_dir()):  # fmt: skip
        hub_snapshot(name)


def load_clip(name: str, device: str = "cpu") -> ClipScorer:
    if name.startswith("open_clip:"):
        return _open_clip(name, device)
    from pipelines.loading import hub_snapshot, weights_digest
    from pipelines.zoo import models as zoo

    check_clip_name(name)
    if zoo.canonical_name(name) == "digits-clip":
        path = zoo.embedded_path("digits-clip")
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
    else:
        path, _ = hub_snapshot(name)
    return _transformers_clip(path, name, weights_digest(path)[:12], device)


def _transformers_clip(path: Path, name: str, version: str, device: str) -> ClipScorer:
    import json

    from transformers import CLIPModel

    from pipelines.loading import check_weight_files
    from pipelines.logs import quiet_libraries

    check_weight_files(path)
    try:
        with quiet_libraries():
            model = CLIPModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a CLIP model from {path}: {exc}") from None
    model.requires_grad_(False)
    mean, std = OPENAI_MEAN, OPENAI_STD
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        cfg = json.loads(processor.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    tokenizer = _tokenizer_for(path, model.config.text_config.max_position_embeddings)

    def encode_text(texts: list[str]) -> torch.Tensor:
        ids = padded_ids(tokenizer, texts).to(device)
        return model.get_text_features(input_ids=ids).pooler_output

    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        return model.get_image_features(pixel_values=pixels).pooler_output

    size = model.config.vision_config.image_size
    return ClipScorer(name, size, mean, std, encode_image, encode_text, version, device, model)


def _tokenizer_for(path: Path, context: int):
    if (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(path)
    from pipelines.tokenizer import clip_tokenizer

    return clip_tokenizer(context)


def _open_clip(spec: str, device: str) -> ClipScorer:
    import open_clip

    _, model_name, *rest = spec.split(":", 2)
    pretrained = rest[0] if rest else None
    if model_name not in open_clip.list_models():
        raise InputError(f"unknown open_clip model {model_name!r}")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
    except Exception as exc:  # missing weights offline, bad file
        raise InputError(f"cannot load {spec}: {exc}") from None
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size

    def encode_text(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device))

    version = pretrained or "random-init"
    return ClipScorer(
        spec, int(size), tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD)),
        model.encode_image, encode_text, version, device,
    )  # fmt: skip
