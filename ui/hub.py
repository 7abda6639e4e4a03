"""`erasure export`: a run folder becomes a Hugging Face Hub model repository with an honest card.

The Hub folder holds the erased model as the run saved it (diffusers layout in safetensors, or a
GAN's generator under `generator/`), `erasure.json`, `eval.json` with its before/after grids,
optionally the model as one original-layout Stable Diffusion `.safetensors` (`--single-file`),
and the model card `README.md`: Hub metadata, what was erased and how, the paper, the evaluation
with its settings, how to load the model, and the caveats.

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

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from erasure import DISTRIBUTION
from erasure.output import MANIFEST, read_run
from erasure.registry import Method, get_method
from pipelines.cards import MODEL_CARD_FILE
from pipelines.errors import InputError
from pipelines.families import get_family
from pipelines.files import check_outside, check_writable, remove_abandoned, write_folder_atomically, write_json
from pipelines.lora_files import LORA_FILE
from pipelines.signals import stop_signals_raise
from pipelines.zoo.models import EMBEDDED, canonical_name

CARD_FILE = "README.md"
EVAL_FILE = "eval.json"
REDUCTION_FILE = "lora_reduction.json"
GAN_FILES = ("generator_config.json", "generator.safetensors")  # the discriminator is not needed to generate
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
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
# The embedded digits models are trained by this repository's recipe and ship under its licence.
EMBEDDED_LICENSE = "apache-2.0"
# Well-known bases whose Hub snapshots this toolkit loads without their README (which holds the licence).
KNOWN_LICENSES = {
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
}
LICENSE_PLACEHOLDER = "unknown-fill-in-the-base-model-license"  # Hub `license_name` syntax: [a-z0-9-.]
PIPELINE_TAGS = {"text-to-image": "text-to-image", "one-step": "text-to-image", "gan": "unconditional-image-generation"}
# A one-step folder is not for diffusers' `DiffusionPipeline` (model_index.json names the toolkit's
# OneStepPipeline), which the Hub's diffusers snippet would call: the toolkit's loader is what loads it whole.
LIBRARIES = {"text-to-image": "diffusers", "one-step": DISTRIBUTION, "gan": "pytorch"}


# Loading snippets of the card; the tests run them against the exported folder.
DIFFUSERS_USAGE = """\
## How to use

With plain diffusers:

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}")
generator = torch.Generator().manual_seed(0)
image = pipe("{prompt}", num_inference_steps={steps}, guidance_scale={guidance}, generator=generator).images[0]
image.save("sample.png")
```

With the toolkit: `erasure sample {repo_id} --prompt "{prompt}" --out grid.png`."""

COMPONENT_USAGE = """\
Only `{name}/` changed; it is plug-and-play in a pipeline of the base model:

```python
from diffusers import DiffusionPipeline
from {library} import {cls}

{name} = {cls}.from_pretrained("{repo_id}", subfolder="{name}")
pipe = DiffusionPipeline.from_pretrained("{base}", {name}={name})
```"""

SINGLE_FILE_USAGE = """\
`{file}` is the same model as one file in the original Stable Diffusion layout: UNet, VAE and
text encoder(s), the format A1111 and ComfyUI load (put it in their checkpoint folder; they expect
models of the real architecture's size). With diffusers, this repository provides the configs:

```python
from diffusers import {pipeline}
from huggingface_hub import hf_hub_download

path = hf_hub_download("{repo_id}", "{file}")
pipe = {pipeline}.from_single_file(path, config="{repo_id}")
```"""

LORA_LOADING = """\
Load it into a pipeline of the base model (as a strength, `set_adapters` takes a weight; several erasures stack
by loading each):

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{repo_id}", adapter_name="erasure")
pipe.set_adapters(["erasure"], adapter_weights=[1.0])
```"""

LORA_USAGE = "The erasure is also a LoRA, `{lora_file}`. " + LORA_LOADING

REDUCED_LORA_INTRO = """\
`{lora_file}` approximates the erasure as a LoRA: the run's weight change cut to rank {rank} by SVD
(`{reduction_file}`), with a relative error of {relative_error:.4f} (worst layer {worst_layer_relative_error:.4f}),
and {changed_tensors_left_out} changed norm or bias tensors left out. The figures of this card were measured on the
full weights of this repository, not on the LoRA. """

REDUCED_LORA_USAGE = REDUCED_LORA_INTRO + LORA_LOADING

KOHYA_USAGE = """\
`{file}` is the same LoRA in the kohya layout, which A1111 and ComfyUI load (put it in their LoRA folder)."""

KOHYA_USAGE_FLUX = """\
`{file}` is the same LoRA in sd-scripts' FLUX layout (Black Forest Labs' layer names, q, k and v fused), which
ComfyUI loads (put it in its LoRA folder)."""

ONE_STEP_USAGE = """\
## How to use

A one-step generator (Score Forgetting Distillation): one UNet evaluation per image, guidance
distilled in. With the concept-erasure toolkit, `load_model("{repo_id}")` loads it like any model.
Diffusers' `DiffusionPipeline.from_pretrained` does not: diffusers has no one-step pipeline
(`model_index.json` names the toolkit's `OneStepPipeline`), but its parts load with plain diffusers
and transformers, and the step is:

```python
from huggingface_hub import snapshot_download
{recipe}```"""

ONE_STEP_LORA_USAGE = """\
`{lora_file}` holds the generator's change as LoRA adapters over the base's UNet (`unet/` here has them
merged in). They make the one-step generator, not an erased version of the base's multi-step pipeline: loaded
into the base's pipeline (`load_lora_weights`, then `fuse_lora`), its UNet is to take the one step above, never the
base's sampler."""

GAN_USAGE = """\
## How to use

The generator is a StyleGAN2 in the concept-erasure toolkit's format (`generator/`: safetensors and
a JSON config), loaded with the toolkit's loader:

```python
from pipelines import load_model

model = load_model("{repo_id}")
images = model.generate([0, 1, 2, 3])  # one PIL image per latent seed
images[0].save("sample.png")
```"""


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
    if lora_format not in ("diffusers", "kohya"):
        raise InputError(f"unknown LoRA format {lora_format!r}; known: diffusers, kohya")
    if lora_format == "kohya" and run.kind == "one-step":
        raise InputError("--lora-format kohya: a one-step run's adapters make its one-step generator, and A1111 or "
                         "ComfyUI would apply them to the base's multi-step sampler; export without it")  # fmt: skip
    if lora_format == "kohya" and as_lora is None and not (run.path / LORA_FILE).is_file():
        raise InputError(f"--lora-format kohya writes a LoRA: {run.path} was not trained as one (--set lora_rank=R); "
                         "reduce it with --as-lora RANK")  # fmt: skip
    if lora_format == "kohya" and as_lora is None and run.model_card.get("family") == "flux":
        from pipelines.kohya import check_flux_layers

        check_flux_layers(run.path / LORA_FILE)
    if local_dir is not None:
        local_dir = Path(local_dir).expanduser().resolve()
        check_outside(local_dir, run.path, "--local-dir", "the run")
        if local_dir.exists():
            raise InputError(f"{local_dir} already exists; choose another --local-dir or remove it")
        check_writable(local_dir, "--local-dir")
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
            message = f"{run.method.key}: erase {', '.join(_concepts(run))}"
            url = push(folder, repo_id, private=private, message=message)
            return Exported(_listing(folder), url=url, notes=notes)


# --- checks, before anything is written ----------------------------------------------------------


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
    from pipelines.loading import check_safetensors, resolve, weights_digest

    path = Path(run_dir).expanduser()
    manifest = read_run(path)
    method = get_method(manifest.get("method", ""))
    source = resolve(str(path))
    if source.kind not in PIPELINE_TAGS:
        raise InputError(f"{path}: exporting {source.kind} models is not available in this version")
    files, left_out = _model_files(path, source.kind)
    for file in files.values():
        if file.suffix == ".safetensors":
            check_safetensors(file)
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
        try:
            report = json.loads(eval_path.read_text())
        except json.JSONDecodeError:
            raise InputError(f"{eval_path} is not valid JSON") from None
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
    from pipelines.lora_files import LORA_FILE

    if run.kind != "text-to-image":
        raise InputError(f"--as-lora reduces a diffusion run's weight change; a {run.kind} run has no LoRA form")
    from erasure.lora import MAX_LORA_RANK

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


def kohya_file_name(repo_id: str) -> str:
    return f"{repo_id.split('/')[-1]}-lora.safetensors"


def _write_kohya_lora(run: Run, folder: Path, repo_id: str) -> None:
    from pipelines.kohya import write_kohya

    unet = None
    if run.model_card.get("family") == "sdxl":  # SDXL's kohya names follow its UNet's SGM block layout
        from pipelines import load_model

        unet = load_model(str(run.path)).unet
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

        save_single_file(load_model(str(run.path)), folder / single_file_name(repo_id))


def _write_merged(run: Run, folder: Path, components: list[str]) -> None:
    """A `--save lora` run holds adapters over its base's weights: the Hub folder gets the `components` they change
    with the adapters merged in, so that `from_pretrained(repo)` loads the erased model, as for any other run (the
    adapter file rides along for `load_lora_weights` on the base), and a card without the adapters to apply."""
    from pipelines import load_model
    from pipelines.cards import write_model_card
    from pipelines.components import save_component

    model = load_model(str(run.path))  # merges the adapters
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


def single_file_name(repo_id: str) -> str:
    return f"{repo_id.split('/')[-1]}.safetensors"


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


# --- the model card -----------------------------------------------------------------------------


def card_metadata(run: Run, pushed: bool = False) -> tuple[dict, list[str]]:
    """The card's YAML metadata, and notes on what the user has to fill in."""
    base = run.manifest["base_model"]
    hub_id = base["spec"] if base.get("origin") == "hub" else None
    notes = []
    metadata: dict = {}
    if hub_id:
        metadata["base_model"] = hub_id
    elif base.get("origin") != "embedded":
        notes.append(
            f"the base model {base['spec']} is not a Hub id, so the card has no base_model metadata; "
            "add it to README.md if the base is on the Hub"
        )
    metadata["library_name"] = LIBRARIES[run.kind]
    license = base_license(base)
    if license:
        metadata["license"] = license
    else:
        metadata.update(license="other", license_name=LICENSE_PLACEHOLDER)
        where = "README.md on the Hub" if pushed else "README.md before publishing"
        notes.append(f"the base model's licence is unknown: set `license` in {where} (it says {LICENSE_PLACEHOLDER})")
    metadata["pipeline_tag"] = PIPELINE_TAGS[run.kind]
    metadata["tags"] = list(dict.fromkeys(["concept-erasure", run.method.key, *_concepts(run)]))
    return metadata, notes


def base_license(base: dict) -> str | None:
    """The base model's licence id when known: embedded, a well-known Hub model, or its own card."""
    if base.get("origin") == "embedded":
        return EMBEDDED_LICENSE
    if base.get("origin") == "hub" and base["spec"] in KNOWN_LICENSES:
        return KNOWN_LICENSES[base["spec"]]
    readme = Path(base["path"]) / CARD_FILE if base.get("path") else None
    if readme is not None and readme.is_file():
        from huggingface_hub import ModelCard

        try:
            return ModelCard.load(readme).data.license
        except Exception:  # a malformed foreign card just means "unknown"
            return None
    return None


def _concepts(run: Run) -> list[str]:
    return list(run.manifest["concepts"])


def render_card(run: Run, repo_id: str, metadata: dict, *, single_file: bool = False, lora: bool = False,
                kohya: bool = False) -> str:  # fmt: skip
    """README.md: YAML metadata (written by huggingface_hub, so it parses back) and the card's text."""
    from huggingface_hub import ModelCardData

    sections = [
        _intro(run, repo_id),
        _what_and_how(run),
        _evaluation(run),
        _usage(run, repo_id, single_file, lora, kohya),
        _caveats(run, metadata),
        _citation(run),
    ]
    return f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def _base_label(base: dict) -> str:
    if base.get("origin") == "hub":
        return f"[{base['spec']}](https://huggingface.co/{base['spec']})"
    if base.get("origin") == "embedded":
        summary = EMBEDDED[canonical_name(base["spec"]) or "digits-sd"][1]
        return f"`{base['spec']}`, the concept-erasure toolkit's embedded toy model ({summary})"
    return f"`{base['spec']}` (a local model)"


def _intro(run: Run, repo_id: str) -> str:
    paper = run.method.paper
    concepts = ", ".join(f'"{c}"' for c in _concepts(run))
    return (
        f"# {repo_id.split('/')[-1]}\n\n"
        f"{_base_label(run.manifest['base_model'])} with {concepts} erased by **{run.method.key}** "
        f"([{paper.title}]({paper.url}), {paper.venue}), made with the concept-erasure toolkit (`erasure export`)."
    )


def _what_and_how(run: Run) -> str:
    import yaml

    m, paper = run.manifest, run.method.paper
    base = m["base_model"]
    changed = ", ".join(f"`{c}`" for c in m.get("changed_components", [])) or "see erasure.json"
    lines = [
        "## What was erased, and how",
        "",
        f"- **Erased:** {', '.join(repr(c) for c in _concepts(run))}",
        f"- **Method:** `{run.method.key}`: {run.method.summary}. Paper: {paper.authors}, "
        f"*{paper.title}*, {paper.venue} ({paper.url}).",
        f"- **Changed:** {changed} ({m.get('trainable_parameters', 0):,} trained parameters); every other part "
        "is the base model's, unchanged.",
        f"- **Base model:** `{base['spec']}` ({base.get('origin')}"
        + (f", revision `{base['revision']}`" if base.get("revision") else "")
        + f"), weights sha256 `{base.get('sha256')}`.",
        f"- **Run:** seed {m.get('seed')}, device {m.get('device')}, mixed precision {m.get('mixed_precision')}, "
        f"{m.get('wall_time_s')} s{' (the part after it was resumed)' if m.get('resumed') else ''}; versions: "
        + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
        "",
        "The method's resolved settings (also in `erasure.json`, with everything else the run recorded):",
        "",
        f"```yaml\n{yaml.safe_dump(m.get('config', {}), sort_keys=False).rstrip()}\n```",
    ]
    return "\n".join(lines)


def _number(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _settings_text(settings: dict) -> str:
    parts = []
    for key, value in settings.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        parts.append(f"{key}: {value}")
    return "; ".join(parts).replace("|", "\\|")


def _metric_value(metric: dict) -> str:
    """A metric's cell: before → after (change), or its value; and its warning, which a value does not make moot."""
    if metric.get("after", metric.get("value")) is None:
        return f"not measured: {metric.get('warning', 'no value')}"
    if "before" in metric:
        text = f"{_number(metric['before'])} → {_number(metric['after'])} ({metric['difference']:+.4g})"
    else:
        text = f"{_number(metric['value'])} ± {_number(metric['std'])}" if "std" in metric else _number(metric["value"])
    return f"{text} (**warning:** {metric['warning']})" if metric.get("warning") else text


def attack_value(attack: dict) -> str:
    """An `erasure eval --attack` result (the "attack" of a concept in eval.json) in one line."""
    return (f"{attack['asr']:.1%} of {attack['pairs']} (prompt, seed) pairs under the {attack['attack']} attack "
            f"(present before the attack: {attack['present_before_attack']:.1%})")  # fmt: skip


def _evaluation(run: Run) -> str:
    report = run.report
    if report is None:
        return (
            "## Evaluation\n\n**This model was not evaluated.** It was exported with `--no-eval`: nothing in this "
            "card measures how well the concept was removed or what else changed. Measure it with "
            "`erasure eval` before relying on it."
        )
    settings = report.get("settings", {})
    lines = [
        "## Evaluation",
        "",
        f"Measured by `erasure eval`: the erased model and its base (`{report['before']['spec']}`) draw the same "
        f"{'latent seeds' if run.kind == 'gan' else '(prompt, seed) grid'} and are judged alike. "
        f"Settings: {_settings_text(settings)}.",
    ]
    if report.get("baseline_matches_run") is False:
        lines += ["", "**Note:** the baseline measured here is not the exact base this model was erased from."]
    if report["after"].get("weights"):  # written by the export: what was measured, against what this repo holds
        lines += ["", "What was measured, and what this repository holds:", ""]
        lines += [f"- {line}." for line in report["after"]["weights"]]
    for concept, section in report["concepts"].items():
        lines += ["", f"### {concept}", "", "| metric | before → after (change) | settings |", "|---|---|---|"]
        for name, metric in section["metrics"].items():
            lines.append(f"| {name} | {_metric_value(metric)} | {_settings_text(metric.get('settings', {}))} |")
        if section.get("attack"):  # erasure/evaluation.py keeps it beside the metrics
            attack = section["attack"]
            lines.append(f"| attack_success_rate | {attack_value(attack)} | {_settings_text(attack['settings'])} |")
        prompts = section.get("prompts")
        if prompts:
            lines += ["", f"Target prompts: {'; '.join(_prompt_texts(prompts['target_prompts']))}.",
                      f"Preserved prompts: {'; '.join(_prompt_texts(prompts['preserved_prompts']))}."]  # fmt: skip
    lines += ["", "Before/after grids (left: base, right: erased; same seeds in each column):"]
    for name, rel in report.get("grids", {}).items():
        lines += ["", f"![before/after: {name}]({rel})"]
    return "\n".join(lines)


def _prompt_texts(part) -> list[str]:
    """The prompts of one part of eval.json: {"prompts": [...], seeds and guidance where they vary}, or the plain
    list of earlier versions."""
    return part["prompts"] if isinstance(part, dict) else part


def _citation(run: Run) -> str:
    """The method's paper, and the paper its family preset follows where that is another (FLUX's ESD: EraseAnything)."""
    from erasure.registry import preset_paper

    papers = [run.method.paper]
    preset = preset_paper(get_family(run.model_card.get("family", "sd1")), run.method.key)
    if preset is not None:
        papers.append(preset)
    return "## Citation\n\n" + "\n\n".join(f"```bibtex\n{paper.bibtex}\n```" for paper in papers)


def _usage(run: Run, repo_id: str, single_file: bool, lora: bool = False, kohya: bool = False) -> str:
    if run.kind == "gan":
        return GAN_USAGE.format(repo_id=repo_id)
    if run.kind == "one-step":
        from pipelines.one_step import PLAIN_DIFFUSERS_RECIPE, PLAIN_DIFFUSERS_RECIPE_XL

        prompt = _concepts(run)[0].replace('"', "'")
        template = PLAIN_DIFFUSERS_RECIPE_XL if run.model_card.get("family") == "sdxl" else PLAIN_DIFFUSERS_RECIPE
        recipe = template.format(folder=f'snapshot_download("{repo_id}")', prompt=prompt)
        usage = ONE_STEP_USAGE.format(repo_id=repo_id, recipe=recipe)
        return usage + "\n\n" + ONE_STEP_LORA_USAGE.format(lora_file=LORA_FILE) if lora else usage
    from pipelines.diffusion import FLUX_SAMPLING, SD_SAMPLING

    defaults = FLUX_SAMPLING if run.model_card.get("family") == "flux" else SD_SAMPLING
    sampling = {**defaults, **run.model_card.get("sampling", {})}
    prompt = _concepts(run)[0].replace('"', "'")
    parts = [DIFFUSERS_USAGE.format(repo_id=repo_id, prompt=prompt, **sampling)]
    changed = run.manifest.get("changed_components", [])
    index = json.loads((run.path / "model_index.json").read_text())
    base = run.manifest["base_model"]
    if len(changed) == 1 and changed[0] in index and base.get("origin") == "hub":
        library, cls = index[changed[0]]
        parts.append(COMPONENT_USAGE.format(repo_id=repo_id, name=changed[0], library=library, cls=cls,
                                            base=base["spec"]))  # fmt: skip
    if single_file:
        pipeline = index.get("_class_name", "StableDiffusionPipeline")
        parts.append(SINGLE_FILE_USAGE.format(repo_id=repo_id, file=single_file_name(repo_id), pipeline=pipeline))
    if lora:
        base_name = base["spec"] if base.get("origin") == "hub" else "BASE-MODEL"
        if run.reduction is not None:  # an approximation, whose error the reader needs beside it
            parts.append(REDUCED_LORA_USAGE.format(repo_id=repo_id, base=base_name, lora_file=LORA_FILE,
                                                   reduction_file=REDUCTION_FILE, **run.reduction))  # fmt: skip
        else:
            parts.append(LORA_USAGE.format(repo_id=repo_id, base=base_name, lora_file=LORA_FILE))
    if kohya:
        template = KOHYA_USAGE_FLUX if run.model_card.get("family") == "flux" else KOHYA_USAGE
        parts.append(template.format(file=kohya_file_name(repo_id)))
    return "\n\n".join(parts)


def _caveats(run: Run, metadata: dict) -> str:
    lines = [
        "## Caveats",
        "",
        "- **Erasure is not a guarantee.** The concept is suppressed for the prompts that were measured; other "
        "wordings, other languages, adversarial prompts or embeddings, further fine-tuning, or merging with "
        "other weights can bring it back. Do not use this model as the only safeguard.",
    ]
    concepts = (run.report or {}).get("concepts", {})
    attacks = {concept: section["attack"] for concept, section in concepts.items() if section.get("attack")}
    if attacks:
        measured = "; ".join(f"{concept}: {attack_value(attack)}" for concept, attack in attacks.items())
        lines.append(f"- **Adversarial robustness** (attack success, see the tables): {measured}.")
    else:
        lines.append("- **Adversarial robustness was not measured** for this model: no attack results are recorded.")
    if run.report is not None:
        lines.append(
            "- The numbers hold for the prompts, seeds and judges listed only; the judges (CLIP zero-shot, "
            "domain classifiers) make mistakes of their own. Related concepts can be affected too: see the "
            "preserved rows."
        )
    if run.manifest["base_model"].get("origin") == "embedded":
        lines.append("- The base is a toy model of small coloured digits for trying the workflow, not a real "
                     "image generator.")  # fmt: skip
    if metadata.get("license_name") == LICENSE_PLACEHOLDER:
        lines.append(
            "- **Licence to fill in:** the base model's licence could not be determined, so the metadata says "
            f"`license: other` / `license_name: {LICENSE_PLACEHOLDER}`. This model is a derivative of its base: "
            "set the base's licence before publishing."
        )
    return "\n".join(lines)
