"""`erasure export`: a run folder becomes a Hugging Face Hub model repository with an honest card.

The Hub folder holds the erased model as the run saved it (diffusers layout in safetensors, or a
GAN's generator under `generator/`), `erasure.json`, `eval.json` with its before/after grids,
optionally the model as one original-layout Stable Diffusion `.safetensors` (`--single-file`),
and the model card `README.md` (`ui/model_card.py`): Hub metadata, what was erased and how, the paper, the
evaluation with its settings, how to load the model, and the caveats.

Everything that can be checked is checked before anything is written: the run, its evaluation,
and for a push a token and a reachable Hub. A run folder is not trusted: only the files its
components load are published, none that links outside the run (or its base model), and grids only
from its grids/ folder. A `--local-dir` is written atomically (it exists only once complete); a push
builds the folder in a temporary directory that is removed, on SIGTERM or SIGHUP too, and the next export
removes what a killed one left. The exported eval.json and erasure.json describe the folder they
are in (whole components, merged adapters), so that the folder can itself be exported again.

The token is only checked for presence: `huggingface_hub` reads it (HF_TOKEN or the stored login)
and sends it, so it never passes through this module's data, files or messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from erasure.output import MANIFEST, read_run
from erasure.registry import Method, get_method
from evaluators.report_format import EVAL_FILE, read_report
from pipelines.cards import MODEL_CARD_FILE
from pipelines.errors import InputError
from pipelines.families import get_family
from pipelines.files import (
    check_outside,
    check_outside_models,
    check_writable,
    remove_abandoned,
    write_folder_atomically,
    write_json,
)
from pipelines.lora_files import LORA_FILE, LORA_FORMATS, MAX_LORA_RANK
from pipelines.safe_load import PICKLED_SUFFIXES
from pipelines.signals import stop_signals_raise

from .model_card import (
    CARD_FILE,
    PIPELINE_TAGS,
    REDUCTION_FILE,
    card_metadata,
    kohya_file_name,
    render_card,
    single_file_name,
)

GAN_FILES = ("generator_config.json", "generator.safetensors")  # the discriminator is not needed to generate
# What diffusers' and transformers' `save_pretrained` write into a component folder, and `from_pretrained` reads:
# configs, the tokenizers' files, and weights in safetensors, whole or sharded with an index (a variant such as
# `.fp16.` is not read without asking for it). Nothing else of a run folder is published: notes, backups, ...
COMPONENT_FILES = (
    "config.json", "scheduler_config.json", "preprocessor_config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "spiece.model",
)  # fmt: skip
COMPONENT_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
PUSH_STAGING = "erasure-export-"  # in the temporary directory, then the writer's pid, as for a --local-dir's staging


@dataclass
class Run:
    """A finished run folder, checked, and what its card is made of."""

    path: Path
    manifest: dict
    kind: str  # "text-to-image", "one-step" or "gan"
    method: Method
    model_files: dict[Path, Path]  # what makes up the loadable model: {path in the Hub folder: file}
    model_card: dict  # erasure_model.json (family, sampling defaults, what was erased)
    report: dict | None  # eval.json; None when exported with --no-eval
    grids: dict[Path, Path] = field(default_factory=dict)  # eval.json's grids: {path in the Hub folder: file}
    left_out: list[str] = field(default_factory=list)  # files in the components' folders that no component loads
    reduction: dict | None = None  # lora_reduction.json: the run's LoRA file is --as-lora's approximation


@dataclass
class Exported:
    files: list[str]  # paths inside the Hub folder
    folder: Path | None = None  # with --local-dir
    url: str | None = None  # after a push
    notes: list[str] = field(default_factory=list)  # what the user still has to do


def export_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    local_dir: str | Path | None = None,
    private: bool = False,
    no_eval: bool = False,
    single_file: bool = False,
    as_lora: int | None = None,
    lora_format: str = "diffusers",
) -> Exported:
    """Build the Hub folder of a run: into `local_dir` (nothing pushed), or pushed to `repo_id`. `as_lora`: also
    the run's weight change reduced to LoRA adapters of that rank (SVD), with the reduction's error. `lora_format`
    "kohya": the LoRA (the run's or the reduced one) also in the layout A1111 and ComfyUI load."""
    _check_repo_id(repo_id)
    run = load_run(run_dir, no_eval=no_eval)
    if single_file:
        _check_single_file(run)
    if as_lora is not None:
        _check_as_lora(run, as_lora)
    _check_lora_format(run, lora_format, as_lora)
    if local_dir is not None:
        local_dir = _check_local_dir(run, local_dir)
    else:
        _check_hub_access()
    metadata, notes = card_metadata(run, pushed=local_dir is None)
    if run.left_out:
        notes.append(f"left out {len(run.left_out)} file(s) that no component loads: {', '.join(run.left_out[:5])}"
                     + (", ..." if len(run.left_out) > 5 else ""))  # fmt: skip

    def build(folder: Path) -> None:
        write_hub_folder(run, folder, single_file=single_file, repo_id=repo_id)
        exported = run
        if as_lora is not None:
            exported = replace(run, reduction=_write_reduced_lora(run, folder, as_lora))
            notes.append(_reduction_note(exported.reduction))
        if lora_format == "kohya":
            _write_kohya_lora(run, folder, repo_id)
        exported = _write_records(exported, folder, repo_id, single_file=single_file, kohya=lora_format == "kohya")
        lora = (folder / LORA_FILE).is_file()
        card = render_card(exported, repo_id, metadata, single_file=single_file, lora=lora,
                           kohya=lora_format == "kohya")  # fmt: skip
        (folder / CARD_FILE).write_text(card)

    with stop_signals_raise():
        if local_dir is not None:
            write_folder_atomically(local_dir, build)
            return Exported(_listing(local_dir), folder=local_dir, notes=notes)
        tmp_root = Path(tempfile.gettempdir())
        remove_abandoned(tmp_root, PUSH_STAGING)
        with tempfile.TemporaryDirectory(prefix=f"{PUSH_STAGING}{os.getpid()}-", dir=tmp_root) as tmp:
            folder = Path(tmp) / "repo"
            folder.mkdir()
            build(folder)
            message = f"{run.method.key}: erase {', '.join(run.manifest['concepts'])}"
            url = push(folder, repo_id, private=private, message=message)
            return Exported(_listing(folder), url=url, notes=notes)


# --- checks, before anything is written ----------------------------------------------------------


def _check_lora_format(run: Run, lora_format: str, as_lora: int | None) -> None:
    if lora_format not in LORA_FORMATS:
        raise InputError(f"unknown LoRA format {lora_format!r}; known: {', '.join(LORA_FORMATS)}")
    if lora_format != "kohya":
        return
    if run.kind == "one-step":
        raise InputError("--lora-format kohya: a one-step run's adapters make its one-step generator, and A1111 or "
                         "ComfyUI would apply them to the base's multi-step sampler; export without it")  # fmt: skip
    if as_lora is None and not (run.path / LORA_FILE).is_file():
        raise InputError(f"--lora-format kohya writes a LoRA: {run.path} was not trained as one (--set lora_rank=R); "
                         "reduce it with --as-lora RANK")  # fmt: skip
    if as_lora is None and run.model_card.get("family") == "flux":
        from pipelines.kohya import check_flux_layers

        check_flux_layers(run.path / LORA_FILE)


def _check_local_dir(run: Run, local_dir: str | Path) -> Path:
    """`--local-dir` resolved: a new folder outside the run, its base model and the embedded models."""
    local_dir = Path(local_dir).expanduser().resolve()
    check_outside(local_dir, run.path, "--local-dir", "the run")
    if run.manifest["base_model"].get("path"):  # files written there would make the base another model
        check_outside(local_dir, run.manifest["base_model"]["path"], "--local-dir", "the run's base model")
    check_outside_models(local_dir, "--local-dir")
    if local_dir.exists():
        raise InputError(f"{local_dir} already exists; choose another --local-dir or remove it")
    check_writable(local_dir, "--local-dir")
    return local_dir


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InputError(f"--repo-id {repo_id!r} is not a Hub repository id (ORG/NAME): {exc}") from None
    if repo_id.count("/") != 1:  # a bare NAME lands in the pusher's namespace, and the card would name the wrong repo
        raise InputError(f"--repo-id {repo_id!r} needs its owner: ORG/NAME (or USER/NAME)")


def load_run(run_dir: str | Path, *, no_eval: bool = False) -> Run:
    """Check a run folder (and its eval.json unless `no_eval`) and gather what export needs."""
    from pipelines.loading import check_weight_files, resolve, weights_digest

    path = Path(run_dir).expanduser()
    manifest = read_run(path)
    method = get_method(manifest.get("method", ""))
    source = resolve(str(path))
    if source.kind not in PIPELINE_TAGS:
        raise InputError(f"{path}: exporting {source.kind} models is not available in this version")
    files, left_out = _model_files(path, source.kind)
    for file in files.values():
        if file.suffix == ".safetensors":
            check_weight_files(file)
    for name in (MANIFEST, MODEL_CARD_FILE, EVAL_FILE, REDUCTION_FILE):
        if (path / name).is_file():
            _inside(path / name, _link_root(path))
    reduction = None
    if (path / LORA_FILE).is_file() and (path / REDUCTION_FILE).is_file():  # a folder exported with --as-lora
        reduction = json.loads((path / REDUCTION_FILE).read_text())

    report, grids = None, {}
    if not no_eval:
        eval_path = path / EVAL_FILE
        if not eval_path.is_file():
            raise InputError(
                f"{path} has no {EVAL_FILE}: run `erasure eval {path}` first, or pass --no-eval to publish it "
                f"with a card that says it was not evaluated"
            )
        report = read_report(eval_path)
        # The card must describe these weights: an evaluation of other weights would be a false claim.
        if report.get("after", {}).get("sha256") != weights_digest(path):
            raise InputError(f"{eval_path} was measured on other weights than {path} holds; rerun `erasure eval`")
        unmeasured = [c for c in manifest["concepts"] if c not in report.get("concepts", {})]
        if unmeasured:  # a card of this run would report another concept's figures as this erasure's
            raise InputError(f"{eval_path} does not measure the erased concept {unmeasured[0]!r}; rerun "
                             f"`erasure eval {path}` without --concept")  # fmt: skip
        grids = _grid_files(path, report)
    return Run(path, manifest, source.kind, method, files, source.card, report, grids, left_out, reduction)


def _grid_files(path: Path, report: dict) -> dict[Path, Path]:
    """The before/after grids of the run's eval.json: {path in the Hub folder: file}. `erasure eval` writes them
    into the run's grids/ folder; a path elsewhere (absolute, or climbing out with ..) would have the export write
    a file, and the card link one, outside the Hub folder."""
    eval_path = path / EVAL_FILE
    grids = report.get("grids", {})
    if not isinstance(grids, dict):
        raise InputError(f"{eval_path}: its grids are not a table of names and paths; rerun `erasure eval`")
    files = {}
    for name, rel in grids.items():
        parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
        if len(parts) != 2 or parts[0] != "grids" or parts[1] == "..":
            raise InputError(f"{eval_path} lists grid {name!r} at {rel!r}, which is not in the run's grids/ folder; "
                             "rerun `erasure eval`")  # fmt: skip
        if not (path / rel).is_file():
            raise InputError(f"{eval_path} lists grid {path / rel}, which is missing; rerun `erasure eval`")
        expected = report.get("grid_sha256", {}).get(name)  # (older reports carry none)
        if expected is not None and hashlib.sha256((path / rel).read_bytes()).hexdigest() != expected:
            raise InputError(f"{path / rel} is not the grid {eval_path} was written with (another evaluation, or one "
                             "stopped while writing, replaced it); rerun `erasure eval`")  # fmt: skip
        files[Path(rel)] = _inside(path / rel, _link_root(path))
    return files


def _model_files(path: Path, kind: str) -> tuple[dict[Path, Path], list[str]]:
    """The files that make up the loadable model, {path in the Hub folder: file to copy}, and the files of the
    components' folders left out (no component loads them)."""
    from pipelines.components import component_folders

    root = _link_root(path)
    if kind == "gan":
        gan = Path(".") if (path / GAN_FILES[0]).is_file() else Path("generator")
        missing = [name for name in GAN_FILES if not (path / gan / name).is_file()]
        if missing:
            raise InputError(f"{path} is not a complete GAN folder (missing {', '.join(missing)})")
        return {gan / name: _inside(path / gan / name, root) for name in GAN_FILES}, []
    files = {Path("model_index.json"): _inside(path / "model_index.json", root)}
    left_out = []
    # A `--save changed` run lends its unchanged components from its base: the Hub folder gets them whole.
    for name, folder in component_folders(path).items():
        if name in (".", "..") or Path(name).name != name:
            raise InputError(f"{path / 'model_index.json'} names a component {name!r}, which is not a folder name")
        wanted = _component_files(folder)
        files.update((Path(name) / file.name, _inside(file, _link_root(folder.parent))) for file in wanted)
        left_out += [f"{name}/{p.relative_to(folder)}" for p in sorted(folder.rglob("*"))
                     if p not in wanted and not p.is_dir()]  # fmt: skip
    if (path / LORA_FILE).is_file():  # a run trained as LoRA: its adapters, for load_lora_weights (and, with
        files[Path(LORA_FILE)] = _inside(path / LORA_FILE, root)  # --save lora, the toolkit's loader) on the base
    return files, left_out


def _component_files(folder: Path) -> list[Path]:
    """The files of a component folder that `from_pretrained` reads; its weights must be safetensors."""
    wanted = [p for p in sorted(folder.iterdir())
              if p.is_file() and (p.name in COMPONENT_FILES or COMPONENT_WEIGHTS.fullmatch(p.name))]  # fmt: skip
    pickled = [p for p in sorted(folder.iterdir()) if p.suffix in PICKLED_SUFFIXES]
    if pickled and not any(p.suffix == ".safetensors" for p in wanted):
        raise InputError(f"{pickled[0]}: only safetensors weights are exported, never pickled files")
    return wanted


def _link_root(folder: Path) -> Path:
    """The folder a model folder's files may lead into: itself, or for a Hub cache snapshot
    (`models--ORG--NAME/snapshots/REVISION`) its repository's folder, whose blobs/ its files link to."""
    folder = folder.resolve()
    return folder.parents[1] if folder.parent.name == "snapshots" else folder


def _inside(file: Path, root: Path) -> Path:
    """`file`, when it (through any links) is a file of `root`: a run folder's links are never followed out of it
    or its base model, so that an export cannot publish a file of the machine it runs on."""
    if not file.resolve().is_relative_to(root):
        raise InputError(f"{file} leads to {file.resolve()}, outside {root}: an export publishes only the files of "
                         "the run and of its base model")  # fmt: skip
    return file


def _check_single_file(run: Run) -> None:
    """The single-file writer knows the layouts of SD 1.x (and the digits world, built like it), SD 2.x and SDXL."""
    if run.kind != "text-to-image":
        raise InputError(f"--single-file writes the Stable Diffusion layout; a {run.kind} run has no such form")
    from pipelines.single_file import SINGLE_FILE_FAMILIES

    family = run.model_card.get("family", "sd1")
    if family not in SINGLE_FILE_FAMILIES:
        raise InputError(f"--single-file writes the layouts of SD 1.x, 2.x and SDXL; a {family} run has no such form")
    index = json.loads((run.path / "model_index.json").read_text())
    if index.get("_class_name") == "StableDiffusionXLPipeline":
        return
    if index.get("text_encoder") != ["transformers", "CLIPTextModel"]:
        raise InputError("--single-file writes the Stable Diffusion layout, which needs a CLIPTextModel text encoder")


def _check_as_lora(run: Run, rank: int) -> None:
    if run.kind != "text-to-image":
        raise InputError(f"--as-lora reduces a diffusion run's weight change; a {run.kind} run has no LoRA form")
    if not 1 <= rank <= MAX_LORA_RANK:
        raise InputError(f"--as-lora takes a rank between 1 and {MAX_LORA_RANK}, not {rank}")
    if (run.path / LORA_FILE).exists():
        raise InputError(f"{run.path} was trained as LoRA adapters: its {LORA_FILE} is exported as it is")


def _write_reduced_lora(run: Run, folder: Path, rank: int) -> dict:
    """The run's change as a LoRA file in the Hub folder, and the reduction's error beside it; returns the error."""
    import diffusers

    from erasure.lora import reduce_to_lora, save_adapters

    adapters, report = reduce_to_lora(run.path, rank)
    pipeline_class = getattr(diffusers, json.loads((run.path / "model_index.json").read_text())["_class_name"])
    save_adapters(pipeline_class, folder, adapters, rank, rank)
    write_json(folder / REDUCTION_FILE, report)
    return report


def _reduction_note(report: dict) -> str:
    return (f"LoRA of rank {report['rank']} (SVD of the weight change): relative error {report['relative_error']:.4f}, "
            f"worst layer {report['worst_layer_relative_error']:.4f}; {report['changed_tensors_left_out']} changed "
            "norm/bias tensors are not in it")  # fmt: skip


def _write_kohya_lora(run: Run, folder: Path, repo_id: str) -> None:
    from pipelines.kohya import write_kohya

    unet = None
    if run.model_card.get("family") == "sdxl":  # SDXL's kohya names follow its UNet's SGM block layout
        from pipelines import load_model

        unet = load_model(str(run.path), device="cpu").unet
    write_kohya(folder / LORA_FILE, get_family(run.model_card.get("family", "sd1")), unet,
                folder / kohya_file_name(repo_id))  # fmt: skip


def _check_hub_access() -> None:
    """Fail in a second, with what to do, when a push could not happen."""
    from huggingface_hub import constants, get_token

    from pipelines.loading import hub_reachable

    local = "or pass --local-dir DIR to write the folder without pushing"
    if get_token() is None:
        raise InputError(f"cannot push: no Hugging Face token (set HF_TOKEN or run `hf auth login`), {local}")
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"cannot push: HF_HUB_OFFLINE is set; unset it, {local}")
    if not hub_reachable():
        raise InputError(f"cannot push: {constants.ENDPOINT} cannot be reached (no network?); {local}")


# --- the folder ---------------------------------------------------------------------------------


def write_hub_folder(run: Run, folder: Path, *, repo_id: str, single_file: bool = False) -> None:
    """Fill `folder` (which exists and is empty) with the run's model and grids (the records and the model card
    apart: `_write_records` writes them once every weight file is in place)."""
    # A `--save lora` run lends every component from its base: those its adapters change are written merged.
    merged = run.manifest["lora"]["components"] if run.model_card.get("lora_adapters") else []
    for rel, file in run.model_files.items():
        if rel.parts[0] not in merged:
            # A GAN's files go under generator/, where the toolkit's loader and its Hub download look for them.
            _copy(file, folder / "generator" / rel.name if run.kind == "gan" else folder / rel)
    if (run.path / MODEL_CARD_FILE).is_file():
        _copy(run.path / MODEL_CARD_FILE, folder / MODEL_CARD_FILE)
    if merged:
        _write_merged(run, folder, merged)
    if run.reduction is not None:
        _copy(run.path / REDUCTION_FILE, folder / REDUCTION_FILE)
    for rel, file in run.grids.items():
        _copy(file, folder / rel)
    if single_file:
        from pipelines import load_model
        from pipelines.single_file import save_single_file

        save_single_file(load_model(str(run.path), device="cpu"), folder / single_file_name(repo_id))


def _write_merged(run: Run, folder: Path, components: list[str]) -> None:
    """A `--save lora` run holds adapters over its base's weights: the Hub folder gets the `components` they change
    with the adapters merged in, so that `from_pretrained(repo)` loads the erased model, as for any other run (the
    adapter file rides along for `load_lora_weights` on the base), and a card without the adapters to apply."""
    from pipelines import load_model
    from pipelines.cards import write_model_card
    from pipelines.components import save_component

    model = load_model(str(run.path), device="cpu")  # merges the adapters
    for name in components:
        save_component(getattr(model.pipe, name), folder / name)
    write_model_card(folder, {k: v for k, v in run.model_card.items() if k != "lora_adapters"})


def _write_records(run: Run, folder: Path, repo_id: str, *, single_file: bool, kohya: bool) -> Run:
    """erasure.json and eval.json of the Hub folder, describing what it holds; returns the run with that eval.json.

    A `--save changed` or `--save lora` run becomes whole components here, and extra files (single file, LoRA)
    change the folder's weight digest: eval.json then names this folder's digest, keeps the one `erasure eval`
    measured, and says how the two relate, so that the folder passes `load_run`'s check and can be exported again.
    """
    from pipelines.loading import weights_digest

    manifest = run.manifest
    if manifest.get("save", "full") == "full":
        _copy(run.path / MANIFEST, folder / MANIFEST)
    else:  # how the run was saved is kept, apart from what the folder holds
        saved = {key: manifest[key] for key in ("save", "stored_components") if key in manifest}
        whole = {k: v for k, v in manifest.items() if k != "stored_components"}
        write_json(folder / MANIFEST, {**whole, "save": "full", "run_save": saved})
    if run.report is None:
        return run
    after, digest = run.report["after"], weights_digest(folder)
    if digest == after["sha256"]:
        _copy(run.path / EVAL_FILE, folder / EVAL_FILE)
        return run
    measured = {"sha256": digest, "measured_sha256": after.get("measured_sha256", after["sha256"]),
                "weights": _measured_weights(run, repo_id, single_file=single_file, kohya=kohya)}  # fmt: skip
    report = {**run.report, "after": {**after, **measured}}
    write_json(folder / EVAL_FILE, report)
    return replace(run, report=report)


def _measured_weights(run: Run, repo_id: str, *, single_file: bool, kohya: bool) -> list[str]:
    """How the weights `erasure eval` measured relate to the files of the Hub folder, where they differ."""
    saved = run.manifest.get("run_save", run.manifest)
    lines = []
    if saved.get("save") == "changed":
        lent = sorted(k for k, how in saved.get("stored_components", {}).items() if how == "base")
        lines.append(f"`erasure eval` measured the run saved with --save changed, which took {', '.join(lent)} from "
                     "its base after checking them against the digests it recorded; this folder holds the same files, "
                     "every component whole")  # fmt: skip
    if saved.get("save") == "lora":
        parts = ", ".join(run.manifest["lora"]["components"])
        lines.append(f"`erasure eval` measured the run saved with --save lora: the base's {parts} with the run's "
                     f"LoRA adapters merged in on loading; this folder's {parts} hold them, merged by the same "
                     "loader")  # fmt: skip
    if run.kind == "gan":
        lines.append("the generator's files, byte for byte, under generator/; the run's other weights (a "
                     "discriminator, which generating does not need) are left out")  # fmt: skip
    if run.left_out:
        lines.append(f"left out of this folder, as no component loads them: {', '.join(run.left_out)}")
    if single_file:
        lines.append(f"`{single_file_name(repo_id)}`: the same model in the original single-file layout, converted by "
                     "the export and not measured itself")  # fmt: skip
    if run.reduction is not None:
        lines.append(f"`{LORA_FILE}`: an approximation of the erasure as a rank-{run.reduction['rank']} LoRA "
                     f"(relative error {run.reduction['relative_error']:.4f}, `{REDUCTION_FILE}`), not measured: "
                     "the figures are the full weights'")  # fmt: skip
    if kohya:
        lines.append(f"`{kohya_file_name(repo_id)}`: `{LORA_FILE}` in the kohya layout, not measured itself")
    return lines


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def push(folder: Path, repo_id: str, *, private: bool, message: str) -> str:
    """create_repo + upload_folder; returns the repository URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()  # endpoint from HF_ENDPOINT; token from HF_TOKEN or the stored login
    try:
        # private=None keeps the namespace's default visibility (and an existing repo's).
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        # The repository becomes the export: what an earlier export left (another LoRA file, a single file, old
        # grids) goes in the same commit, so the card never sits beside weights it does not describe.
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"erasure export ({message})",
                          delete_patterns="*")  # fmt: skip
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise InputError(
                f"the Hub refused the token for {repo_id} (HTTP {status}): check HF_TOKEN or `hf auth login`, "
                f"and write access to the namespace"
            ) from None
        raise
    return str(url)
