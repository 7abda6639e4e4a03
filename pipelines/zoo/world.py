"""The vocabulary of the embedded digits world: what a render can show and how captions name it.

Everything that needs to know "which words mean which digit/colour/style" (the renderer's
captions, the judge's heads, the evaluators' concept parser, the retain sets of the methods)
reads it from here, so the world has one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..tokenizer import plain_words

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = ("white", "red", "green", "blue", "yellow")
STYLES = ("plain", "italic", "bold")

# RGB in [0, 1]; chosen far apart so that colour is never ambiguous to a judge.
COLOUR_RGB = {
    "white": (0.95, 0.95, 0.95),
    "red": (0.95, 0.15, 0.10),
    "green": (0.10, 0.85, 0.20),
    "blue": (0.20, 0.40, 1.00),
    "yellow": (0.95, 0.90, 0.10),
}

# Words a caption may use for each style (the first is the canonical one).
STYLE_WORDS = {
    "plain": ("plain", "regular", "upright"),
    "italic": ("italic", "slanted"),
    "bold": ("bold", "thick"),
}

# A judge head and the class names it predicts.
HEADS = {"digit": DIGIT_WORDS, "colour": COLOURS, "style": STYLES}


@dataclass(frozen=True)
class WorldConcept:
    """A concept of the digits world: one class of one judge head (e.g. digit 7, colour red)."""

    head: str
    index: int

    @property
    def name(self) -> str:
        return HEADS[self.head][self.index]


def parse_concept(text: str) -> WorldConcept | None:
    """Map a concept text ("seven", "7", "red", "italic", "slanted digits") to a judge class.

    Returns None when the text names nothing of the digits world, so callers can fall back to a
    CLIP-based judge.
    """
    words = plain_words(text)
    found: list[WorldConcept] = []
    for w in words:
        if w in DIGIT_WORDS:
            found.append(WorldConcept("digit", DIGIT_WORDS.index(w)))
        elif w.isdigit() and len(w) == 1:
            found.append(WorldConcept("digit", int(w)))
        elif w in COLOURS:
            found.append(WorldConcept("colour", COLOURS.index(w)))
        else:
            for style, style_words in STYLE_WORDS.items():
                if w in style_words:
                    found.append(WorldConcept("style", STYLES.index(style)))
    unique = set(found)
    return found[0] if len(unique) == 1 else None


def zero_shot_prompts(head: str) -> dict[str, list[str]]:
    """Prompt ensembles per class for zero-shot classification of one attribute with digits-clip."""
    if head == "digit":
        return {
            w: [f"a {w}", f"the number {w}", f"a handwritten {w}", f"the number {i}", f"a {i}"]
            for i, w in enumerate(DIGIT_WORDS)
        }
    if head == "colour":
        return {c: [f"a {c} {d}" for d in DIGIT_WORDS] for c in COLOURS}
    return {s: [f"a {s} {d}" for d in DIGIT_WORDS] for s in STYLES}
