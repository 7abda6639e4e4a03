"""The model card of an exported run (`README.md` of the Hub folder): its Hub metadata, what was erased and how, the
paper, the evaluation with its settings, how to load the model (snippets the tests run against an exported folder),
and the caveats. It also names the files beside it that it describes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from erasure import DISTRIBUTION
from erasure.evaluation import reference_note
from evaluators.report_format import concept_attacks
from pipelines.families import get_family
from pipelines.lora_files import LORA_FILE
from pipelines.zoo.models import EMBEDDED, canonical_name

if TYPE_CHECKING:
    from .hub import Run

CARD_FILE = "README.md"
REDUCTION_FILE = "lora_reduction.json"  # beside a LoRA that --as-lora reduced from full weights: its error
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


def single_file_name(repo_id: str) -> str:
    return f"{repo_id.split('/')[-1]}.safetensors"


def kohya_file_name(repo_id: str) -> str:
    return f"{repo_id.split('/')[-1]}-lora.safetensors"


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
    """An `erasure eval --attack` result (one of a concept's "attacks" in eval.json) in one line."""
    note = reference_note(attack)
    before = f"present before the attack: {attack['present_before_attack']:.1%}" + (f"; {note}" if note else "")
    pairs = f"{attack['pairs']} (prompt, seed) pairs"
    return f"{attack['asr']:.1%} of {pairs} under the {attack['attack']} attack ({before})"


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
        for attack in concept_attacks(section):  # erasure/evaluation.py keeps them beside the metrics
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
    attacks = [(concept, attack) for concept, section in concepts.items() for attack in concept_attacks(section)]
    if attacks:
        measured = "; ".join(f"{concept}: {attack_value(attack)}" for concept, attack in attacks)
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
