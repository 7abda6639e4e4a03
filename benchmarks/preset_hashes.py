"""Digests of the weights every method's preset trains, at short settings, as JSON.

    python benchmarks/preset_hashes.py [--method KEY ...] [--model-text digits] [--model-gan digits-gan]

Each method erases "seven" from the embedded model of its kind with its family preset, only the
step count shortened (SHORT below), at one CPU thread and seed 0, and the sha256 of every changed
component's tensors is printed. Two runs of the same code give the same digests; a refactoring that
claims not to change what a method computes must leave them unchanged (quote both runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

# Only the number of steps differs from each preset (the GAN methods' labelled pool is smaller too).
SHORT = {
    "esd": ["steps=4"],
    "advunlearn": ["steps=34"],  # past the preset's 30 warm-up steps: the attack runs too
    "fewshot": ["steps=8"],  # two epochs of its 8 builtin images at batch 2
    "sfd": ["steps=3"],
    "stereo": ["search_steps=3", "inversion_steps=3", "steps=3"],  # both rounds, all 64 + 64 images
    "text2unlearn": ["steps=10", "pool=600"],
    "adapt-unlearn": ["adapt_steps=3", "steps=3", "pool=2400"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", choices=list(SHORT), help="default: every method")
    parser.add_argument("--model-text", default="digits")
    parser.add_argument("--model-gan", default="digits-gan")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from erasure_quality import weights_sha256  # this folder's: the digest the quality benchmark prints

    from erasure.api import erase
    from erasure.registry import get_method
    from pipelines import load_model

    workdir = Path(tempfile.mkdtemp(prefix="erasure-hashes-"))
    result = {}
    try:
        for key in args.method or list(SHORT):
            model = args.model_gan if get_method(key).model_kind == "gan" else args.model_text
            started = time.time()
            run = erase(key, ["seven"], model, out=workdir / key, sets=SHORT[key], seed=0, progress=False)
            manifest = json.loads((run / "erasure.json").read_text())
            erased = load_model(str(run), device="cpu")
            result[key] = {
                "model": model, "sets": SHORT[key], "seconds": round(time.time() - started, 1),
                "sha256": {c: weights_sha256(getattr(erased, c)) for c in manifest["changed_components"]},
            }  # fmt: skip
            print(json.dumps({key: result[key]}), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"threads": 1, "seed": 0, "concept": "seven", "runs": result}, indent=2))


if __name__ == "__main__":
    main()
