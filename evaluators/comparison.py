"""Several evaluation reports side by side: one row per metric, the base model's value, then each erased model's.

Numbers measured under different protocols do not belong in one table, so the reports must share their base model
(its weights' sha256) and every protocol setting that moves a number: seeds, steps, guidance, CLIP, the judge,
each concept's prompts, and the features and real images of FID and KID. Attacks may differ: each attack (kind,
steps, prompts and seeds) gets a row of its own.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.errors import InputError

from .report_format import EVAL_FILE, concept_attacks
from .report_format import read_report as read_report_file

# Settings that describe how a report was made but move no number.
NOT_PROTOCOL = ("grids", "processes")
MARK = "*"  # a cell whose metric carries a warning; the warnings are listed under the table


@dataclass
class Comparison:
    labels: list[str]  # per column (an erased model): its heading
    rows: list[tuple[str, str]] = field(default_factory=list)  # (concept, row name), in order of first appearance
    base: dict = field(default_factory=dict)  # row -> the base model's value (a metric's "before")
    cells: list[dict] = field(default_factory=list)  # per column: row -> value
    spreads: list[dict] = field(default_factory=list)  # per column: row -> the value's +- (KID)
    warnings: dict = field(default_factory=dict)  # (column, row) -> warning text

    def add(self, row: tuple[str, str]) -> None:
        if row not in self.rows:
            self.rows.append(row)


def report_path(given: str | Path) -> Path:
    """A run folder stands for its eval.json; a file is taken as it is."""
    path = Path(given).expanduser()
    if path.is_dir():
        path = path / EVAL_FILE
        if not path.is_file():
            raise InputError(f"{given} has no eval.json: run `erasure eval {given}` first")
    elif not path.is_file():
        raise InputError(f"no such run folder or report: {given}")
    return path


def read_report(given: str | Path) -> dict:
    return read_report_file(report_path(given))


def protocol(report: dict) -> dict:
    """What a report's numbers depend on besides the erased model."""
    settings = {k: v for k, v in report.get("settings", {}).items() if k not in NOT_PROTOCOL}
    concepts = {name: {"prompts": section.get("prompts"), "judge": section.get("judge")}
                for name, section in report["concepts"].items()}  # fmt: skip
    return {"base model": report["before"].get("sha256"), "settings": settings, "concepts": concepts}


def _first_difference(a, b, where: str = "") -> tuple[str, object, object] | None:
    """(dotted key, its value in a, in b) of the first setting that differs; a concept only one report has is no
    difference (its rows stay empty in the other's column)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            here = f"{where}.{key}" if where else str(key)
            if key in a and key in b:
                found = _first_difference(a[key], b[key], here)
                if found:
                    return found
            elif where != "concepts":
                return here, a.get(key), b.get(key)
        return None
    return None if a == b else (where, a, b)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# A metric's own settings that move its number, recorded only there: the features of FID and KID (`eval
# --fid-features`: FIDs in different feature spaces differ by orders of magnitude) and their real reference images.
METRIC_PROTOCOL = ("features", "real")


def _metric_difference(a: dict, b: dict) -> tuple[str, object, object] | None:
    """(dotted key, its value in a, in b) of the first METRIC_PROTOCOL setting of a metric both reports have that
    differs."""
    for concept, section in a["concepts"].items():
        other = b["concepts"].get(concept, {}).get("metrics", {})
        for name, metric in section.get("metrics", {}).items():
            if name in other and isinstance(metric, dict) and isinstance(other[name], dict):
                mine, theirs = metric.get("settings") or {}, other[name].get("settings") or {}
                for key in METRIC_PROTOCOL:
                    if mine.get(key) != theirs.get(key):
                        return f"concepts.{concept}.{name}.{key}", mine.get(key), theirs.get(key)
    return None


def check_comparable(reports: list[dict], names: list[str]) -> None:
    first = protocol(reports[0])
    for report, name in zip(reports[1:], names[1:]):
        found = _first_difference(first, protocol(report)) or _metric_difference(reports[0], report)
        if found is not None:
            where, a, b = found
            raise InputError(f"{names[0]} and {name} were measured differently ({where}: {_short(a)} vs {_short(b)}); "
                             "a table compares reports of one base model under one protocol")  # fmt: skip


def _label(report: dict, path: Path) -> str:
    """A run's folder name for its eval.json, else the model's name."""
    return path.parent.name if path.name == EVAL_FILE else Path(report["after"].get("spec", "")).name or str(path)


def _attack_pairs(attack: dict) -> str:
    """Which pairs an attack ran on, in a few words: its steps, prompts and seeds (the same prompt file and counts
    give the same pairs: the protocol check holds the prompts alike)."""
    settings = attack.get("settings", {})
    prompts, seeds = settings.get("prompts", []), settings.get("seeds", [])
    per_prompt = bool(seeds) and isinstance(seeds[0], list)
    drawn = "at the file's seeds" if per_prompt else f"x {len(seeds)} seeds"
    return f"{settings.get('steps')} steps, {len(prompts)} prompts {drawn}"


def _values(report: dict) -> tuple[list, dict, dict, dict, dict]:
    """One report's (rows in order, row -> value, row -> spread, row -> warning, row -> base model's value)."""
    rows, values, spreads, warnings, base = [], {}, {}, {}, {}
    run = report.get("run") or {}
    for name, value in (("method", run.get("method")), ("training seed", run.get("seed"))):
        rows.append(("", name))
        values["", name] = value
    for concept, section in report["concepts"].items():
        for name, metric in section["metrics"].items():
            row = (concept, name)
            rows.append(row)
            values[row] = metric.get("after", metric.get("value"))
            if "before" in metric:
                base[row] = metric["before"]
            if "std" in metric:
                spreads[row] = metric["std"]
            if metric.get("warning"):
                warnings[row] = metric["warning"]
        for attack in concept_attacks(section):
            row = (concept, f"attack success rate ({attack['attack']}, {_attack_pairs(attack)})")
            rows.append(row)
            values[row] = attack["asr"]
    return rows, values, spreads, warnings, base


def compare(given: list[str | Path]) -> Comparison:
    """The table of `given` run folders and report files. Reports of one erased model (its weights' sha256) share
    a column, e.g. one `erasure eval --json` per attack, unless they disagree on a value."""
    if not given:
        raise InputError("give at least one run folder or evaluation report")
    paths = [report_path(g) for g in given]
    reports = [read_report(p) for p in paths]
    check_comparable(reports, [str(p) for p in paths])
    table = Comparison([])
    models: list = []  # per column: the erased model's sha256
    sources: list[list[Path]] = []  # per column: its reports' paths
    for report, path in zip(reports, paths):
        rows, values, spreads, warnings, base = _values(report)
        sha = report["after"].get("sha256")
        column = next((i for i, cells in enumerate(table.cells) if models[i] == sha
                       and all(cells[row] == values[row] for row in cells.keys() & values.keys())), None)  # fmt: skip
        if column is None:
            column = len(table.cells)
            table.labels.append(_label(report, path))
            table.cells.append({})
            table.spreads.append({})
            models.append(sha)
            sources.append([])
        elif path.name == EVAL_FILE and all(p.name != EVAL_FILE for p in sources[column]):  # a run folder names it
            table.labels[column] = _label(report, path)
        sources[column].append(path)
        for row in rows:
            table.add(row)
        table.cells[column].update(values)
        table.spreads[column].update(spreads)
        table.warnings.update({(column, row): text for row, text in warnings.items()})
        for row, value in base.items():
            table.base.setdefault(row, value)
    table.labels = _told_apart(table.labels, sources)
    return table


def _told_apart(labels: list[str], sources: list[list[Path]]) -> list[str]:
    """Columns of one name named by their report files; where those are alike too (two runs named alike in two
    folders: both `run (eval.json)`), by their folders or paths. Counted before any is renamed."""

    def named(labels: list[str], by: list[list[str]]) -> list[str]:
        repeated = {label for label in labels if labels.count(label) > 1}
        return [f"{label} ({', '.join(by[i])})" if label in repeated else label for i, label in enumerate(labels)]

    by_file = named(labels, [[p.name for p in column] for column in sources])
    by_path = named(labels, [[str(p.parent if p.name == EVAL_FILE else p) for p in column] for column in sources])
    clashing = {label for label in by_file if by_file.count(label) > 1}
    return [by_path[i] if label in clashing else label for i, label in enumerate(by_file)]


def _text(value, spread=None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" + (f" +- {spread:.2g}" if spread is not None else "")
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Comparison) -> str:
    head = ["concept", "metric", "base model", *table.labels]
    lines = ["| " + " | ".join(_cell(text) for text in head) + " |", "|" + "---|" * len(head)]
    warned = {row for _, row in table.warnings}  # a warning on a set's size holds for the base's value too
    for row in table.rows:
        base = "" if not row[0] else _text(table.base.get(row)) + (MARK if row in table.base and row in warned else "")
        cells = [base]
        for index, values in enumerate(table.cells):
            text = _text(values.get(row), table.spreads[index].get(row)) if row in values else ""
            cells.append(text + (MARK if (index, row) in table.warnings else ""))
        lines.append("| " + " | ".join(_cell(text) for text in [*row, *cells]) + " |")
    notes: dict = {}  # (row, warning) -> the columns it was given for
    for (index, row), text in table.warnings.items():
        notes.setdefault((row, text), []).append(table.labels[index])
    if notes:
        lines += ["", f"{MARK} warnings:"]
        lines += [f"- {' '.join(row).strip()} ({', '.join(labels)}): {text}" for (row, text), labels in notes.items()]
    return "\n".join(lines) + "\n"


def to_csv(table: Comparison) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["concept", "metric", "base model", *table.labels])
    for row in table.rows:
        writer.writerow([*row, table.base.get(row, ""), *(values.get(row, "") for values in table.cells)])
    return out.getvalue()
