"""A run's `eval.json` as a before/after table and its grids, and `erasure eval` run from the page."""

from __future__ import annotations

from pathlib import Path

from erasure.evaluation import reference_note
from erasure.output import read_run
from evaluators.report_format import EVAL_FILE, concept_attacks, read_report

HEADERS = ["concept", "metric", "before", "after", "difference", "warning"]


def eval_table(run: str | Path) -> tuple[list[list], list[tuple[str, str]], str]:
    """(table rows, [(grid path, caption)], message) for a run; empty with a hint when not evaluated."""
    read_run(run)
    path = Path(run) / EVAL_FILE
    if not path.is_file():
        return [], [], f"{Path(run).name} has no eval.json yet: press **Evaluate** (or run `erasure eval {run}`)."
    report = read_report(path)
    rows = []
    for concept, section in report["concepts"].items():
        for name, metric in section["metrics"].items():
            warning = metric.get("warning")  # it holds for a value too (e.g. a small set), so it is always shown
            if "before" in metric:
                rows.append([concept, name, _round(metric["before"]), _round(metric["after"]),
                             _round(metric["difference"]), warning])  # fmt: skip
            else:  # a metric of the erased model alone, e.g. FID against the base model's images
                rows.append([concept, name, None, _round(metric["value"]), None, warning])
        for attack in concept_attacks(section):  # `erasure eval --attack`: the erased model's attack success rate
            rows.append([concept, f"attack_success_rate ({attack['attack']}, {attack['pairs']} pairs)", None,
                         _round(attack["asr"]), None, reference_note(attack)])  # fmt: skip
    grids = [(str(path.parent / rel), name) for name, rel in report.get("grids", {}).items()]
    settings = report.get("settings", {})
    message = f"{path} · seeds per prompt: {settings.get('samples_per_prompt', settings.get('samples', '?'))}"
    return rows, grids, message


def _round(value) -> float | None:
    """Four significant digits, not decimals: KID on CLIP features is of order 1e-5, and would show as 0."""
    return None if value is None else float(f"{float(value):.4g}")


def evaluate_run(run: str | Path, samples: int | None, device: str = "cpu") -> Path:
    """`erasure eval RUN`: writes RUN/eval.json and RUN/grids/ (progress through tqdm, which the page tracks)."""
    from erasure.evaluation import run_eval

    read_run(run)
    return run_eval(str(run), samples=samples, device=device, progress=True)
