"""Pluggable image features for FID/KID.

- `judge`: digits-judge's penultimate layer (the offline default in the digits world);
- `clip`: the scoring CLIP model's image embeddings (offline with any local CLIP);
- `inception:<file>`: torchvision's Inception-v3 pool features (2048-d) from a local weights file
  (e.g. `inception_v3_google-0cc3c7bd.pth`), loaded without executing code. Values are comparable
  across runs of this tool, not with pytorch-fid's TF-ported weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.errors import InputError
from pipelines.safe_load import load_tensors


@dataclass
class FeatureExtractor:
    name: str
    extract: Callable[[torch.Tensor], torch.Tensor]  # images [N, 3, H, W] in [0, 1] -> [N, D]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.extract(images).float().cpu()


def inception_features(weights: str | Path, device: str = "cpu") -> FeatureExtractor:
    from torchvision.models import inception_v3

    weights = Path(weights).expanduser()  # as check_feature_spec read it
    if not weights.is_file():
        raise InputError(f"Inception weights not found: {weights}")
    state = load_tensors(weights, f"Inception weights {weights}")
    # torchvision's Inception-v3 weights (ported from Google's) expect pixels in [-1, 1]: its own builder turns
    # transform_input on for them, which maps the ImageNet-normalised input below to that range.
    network = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"{weights} does not hold torchvision Inception-v3 weights: {str(exc)[:200]}") from None
    network.fc = torch.nn.Identity()  # keep the 2048-d pool features
    network = network.eval().to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def extract(images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), 64):
            x = F.interpolate(
                images[i : i + 64].to(device), size=(299, 299), mode="bilinear", align_corners=False, antialias=True
            )
            out.append(network((x - mean) / std))
        return torch.cat(out)

    return FeatureExtractor(f"inception-v3 pool (torchvision weights {weights.name})", extract)


def check_feature_spec(spec: str | None, family) -> None:
    """Refuse FID features that cannot be made for models of `family`, before any image is generated
    (None: the default)."""
    if spec is None or spec == "clip":
        return
    if spec == "judge":
        if family.judge is None:
            raise InputError(f"--fid-features judge needs a domain judge, and {family.name} models have none; use "
                             "clip or inception:FILE")  # fmt: skip
        return
    if spec.startswith("inception:"):
        weights = Path(spec.split(":", 1)[1]).expanduser()
        if not weights.is_file():
            raise InputError(f"--fid-features {spec}: no such Inception weights file {weights}")
        return
    raise InputError(f"unknown --fid-features {spec!r}: use judge, clip or inception:<weights file>")


def feature_extractor(spec: str, judge=None, clip=None, device: str = "cpu") -> FeatureExtractor:
    """`judge`, `clip` or `inception:<weights file>`."""
    if spec == "judge":
        if judge is None or not hasattr(judge, "features"):
            raise InputError("judge features need a domain judge that has features (use --fid-features clip)")
        return FeatureExtractor(f"{judge.name} penultimate features", judge.features)
    if spec == "clip":
        if clip is None:
            raise InputError("clip features need a CLIP model")
        return FeatureExtractor(f"{clip.name} image embeddings", clip.image_features)
    if spec.startswith("inception:"):
        return inception_features(spec.split(":", 1)[1], device)
    raise InputError(f"unknown FID features {spec!r}: use judge, clip or inception:<weights file>")
