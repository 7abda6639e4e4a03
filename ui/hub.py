"""`erasure export`: a run folder becomes a Hugging Face Hub model repository with an honest card.

The Hub folder holds the erased model as the run saved it (diffusers layout in safetensors, or a
GAN's generator under `generator/`), `erasure.json`, `eval.json` with its before/after grids,
optionally the model as one original-layout Stable Diffusion `.safetensors` (`--single-file`),
and the model card `README.md`: Hub metadata, what was erased and how, the paper, the evaluation
with its settings, how to load the model, and the caveats.

Everything that can be checked is checked before anything is written: the run, its evaluation,
and for a push a token and a reachable Hub. A `--local-dir` is written atomically (it exists only
once complete); a push builds the folder in a temporary directory that is always removed. The
token is only checked for presence: `huggingface_hub` reads it (HF_TOKEN or the stored login) and
sends it, so it never passes through this module's data, files or messages.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from erasure.output import MANIFEST, RunDirectory, read_run
from erasure.registry import Method, get_method
from pipelines.cards import MODEL_CARD_FILE
from pipelines.errors import InputError
from pipelines.families import get_family
from pipelines.files import check_outside
from pipelines.lora_files import LORA_FILE
from pipelines.zoo.models import EMBEDDED, canonical_name

CARD_FILE = "README.md"
EVAL_FILE = "eval.json"
GAN_FILES = ("generator_config.json", "generator.safetensors")  # the discriminator is not needed to generate
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
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
LIBRARIES = {"text-to-image": "diffusers", "one-step": "diffusers", "gan": "pytorch"}


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

LORA_USAGE = """\
The erasure is also a LoRA, `{lora_file}`: load it into a pipeline of the base model (as a strength,
`set_adapters` takes a weight; several erasures stack by loading each):

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{repo_id}", adapter_name="erasure")
pipe.set_adapters(["erasure"], adapter_weights=[1.0])
```"""

KOHYA_USAGE = """\
`{file}` is the same LoRA in the kohya layout, which A1111 and ComfyUI load (put it in their LoRA folder)."""

KOHYA_USAGE_FLUX = """\
`{file}` is the same LoRA in sd-scripts' FLUX layout (Black Forest Labs' layer names, q, k and v fused), which
ComfyUI loads (put it in its LoRA folder)."""

ONE_STEP_USAGE = """\
## How to use

A one-step generator (Score Forgetting Distillation): one UNet evaluation per image, guidance
distilled in. With the concept-erasure toolkit, `load_model("{repo_id}")` loads it like any model.
With plain diffusers and transformers, the step is:

```python
from huggingface_hub import snapshot_download
{recipe}```"""

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
    kind: str  # "text-to-image" or "gan"
    method: Method
    model_files: dict[Path, Path]  # what makes up the loadable model: {path in the Hub folder: file}
    model_card: dict  # erasure_model.json (family, sampling defaults, what was erased)
    report: dict | None  # eval.json; None when exported with --no-eval


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
        if not local_dir.parent.is_dir():
            raise InputError(f"folder {local_dir.parent} does not exist")
    else:
        _check_hub_access()
    metadata, notes = card_metadata(run, pushed=local_dir is None)

    def build(folder: Path) -> None:
        write_hub_folder(run, folder, single_file=single_file, repo_id=repo_id)
        if as_lora is not None:
            notes.append(_write_reduced_lora(run, folder, as_lora))
        if lora_format == "kohya":
            _write_kohya_lora(run, folder, repo_id)
        lora = (folder / LORA_FILE).is_file()
        card = render_card(run, repo_id, metadata, single_file=single_file, lora=lora, kohya=lora_format == "kohya")
        (folder / CARD_FILE).write_text(card)

    if local_dir is not None:
        RunDirectory(local_dir).commit(build)
        return Exported(_listing(local_dir), folder=local_dir, notes=notes)
    with tempfile.TemporaryDirectory(prefix="erasure-export-") as tmp:
        folder = Path(tmp) / "repo"
        folder.mkdir()
        build(folder)
        url = push(folder, repo_id, private=private, message=f"{run.method.key}: erase {', '.join(_concepts(run))}")
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
    files = _model_files(path, source.kind)
    pickled = [f for f in files.values() if f.suffix in PICKLED_SUFFIXES]
    if pickled:
        raise InputError(f"{pickled[0]}: only safetensors weights are exported, never pickled files")
    for file in files.values():
        if file.suffix == ".safetensors":
            check_safetensors(file)

    report = None
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
        missing = [g for g in report.get("grids", {}).values() if not (path / g).is_file()]
        if missing:
            raise InputError(f"{eval_path} lists grid {path / missing[0]}, which is missing; rerun `erasure eval`")
    return Run(path, manifest, source.kind, method, files, source.card, report)


def _model_files(path: Path, kind: str) -> dict[Path, Path]:
    """The files that make up the loadable model: {path in the Hub folder: file to copy}."""
    from pipelines.components import component_folders

    if kind == "gan":
        root = Path(".") if (path / GAN_FILES[0]).is_file() else Path("generator")
        missing = [name for name in GAN_FILES if not (path / root / name).is_file()]
        if missing:
            raise InputError(f"{path} is not a complete GAN folder (missing {', '.join(missing)})")
        return {root / name: path / root / name for name in GAN_FILES}
    files = {Path("model_index.json"): path / "model_index.json"}
    # A `--save changed` run lends its unchanged components from its base: the Hub folder gets them whole.
    for name, folder in component_folders(path).items():
        files.update((Path(name) / p.relative_to(folder), p) for p in sorted(folder.rglob("*")) if p.is_file())
    if (path / LORA_FILE).is_file():  # a run trained as LoRA: its adapters, for load_lora_weights (and, with
        files[Path(LORA_FILE)] = path / LORA_FILE  # --save lora, the toolkit's loader) on the base's weights
    return files


def _check_single_file(run: Run) -> None:
    """The single-file writer knows the layouts of SD 1.x (and the digits world, built like it), SD 2.x and SDXL."""
    if run.kind != "text-to-image":
        raise InputError(f"--single-file writes the Stable Diffusion layout; a {run.kind} run has no such form")
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


def _write_reduced_lora(run: Run, folder: Path, rank: int) -> str:
    """The run's change as a LoRA file in the Hub folder, and the reduction's error beside it; returns a note."""
    import diffusers

    from erasure.lora import reduce_to_lora, save_adapters

    adapters, report = reduce_to_lora(run.path, rank)
    pipeline_class = getattr(diffusers, json.loads((run.path / "model_index.json").read_text())["_class_name"])
    save_adapters(pipeline_class, folder, adapters, rank, rank)
    (folder / "lora_reduction.json").write_text(json.dumps(report, indent=2) + "\n")
    return (f"LoRA of rank {rank} (SVD of the weight change): relative error {report['relative_error']:.4f}, worst "
            f"layer {report['worst_layer_relative_error']:.4f}; {report['changed_tensors_left_out']} changed "
            "norm/bias tensors are not in it")


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
    """Fill `folder` (which exists and is empty) with the run's files (the model card apart)."""
    # A `--save lora` run lends every component from its base: those its adapters change are written merged.
    merged = run.manifest["lora"]["components"] if run.model_card.get("lora_adapters") else []
    for rel, file in run.model_files.items():
        if rel.parts[0] not in merged:
            # A GAN's files go under generator/, where the toolkit's loader and its Hub download look for them.
            _copy(file, folder / "generator" / rel.name if run.kind == "gan" else folder / rel)
    for name in (MANIFEST, MODEL_CARD_FILE):
        if (run.path / name).is_file():
            _copy(run.path / name, folder / name)
    if merged:
        _write_merged(run, folder, merged)
    if run.report is not None:
        _copy(run.path / EVAL_FILE, folder / EVAL_FILE)
        for rel in run.report.get("grids", {}).values():
            _copy(run.path / rel, folder / rel)
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
        return ONE_STEP_USAGE.format(repo_id=repo_id, recipe=recipe)
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
