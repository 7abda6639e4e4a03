"""Before/after on the same seeds: the base model's images and each erased run's, labelled.

Loaded models are kept in a small cache shared by every user of the page. A diffusers pipeline is
not thread-safe (its scheduler keeps per-call state), so generation holds the cache's lock: the
Gradio queue already runs one generate at a time, the lock keeps that true for any other caller.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from erasure.output import read_run
from pipelines.bounds import GUIDANCE, LORA_STRENGTH, SEED_BOUNDS, STEPS, check_number
from pipelines.errors import InputError
from pipelines.lora_files import LORA_FILE

MAX_IMAGES = 64  # per model and request: prompts x seeds; beyond this the page would only crawl


@dataclass
class Comparison:
    """Gallery items: (image, caption). `base` is prompts x seeds row by row; `erased` the same per run."""

    base: list[tuple[object, str]]
    erased: list[tuple[object, str]]
    summary: str


class ModelCache:
    """The last few loaded backends by resolved location, loaded once and reused across requests."""

    def __init__(self, size: int = 4, device: str = "cpu", dtype=None):
        self.size = size
        self.device, self.dtype = device, dtype
        self.lock = threading.RLock()
        self._models: OrderedDict[str, object] = OrderedDict()

    def get(self, spec: str | None, lora_strength: float | None = None):
        """The model of `spec`; with `lora_strength`, a run trained as LoRA with its erasure at that weight."""
        from pipelines import load_model, resolve

        source = resolve(spec)  # fails fast, before the lock, on a bad name or folder
        path = Path(source.path).resolve()
        key = f"{path}@{path.stat().st_mtime_ns}"  # a run folder made again under the same name is reloaded
        if lora_strength is not None:
            key += f"@lora={lora_strength}"
        with self.lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            if lora_strength is not None:
                from erasure.lora import load_at_strength

                model = load_at_strength(source.path, lora_strength, device=self.device, dtype=self.dtype)
            else:
                model = load_model(source, device=self.device, dtype=self.dtype)
            self._models[key] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return model


def parse_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines are ignored."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def check_comparable(runs: Sequence[str], base_kind: str) -> None:
    """Refuse a run that cannot be drawn beside a base model of `base_kind` (a GAN run beside a text-to-image base)."""
    from pipelines import resolve
    from pipelines.loading import comparable_kinds

    for run in runs:
        if not comparable_kinds(run_kind := resolve(run).kind, base_kind):
            raise InputError(f"{run} is a {run_kind} model; it cannot be compared with a {base_kind} base model")


def compare(
    cache: ModelCache,
    base: str,
    runs: Sequence[str],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    lora_strength: float = 1.0,
) -> Comparison:
    """Generate every (prompt, seed) with the base model and with each run; GANs take seeds only. Runs trained as
    LoRA are drawn with their erasure at `lora_strength` (0: off); full-weight runs as they are."""
    from pipelines import resolve

    _check_numbers(seeds, steps, guidance, lora_strength)
    base = (base or "").strip() or None
    runs = [r for r in runs if r]
    for run in runs:
        read_run(run)
    kind = resolve(base).kind
    check_comparable(runs, kind)
    if not seeds:
        raise InputError("choose at least one seed")
    if kind == "gan":
        prompts = []
    elif not prompts:
        raise InputError("type at least one prompt (one per line), or take the run's prompts")
    if max(len(prompts), 1) * len(seeds) > MAX_IMAGES:
        raise InputError(f"at most {MAX_IMAGES} images per model: fewer prompts or seeds, please")

    at_strength = {run: lora_strength if lora_strength != 1 and (Path(run) / LORA_FILE).is_file() else None
                   for run in runs}  # fmt: skip

    with cache.lock:
        # Every model loads (or is refused) before any draws: a bad run fails the request at once.
        base_model = cache.get(base)
        run_models = [cache.get(run, at_strength[run]) for run in runs]
        before = _images(base_model, prompts, seeds, steps, guidance)
        after = [(_run_label(run, at_strength[run]), _images(model, prompts, seeds, steps, guidance))
                 for run, model in zip(runs, run_models)]  # fmt: skip
    base_items = [(image, f"base · {label}") for image, label in before]
    erased_items = [(image, f"{name} · {label}") for name, images in after for image, label in images]
    what = f"{len(prompts)} prompt(s) x {len(seeds)} seed(s)" if prompts else f"{len(seeds)} latent seed(s)"
    summary = f"{what}: base model and {len(runs)} erased run(s), seeds {seeds[0]}-{seeds[-1]}"
    if lora_strength != 1:
        lora_runs = sum(s is not None for s in at_strength.values())
        summary += f"; LoRA strength {lora_strength:g} on {lora_runs} LoRA run(s)"
        if lora_runs < len(runs):
            summary += f", {len(runs) - lora_runs} full-weight run(s) as trained"
    return Comparison(base_items, erased_items, summary)


def _check_numbers(seeds: Sequence[int], steps: int | None, guidance: float | None, lora_strength: float) -> None:
    """The limits `erasure sample` puts on the same settings (pipelines/bounds.py), named as the page names them."""
    if seeds:
        check_number("first seed", min(seeds), SEED_BOUNDS)
        check_number("last seed (first seed + seeds - 1)", max(seeds), SEED_BOUNDS)
    if steps is not None:
        check_number("steps", steps, STEPS)
    if guidance is not None:
        check_number("guidance", guidance, GUIDANCE)
    check_number("LoRA strength", lora_strength, LORA_STRENGTH)


def _run_label(run: str, strength: float | None) -> str:
    return Path(run).name + ("" if strength is None else f" @ {strength:g}")


def _images(model, prompts, seeds, steps, guidance) -> list[tuple[object, str]]:
    """(image, "prompt · seed s") in row order: one row per prompt, one column per seed."""
    if model.kind == "gan":  # the same seeds give the same latents z for the base and every run
        return [(image, f"seed {s}") for s, image in zip(seeds, model.generate(seeds))]
    rows = model.generate(prompts, seeds, steps=steps, guidance=guidance)
    return [(image, f"{prompt} · seed {s}") for prompt, row in zip(prompts, rows) for s, image in zip(seeds, row)]
