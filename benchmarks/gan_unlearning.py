"""Unlearning quality of a GAN method on the embedded digits-gan (or any GAN), as JSON.

    python benchmarks/gan_unlearning.py --method adapt-unlearn --concept seven [--concept red]
        [--samples 2000] [--seed 0] [--set key=value ...] [--model digits-gan] [--keep DIR]

Unlearns the concept(s), then scores the run against its base with `erasure eval`'s GAN protocol
(evaluators/report.py `evaluate_gan`) on the fixed latent seeds 0..samples-1, shared by both
generators: the judge's share of samples showing each concept and its percentage drop (PUL), the
Frechet distance of judge features to held-out renders without the concept for both generators,
and, in the digits world, every digit's share of the samples before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch


def digit_shares(images: torch.Tensor, judge) -> list[float]:
    """The share of samples the judge names each digit (argmax of its digit head)."""
    predicted = judge.predict(images)["digit"].argmax(-1)
    return [round(float((predicted == d).float().mean()), 4) for d in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True)
    parser.add_argument("--concept", action="append", required=True, help="repeat for several concepts")
    parser.add_argument("--model", default="digits-gan")
    parser.add_argument("--samples", type=int, default=2000, help="fixed latent seeds 0..samples-1")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", metavar="DIR", help="keep the run here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from erasure.api import erase
    from evaluators.judges import DigitsJudge
    from evaluators.report import evaluate_gan
    from pipelines import load_model
    from pipelines.images import to_tensor
    from pipelines.zoo.world import parse_concept

    workdir = Path(tempfile.mkdtemp(prefix="erasure-gan-bench-"))
    out = Path(args.keep) if args.keep else workdir / "run"
    try:
        run_dir = erase(args.method, args.concept, args.model, out=out, sets=args.set, seed=args.seed)
        manifest = json.loads((run_dir / "erasure.json").read_text())
        erased, base = load_model(str(run_dir)), load_model(args.model)
        report = evaluate_gan(erased, base, args.concept, samples=args.samples).report
        result = {
            "method": args.method, "concepts": args.concept, "model": args.model, "config": manifest["config"],
            "seed": args.seed, "erase_time_s": manifest["erase_time_s"], "wall_time_s": manifest["wall_time_s"],
            "outcome": manifest.get(args.method.replace("-", "_")), "samples": args.samples,
            "note": "times on 2 CPU threads; run alone, other CPU jobs slow it several-fold",
        }  # fmt: skip
        for concept in args.concept:
            metrics = report["concepts"][concept]["metrics"]
            row = {}
            for name, metric in metrics.items():
                keep = {k: metric[k] for k in ("before", "after", "value") if k in metric}
                row[name] = {k: None if v is None else round(v, 4) for k, v in keep.items()}
            fd = metrics.get("fid_vs_real_without_concept", {})
            if fd.get("after") is not None and fd.get("before"):  # none below two samples
                row["fd_ratio_after_to_before"] = round(fd["after"] / fd["before"], 3)
            result[concept] = row
        if base.family.judge == DigitsJudge.name:  # the digits world: every digit's share too
            judge = DigitsJudge()
            seeds = range(args.samples)
            models = {"before": base, "after": erased}
            shares = {name: digit_shares(to_tensor(m.generate(seeds)), judge) for name, m in models.items()}
            erased_digits = {p.index for c in args.concept if (p := parse_concept(c)) and p.head == "digit"}
            kept = [round(a / b, 3) if b > 0 else None for d, (b, a) in enumerate(zip(*shares.values()))
                    if d not in erased_digits]  # fmt: skip
            result["digit_shares"] = {**shares, "kept_ratio_other_digits": kept,
                                      "min_kept_ratio": min(k for k in kept if k is not None)}  # fmt: skip
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
