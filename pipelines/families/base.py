"""The family interface, with what the families of real-world models share.

A `Family` holds everything that differs between model families: how prompts become the
denoiser's conditioning and how a latent trajectory or a single step is sampled (the Stable
Diffusion families), which prompts ask for a concept, which keep what must survive and which
neighbour it, the domain judge and CLIP that can tell a concept apart, builtin images of a
concept, and each method's tuned preset. Methods and evaluators ask the family of the model they
face (`model.family`) and never compare its name.

The defaults here are those of models of the real world (COCO objects as what to keep, CLIP
ViT-L/14 as the judge of last resort); a family of another world overrides them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import InputError
from ..tokenizer import plain_words

COCO_OBJECTS = Path(__file__).with_name("coco_objects.txt")
GENERAL_TARGET_TEMPLATES = ("{}", "a photo of {}", "a painting of {}", "an image of {}", "{}, highly detailed")
NEUTRAL_ANCHORS = ("a photo", "an image", "a picture of something", "a photo of an everyday scene")


@dataclass
class PromptSet:
    """The prompts of the before/after protocol for one concept: prompts that ask for it (target) and
    prompts whose content must survive (preserved: neighbour concepts and unrelated ones)."""

    target: list[str]
    preserved: list[str]
    preserved_labels: list[dict[str, int]] = field(default_factory=list)  # what a judge must read off each
    clip_concept: list[str] = field(default_factory=list)  # prompt ensemble naming the concept
    clip_anchors: list[str] = field(default_factory=list)  # what the concept competes with
    judged_head: str | None = None  # the judge's head the concept lives on, where it has heads

    def describe(self) -> dict:
        return {
            "target_prompts": self.target, "preserved_prompts": self.preserved,
            "clip_concept_prompts": self.clip_concept, "clip_anchor_prompts": self.clip_anchors,
        }  # fmt: skip


def coco_objects() -> list[str]:
    return [name.strip() for name in COCO_OBJECTS.read_text().split("\n") if name.strip()]


_FILLER = {"a", "an", "the", "of", "in", "on", "with", "and", "by", "photo", "image", "picture", "painting", "style"}


def _content_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - _FILLER


def mentions(prompt: str, concepts: Sequence[str]) -> bool:
    """Whether `prompt` shares a content word with one of `concepts`."""
    words = _content_words(prompt)
    return any(_content_words(c) & words for c in concepts)


class Family:
    """A model family; see the module docstring. One instance per family, registered by name."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    default_clip: ClassVar[str] = "openai/clip-vit-large-patch14"  # CLIP of scores and zero-shot presence
    eval_samples: ClassVar[int] = 10  # seeds per prompt of the evaluation protocol, by default
    judge: ClassVar[str | None] = None  # the domain judge of this family's world (evaluators/judges.py)
    has_builtin_images: ClassVar[bool] = False  # images of its concepts ship with it (`--images builtin`)
    # method key -> the options tuned for this family, over the config's paper defaults
    presets: ClassVar[dict[str, dict]] = {}
    # method key -> what a LoRA run of it (lora_rank > 0) changes of that preset, with the rank it was measured
    # at: an adapter starts at zero and needs larger steps than full weights to move as far
    lora_presets: ClassVar[dict[str, dict]] = {}
    # method key -> the registry's key of the paper a preset follows where it is not the method's own
    preset_papers: ClassVar[dict[str, str]] = {}
    # the components the family's diffusers LoRA file can hold (None: every one a method trains)
    lora_components: ClassVar[tuple[str, ...] | None] = None
    # method key (or "attack:NAME", for `eval --attack NAME`) -> why this family's models cannot take it, refused
    # before anything loads
    unsupported: ClassVar[dict[str, str]] = {}

    def preset(self, method: str) -> dict:
        return dict(self.presets.get(method, {}))

    def lora_preset(self, method: str) -> dict:
        return dict(self.lora_presets.get(method, {}))

    def check_method(self, method: str) -> None:
        """Refuse, in one line, a method this family's models cannot take."""
        if method in self.unsupported:
            raise InputError(f"{method} cannot erase from {self.name} models: {self.unsupported[method]}")

    def judges(self, concept: str) -> bool:
        """Whether the family's own judge can tell `concept` in an image."""
        return False

    # --- prompts -------------------------------------------------------------------------------

    def prompt_set(self, concept: str, neighbours: Sequence[str] | None = None) -> PromptSet:
        """The protocol's prompts for any concept; preserved: the neighbours (if given), then COCO objects."""
        target = [t.format(concept) for t in GENERAL_TARGET_TEMPLATES]
        unrelated = [f"a photo of a {o}" for o in coco_objects()[::8] if o not in concept.lower()]
        preserved = [f"a photo of {n}" for n in (neighbours or [])] + unrelated
        anchors = list(NEUTRAL_ANCHORS) + unrelated[:5]
        return PromptSet(target, preserved, [], [concept, f"a photo of {concept}"], anchors)

    def concept_words(self, concept: str) -> set[str]:
        """The lower-case words this family's prompts may name `concept` by: its own words, here."""
        return set(plain_words(concept))

    def retain_pool(self, concepts: Sequence[str]) -> list[str]:
        """Prompts of what to keep, before those that mention a concept are left out."""
        return [f"a photo of a {name}" for name in coco_objects()]

    def retain_prompts(self, concepts: Sequence[str], rng: random.Random, n: int = 200) -> list[str]:
        """Up to `n` prompts of things to keep, in `rng`'s order. Prompts that mention a word of a concept
        are left out, so that a retain term never protects what is being erased."""
        pool = [p for p in self.retain_pool(concepts) if not mentions(p, concepts)]
        if not pool:
            raise InputError("no retain prompt is left once the concepts are excluded")
        rng.shuffle(pool)
        return pool[:n]

    def remain_prompts(self, concepts: Sequence[str], seed: int, n: int) -> list[str]:
        """SFD's remain distribution: prompts of the model's own distribution without the concepts."""
        return self.retain_prompts(concepts, random.Random(seed), n)

    def forget_pairs(self, overrides: dict[str, str], templates: Sequence[str], seed: int, n: int = 200,
                     ) -> list[tuple[str, str]]:  # fmt: skip
        """(prompt of a concept, the same prompt of what it becomes) for every concept -> override."""
        return [(t.format(c), t.format(o)) for c, o in overrides.items() for t in templates]

    def anchor_prompts(self, concept: str, rng: random.Random, n: int = 50) -> list[str]:
        """The concept in context, for methods that steer towards the context while erasing the concept
        (STEREO's anchors). Real-world defaults are the general templates; STEREO wrote sentences per concept,
        which a method's `anchor_prompts` option takes."""
        return [t.format(concept) for t in GENERAL_TARGET_TEMPLATES[1:]]

    def default_override(self, concept: str) -> str | None:
        """What `concept` becomes when the user names nothing (SFD); None: the user must name it."""
        return None

    # --- images --------------------------------------------------------------------------------

    def builtin_images(self, concept: str, count: int, seed: int):
        """`count` images of `concept` that ship with the family, [count, 3, S, S] in [0, 1]."""
        raise InputError(f"the {self.name} family has no builtin images; pass a folder of images of {concept!r}")

    def __repr__(self) -> str:
        return f"<family {self.name}>"
