"""Per-image concept detection for methods that need labels while they train: the few-shot
stopping rule, and the GAN methods that split a generator's own samples into those that show the
concept (negatives) and those that do not (positives).

The domain judge decides where the model family has one for the concept (digits-judge, NudeNet);
elsewhere CLIP zero-shot does: the concept's prompt ensemble against anchor prompts, the rule of
`evaluate`'s `target_presence_clip`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipelines.errors import InputError

from .clip_models import ClipScorer, load_clip
from .judges import default_judge
from .metrics import zero_shot_presence
from .prompts import prompt_set

CLIP_PRESENCE_RULE = "mean embedding of the concept prompts is closer than every anchor prompt"
CLASSIFIERS = ("auto", "judge", "clip")


def default_clip(family: str) -> str:
    return "digits-clip" if family == "digits" else "openai/clip-vit-large-patch14"


class ConceptDetector:
    """`detector(images) -> bool [N]`: whether `concept` is in each image ([N, 3, H, W] in [0, 1]).

    `classifier`: `auto` (the judge where there is one, else CLIP), `judge` (refused where there is
    none) or `clip`. `clip`: a loaded scorer to share, or a name for `load_clip`."""

    def __init__(self, concept: str, family: str, device: str = "cpu", clip: ClipScorer | str | None = None,
                 classifier: str = "auto"):  # fmt: skip
        if classifier not in CLASSIFIERS:
            raise InputError(f"classifier must be one of {', '.join(CLASSIFIERS)}, not {classifier!r}")
        self.concept = concept
        self.judge = default_judge(concept, family, device) if classifier != "clip" else None
        if classifier == "judge" and self.judge is None:
            raise InputError(f"no domain judge knows {concept!r} for {family} models; use the clip classifier")
        self.clip = None
        if self.judge is None:
            self.clip = clip if isinstance(clip, ClipScorer) else load_clip(clip or default_clip(family), device)
            prompts = prompt_set(concept, family)
            with torch.no_grad():
                self._concept_text = self.clip.text_features(prompts.clip_concept)
                self._anchor_text = self.clip.text_features(prompts.clip_anchors)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.judge is not None:
            return self.judge.detects(images, self.concept).cpu()
        features = self.clip.image_features(images)
        return zero_shot_presence(features, self._concept_text, self._anchor_text).cpu()

    def describe(self) -> dict:
        if self.judge is not None:
            return self.judge.describe()
        return {**self.clip.describe(), "rule": CLIP_PRESENCE_RULE}


def concept_detectors(concepts: Sequence[str], family: str, device: str = "cpu", clip: str | None = None,
                      classifier: str = "auto") -> dict[str, ConceptDetector]:  # fmt: skip
    """One detector per concept; those that fall back to CLIP share one loaded model."""
    needs_clip = classifier == "clip" or any(default_judge(c, family, device) is None for c in concepts)
    shared = load_clip(clip or default_clip(family), device) if needs_clip else None
    return {c: ConceptDetector(c, family, device, shared, classifier) for c in concepts}
