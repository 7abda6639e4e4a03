"""Where the embedded models live and what each one is.

The shipped weights sit in `pipelines/zoo/weights/<name>/`; `ERASURE_ZOO=<dir>` points every
command at a rebuilt zoo instead (the output folder of `erasure zoo build`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SHIPPED_ROOT = Path(__file__).parent / "weights"
QUALITY_FILE = "quality.json"

# name -> (kind, one-line description). "digits" is the default model's short name.
EMBEDDED = {
    "digits-sd": ("text-to-image", "tiny Stable-Diffusion-format pipeline over coloured, styled digits"),
    "digits-gan": ("gan", "unconditional StyleGAN2 over the same renders"),
    "digits-clip": ("clip", "small CLIP (real CLIP BPE tokenizer) trained on renders and captions"),
    "digits-judge": ("judge", "CNN that classifies digit, colour and style of a 32x32 image"),
}
ALIASES = {"digits": "digits-sd"}
DEFAULT_MODEL = "digits"
DEFAULT_MODELS = {"text-to-image": DEFAULT_MODEL, "gan": "digits-gan"}  # what a method of each kind erases by default


def zoo_root() -> Path:
    override = os.environ.get("ERASURE_ZOO")
    return Path(override) if override else SHIPPED_ROOT


def canonical_name(name: str) -> str | None:
    """The embedded model a name refers to ("digits" -> "digits-sd"), or None."""
    name = ALIASES.get(name, name)
    return name if name in EMBEDDED else None


def embedded_path(name: str) -> Path:
    """Folder of an embedded model; raises FileNotFoundError with a hint when it is not built."""
    canonical = canonical_name(name)
    if canonical is None:
        raise KeyError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED))}")
    path = zoo_root() / canonical
    if not path.is_dir():
        raise FileNotFoundError(
            f"embedded model {canonical} is not present under {zoo_root()}; "
            f"build it with `erasure zoo build --out DIR` and set ERASURE_ZOO=DIR"
        )
    return path


def quality() -> dict:
    """Measured quality of the zoo (written by `benchmarks/zoo_quality.py --write`)."""
    path = zoo_root() / QUALITY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
