"""Two LoRA erasures stacked with plain diffusers, as JSON: each concept alone, then both adapters loaded into one
pipeline of the base (`load_lora_weights` of each run, `set_adapters` with strengths), scored on every concept.

    python benchmarks/lora_stack.py RUN_A RUN_B [--strength 1.0 --strength 1.0] [--seeds 10] [--model digits]

Each run is an erasure trained with `--set lora_rank=R` (its folder holds `pytorch_lora_weights.safetensors`).
The stacked model is the base's pipeline with both adapters at their strengths, fused into its weights; it is
scored with the before/after protocol (evaluators/report.py) on the union of the runs' concepts, against the
base, as each run alone is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the judge's presence of each concept, and the accuracy of every head the judge reads on what must survive (the
# head a concept lives on is `preserved_accuracy`: a digit's digits, a colour's colours; the others are suffixed)
METRICS = ("target_presence_judge", "preserved_accuracy")


def stacked(base_spec: str, runs: list[Path], strengths: list[float]):
    """The base model with every run's adapters at its strength, fused (a toolkit model, as `load_model` gives)."""
    from pipelines import load_model
    from pipelines.lora_files import apply_lora_files

    model = load_model(base_spec)
    apply_lora_files(model.pipe, runs, strengths)
    return model


def scores(model, base, concepts: list[str], seeds: int) -> dict:
    """{"before": the base's scores, "after": the model's}, per concept."""
    from evaluators.report import evaluate

    report = evaluate(model, base, concepts, samples=seeds, progress=False).report
    metrics = {c: report["concepts"][c]["metrics"] for c in concepts}
    return {side: {c: {m: round(v[side], 4) for m, v in metrics[c].items() if m.startswith(METRICS)} for c in concepts}
            for side in ("before", "after")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs=2, type=Path)
    parser.add_argument("--strength", type=float, action="append", help="per run, in order (default: 1 each)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per prompt in the evaluation")
    parser.add_argument("--model", default="digits", help="the base both runs erased from")
    args = parser.parse_args()
    strengths = args.strength or [1.0] * len(args.runs)
    if len(strengths) != len(args.runs):
        raise SystemExit("give one --strength per run")

    from pipelines import load_model

    manifests = [json.loads((run / "erasure.json").read_text()) for run in args.runs]
    concepts = [c for m in manifests for c in m["concepts"]]
    base = load_model(args.model)
    both = scores(stacked(args.model, list(args.runs), strengths), base, concepts, args.seeds)
    result = {"runs": [str(r) for r in args.runs], "strengths": strengths, "concepts": concepts,
              "seeds_per_prompt": args.seeds, "base": both["before"]}  # fmt: skip
    for run in args.runs:
        result[f"alone: {run.name}"] = scores(stacked(args.model, [run], [1.0]), base, concepts, args.seeds)["after"]
    result["stacked"] = both["after"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
