"""A quick screen of few-shot erasing settings on digits-sd, as JSON lines (one per setting).

    python benchmarks/fewshot_sweep.py "lr=3e-3,steps=20" "lr=3e-3,steps=40,num_images=8" ...

Each argument is a comma-separated list of `--set` options on top of the digits preset. Only the
erased model is judged (the base model draws 100% sevens and 100% of the other digits on these
prompts): digits-judge on 5 "seven" prompts and "a <digit>" for the 9 other digits, 4 seeds each.
It is a screen, not the protocol: confirm a choice with `erasure_quality.py --method fewshot`.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

TARGET = ["a seven", "the number seven", "a handwritten seven", "a red seven", "a blue italic seven"]
SEEDS = list(range(4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="+", help='--set options of one setting, e.g. "lr=3e-3,steps=20"')
    args = parser.parse_args()
    torch.set_num_threads(1)
    from erasure.config import build_config, parse_sets
    from erasure.registry import METHODS
    from erasure.training import RunContext
    from evaluators.judges import DigitsJudge
    from pipelines import load_model
    from pipelines.images import to_tensor
    from pipelines.zoo.world import DIGIT_WORDS

    entry = METHODS["fewshot"].entry
    judge, base = DigitsJudge(), load_model("digits")
    others = [i for i in range(10) if i != 7]
    expected = torch.tensor(others).repeat_interleave(len(SEEDS))
    for spec in args.settings:
        sets = [s for s in spec.split(",") if s]
        model = copy.deepcopy(base)
        started = time.time()
        result = entry(
            model, ["seven"], build_config("fewshot", "digits", parse_sets(sets)), RunContext(progress=False)
        )
        seconds = time.time() - started
        sevens = to_tensor([im for row in model.generate(TARGET, SEEDS) for im in row])
        rest = to_tensor([im for row in model.generate([f"a {DIGIT_WORDS[i]}" for i in others], SEEDS) for im in row])
        line = {
            "sets": sets, "erase_seconds": round(seconds, 1),
            "seven_judged": float(judge.detects(sevens, "seven").float().mean()),
            "other_digits_accuracy": float((judge.predict(rest)["digit"].argmax(-1) == expected).float().mean()),
            "outcome": result.outcome.get("fewshot"),
        }  # fmt: skip
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
