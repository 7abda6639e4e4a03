"""Erasure quality of a diffusion method on the embedded digits-sd (or any model), as JSON.

    python benchmarks/erasure_quality.py --method advunlearn --concept seven [--seeds 20] [--attack]
        [--set key=value ...] [--model digits] [--keep DIR] [--compare-time esd]
    python benchmarks/erasure_quality.py --run RUN [--attack ...]    # measure a finished run again

Erases the concept, then scores the run against its base with the before/after protocol
(evaluators/report.py): concept presence on target prompts (judge and CLIP), preserved accuracy,
CLIP score, FID on preserved prompts; with --attack also the attack success rate of the
embedding-space UnlearnDiffAtk (evaluators/attack.py) on the base and the erased model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch


def weights_sha256(module: torch.nn.Module) -> str:
    """A digest of every tensor of `module` (names and float32 bytes): equal only for equal weights."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode() + value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def paraphrases(concept: str) -> list[str]:
    """Prompts that ask for a digit by its numeral or in words the target prompts do not use."""
    from pipelines.zoo.world import COLOURS, parse_concept

    parsed = parse_concept(concept)
    if parsed is None or parsed.head != "digit":
        raise SystemExit(f"--paraphrases needs a digit of the digits world, not {concept!r}")
    n, word = parsed.index, parsed.name
    return [f"a {n}", f"the number {n}", f"a handwritten {n}", f"{n}", f"the digit {n}", f"the number {n} in red",
            f"a {COLOURS[2]} italic {n}", f"the digit {word}, bold, blue", f"a drawing of a yellow {word}",
            f"{word}, the number"]  # fmt: skip


def paraphrase_presence(erased, base, concept: str, seeds: int) -> dict:
    """The share of images of each model the judge reads as the concept, over paraphrases x seeds."""
    from evaluators.judges import default_judge
    from pipelines.images import to_tensor

    prompts = paraphrases(concept)
    judge = default_judge(concept, base.family)
    shares = {}
    for name, model in (("before", base), ("after", erased)):
        images = to_tensor([im for row in model.generate(prompts, list(range(seeds))) for im in row])
        shares[name] = round(float(judge.detects(images, concept).float().mean()), 4)
    return {**shares, "prompts": prompts, "seeds_per_prompt": seeds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", help="the method to erase with (required unless --run is given)")
    parser.add_argument("--concept", help="the concept to erase (default with --run: the run's only concept)")
    parser.add_argument("--model", default="digits")
    parser.add_argument(
        "--run", metavar="RUN",
        help="measure this finished run instead of erasing: its method and base model are read from its erasure.json",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=20, help="seeds per prompt in the evaluation")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--attack", action="store_true", help="measure the attack success rate too")
    # The attack's outcome depends much on the seed (5 seeds: ESD 47% or 16% depending on which), so
    # 20 seeds x 11 prompts = 220 attacked pairs by default.
    parser.add_argument("--attack-seeds", type=int, default=20, help="seeds per target prompt for the attack")
    parser.add_argument("--attack-steps", type=int, default=100)
    parser.add_argument(
        "--also-attack", action="append", default=[], choices=["unlearndiffatk", "textual-inversion"],
        help="with --attack: also run these attacks of `erasure eval --attack` on the erased model (same code)",
    )  # fmt: skip
    parser.add_argument(
        "--skip-base-attack", action="store_true",
        help="attack the erased model only (the base model's ASR does not depend on the method: 100%% on digits-sd)",
    )  # fmt: skip
    parser.add_argument("--keep", metavar="DIR", help="keep the erased run here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument(
        "--paraphrases", action="store_true",
        help="a digit of the digits world: also judge its numeral and paraphrases ('a 7', 'the number 7 in red', "
        "...), none of them a prompt of the evaluation's target set",
    )  # fmt: skip
    parser.add_argument(
        "--compare-time", metavar="METHOD",
        help="also erase with METHOD (its preset) in the same run and report both erase times",
    )  # fmt: skip
    args = parser.parse_args()
    if args.run:
        finished = json.loads((Path(args.run) / "erasure.json").read_text())
        if args.method not in (None, finished["method"]) or args.set or args.compare_time or args.keep:
            parser.error("--run measures a finished run: --method, --set, --compare-time and --keep do not apply")
        if args.concept is None and len(finished["concepts"]) != 1:
            parser.error(f"--run: the run erased {finished['concepts']}; say which with --concept")
        args.method, args.model = finished["method"], finished["base_model"]["spec"]
        args.concept = args.concept or finished["concepts"][0]
    elif args.method is None or args.concept is None:
        parser.error("--method and --concept are required (or --run RUN)")
    torch.set_num_threads(args.threads)

    from erasure.api import erase
    from evaluators.attack import AttackSettings, attack_success_rate
    from evaluators.report import default_judge, evaluate
    from pipelines import load_model

    workdir = Path(tempfile.mkdtemp(prefix="erasure-bench-"))
    out = Path(args.keep) if args.keep else workdir / "run"
    try:
        if args.run:
            run_dir = Path(args.run)
        else:
            run_dir = erase(args.method, [args.concept], args.model, out=out, sets=args.set, seed=args.seed,
                            progress=True)  # fmt: skip
        manifest = json.loads((run_dir / "erasure.json").read_text())
        # The erasure's own figures first, on a line of their own: a time-boxed run (the device session) that is
        # cut off during the evaluation still keeps them.
        print(json.dumps({"erase": {k: manifest[k] for k in ("device", "wall_time_s", "erase_time_s")}}), flush=True)
        device = manifest["device"]  # evaluate where the erasure ran: on a GPU, the CPU would take minutes more
        erased_weights = {name: weights_sha256(getattr(load_model(str(run_dir), device="cpu"), name))
                          for name in manifest["changed_components"]}  # fmt: skip
        erased, base = load_model(str(run_dir), device=device), load_model(args.model, device=device)
        report = evaluate(erased, base, [args.concept], samples=args.seeds, progress=True).report
        metrics = report["concepts"][args.concept]["metrics"]
        result = {
            "method": args.method, "concept": args.concept, "model": args.model, "run": args.run,
            "seed": manifest["seed"], "config": manifest["config"],
            "wall_time_s": manifest["wall_time_s"], "erase_time_s": manifest["erase_time_s"],
            "peak_rss_mb": manifest["peak_rss_mb"],
            "trainable_parameters": manifest["trainable_parameters"],
            "erased_weights_sha256": erased_weights,
            "outcome": manifest.get(args.method),  # what the run decided (e.g. fewshot's stopping epoch)
            "evaluation": {"seeds_per_prompt": args.seeds, "judge": report["concepts"][args.concept]["judge"]},
        }  # fmt: skip
        for name, metric in metrics.items():
            keep = {k: metric[k] for k in ("before", "after", "difference", "value") if k in metric}
            result[name] = {k: None if v is None else round(v, 4) for k, v in keep.items()}
        if args.paraphrases:
            result["paraphrases"] = paraphrase_presence(erased, base, args.concept, args.seeds)
        if args.compare_time:
            other = erase(args.compare_time, [args.concept], args.model, out=workdir / "compare", seed=args.seed,
                          progress=True)  # fmt: skip
            other_time = json.loads((other / "erasure.json").read_text())["erase_time_s"]
            result["time_comparison"] = {
                args.method: manifest["erase_time_s"], args.compare_time: other_time,
                "ratio": round(other_time / max(manifest["erase_time_s"], 1e-9), 1),
                "note": "seconds of the erasure itself, after the model is loaded, same process",
            }  # fmt: skip
        if args.attack:
            judge = default_judge(args.concept, base.family)
            prompts = base.family.prompt_set(args.concept).target
            settings = AttackSettings(steps=args.attack_steps)
            seeds = list(range(1000, 1000 + args.attack_seeds))  # other seeds than the evaluation's
            asr = {}
            attacked = (("erased", erased),) if args.skip_base_attack else (("base", base), ("erased", erased))
            for name, model in attacked:
                outcome = attack_success_rate(model, base, judge, args.concept, prompts, seeds, settings, progress=True)
                asr[name] = {k: v for k, v in outcome.items() if k not in ("settings", "per_pair")}
                asr[name]["loss"] = outcome["settings"]["method"]  # a one-step generator is attacked its own way
                asr["settings"] = {k: v for k, v in outcome["settings"].items() if k not in ("prompts", "judge")}
            for kind in args.also_attack:  # the code `erasure eval RUN --attack KIND` runs
                from erasure.evaluation import run_attack

                outcome = run_attack(kind, erased, base, args.concept, None, args.attack_seeds, args.attack_steps,
                                     None, True)  # fmt: skip
                asr[kind] = {k: v for k, v in outcome.items() if k not in ("settings", "per_pair", "loss")}
            result["attack"] = asr
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
