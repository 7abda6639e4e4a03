"""`erase()`: the one call behind `erasure erase` and the preview UI.

It validates everything it can before loading a model (method, concepts, config, output folder,
device), runs the method under the shared loop, and writes the run folder atomically: the erased
model as a diffusers-loadable folder (the changed component is a standalone subfolder of it, e.g.
`text_encoder/`), plus `erasure.json` with every setting that produced it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.bounds import SEED_BOUNDS, check_number
from pipelines.components import RUN_SAVE_MODES
from pipelines.errors import InputError
from pipelines.files import check_outside, check_outside_models, check_writable, slug

from . import DISTRIBUTION
from .config import build_config, config_to_dict, input_digests, load_config_file, parse_sets
from .isolation import keeps_process_state
from .output import RunDirectory, library_versions, mark_resumable, peak_memory_mb, write_manifest
from .registry import default_model, get_method
from .training import RunContext, TrainingDiverged, checkpoint_on_stop

if TYPE_CHECKING:
    from pipelines.loading import ModelSource

    from .config import MethodConfig
    from .registry import Method

log = logging.getLogger(__name__)


def default_out_dir(method: str, concepts: Sequence[str]) -> Path:
    return Path("runs") / f"{method}-{slug('-'.join(concepts))}"


def _check_save_mode(save: str, source) -> None:
    if save not in RUN_SAVE_MODES:
        raise InputError(f"unknown --save {save!r}; choose one of: {', '.join(RUN_SAVE_MODES)}")
    if save in ("changed", "lora") and (source.kind == "gan" or not source.path.is_dir()):
        raise InputError(
            f"--save {save} needs a base saved as a diffusers pipeline folder; {source.spec} is a "
            f"{'GAN' if source.kind == 'gan' else 'single-file checkpoint'}: use --save full"
        )


def run_fingerprint(
    method: str, concepts: list[str], config, seed: int, mixed_precision: str, base_model: dict, device: str,
    **precision: str,
) -> dict:
    """Everything that determines a run's result; a checkpoint resumes only under the same one. `precision`:
    the optimiser state's and the frozen networks' (RunContext's fields), recorded when not the default.
    The kind of device counts too: its random streams differ, and it decides the frozen networks' dtype."""
    versions = library_versions()
    defaults = {"optimizer_state": "fp32", "frozen_precision": "auto"}
    inputs = input_digests(config)
    return {
        "method": method, "concepts": list(concepts), "config": config_to_dict(config), "seed": seed,
        "mixed_precision": mixed_precision, "base_model_sha256": base_model["sha256"],
        "device": device.partition(":")[0],
        **{k: v for k, v in precision.items() if v != defaults.get(k)},
        **({"input_files": inputs} if inputs else {}),
        "versions": {k: versions.get(k) for k in (DISTRIBUTION, "torch", "diffusers", "transformers", "accelerate")},
    }  # fmt: skip


def check_method_takes(spec, source) -> None:
    """Refuse a model of the other kind (a GAN for a text-to-image method, and the reverse), or of a family the method
    does not support: in `erase`, and in `--show-config`, which would otherwise print options that never apply."""
    if source.kind != spec.model_kind:
        raise InputError(f"{spec.key} erases from {spec.model_kind} models, but {source.spec} is a {source.kind} model")
    source.family.check_method(spec.key)


def _warn_of_cut_concepts(model, concepts: Sequence[str]) -> None:
    """A concept longer than the text encoder's context is cut there without an error: say so."""
    tokenizer = getattr(model, "tokenizer", None)
    for concept in concepts if tokenizer is not None else ():
        tokens = len(tokenizer(concept).input_ids)
        if tokens > tokenizer.model_max_length:
            log.warning("the concept %r is %d tokens long; the text encoder reads %d, so the rest is cut off",
                        concept[:40] + "...", tokens, tokenizer.model_max_length)  # fmt: skip


@dataclass(frozen=True)
class _Request:
    """What an `erase` call asks for, resolved and checked before any model loads."""

    method: str  # as the caller named it, which the run folder records
    spec: Method
    concepts: list[str]
    source: ModelSource
    config: MethodConfig
    out: Path
    save: str

    @property
    def lora_rank(self) -> int:
        return getattr(self.config, "lora_rank", 0)


def _checked_request(method: str, concepts, model, out, config_file, sets, seed: int, checkpoint_every: int,
                     model_config, save: str) -> _Request:  # fmt: skip
    """`erase`'s arguments resolved and checked before any model loads."""
    from pipelines import resolve
    from pipelines.loading import check_model_config

    from .common import check_concepts

    spec = get_method(method)
    concepts = check_concepts(concepts)
    source = resolve(default_model(spec.key) if model is None else model)
    check_model_config(model_config, source)
    check_method_takes(spec, source)
    _check_save_mode(save, source)
    overrides = []
    if config_file:
        options, recorded = load_config_file(config_file)
        if recorded is not None and get_method(recorded["method"]).key != spec.key:
            ran = recorded["method"]
            raise InputError(f"--config {config_file} is a run of {ran}, whose options are {ran}'s: drop --method to "
                             f"rerun it, or give {method} a YAML file (`--show-config` writes one)")  # fmt: skip
        overrides.append(options)
    overrides.append(parse_sets(list(sets)) if not isinstance(sets, dict) else dict(sets))
    family = source.family
    config = build_config(method, family, *overrides)
    config.check(family, concepts)  # what the config can only check once it knows the model and concepts
    for concept in concepts:
        family.prompt_set(concept)  # a concept the family cannot evaluate (the digits world's are a closed set)
    if save == "lora" and not getattr(config, "lora_rank", 0):
        raise InputError("--save lora keeps a run's LoRA adapters: train them with --set lora_rank=R (e.g. 8)")
    check_number("--seed", seed, SEED_BOUNDS, integer=True)
    check_number("--checkpoint-every", checkpoint_every, "[1, inf)", integer=True)
    out = check_writable(default_out_dir(method, concepts) if out is None else out)
    check_outside(out, source.path, "--out", "the model it erases from")
    check_outside_models(out, "--out")
    return _Request(method, spec, concepts, source, config, out, save)


@keeps_process_state
def erase(
    method: str,
    concepts: Sequence[str],
    model: str | None = None,
    *,
    out: str | Path | None = None,
    config_file: str | Path | None = None,
    sets: Sequence[str] | dict = (),
    seed: int = 0,
    device: str = "auto",
    mixed_precision: str = "no",
    optimizer_state: str = "fp32",
    frozen_precision: str = "auto",
    resume: bool = False,
    checkpoint_every: int = 50,
    progress: bool = True,
    after_step: Callable[[int, int, dict], None] | None = None,
    model_config: str | Path | None = None,
    save: str = "full",
) -> Path:
    """Erase `concepts` from `model` with `method`, as `erasure erase` does; returns the finished run folder.

    - `method`: a registry key (`erasure methods`); `concepts`: one string or several; `model`: a name, folder,
      single file or Hub id (default: the method's embedded model). The model is loaded from there, never taken
      as an object: the run records the base's hash, and the caller's models are left untouched.
    - `out`: the run folder (default `runs/METHOD-CONCEPTS`), written whole at the end; `resume=True` continues
      an interrupted run there. `config_file` (a YAML file of settings, or a run's `erasure.json`) and `sets`
      ({"steps": 100} or ["steps=100"]) override the method's preset for the model's family.
    - `seed`, `device` ("auto": CUDA when there is one), `mixed_precision` ("no", "bf16", "fp16"),
      `optimizer_state` ("fp32", "8bit"), `frozen_precision` ("auto", "full", "half"), `checkpoint_every` (steps),
      `model_config` (a single-file checkpoint's config folder), `save` ("full", "changed", "lora").
    - `progress`: tqdm bars on stderr; `after_step(step, total, logs)` is called after every training step.

    Raises `InputError` (before any model loads, for bad arguments). An exception that stops the run after a
    checkpoint - a KeyboardInterrupt, an out-of-memory error - is raised as it is, with `resumable_run(exc)`
    (`erasure.output`) naming the kept run. The call leaves accelerate's state and the global random streams as it
    found them, and waits for any other `erase` or `evaluate` of the process to end (see `erasure.isolation`).
    """
    from pipelines import load_model
    from pipelines.devices import resolve_device

    device = resolve_device(device)
    request = _checked_request(method, concepts, model, out, config_file, sets, seed, checkpoint_every, model_config,
                               save)  # fmt: skip
    # Under several processes (accelerate launch, torchrun) every process trains; the main one alone owns the run
    # folder. All check it before any of them creates anything, and before hashing the base (seconds on SD).
    run_dir = RunDirectory(request.out, resume=resume)
    run_dir.check()
    base_model = request.source.describe()  # hashes the base's weights: the run and its checkpoints are tied to them
    precision = {"optimizer_state": optimizer_state, "frozen_precision": frozen_precision}
    run = RunContext(
        seed=seed, device=device, mixed_precision=mixed_precision, checkpoint_dir=run_dir.checkpoint_dir,
        checkpoint_every=checkpoint_every, resume=resume, progress=progress, after_step=after_step, **precision,
        fingerprint=run_fingerprint(method, request.concepts, request.config, seed, mixed_precision, base_model,
                                    device, **precision),
    )  # fmt: skip
    run_dir.check_fingerprint(run.fingerprint)
    run.accelerator.wait_for_everyone()
    resumed = resume and run_dir.saved_progress()
    if run.is_main:
        run_dir.begin(run.fingerprint)
        if resume and not resumed:
            log.warning("nothing to resume in %s: the run stopped before its first checkpoint, so it starts from "
                        "its first step", run_dir.work)  # fmt: skip
    # A SIGTERM (a scheduler preempting the job) or SIGHUP (a dropped ssh session) checkpoints the step it arrives at:
    # `--resume` loses nothing.
    with checkpoint_on_stop():
        try:
            started = time.time()
            base = load_model(request.source, device=device, single_file_config=model_config)
            loaded = time.time()
            _warn_of_cut_concepts(base, request.concepts)
            log.info("erasing %s with %s", ", ".join(request.concepts), method)
            result = request.spec.entry(base, request.concepts, request.config, run)
            from .lora import take_adapters

            # LoRA runs: the adapters are kept apart, then merged, so the model saves as a plain pipeline
            adapters = take_adapters(result.model, result.changed) if request.lora_rank else {}
            record = {
                "base_model": base_model,
                "resumed": resumed,  # then the times below are of the resumed part
                "wall_time_s": round(time.time() - started, 2), "erase_time_s": round(time.time() - loaded, 2),
            }  # fmt: skip
            if run.is_main:
                run_dir.commit(lambda folder: _write_run(folder, request, run, result, adapters, record))
                log.info("saved %s", run_dir.final)
            run.accelerator.wait_for_everyone()
            return run_dir.final
        except InputError as exc:
            if run.is_main:  # e.g. resuming with other settings: a checkpoint stays for the right command
                run_dir.abandon(keep_checkpoint=not isinstance(exc, TrainingDiverged))
            raise
        except BaseException as exc:
            if run_dir.abandon() if run.is_main else run_dir.checkpoint_dir.exists():
                mark_resumable(exc, run_dir)
            raise


def _write_run(folder: Path, request: _Request, run: RunContext, result, adapters: dict, record: dict) -> None:
    """A finished run's folder: the erased model, its LoRA file when it trained adapters, and `erasure.json` with
    everything that produced it. `record`: the base model's description, whether the run resumed, its times."""
    from .lora import LORA_FILE, adapter_size, save_adapters

    erased = {"method": request.method, "concepts": request.concepts, "base_model": request.source.spec}
    lora_only = request.save == "lora"
    card = {"erased": erased, **({"lora_adapters": LORA_FILE} if lora_only else {})}
    changed, mode = ([], "changed") if lora_only else (result.changed, request.save)
    stored = result.model.save(folder, card=card, changed=changed, mode=mode)
    lora = {}
    if adapters:
        rank, alpha = request.lora_rank, request.config.lora_alpha or request.lora_rank
        path = save_adapters(_lora_file_writer(result.model), folder, adapters, rank, alpha)
        lora = {"lora": {"rank": rank, "alpha": alpha, "components": sorted(adapters), **adapter_size(path)}}
    log.info("components: %s", ", ".join(f"{k} {v}" for k, v in stored.items()) or "all serialised")
    total = sum(p.numel() for name in result.changed for p in getattr(result.model, name).parameters())
    spec = request.spec
    write_manifest(folder, {
        "method": request.method, "paper": spec.paper.title, "paper_url": spec.paper.url,
        "concepts": request.concepts, "base_model": record["base_model"], "config": config_to_dict(request.config),
        "seed": run.seed, "device": run.device, "mixed_precision": run.mixed_precision, "processes": run.num_processes,
        "optimizer_state": run.optimizer_state, "frozen_precision": run.frozen_precision,
        "frozen_dtype": str(run.frozen_dtype).removeprefix("torch."),
        "changed_components": result.changed, "save": request.save, "stored_components": stored,
        "trainable_parameters": result.trainable_parameters, "changed_component_parameters": total,
        "final_logs": result.logs, **result.outcome, **lora,
        "resumed": record["resumed"], "wall_time_s": record["wall_time_s"], "erase_time_s": record["erase_time_s"],
        **peak_memory_mb(run.device), "versions": library_versions(),
    })  # fmt: skip


def _lora_file_writer(model):
    """The pipeline class whose `save_lora_weights` writes the run's LoRA file: the run's own, or for a one-step
    generator (no LoRA loader of its own) its family's pipeline, whose `load_lora_weights` reads the file."""
    import diffusers

    own = type(model.pipe)
    return own if hasattr(own, "save_lora_weights") else getattr(diffusers, model.family.pipeline_class)
