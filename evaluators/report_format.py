"""What an evaluation report (eval.json) is, for its readers: light, so that reading one loads no model code."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.errors import InputError

FORMAT = "erasure-eval/2"  # 2: a concept's attacks are a list, "attacks" (1: at most one, "attack")
READABLE_FORMATS = ("erasure-eval/1", FORMAT)
EVAL_FILE = "eval.json"  # a run's own report, in the run folder


def concept_attacks(section: dict) -> list[dict]:
    """A concept's attack results, in the order they ran, from a report of either format."""
    if "attacks" in section:
        return list(section["attacks"])
    return [section["attack"]] if section.get("attack") else []


def read_report(path: Path) -> dict:
    """The report in `path`, or InputError saying why it is none: unreadable, not JSON, another kind of file, or
    one whose parts its readers need are missing (a damaged or hand-edited report)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not a readable evaluation report ({exc})") from None
    if not isinstance(report, dict) or report.get("format") not in READABLE_FORMATS:
        raise InputError(f"{path} is not an evaluation report (`erasure eval` writes them, format {FORMAT})")
    problem = _report_problem(report)
    if problem:
        raise InputError(f"{path} is a damaged evaluation report ({problem}); rerun `erasure eval`")
    return report


def _report_problem(report: dict) -> str | None:
    for part in ("before", "after", "concepts"):
        if not isinstance(report.get(part), dict):
            return f"it has no {part} section"
    if not isinstance(report.get("settings", {}), dict):
        return "its settings are not a mapping"
    for concept, section in report["concepts"].items():
        metrics = section.get("metrics") if isinstance(section, dict) else None
        if not isinstance(metrics, dict) or not all(isinstance(m, dict) and ("after" in m or "value" in m)
                                                    for m in metrics.values()):  # fmt: skip
            return f"the metrics of {concept!r} are not a mapping of measured values"
        attacks = section.get("attacks", [section["attack"]] if section.get("attack") else [])
        if not isinstance(attacks, list) or not all(isinstance(a, dict) and {"attack", "asr"} <= a.keys()
                                                    for a in attacks):  # fmt: skip
            return f"the attacks of {concept!r} are not a list of results"
    return None
