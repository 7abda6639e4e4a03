"""How long `erasure eval` takes on digits-sd: the full before/after protocol for one concept.

    python benchmarks/eval_speed.py [--samples 7] [--threads 2]

With 7 seeds per prompt the protocol generates and scores 406 images (29 prompts x 7 seeds x 2
models). Prints JSON: images, seconds, images per second.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--concept", default="seven")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from evaluators.report import evaluate
    from pipelines import load_model

    after, before = load_model("digits"), load_model("digits")
    started = time.time()
    report = evaluate(after, before, [args.concept], samples=args.samples, progress=False).report
    seconds = time.time() - started
    prompts = report["concepts"][args.concept]["prompts"]
    images = 2 * args.samples * (len(prompts["target_prompts"]) + len(prompts["preserved_prompts"]))
    print(json.dumps({"images": images, "seconds": round(seconds, 1), "images_per_second": round(images / seconds, 1),
                      "threads": args.threads, "steps": report["settings"]["steps"]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
