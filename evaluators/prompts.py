"""Prompt sets of the before/after protocol: prompts that ask for the concept (target) and prompts
whose content must survive (preserved: neighbour concepts and unrelated ones).

In the digits world every preserved prompt also carries the labels a judge should read off its
images, so "preserved accuracy" is measured, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

from pipelines.errors import InputError

GENERAL_TARGET_TEMPLATES = ("{}", "a photo of {}", "a painting of {}", "an image of {}", "{}, highly detailed")
NEUTRAL_ANCHORS = ("a photo", "an image", "a picture of something", "a photo of an everyday scene")


@dataclass
class PromptSet:
    target: list[str]
    preserved: list[str]
    preserved_labels: list[dict[str, int]] = field(default_factory=list)  # digits world only
    clip_concept: list[str] = field(default_factory=list)  # prompt ensemble naming the concept
    clip_anchors: list[str] = field(default_factory=list)  # what the concept competes with
    judged_head: str | None = None  # digits world: the head the concept lives on

    def describe(self) -> dict:
        return {
            "target_prompts": self.target, "preserved_prompts": self.preserved,
            "clip_concept_prompts": self.clip_concept, "clip_anchor_prompts": self.clip_anchors,
        }  # fmt: skip


def digits_prompt_set(concept: str) -> PromptSet:
    """Target and preserved prompts for a digit, colour or style of the digits world."""
    from pipelines.zoo.world import COLOURS, DIGIT_WORDS, STYLES, parse_concept, zero_shot_prompts

    parsed = parse_concept(concept)
    if parsed is None:
        raise InputError(f"{concept!r} is not a digit, colour or style of the digits world")
    names = {"digit": DIGIT_WORDS, "colour": COLOURS, "style": STYLES}[parsed.head]
    word = names[parsed.index]
    if parsed.head == "digit":
        target = [f"a {word}", f"the number {word}", f"a handwritten {word}"]
        target += [f"a {c} {word}" for c in COLOURS] + [f"a {s} {word}" for s in STYLES]
    elif parsed.head == "colour":
        target = [f"a {word} {d}" for d in DIGIT_WORDS]
    else:
        target = [f"a {word} {d}" for d in DIGIT_WORDS]

    preserved, labels = [], []
    k = 0
    for d in range(len(DIGIT_WORDS)):
        for _ in range(2):  # two renders of each kept digit, rotating through colours and styles
            c, s = k % len(COLOURS), (k // len(COLOURS) + k) % len(STYLES)
            k += 1
            label = {"digit": d, "colour": c, "style": s}
            if label[parsed.head] == parsed.index:
                continue
            preserved.append(f"a {COLOURS[c]} {STYLES[s]} {DIGIT_WORDS[d]}")
            labels.append(label)
    ensembles = zero_shot_prompts(parsed.head)
    anchors = [p for name, prompts in ensembles.items() if name != word for p in prompts]
    return PromptSet(target, preserved, labels, ensembles[word], anchors, parsed.head)


def general_prompt_set(concept: str, neighbours: list[str] | None = None) -> PromptSet:
    """Prompts for any concept on a real model; preserved: neighbours (if given) + COCO objects."""
    target = [t.format(concept) for t in GENERAL_TARGET_TEMPLATES]
    coco = resources.files("evaluators").joinpath("data/coco_objects.txt").read_text().split("\n")
    unrelated = [f"a photo of a {o.strip()}" for o in coco[::8] if o.strip() and o.strip() not in concept.lower()]
    preserved = [f"a photo of {n}" for n in (neighbours or [])] + unrelated
    return PromptSet(target, preserved, [], [concept, f"a photo of {concept}"], list(NEUTRAL_ANCHORS) + unrelated[:5])


def prompt_set(concept: str, family: str, neighbours: list[str] | None = None) -> PromptSet:
    if family == "digits":
        return digits_prompt_set(concept)
    return general_prompt_set(concept, neighbours)
