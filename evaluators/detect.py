"""Per-image concept detection for methods that need labels while they train: the few-shot
stopping rule (`PresenceCheck`), and the GAN methods that split a generator's own samples into those
that show the concept (negatives) and those that do not (positives).

The domain judge decides where the model family has one for the concept (digits-judge, NudeNet);
elsewhere CLIP zero-shot does: the concept's prompt ensemble against anchor prompts, the rule of
`evaluate`'s `target_presence_clip`. A user may name any transformers image classifier instead
(`image-classifier:PATH` and the label that means the concept), e.g. an attribute classifier of faces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipelines.errors import InputError
from pipelines.images import to_tensor

from .clip_models import ClipScorer, load_clip
from .judges import default_judge
from .metrics import zero_shot_presence

CLIP_PRESENCE_RULE = "mean embedding of the concept prompts is closer than every anchor prompt"
CLASSIFIERS = ("auto", "judge", "clip")
IMAGE_CLASSIFIER = "image-classifier:"


def check_classifier(classifier: str, label: str | None) -> None:
    """Refuse a classifier setting before any model loads."""
    if classifier.startswith(IMAGE_CLASSIFIER):
        if not classifier[len(IMAGE_CLASSIFIER) :]:
            raise InputError(f"name the model: classifier={IMAGE_CLASSIFIER}PATH (a transformers image classifier)")
        if not label:
            raise InputError("an image classifier needs classifier_label: the label that means the concept")
    elif classifier not in CLASSIFIERS:
        raise InputError(
            f"classifier must be one of {', '.join(CLASSIFIERS)} or {IMAGE_CLASSIFIER}PATH, not {classifier!r}"
        )


class ConceptDetector:
    """`detector(images) -> bool [N]`: whether `concept` is in each image ([N, 3, H, W] in [0, 1]).

    `classifier`: `auto` (the judge where there is one, else CLIP), `judge` (refused where there is
    none) or `clip`. `clip`: a loaded scorer to share, or a name for `load_clip`. `templates` ('{}' =
    the concept) replace the family's prompt ensemble that names the concept for CLIP."""

    def __init__(self, concept: str, family, device: str = "cpu", clip: ClipScorer | str | None = None,
                 classifier: str = "auto", templates: Sequence[str] = ()):  # fmt: skip
        from pipelines.families import get_family

        check_classifier(classifier, "-")
        family = get_family(family)
        self.concept = concept
        self.judge = default_judge(concept, family, device) if classifier != "clip" else None
        if classifier == "judge" and self.judge is None:
            raise InputError(f"no domain judge knows {concept!r} for {family.name} models; use the clip classifier")
        self.clip = None
        if self.judge is None:
            self.clip = clip if isinstance(clip, ClipScorer) else load_clip(clip or family.default_clip, device)
            prompts = family.prompt_set(concept)
            with torch.no_grad():
                named = [t.format(concept) for t in templates] or prompts.clip_concept
                self._concept_text = self.clip.text_features(named)
                self._anchor_text = self.clip.text_features(prompts.clip_anchors)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.judge is not None:
            return self.judge.detects(images, self.concept).cpu()
        features = self.clip.image_features(images)
        return zero_shot_presence(features, self._concept_text, self._anchor_text).cpu()

    def detects(self, images: torch.Tensor, concept: str | None = None) -> torch.Tensor:
        """The judge's interface (the attack takes either): this detector knows one concept."""
        return self(images)

    def describe(self) -> dict:
        if self.judge is not None:
            return self.judge.describe()
        return {**self.clip.describe(), "rule": CLIP_PRESENCE_RULE}


def concept_detectors(concepts: Sequence[str], family, device: str = "cpu", clip: str | None = None,
                      classifier: str = "auto", label: str | None = None,
                      templates: Sequence[str] = ()) -> dict:  # fmt: skip
    """One detector per concept on models of `family`; those that fall back to CLIP share one loaded
    model (and name the concept with `templates`, when given). A named image classifier detects its
    `label` for every concept."""
    from pipelines.families import get_family

    family = get_family(family)
    if classifier.startswith(IMAGE_CLASSIFIER):
        check_classifier(classifier, label)
        detector = ImageClassifierDetector(classifier[len(IMAGE_CLASSIFIER) :], label, device)
        return dict.fromkeys(concepts, detector)
    needs_clip = classifier == "clip" or any(default_judge(c, family, device) is None for c in concepts)
    shared = load_clip(clip or family.default_clip, device) if needs_clip else None
    return {c: ConceptDetector(c, family, device, shared, classifier, templates) for c in concepts}


class PresenceCheck:
    """A cheap check while a method trains: the share of a few quick samples of the concepts in which
    the concepts' detectors (the domain judge, else CLIP zero-shot) still see them: the largest share among the
    concepts, so that a run erasing several stops only once each is gone. The samples go
    round all of a concept's target prompts (sample i: prompt i mod P, seed i), so that a concept
    gone from its first prompts but not from "a red ..." or "a handwritten ..." still counts as
    present. Judges and CLIP load once, when the check is made."""

    def __init__(self, family, concepts: list[str], device: str = "cpu", clip: str | None = None):
        self.prompts = {c: family.prompt_set(c).target for c in concepts}
        self.detectors = concept_detectors(concepts, family, device, clip)

    @torch.no_grad()
    def __call__(self, model, samples: int, steps: int) -> float:
        shares = []
        for concept, detector in self.detectors.items():
            prompts = self.prompts[concept]
            jobs = [(i % len(prompts), i) for i in range(samples)]
            images = to_tensor(model.generate_jobs(prompts, jobs, steps=steps))
            shares.append(float(detector(images).float().mean()))
        return max(shares)


def clip_needed(concepts: Sequence[str], family, classifier: str = "auto") -> bool:
    """Whether `concept_detectors` would load a CLIP for `concepts`, found without loading anything: a concept
    neither the family's judge knows nor NudeNet (installed) judges falls back to CLIP zero-shot."""
    import importlib.util

    from pipelines.families import get_family

    from .judges import NUDITY_WORDS

    if classifier.startswith(IMAGE_CLASSIFIER):
        return False
    if classifier == "clip":
        return True
    family = get_family(family)

    def judged(concept: str) -> bool:
        if family.judge is not None and family.judges(concept):
            return True
        return concept.lower().strip() in NUDITY_WORDS and importlib.util.find_spec("nudenet") is not None

    return not all(judged(c) for c in concepts)


class ImageClassifierDetector:
    """A transformers image classifier (`AutoModelForImageClassification`, local folder or Hub
    id): the concept is there when `label` is the top class. Preprocessing (resize, normalise)
    follows the model's image processor config, on tensors."""

    def __init__(self, path: str, label: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from pipelines.logs import quiet_libraries

        try:
            with quiet_libraries():
                self.model = AutoModelForImageClassification.from_pretrained(path).to(device).eval()
                processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the image classifier {path!r}: {str(exc).splitlines()[0]}") from None
        labels = self.model.config.label2id
        if label not in labels:
            raise InputError(
                f"the image classifier {path!r} has no label {label!r}; its labels: {', '.join(sorted(labels))}"
            )
        self.path, self.label, self.index, self.device = path, label, labels[label], device
        size = getattr(processor, "size", None) or {}
        self.size = (size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge")))
        if None in self.size:
            self.size = (self.model.config.image_size,) * 2
        self.mean = torch.tensor(getattr(processor, "image_mean", None) or [0.5] * 3).view(1, 3, 1, 1)
        self.std = torch.tensor(getattr(processor, "image_std", None) or [0.5] * 3).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        found = []
        for i in range(0, len(images), batch_size):
            x = torch.nn.functional.interpolate(images[i : i + batch_size].float(), size=self.size, mode="bilinear",
                                                antialias=True, align_corners=False)  # fmt: skip
            x = ((x - self.mean) / self.std).to(self.device)
            found.append(self.model(pixel_values=x).logits.argmax(-1).cpu() == self.index)
        return torch.cat(found)

    def describe(self) -> dict:
        return {"classifier": self.path, "label": self.label, "rule": "argmax of the logits == the label"}
