"""Finished run folders as the preview sees them: found under `runs/`, checked, labelled, prompted.

Only the manifest (`erasure.json`) is read here; no model is loaded.
"""

from __future__ import annotations

from pathlib import Path

from erasure.output import MANIFEST, read_manifest, read_run

PROMPTS_PER_CONCEPT = 2  # target prompts and preserved prompts each, so the page stays quick


def find_runs(runs_dir: str | Path) -> list[Path]:
    """Finished runs directly under `runs_dir`, newest first (hidden work folders are skipped)."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def run_label(path: str | Path) -> str:
    """What a run is called in the page's lists, e.g. `esd-seven (esd: seven)`."""
    manifest = read_manifest(path) or {}
    what = f"{manifest.get('method', '?')}: {', '.join(manifest.get('concepts', []))}"
    return f"{Path(path).name} ({what})"


def run_choices(paths: list[str | Path]) -> list[tuple[str, str]]:
    """(label, value) pairs for a dropdown; the value is the folder path the handlers receive."""
    return [(run_label(p), str(p)) for p in paths]


def default_prompts(path: str | Path) -> list[str]:
    """A few prompts that ask for each erased concept, then a few whose content must survive.

    They are the evaluation protocol's own target and preserved prompts (`erasure eval`), so what
    the page shows is what the metrics measure.
    """
    from pipelines.families import get_family

    manifest = read_run(path)
    family = get_family(manifest["base_model"].get("family", "sd1"))
    target, preserved = [], []
    for concept in manifest["concepts"]:
        prompts = family.prompt_set(concept)
        target += prompts.target[:PROMPTS_PER_CONCEPT]
        preserved += prompts.preserved[:PROMPTS_PER_CONCEPT]
    return list(dict.fromkeys(target + preserved))
