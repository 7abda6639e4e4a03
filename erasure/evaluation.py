"""`erasure eval`: re-score a saved run (or any model against a baseline) and write the report.

A run folder knows its base model and concepts (erasure.json), so `erasure eval RUN` needs nothing
else; the report goes to RUN/eval.json and the before/after grids to RUN/grids/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from evaluators.report_format import EVAL_FILE
from pipelines.errors import InputError
from pipelines.files import atomic_write, check_writable, slug, write_json

from .finished_attacks import FinishedAttacks
from .isolation import keeps_process_state
from .output import hold_exclusively, library_versions, read_manifest, recorded_base_model

log = logging.getLogger(__name__)


@keeps_process_state
def run_eval(
    target: str,
    *,
    concepts: str | list[str] | None = None,
    baseline: str | None = None,
    json_path: str | Path | None = None,
    samples: int | None = None,
    seed: int = 0,
    clip: str | None = None,
    fid_features: str | None = None,
    device: str = "auto",
    model_config: str | Path | None = None,
    progress: bool = True,
    dtype: str = "auto",
    attack: str | Sequence[str] | None = None,
    attack_prompts: int | None = None,
    attack_seeds: int = 5,
    attack_steps: int = 100,
    prompts_file: str | Path | None = None,
    preserved_prompts_file: str | Path | None = None,
    neighbours: list[str] | None = None,
    attack_images: str | Path | None = None,
    resume: bool = False,
) -> Path:
    """Evaluate and write the JSON report (and grids beside it); returns the JSON path. `attack`: one attack or
    several (each concept's results go to its `attacks` list, in that order). `resume`: keep the attacks that an
    interrupted evaluation with the same settings finished (erasure/finished_attacks.py)."""
    from accelerate import PartialState

    from pipelines import load_model
    from pipelines.devices import dtype_name

    if resume and not attack:
        raise InputError("--resume keeps the attacks an interrupted evaluation finished: add --attack")
    request = _checked_request(
        target, concepts=concepts, baseline=baseline, json_path=json_path, samples=samples, seed=seed, clip=clip,
        fid_features=fid_features, device=device, model_config=model_config, dtype=dtype, attack=attack,
        attack_prompts=attack_prompts, attack_seeds=attack_seeds, attack_steps=attack_steps, prompts_file=prompts_file,
        preserved_prompts_file=preserved_prompts_file, neighbours=neighbours, attack_images=attack_images,
    )  # fmt: skip
    device = request.device
    # under `accelerate launch` / `torchrun`, every process draws a share of the images
    state = PartialState(cpu=not device.startswith("cuda"))
    if state.num_processes > 1 and device.startswith("cuda"):
        device = str(state.device)  # one GPU per process
    progress = progress and state.is_main_process
    finished = None
    if request.attacks:  # checked by every process, before any model loads
        fingerprint = _attack_fingerprint(request, attack_prompts, attack_seeds, attack_steps, clip, attack_images)
        finished = FinishedAttacks(request.json_path, fingerprint, resume, announce=state.is_main_process)
    # Two evaluations of one run would mix their grids and reports: the second is refused at once. (The main process
    # alone writes; a report elsewhere than the run's own is the caller's file to name.)
    own = request.own_report and state.is_main_process
    with hold_exclusively(Path(request.target), "evaluated") if own else nullcontext(), finished or nullcontext():
        after = load_model(request.after, device=device, single_file_config=model_config, dtype=request.dtype)
        before = load_model(request.before, device=device, single_file_config=model_config, dtype=request.dtype)
        result = _scores(after, before, request, samples, seed, clip, fid_features, progress)
        result.report["settings"]["processes"] = state.num_processes
        result.report["settings"]["dtype"] = dtype_name(request.dtype)
        if not state.is_main_process:  # the main process attacks and writes; it needs no other process for that,
            return request.json_path  # so none waits for it (a long attack would outlast a collective's timeout)
        for concept in request.concepts if request.attacks else ():
            result.report["concepts"][concept]["attacks"] = [
                finished.run(concept, kind, partial(
                    run_attack, kind, after, before, concept, attack_prompts, attack_seeds, attack_steps, clip,
                    progress, attack_images if kind == "textual-inversion" else None,
                    file_rows=request.prompt_options["target_rows"] or ()))
                for kind in request.attacks
            ]  # fmt: skip
        manifest = request.manifest
        if manifest is not None:
            result.report["run"] = {k: manifest[k] for k in ("method", "config", "seed")}
            expected = manifest["base_model"].get("sha256")
            result.report["baseline_matches_run"] = expected == result.report["before"]["sha256"]

        result.report["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        result.report["versions"] = library_versions()
        _warn_of_replaced_results(request.json_path, result.report)
        _write_report(result.report, result.grids, request.json_path, request.grid_dir)
        if finished is not None:
            finished.discard()
        return request.json_path


@dataclass
class _EvalRequest:
    """An evaluation's inputs, resolved and checked before any model loads."""

    target: str
    after: object  # pipelines.ModelSource
    before: object
    manifest: dict | None
    concepts: list[str]
    attacks: list[str]
    prompt_options: dict  # evaluate()'s target_rows, preserved_rows and neighbours
    json_path: Path
    grid_dir: Path
    own_report: bool  # the run folder's own eval.json
    device: str
    dtype: object  # torch.dtype


def _checked_request(target, *, concepts, baseline, json_path, samples, seed, clip, fid_features, device, model_config,
                     dtype, attack, attack_prompts, attack_seeds, attack_steps, prompts_file, preserved_prompts_file,
                     neighbours, attack_images) -> _EvalRequest:  # fmt: skip
    """run_eval's arguments resolved and checked, everything that can be checked without a model."""
    from evaluators.clip_models import check_clip_available, check_clip_name
    from evaluators.features import check_feature_spec
    from evaluators.prompt_files import read_prompt_file
    from pipelines import resolve
    from pipelines.bounds import SEED_BOUNDS, check_number
    from pipelines.devices import model_dtype, resolve_device
    from pipelines.loading import check_model_config, comparable_kinds

    from .common import check_concepts

    device = resolve_device(device)
    target = os.path.expanduser(target)  # a quoted ~ (or one from Python) reaches here unexpanded
    after_source = resolve(target)
    torch_dtype = model_dtype(dtype, device, after_source.kind)  # a GAN against a prompted model is refused below
    manifest = read_manifest(target) if Path(target).is_dir() else None
    if manifest is not None:
        baseline = baseline or recorded_base_model(manifest)
        concepts = concepts or manifest["concepts"]
    if not baseline:
        raise InputError("--baseline is needed: the model is not an erased run folder")
    if not concepts:
        raise InputError("--concept is needed: the model is not an erased run folder")
    concepts = check_concepts(concepts)
    if samples is not None:
        check_number("--samples", samples, "[1, inf)", integer=True)
    check_number("--seed", seed, SEED_BOUNDS, integer=True)
    if clip is not None:
        check_clip_name(clip)
    before_source = resolve(baseline)
    check_model_config(model_config, after_source, before_source)
    check_feature_spec(fid_features, before_source.family)
    for concept in concepts:  # a concept the family cannot evaluate (the digits world's are a closed set)
        before_source.family.prompt_set(concept)
    attacks = _attack_list(attack)
    for kind in attacks:
        _check_attack(kind, after_source, attack_prompts, attack_seeds, attack_steps,
                      attack_images if kind == "textual-inversion" else None)  # fmt: skip
    if attack_images is not None and "textual-inversion" not in attacks:
        raise InputError("--attack-images is for --attack textual-inversion")
    prompt_options = {"target_rows": prompts_file, "preserved_rows": preserved_prompts_file, "neighbours": neighbours}
    if after_source.kind == "gan" and any(prompt_options.values()):
        raise InputError("--prompts, --preserved-prompts and --neighbours need a prompted model, not a GAN")
    prompt_options["target_rows"] = read_prompt_file(prompts_file) if prompts_file else None
    prompt_options["preserved_rows"] = (
        read_prompt_file(preserved_prompts_file, "--preserved-prompts") if preserved_prompts_file else None
    )
    if neighbours is not None and any(not n.strip() for n in neighbours):
        raise InputError("--neighbours: empty concept")
    if not comparable_kinds(after_source.kind, before_source.kind):
        raise InputError(f"cannot compare a {after_source.kind} model with a {before_source.kind} model")
    json_path, grid_dir, own_report = _report_paths(target, manifest, json_path, concepts)
    # the scores' and the detectors' CLIP, last of the checks: offline, it asks whether the Hub can be reached
    check_clip_available(clip or before_source.family.default_clip)
    return _EvalRequest(target, after_source, before_source, manifest, concepts, attacks, prompt_options, json_path,
                        grid_dir, own_report, device, torch_dtype)  # fmt: skip


def _attack_fingerprint(request: _EvalRequest, prompts: int | None, seeds: int, steps: int, clip: str | None,
                        images) -> dict:  # fmt: skip
    """What an attack's result depends on: a finished one is kept for `--resume` only under the same. (Not the
    concepts or the attacks asked for: each result is kept under its own concept and attack.)"""
    from pipelines.devices import dtype_name
    from pipelines.files import files_sha256
    from pipelines.images import image_folder_files
    from pipelines.loading import weights_digest

    rows = request.prompt_options["target_rows"]
    return {
        "model": weights_digest(Path(request.after.path)), "baseline": weights_digest(Path(request.before.path)),
        "attack_prompts": prompts, "attack_seeds": seeds, "attack_steps": steps, "clip": clip,
        "prompts": [[row.text, row.seed, row.guidance] for row in rows] if rows else None,
        "attack_images": files_sha256((p.name, p) for p in image_folder_files(images)) if images else None,
        "device": request.device.split(":")[0], "dtype": dtype_name(request.dtype), "versions": library_versions(),
    }  # fmt: skip


def _scores(after, before, request: _EvalRequest, samples, seed, clip, fid_features, progress):
    """The report's scores (CLIP, detectors, FID) of `after` against `before`: a GAN's or a prompted model's."""
    from evaluators.report import evaluate, evaluate_gan

    if after.kind == "gan":
        return evaluate_gan(after, before, request.concepts, samples=samples, seed=seed, clip=clip,
                            fid_features=fid_features, progress=progress)  # fmt: skip
    return evaluate(after, before, request.concepts, samples=samples, seed=seed, clip=clip, fid_features=fid_features,
                    progress=progress, **request.prompt_options)  # fmt: skip


def _report_paths(target: str, manifest: dict | None, json_path: str | Path | None, concepts: list[str],
                  ) -> tuple[Path, Path, bool]:  # fmt: skip
    """Where the report and its grids go (checked before any model loads), and whether it is the run's own report.

    A run's own report (RUN/eval.json) keeps its grids in RUN/grids, what export publishes; any other report keeps
    them beside its file, so that two reports in one folder do not overwrite each other's."""
    given = bool(json_path)
    if given:
        json_path = Path(json_path).expanduser()
    else:
        json_path = Path(target) / EVAL_FILE if manifest is not None else Path(f"eval-{slug('-'.join(concepts))}.json")
    # a refusal of the default report (no --json given) names the file, and --json as the way around it
    what = f"--json {json_path}" if given else str(json_path)
    elsewhere = "move it away, or pass --json FILE to write the report elsewhere"
    own_report = manifest is not None and json_path.resolve() == (Path(target) / EVAL_FILE).resolve()
    grid_dir = json_path.parent / ("grids" if own_report else f"{json_path.stem}-grids")
    if json_path.is_dir():
        fix = f"give the report's file name, e.g. {json_path / EVAL_FILE}" if given else elsewhere
        raise InputError(f"{what} is a folder; {fix}")
    if json_path.exists() and not _is_report(json_path):
        raise InputError(f"{what} exists and is not an evaluation report; it is left as it is"
                         f"{'' if given else '; ' + elsewhere}")  # fmt: skip
    check_writable(json_path, "--json" if given else "the report")
    if grid_dir.exists() and not grid_dir.is_dir():  # found now, not once every image is drawn
        raise InputError(f"{grid_dir} is a file; the report's grids go in a folder of that name: move it away")
    check_writable(grid_dir, "the grids' folder")
    return json_path, grid_dir, own_report


def _write_report(report: dict, grids: dict, json_path: Path, grid_dir: Path) -> None:
    """The grids, then the report that names them, each grid with its digest: an export checks that the grids are
    the report's (another evaluation, or one stopped between the two, would have left others). Grids of an earlier
    report that this one does not name (another concept's) are removed once it is written."""
    grid_dir.mkdir(parents=True, exist_ok=True)
    report["grids"], report["grid_sha256"] = {}, {}
    for name, grid in grids.items():
        path = grid_dir / f"{name}.png"
        atomic_write(path, lambda tmp, grid=grid: grid.save(tmp, format="PNG"))
        report["grids"][name] = os.path.relpath(path, json_path.parent)
        report["grid_sha256"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
    write_json(json_path, report, default=float)
    for stale in set(grid_dir.glob("*.png")) - {grid_dir / f"{name}.png" for name in grids}:
        stale.unlink(missing_ok=True)


def _warn_of_replaced_results(json_path: Path, report: dict) -> None:
    """A report replaced by one without some of its results (its attacks, another concept) says so: rerunning a
    quick evaluation of a run would otherwise drop the hour of attacks its report held, without a word."""
    if not json_path.is_file():
        return
    try:
        old = json.loads(json_path.read_text())
        lost = [c for c in old["concepts"] if c not in report["concepts"]]
        lost += [f"{c}'s attacks" for c, section in old["concepts"].items()
                 if section.get("attacks") and not report["concepts"].get(c, {}).get("attacks")]  # fmt: skip
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return
    if lost:
        log.warning("%s is replaced, and with it its results for %s (written %s)", json_path, ", ".join(lost),
                    old.get("created", "before reports were dated"))  # fmt: skip


ATTACKS = ("embedding", "unlearndiffatk", "textual-inversion")
ATTACK_SEED_OFFSET = 1000  # attacked pairs use other seeds than the evaluation's


def _attack_list(attack: str | Sequence[str] | None) -> list[str]:
    """The attacks asked for, each once, in the order given."""
    if attack is None:
        return []
    return list(dict.fromkeys([attack] if isinstance(attack, str) else attack))


def _check_attack(attack: str, source, prompts: int | None, seeds: int, steps: int, images) -> None:
    from pipelines.bounds import check_number
    from pipelines.images import image_folder_files

    if attack not in ATTACKS:
        raise InputError(f"unknown --attack {attack!r}; available: {', '.join(ATTACKS)}")
    if source.kind not in ("text-to-image", "one-step"):
        raise InputError(f"--attack needs a prompted model; {source.spec} is a {source.kind} model")
    why = source.family.unsupported.get(f"attack:{attack}")
    if why is not None:
        raise InputError(f"--attack {attack} on {source.family.name} models: {why}")
    if attack == "textual-inversion" and source.kind == "one-step":
        raise InputError("--attack textual-inversion learns a word with the denoising loss, which a one-step "
                         "generator has not; use embedding or unlearndiffatk")  # fmt: skip
    if images is not None:
        image_folder_files(images)
    if prompts is not None:
        check_number("--attack-prompts", prompts, "[1, inf)", integer=True)
    check_number("--attack-seeds", seeds, "[1, inf)", integer=True)
    check_number("--attack-steps", steps, "[1, inf)", integer=True)


def run_attack(attack: str, after, before, concept: str, prompts: int | None, seeds: int, steps: int, clip,
            progress: bool, images=None, file_rows: Sequence = ()) -> dict:  # fmt: skip
    """Attack the erased model (evaluators/attack.py, discrete_attack.py, inversion_attack.py); the base
    model's images are the references. The prompts attacked are the first `prompts` of the `--prompts` file's
    (`file_rows`: PromptRow) when one was given, else of the concept's built-in target prompts."""
    from evaluators.detect import ConceptDetector

    own_seeds = list(range(ATTACK_SEED_OFFSET, ATTACK_SEED_OFFSET + seeds))
    targets, guidance, seeds_used = _attacked_prompts(file_rows, before.family.prompt_set(concept).target,
                                                      own_seeds, prompts)  # fmt: skip
    detector = ConceptDetector(concept, before.family, str(after.device), clip)
    if attack == "embedding":
        from evaluators.attack import AttackSettings, attack_success_rate

        outcome = attack_success_rate(after, before, detector, concept, targets, seeds_used,
                                      AttackSettings(steps=steps), progress=progress, guidance=guidance)  # fmt: skip
    elif attack == "unlearndiffatk":
        from evaluators.discrete_attack import DiscreteAttackSettings, discrete_attack

        outcome = discrete_attack(after, before, detector, concept, targets, seeds_used,
                                  DiscreteAttackSettings(steps=steps), progress=progress,
                                  guidance=guidance)  # fmt: skip
    else:
        from evaluators.inversion_attack import InversionSettings, inversion_attack
        from pipelines.images import image_folder_files, load_square_images

        pictures = None
        if images is not None:
            pictures = load_square_images(image_folder_files(images), after.family.image_resolution(after))
        outcome = inversion_attack(after, before, detector, concept, targets, seeds_used,
                                   InversionSettings(steps=steps), images=pictures, progress=progress,
                                   guidance=guidance)  # fmt: skip
    return {"attack": attack, **outcome}


def _attacked_prompts(file_rows: Sequence, builtin: Sequence[str], own_seeds: list[int], limit: int | None):
    """(prompts, each one's guidance, seeds): each distinct (text, guidance) of the file's rows once, at that
    guidance, and at the seeds of its rows that give one - as the evaluation draws them, UnlearnDiffAtk's protocol
    on I2P - plus the attack's own where a row gives none; else the built-in prompts at the model's guidance and the
    attack's own seeds, apart from the evaluation's. `seeds` is one list for all when every prompt has the same."""
    groups: dict = {}
    for row in file_rows:
        groups.setdefault((row.text, row.guidance), []).append(row.seed)
    if not groups:
        return list(builtin[:limit]), [None] * len(builtin[:limit]), own_seeds
    chosen = list(groups.items())[:limit]
    seeds = [list(dict.fromkeys(s for s in given if s is not None)) + (own_seeds if None in given else [])
             for _, given in chosen]  # fmt: skip
    shared = all(s == seeds[0] for s in seeds)
    return [text for (text, _), _ in chosen], [g for (_, g), _ in chosen], seeds[0] if shared else seeds


# Textual inversion learnt on images the judge mostly does not see the concept in had little to bring back.
LEARNT_ON_TOO_FEW = 0.5


def reference_note(attack: dict) -> str | None:
    """A line on an attack result whose references do not all show the concept (None when they all do, or when the
    attack has no per-pair references): its rate counts pairs it had nothing to bring back in. Textual inversion's
    references are the images its word was learnt on: a note when the judge sees the concept in under half."""
    notes = []
    share = attack.get("reference_shows_concept")
    if share is not None and share != 1.0:
        over = attack.get("asr_where_reference_shows")
        notes.append(f"the base model's reference shows the concept in {share:.1%} of the pairs; attack success over "
                     "those: " + ("none to count" if over is None else f"{over:.1%}"))  # fmt: skip
    learnt_on = attack.get("images_showing_concept")
    if learnt_on is not None and learnt_on < LEARNT_ON_TOO_FEW:
        notes.append(f"the judge sees the concept in {learnt_on:.1%} of the images the word was learnt on: a low rate "
                     "may mean it had little to learn, not that the erasure held")  # fmt: skip
    return "; ".join(notes) or None


def summary_lines(report: dict) -> list[str]:
    """A short human-readable digest of a report for the terminal."""
    from evaluators.report_format import concept_attacks

    lines = []
    for concept, section in report["concepts"].items():
        for name, metric in section["metrics"].items():
            if metric.get("difference") is not None:  # a before/after pair with both values (an FID may have none)
                lines.append(f"{concept}: {name}: {metric['before']:.4g} -> {metric['after']:.4g} "
                             f"({metric['difference']:+.4g})")  # fmt: skip
            elif metric.get("value") is not None:
                spread = f" +- {metric['std']:.2g}" if "std" in metric else ""
                lines.append(f"{concept}: {name}: {metric['value']:.4g}{spread}")
            if metric.get("warning"):
                lines.append(f"{concept}: {name}: warning: {metric['warning']}")
        for attack in concept_attacks(section):
            kept = "; kept from the interrupted evaluation" if attack.get("resumed") else ""
            lines.append(f"{concept}: attack ({attack['attack']}): success rate {attack['asr']:.1%} of "
                         f"{attack['pairs']} pairs (present before the attack: {attack['present_before_attack']:.1%}; "
                         f"{attack['seconds_per_pair']} s per pair{kept})")  # fmt: skip
            note = reference_note(attack)
            if note:
                lines.append(f"{concept}: attack ({attack['attack']}): {note}")
    return lines


def _is_report(path: Path) -> bool:
    """Whether `path` holds an earlier report (which a new evaluation replaces), not some other file."""
    from evaluators.report_format import READABLE_FORMATS

    try:
        return json.loads(path.read_text()).get("format") in READABLE_FORMATS
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
