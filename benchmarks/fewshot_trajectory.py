"""Few-shot erasing on digits-sd epoch by epoch, as JSON lines: what the stopping rule sees after each
epoch, and what a small version of the evaluation protocol would say at that point.

    python benchmarks/fewshot_trajectory.py [--epochs 12] [--seed 0] "retain_weight=0.1" "num_images=4,lr=5e-3" ...

Each argument is a comma-separated list of `--set` options on top of the digits preset; the run goes
on for `--epochs` whatever the rule says (its check is made and reported, never obeyed), so that one
run shows where the rule would stop (`rule_stops_here`: the check has been below `stop_below` at
`stop_patience` epochs in a row) and whether that was a good epoch. Per epoch: `rule` (the check's
presence), `sevens` (digits-judge on the protocol's 11 "seven" prompts x 3 seeds), `sevens_7` (5 "7"
prompts x 3 seeds: the synonym), and the judge's digit / colour / style accuracy on the protocol's 18
preserved prompts x 3 seeds (base model: 100% sevens, 100 / 100 / 100%). The lines come from the
rule's check, so `stop_below=none` prints none. Confirm a choice with `erasure_quality.py --method
fewshot`.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

SEEDS = [100, 101, 102]
SEVEN_DIGIT_PROMPTS = ["a 7", "the number 7", "a handwritten 7", "a red 7", "a blue italic 7"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="+", help="comma-separated --set options, one run each ('' = the preset)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from erasure.config import build_config, parse_sets
    from erasure.fewshot import BUILTIN_COUNT
    from erasure.registry import METHODS
    from erasure.training import RunContext
    from evaluators import detect
    from evaluators.judges import DigitsJudge
    from pipelines import load_model
    from pipelines.images import to_tensor

    entry = METHODS["fewshot"].entry
    judge, base = DigitsJudge(), load_model("digits")
    prompts = base.family.prompt_set("seven")
    expected = {
        head: torch.tensor([label[head] for label in prompts.preserved_labels]).repeat_interleave(len(SEEDS))
        for head in ("digit", "colour", "style")
    }

    def draw(model, texts):
        return to_tensor([im for row in model.generate(texts, SEEDS) for im in row])

    def protocol(model) -> dict:
        predicted = judge.predict(draw(model, prompts.preserved))
        accuracy = {h: float((predicted[h].argmax(-1) == expected[h]).float().mean()) for h in expected}
        return {
            "sevens": round(float(judge.detects(draw(model, prompts.target), "seven").float().mean()), 4),
            "sevens_7": round(float(judge.detects(draw(model, SEVEN_DIGIT_PROMPTS), "seven").float().mean()), 4),
            **{f"{h}_accuracy": round(a, 4) for h, a in accuracy.items()},
        }

    print(json.dumps({"base": True, **protocol(base)}), flush=True)
    check = detect.PresenceCheck.__call__

    def trajectory(sets: list[str]) -> None:
        config = build_config("fewshot", "digits", parse_sets(sets))
        config.steps = args.epochs * max(1, (config.num_images or BUILTIN_COUNT) // config.batch_size)
        epoch = below = 0

        def observed(self, model, samples, steps):  # the check, reported and then ignored
            nonlocal epoch, below
            epoch += 1
            presence = check(self, model, samples, steps)
            below = below + 1 if presence < config.stop_below else 0
            line = {"sets": sets, "seed": args.seed, "epoch": epoch, "rule": round(presence, 4),
                    "rule_stops_here": below == config.stop_patience, **protocol(model)}  # fmt: skip
            print(json.dumps(line), flush=True)
            return 1.0

        detect.PresenceCheck.__call__ = observed
        try:
            entry(copy.deepcopy(base), ["seven"], config, RunContext(seed=args.seed, progress=False))
        finally:
            detect.PresenceCheck.__call__ = check

    for spec in args.sets:
        trajectory([s for s in spec.split(",") if s])


if __name__ == "__main__":
    main()
