"""`erasure export`: the Hub folder of real (tiny) runs loads back with plain diffusers, the single
file with `from_single_file`, the GAN with the toolkit's loader; the card parses and says what it
must; a push goes through huggingface_hub to a local HTTP server that answers like the Hub."""

import base64
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erasure.api import erase
from erasure.evaluation import run_eval
from erasure.registry import METHODS
from pipelines import load_model
from pipelines.loading import weights_digest
from ui.cli import main
from ui.hub import export_run, load_run
from ui.model_card import LICENSE_PLACEHOLDER, card_metadata, render_card

from .conftest import dead_pid

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "me/tiny-no-cat"
QUICK = ["steps=4", "ddim_steps=3", "batch_size=1", "lr=1e-2"]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _python_block(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


@pytest.fixture(scope="module")
def evaluated_run(tiny_pipeline_dir, tmp_path_factory):
    """A tiny ESD run, evaluated (digits-clip scores it: the tiny model's own family has no offline CLIP)."""
    run = erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path_factory.mktemp("esd") / "run", sets=QUICK,
                progress=False)  # fmt: skip
    run_eval(str(run), samples=1, clip="digits-clip", progress=False)
    return run


@pytest.fixture(scope="module")
def exported(evaluated_run, tmp_path_factory):
    # as the README's command: `--local-dir hub/NAME` where no hub/ exists yet
    local_dir = tmp_path_factory.mktemp("export") / "hub" / "digits-no-seven"
    return export_run(evaluated_run, REPO_ID, local_dir=local_dir, single_file=True)


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    """A GAN run folder as a GAN method saves it (no GAN method is available yet): digits-gan with its
    generator's weights moved, and its manifest."""
    from erasure.output import write_manifest
    from pipelines import resolve

    source = resolve("digits-gan")
    model = load_model(source)
    torch.manual_seed(0)
    with torch.no_grad():  # stands in for the erasure: the run's weights differ from the base's
        for p in model.generator.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("gan") / "run"
    model.save(path, card={"erased": {"method": "text2unlearn", "concepts": ["seven"], "base_model": "digits-gan"}})
    trained = sum(p.numel() for p in model.generator.parameters())
    write_manifest(path, {
        "method": "text2unlearn", "concepts": ["seven"], "base_model": source.describe(), "config": {}, "seed": 0,
        "changed_components": ["generator"], "trainable_parameters": trained,
    })  # fmt: skip
    return path


# --- the folder and the card ---------------------------------------------------------------------


def test_local_dir_export_loads_with_diffusers_and_draws_the_runs_images(evaluated_run, exported):
    from diffusers import DiffusionPipeline

    hub = exported.folder
    files = _files(hub)
    run_files = _files(evaluated_run)
    report = json.loads((evaluated_run / "eval.json").read_text())
    for name in ["model_index.json", "erasure.json", "erasure_model.json", *report["grids"].values()]:
        assert files[name] == run_files[name], name
    # The single file joins the folder's weights: eval.json names their digest, and keeps the one it measured.
    after = json.loads(files["eval.json"])["after"]
    assert after["sha256"] == weights_digest(hub) and after["measured_sha256"] == report["after"]["sha256"]
    assert json.loads(files["eval.json"]) == {**report, "after": after}
    weights = [n for n in run_files if n.endswith(".safetensors")]
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"} <= set(weights)
    assert all(files[n] == run_files[n] for n in weights)  # the run's weights, byte for byte
    assert {"README.md", "tiny-no-cat.safetensors"} <= set(files) and sorted(exported.files) == sorted(files)
    assert [p.name for p in hub.parent.iterdir()] == [hub.name]  # no staging folder left beside it

    pipe = DiffusionPipeline.from_pretrained(hub)
    pipe.set_progress_bar_config(disable=True)
    ours = load_model(str(evaluated_run)).generate(["a cat", "a dog"], [0, 1], steps=3)
    for row, prompt in zip(ours, ["a cat", "a dog"]):
        theirs = [pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(s)).images[0]
                  for s in (0, 1)]  # fmt: skip
        assert _same(row, theirs), prompt


def test_single_file_loads_with_from_single_file_and_draws_the_same_images(evaluated_run, exported):
    from diffusers import StableDiffusionPipeline

    path = exported.folder / "tiny-no-cat.safetensors"
    # The exported folder is the config the card points at (`config="<repo id>"`).
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(exported.folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ours = load_model(str(evaluated_run)).generate(["a cat"], [0, 1], steps=3)[0]
    theirs = [
        pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(s)).images[0] for s in (0, 1)
    ]
    assert _same(ours, theirs)


def test_the_cards_single_file_snippet_loads_the_file_with_the_repositorys_configs(evaluated_run, exported):
    # The card's --single-file snippet is run as written, the folder standing in for the Hub repository: a tiny or
    # fine-tuned file needs this repository's configs (`config=`); without them diffusers would build the
    # architecture it guesses from the file and fetch that model's configs instead.
    blocks = re.findall(r"```python\n(.*?)```", (exported.folder / "README.md").read_text(), re.S)
    [snippet] = [block for block in blocks if "from_single_file" in block]
    download = f'hf_hub_download("{REPO_ID}", "tiny-no-cat.safetensors")'
    config = f'config="{REPO_ID}")'
    assert snippet.count(download) == 1 and snippet.count(config) == 1
    snippet = snippet.replace(download, repr(str(exported.folder / "tiny-no-cat.safetensors")))
    namespace: dict = {}
    exec(snippet.replace(config, f"config={str(exported.folder)!r}, local_files_only=True)"), namespace)  # noqa: S102
    pipe = namespace["pipe"]
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert _same(load_model(str(evaluated_run)).generate(["a cat"], [0], steps=3)[0], theirs)

def test_card_parses_and_carries_metadata_method_paper_evaluation_and_caveats(evaluated_run, exported,
                                                                             tiny_pipeline_dir):  # fmt: skip
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard.load(exported.folder / "README.md")
    metadata = card.data.to_dict()
    # Local base: no Hub id to name, licence unknown -> the placeholder, and the user is told.
    assert metadata == {
        "library_name": "diffusers", "license": "other", "license_name": LICENSE_PLACEHOLDER,
        "pipeline_tag": "text-to-image", "tags": ["concept-erasure", "esd", "cat"],
    }  # fmt: skip
    assert ModelCardData(**metadata).to_dict() == metadata  # round-trips through huggingface_hub's schema
    # a --local-dir export is not on the Hub yet: the licence is to be set before publishing it
    assert any("licence is unknown: set `license` in README.md before publishing" in note for note in exported.notes)
    assert re.fullmatch(r"[a-z0-9.-]+", LICENSE_PLACEHOLDER)  # the Hub's license_name syntax

    text = card.text
    assert METHODS["esd"].paper.bibtex in text and '"cat" erased by **esd**' in text
    assert "`unet`" in text and "steps: 4" in text  # what changed, the resolved config
    # the base the evaluation compared with is the fixture's base, not the erased run
    assert f"the erased model and its base (`{tiny_pipeline_dir}`)" in text and str(evaluated_run) not in text
    # the parameters the run trained (the UNet's cross-attention, ESD-x), not the size of the UNet they are in
    manifest = json.loads((evaluated_run / "erasure.json").read_text())
    unet = load_model(str(evaluated_run)).unet
    trained = sum(p.numel() for name, p in unet.named_parameters() if ".attn2." in name)
    assert manifest["trainable_parameters"] == trained < sum(p.numel() for p in unet.parameters())
    assert f"({trained:,} trained parameters)" in text
    assert manifest["resumed"] is False and "resumed" not in text  # its time is the whole run's
    assert "toy model" not in text  # a local base, not the embedded digits
    report = json.loads((evaluated_run / "eval.json").read_text())
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    changes = 0
    for name, metric in report["concepts"]["cat"]["metrics"].items():
        row = next(r for r in rows if r.startswith(f"| {name} |"))
        if "before" in metric:
            # the change is after - before: a drop in the concept's presence reads as a negative change
            assert metric["difference"] == pytest.approx(metric["after"] - metric["before"])
            assert f"{metric['before']:.4g} → {metric['after']:.4g} ({metric['difference']:+.4g})" in row, name
            changes += metric["difference"] != 0
        if "images" in metric["settings"]:
            images = metric["settings"]["images"]  # a list for the two halves of before-vs-after metrics
            assert f"images: {', '.join(map(str, images)) if isinstance(images, list) else images}" in row, name
    assert changes  # a change whose sign could be read wrong
    assert "samples_per_prompt: 1" in text and "model digits-clip" in text  # the eval's own settings
    prompts = report["concepts"]["cat"]["prompts"]
    assert f"Target prompts: {'; '.join(prompts['target_prompts']['prompts'])}." in text
    assert f"Preserved prompts: {'; '.join(prompts['preserved_prompts']['prompts'])}." in text
    assert report["grids"]
    for grid in report["grids"].values():
        assert f"]({grid})" in text and (exported.folder / grid).is_file()  # embedded, and shipped
    assert "Erasure is not a guarantee" in text and "Adversarial robustness was not measured" in text
    assert "tiny-no-cat.safetensors" in text and "from_single_file" in text


def test_card_and_metrics_page_show_attack_results_and_every_warning(evaluated_run, tmp_path):
    from ui.metrics import HEADERS, eval_table

    report = json.loads((evaluated_run / "eval.json").read_text())
    metrics = report["concepts"]["cat"]["metrics"]
    # one seed per prompt: the before-vs-after KID has a value and warnings, which the value does not make moot
    kid = metrics["preserved_kid_before_vs_after"]
    assert kid["value"] is not None and "too noisy" in kid["warning"]
    # what `erasure eval --attack A --attack B` stores beside the metrics (erasure/evaluation.py)
    settings = {"steps": 2, "prompts": ["a cat"], "seeds": [1000, 1001]}
    embedding = {"attack": "embedding", "asr": 0.5, "present_before_attack": 0.25, "present_after_attack": 0.5,
                 "pairs": 4, "seconds_per_pair": 0.1, "per_pair": [], "settings": settings}  # fmt: skip
    inversion = {**embedding, "attack": "textual-inversion", "asr": 0.75, "present_after_attack": 0.75}
    report["concepts"]["cat"]["attacks"] = [embedding, inversion]
    run = replace(load_run(evaluated_run), report=report)
    card = render_card(run, REPO_ID, card_metadata(run)[0])
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    for name, metric in metrics.items():
        if metric.get("warning"):
            assert metric["warning"] in next(r for r in rows if r.startswith(f"| {name} |")), name
    measured = "50.0% of 4 (prompt, seed) pairs under the embedding attack (present before the attack: 25.0%)"
    inverted = "75.0% of 4 (prompt, seed) pairs under the textual-inversion attack (present before the attack: 25.0%)"
    attack_rows = [r for r in rows if r.startswith("| attack_success_rate |")]
    assert len(attack_rows) == 2 and measured in attack_rows[0] and inverted in attack_rows[1]
    assert "Adversarial robustness was not measured" not in card and f"cat: {measured}; cat: {inverted}" in card
    # a report of the first format (one attack, under "attack") reads as it did
    section = {k: v for k, v in report["concepts"]["cat"].items() if k != "attacks"}
    old = {**report, "format": "erasure-eval/1", "concepts": {"cat": {**section, "attack": embedding}}}
    old_card = render_card(replace(run, report=old), REPO_ID, card_metadata(run)[0])
    assert f"cat: {measured}." in old_card and inverted not in old_card

    # the page's table: every warning in its own column, and the attack's success rate
    page_run = tmp_path / "run"
    page_run.mkdir()
    (page_run / "erasure.json").write_bytes((evaluated_run / "erasure.json").read_bytes())
    kid["value"] = 3.2104e-05
    # an attack whose base reference showed the concept in half of its pairs: its rate needs that note beside it
    report["concepts"]["cat"]["attacks"][0] |= {"reference_shows_concept": 0.5, "asr_where_reference_shows": 1.0}
    (page_run / "eval.json").write_text(json.dumps(report))
    rows, _, message = eval_table(page_run)
    table = {row[1]: dict(zip(HEADERS, row)) for row in rows}
    assert message.endswith("seeds per prompt: 1")  # the evaluation drew one seed per prompt (the fixture's samples=1)
    pairs = {name: metric for name, metric in metrics.items() if "before" in metric}
    assert any(metric["before"] != metric["after"] for metric in pairs.values())
    for name, metric in pairs.items():  # each value in its own column, to four significant digits
        shown = [table[name][column] for column in ("before", "after", "difference")]
        assert shown == [float(f"{metric[column]:.4g}") for column in ("before", "after", "difference")], name
    assert table["preserved_kid_before_vs_after"]["warning"] == kid["warning"]
    assert table["preserved_kid_before_vs_after"]["after"] == 3.21e-05  # KID on CLIP features: not rounded to 0
    assert table["attack_success_rate (embedding, 4 pairs)"]["after"] == 0.5
    assert table["attack_success_rate (embedding, 4 pairs)"]["warning"] == (
        "the base model's reference shows the concept in 50.0% of the pairs; attack success over those: 100.0%")
    assert table["attack_success_rate (textual-inversion, 4 pairs)"]["warning"] is None
    assert table["attack_success_rate (textual-inversion, 4 pairs)"]["after"] == 0.75


def test_card_snippet_loads_the_exported_folder_and_draws_the_runs_image(evaluated_run, exported, in_tmp):
    snippet = _python_block((exported.folder / "README.md").read_text())
    exec(snippet.replace(f'"{REPO_ID}"', f'"{exported.folder}"'), {})  # the folder stands in for the Hub repo
    model = load_model(str(evaluated_run))  # the snippet uses the model's default steps and guidance
    assert _same(model.generate(["cat"], [0])[0], [Image.open(in_tmp / "sample.png")])


def test_a_hub_base_is_named_with_its_licence_and_its_changed_part_is_plug_and_play(evaluated_run):
    run = load_run(evaluated_run)
    base = {**run.manifest["base_model"], "spec": "CompVis/stable-diffusion-v1-4", "origin": "hub"}
    run = replace(run, manifest={**run.manifest, "base_model": base})
    metadata, notes = card_metadata(run)
    assert metadata["base_model"] == "CompVis/stable-diffusion-v1-4"
    assert metadata["license"] == "creativeml-openrail-m" and "license_name" not in metadata and notes == []
    card = render_card(run, REPO_ID, metadata)
    assert "from diffusers import UNet2DConditionModel" in card and 'subfolder="unet"' in card
    assert '"CompVis/stable-diffusion-v1-4", unet=unet' in card
    # with two changed parts, the base's pipeline with one of them would be half the erasure: no such snippet
    both = replace(run, manifest={**run.manifest, "changed_components": ["unet", "text_encoder"]})
    card = render_card(both, REPO_ID, metadata)
    assert "subfolder=" not in card and "plug-and-play" not in card and "DiffusionPipeline.from_pretrained" in card


def test_a_local_bases_licence_is_read_from_its_own_card(evaluated_run, tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# A base model\n")
    run = load_run(evaluated_run)
    base = {**run.manifest["base_model"], "path": str(tmp_path)}
    assert base["origin"] not in ("hub", "embedded")
    metadata, notes = card_metadata(replace(run, manifest={**run.manifest, "base_model": base}))
    assert metadata["license"] == "mit" and "license_name" not in metadata
    assert not [note for note in notes if "licence" in note]


def test_the_card_says_when_its_baseline_is_not_the_runs_base_and_escapes_pipes_in_its_tables(evaluated_run):
    run = load_run(evaluated_run)
    note = "the baseline measured here is not the exact base"
    assert run.report["baseline_matches_run"] is True
    assert note not in render_card(run, REPO_ID, card_metadata(run)[0])
    report = json.loads(json.dumps(run.report))
    report["baseline_matches_run"] = False
    name, metric = next(iter(report["concepts"]["cat"]["metrics"].items()))
    metric["settings"] = {**metric["settings"], "prompts": ["a cat | a dog"]}  # a prompt with the table's separator
    card = render_card(replace(run, report=report), REPO_ID, card_metadata(run)[0])
    assert note in card
    [row] = [line for line in card.splitlines() if line.startswith(f"| {name} |")]
    assert "prompts: a cat \\| a dog" in row and len(re.split(r"(?<!\\)\|", row)) == 5  # three cells


def test_a_lora_cards_snippet_loads_the_adapters_into_the_hub_base_it_names(evaluated_run):
    # The card's LoRA snippet is run as written: with a Hub base it must load that base (the adapters fit no other
    # model), and only a base with no Hub id leaves a placeholder for the reader to fill in.
    run = load_run(evaluated_run)
    hub = {**run.manifest["base_model"], "spec": "CompVis/stable-diffusion-v1-4", "origin": "hub"}
    on_hub = replace(run, manifest={**run.manifest, "base_model": hub})
    card = render_card(on_hub, REPO_ID, card_metadata(on_hub)[0], lora=True)
    snippet = ('DiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")\n'
               f'pipe.load_lora_weights("{REPO_ID}", adapter_name="erasure")')
    assert snippet in card
    local = render_card(run, REPO_ID, card_metadata(run)[0], lora=True)
    assert 'DiffusionPipeline.from_pretrained("BASE-MODEL")' in local and "CompVis" not in local


def test_gan_run_exports_its_generator_for_the_toolkits_loader(gan_run, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    result = export_run(gan_run, "me/digits-gan-no-seven", local_dir=tmp_path / "hub", no_eval=True)
    hub = result.folder
    assert sorted(_files(hub)) == ["README.md", "erasure.json", "erasure_model.json",
                                   "generator/generator.safetensors", "generator/generator_config.json"]  # fmt: skip
    assert (hub / "generator/generator.safetensors").read_bytes() == (gan_run / "generator.safetensors").read_bytes()
    ours = load_model(str(gan_run)).generate([0, 1, 2])
    assert _same(ours, load_model(str(hub)).generate([0, 1, 2]))
    assert not _same(ours, load_model("digits-gan").generate([0, 1, 2]))  # it is the run, not the base

    card = ModelCard.load(hub / "README.md")
    assert card.data.to_dict() == {
        "library_name": "pytorch", "license": "apache-2.0", "pipeline_tag": "unconditional-image-generation",
        "tags": ["concept-erasure", "text2unlearn", "seven"],
    }  # fmt: skip
    assert "This model was not evaluated" in card.text and "| metric |" not in card.text
    # its base is named as the embedded GAN it is, with the caveat of a toy model
    assert "`digits-gan`, the concept-erasure toolkit's embedded toy model (unconditional StyleGAN2" in card.text
    assert "The base is a toy model of small coloured digits" in card.text
    assert METHODS["text2unlearn"].paper.bibtex in card.text and result.notes == []
    monkeypatch.chdir(tmp_path)
    exec(_python_block(card.text).replace('"me/digits-gan-no-seven"', f'"{hub}"'), {})
    assert _same(ours[:1], [Image.open(tmp_path / "sample.png")])


# --- refusals: one line, exit code 2, nothing written --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["{gan}", "--local-dir", "{tmp}/hub"], "no eval.json"),
        (["{gan}", "--local-dir", "{tmp}/hub", "--no-eval", "--single-file"], "a gan run has no such form"),
        (["{run}", "--local-dir", "{tmp}/taken"], "already exists"),
        (["{run}", "--local-dir", "{tmp}/taken/note/hub"], "note is a file, not a folder"),
        (["{tiny}", "--local-dir", "{tmp}/hub"], "not an erased run folder"),
        (["{run}", "--repo-id", "not a repo id", "--local-dir", "{tmp}/hub"], "not a Hub repository id"),
        (["{run}", "--repo-id", "no-owner", "--local-dir", "{tmp}/hub"], "needs its owner: ORG/NAME"),
        (["{run}", "--local-dir", "{run}/hub"], "is inside the run"),  # its digest would then change
        (["{run}", "--local-dir", "{tiny}/hub"], "is inside the run's base model"),  # and the base's
    ],
)
def test_bad_export_gives_one_line_and_exit_code_2(args, message, evaluated_run, gan_run, tiny_pipeline_dir,
                                                   tmp_path, capsys):  # fmt: skip
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "note").write_text("a file")
    args = [a.format(gan=gan_run, run=evaluated_run, tiny=tiny_pipeline_dir, tmp=tmp_path) for a in args]
    if "--repo-id" not in args:
        args += ["--repo-id", REPO_ID]
    assert main(["export", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_an_out_of_range_lora_rank_is_refused_before_anything_is_written(evaluated_run, tmp_path, capsys):
    """A typo such as 100000 would exhaust the memory: the parser refuses it (exit 2, one line), and so does
    `export_run` from Python."""
    from pipelines import InputError

    with pytest.raises(SystemExit) as refused:
        main(["export", str(evaluated_run), "--repo-id", REPO_ID, "--local-dir", str(tmp_path / "hub"),
              "--as-lora", "100000"])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and len(lines) == 1, lines
    assert "--as-lora: must be between 1 and 1024, not 100000" in lines[0]
    with pytest.raises(InputError, match="--as-lora takes a rank between 1 and 1024, not 100000"):
        export_run(evaluated_run, REPO_ID, local_dir=tmp_path / "hub", as_lora=100000)
    assert not (tmp_path / "hub").exists()


def test_an_evaluation_of_other_weights_is_refused(evaluated_run, tiny_pipeline_dir, tmp_path):
    import shutil

    from pipelines import InputError

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    unet = "unet/diffusion_pytorch_model.safetensors"
    shutil.copyfile(tiny_pipeline_dir / unet, run / unet)  # the run's weights changed after `erasure eval`
    with pytest.raises(InputError, match="measured on other weights"):
        export_run(run, REPO_ID, local_dir=tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_a_report_written_elsewhere_keeps_its_grids_beside_it(evaluated_run, tmp_path):
    own = {p: p.read_bytes() for p in (evaluated_run / "grids").iterdir()}
    reports = tmp_path / "reports"  # not there yet: it is made, as `erase --out`'s parents are
    # (measured against another baseline than the run's base, here the run itself: --baseline wins over the manifest)
    report = run_eval(str(evaluated_run), samples=1, clip="digits-clip", progress=False, json_path=reports / "b.json",
                      baseline=str(evaluated_run))  # fmt: skip
    written = json.loads(report.read_text())
    assert written["before"]["sha256"] == written["after"]["sha256"] and written["baseline_matches_run"] is False
    grids = written["grids"]
    assert grids and all((reports / g).is_file() and g.startswith("b-grids/") for g in grids.values())
    assert {p: p.read_bytes() for p in (evaluated_run / "grids").iterdir()} == own  # the run's own are untouched


def test_an_evaluation_of_another_concept_is_refused(evaluated_run, tmp_path, caplog):
    import shutil

    from pipelines import InputError

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    with caplog.at_level("WARNING"):
        run_eval(str(run), concepts=["dog"], samples=1, clip="digits-clip", progress=False)  # the run erased "cat"
    assert "its results for cat (written 20" in caplog.text  # the report replaced is dated
    report = json.loads((run / "eval.json").read_text())
    assert {"created", "versions"} <= report.keys()
    # the grids of the replaced report's concept are gone: grids/ holds this report's, each with its digest
    assert sorted(p.name for p in (run / "grids").iterdir()) == sorted(Path(g).name for g in report["grids"].values())
    assert report["grid_sha256"].keys() == report["grids"].keys()
    with pytest.raises(InputError, match="does not measure the erased concept 'cat'"):
        export_run(run, REPO_ID, local_dir=tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_grids_that_are_not_the_reports_own_are_refused_by_export(evaluated_run, tmp_path):
    import shutil

    from pipelines import InputError

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    first, second = sorted(json.loads((run / "eval.json").read_text())["grids"].values())[:2]
    shutil.copyfile(run / second, run / first)  # as another evaluation, or one stopped between grids and report
    with pytest.raises(InputError, match="is not the grid .* was written with"):
        export_run(run, REPO_ID, local_dir=tmp_path / "hub")
    shutil.rmtree(run / "grids")
    (run / "grids").write_text("")  # refused before any image is drawn, not once they all are
    with pytest.raises(InputError, match="grids is a file"):
        run_eval(str(run), samples=1, clip="digits-clip", progress=False)


def test_a_second_evaluation_of_a_run_is_refused_while_one_writes_it(evaluated_run, tmp_path):
    """Two evaluations of one run would mix their grids and reports: while one runs (here a process holding what it
    holds), a second is refused before any model loads; a report written elsewhere is not held up."""
    import subprocess
    import sys

    from pipelines import InputError

    run = _copy_run(evaluated_run, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        before = (run / "eval.json").read_bytes()
        with pytest.raises(InputError, match=f"{run} is being evaluated by another process; wait for it to end"):
            run_eval(str(run), samples=1, clip="digits-clip", progress=False)
        assert (run / "eval.json").read_bytes() == before
        run_eval(str(run), samples=1, clip="digits-clip", progress=False, json_path=tmp_path / "elsewhere.json")
    finally:
        holder.communicate("")
    run_eval(str(run), samples=1, clip="digits-clip", progress=False)  # the holder has ended: the lock went with it


def test_an_evaluation_holds_its_run_against_another_evaluation(tmp_path):
    # both take the run's lock: a shared lock would let two evaluations write one run's grids and report at once
    from erasure.output import hold_exclusively
    from pipelines import InputError

    with hold_exclusively(tmp_path, "evaluated"):
        with pytest.raises(InputError, match="is being evaluated by another process"):
            with hold_exclusively(tmp_path, "evaluated"):
                pass
    with hold_exclusively(tmp_path, "evaluated"):  # released at the end of the first
        pass


def _copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.mark.parametrize("trap", ["grid outside", "grid absolute", "link outside"])
def test_a_run_folders_paths_and_links_out_of_it_are_refused(trap, evaluated_run, tmp_path, capsys):
    run = _copy_run(evaluated_run, tmp_path / "in")
    (tmp_path / "in" / "outside").mkdir()
    planted = tmp_path / "in" / "outside" / "secret.png"
    planted.write_bytes(b"a file of the machine")
    if trap == "link outside":  # a file the tokenizer loads, linked to a file of the machine
        (run / "tokenizer" / "tokenizer.json").unlink()
        (run / "tokenizer" / "tokenizer.json").symlink_to(planted)
    else:
        report = json.loads((run / "eval.json").read_text())
        report["grids"]["evil"] = "../outside/secret.png" if trap == "grid outside" else str(planted)
        (run / "eval.json").write_text(json.dumps(report))
    before = sorted(tmp_path.rglob("*"))
    assert main(["export", str(run), "--repo-id", REPO_ID, "--local-dir", str(tmp_path / "hub")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert ("leads to" if trap == "link outside" else "not in the run's grids/ folder") in lines[0]
    assert sorted(tmp_path.rglob("*")) == before and planted.read_bytes() == b"a file of the machine"


def test_a_downloaded_export_exports_again_through_its_links_to_the_caches_blobs(evaluated_run, exported, tmp_path):
    # huggingface_hub keeps a download as models--ORG--NAME/snapshots/REVISION/, whose files link to ../../blobs/:
    # those links stay in the repository's folder, so the snapshot is a run folder like any other
    repo = tmp_path / "models--me--tiny-no-cat"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in exported.folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        link = snapshot / file.relative_to(exported.folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    again = _files(export_run(snapshot, REPO_ID, local_dir=tmp_path / "again").folder)
    weights = {name: data for name, data in _files(exported.folder).items() if "/" in name and ".safetensors" in name}
    assert weights and {name: again[name] for name in weights} == weights


def test_only_the_files_a_component_loads_are_published(evaluated_run, tmp_path):
    run = _copy_run(evaluated_run, tmp_path)
    (run / "unet" / "notes.txt").write_text("not for the Hub")
    (run / "text_encoder" / "linked.txt").symlink_to(tmp_path / "outside.txt")
    (tmp_path / "outside.txt").write_text("a file of the machine")
    exported = export_run(run, REPO_ID, local_dir=tmp_path / "hub")
    assert "unet/notes.txt" not in exported.files and "text_encoder/linked.txt" not in exported.files
    assert sorted(f for f in exported.files if f.startswith(("unet/", "text_encoder/"))) == [
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    assert any("text_encoder/linked.txt, unet/notes.txt" in note for note in exported.notes)


def test_every_shard_of_a_sharded_component_is_published(evaluated_run, tmp_path):
    # transformers and diffusers save a large component (SDXL's and FLUX's text encoders, FLUX's transformer) as
    # shards and an index: a Hub folder without one of them cannot be loaded with from_pretrained
    from transformers import CLIPTextModel

    run = _copy_run(evaluated_run, tmp_path)
    encoder = CLIPTextModel.from_pretrained(run / "text_encoder")
    (run / "text_encoder" / "model.safetensors").unlink()
    encoder.save_pretrained(run / "text_encoder", max_shard_size="20KB")
    written = sorted(p.name for p in (run / "text_encoder").iterdir())
    assert "model.safetensors.index.json" in written and "model-00002-of-" in " ".join(written)
    hub = export_run(run, REPO_ID, local_dir=tmp_path / "hub", no_eval=True).folder
    assert sorted(p.name for p in (hub / "text_encoder").iterdir()) == written
    loaded = CLIPTextModel.from_pretrained(hub / "text_encoder").state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in encoder.state_dict().items())


def test_a_bare_repo_name_and_a_folder_in_the_base_model_are_refused(evaluated_run, tiny_pipeline_dir, tmp_path):
    # (the slow command-line test's cases, in this process) a bare NAME would be pushed into the pusher's namespace
    # under a card that names another repository; files written into the base's folder would change the base
    from pipelines import InputError

    with pytest.raises(InputError, match="needs its owner: ORG/NAME"):
        export_run(evaluated_run, "tiny-no-cat", local_dir=tmp_path / "hub")
    with pytest.raises(InputError, match="is inside the run's base model"):
        export_run(evaluated_run, REPO_ID, local_dir=tiny_pipeline_dir / "hub")
    assert not (tmp_path / "hub").exists() and not (tiny_pipeline_dir / "hub").exists()


# --- what the folder says it holds ----------------------------------------------------------------


def _as_evaluated(run: Path, evaluated_run: Path) -> Path:
    """`run` with the report `erasure eval` wrote for `evaluated_run` (its grids too), pinned to `run`'s weights: it
    stands in for evaluating `run` again (the figures are not what these tests check)."""
    import shutil

    report = json.loads((evaluated_run / "eval.json").read_text())
    report["after"] = {**report["after"], "spec": str(run), "path": str(run), "sha256": weights_digest(run)}
    (run / "eval.json").write_text(json.dumps(report))
    shutil.copytree(evaluated_run / "grids", run / "grids")
    return run


@pytest.mark.parametrize("save", ["changed", "lora"])
def test_a_partly_saved_runs_export_says_what_it_holds_and_exports_again(save, evaluated_run, tiny_pipeline_dir,
                                                                         tmp_path):  # fmt: skip
    from safetensors.torch import load_file

    sets = QUICK + (["lora_rank=2"] if save == "lora" else [])
    run = erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=sets, progress=False, save=save)
    unet = "unet/diffusion_pytorch_model.safetensors"
    if save == "changed":  # the same training as evaluated_run's: the same UNet, saved without the base's parts
        assert (run / unet).read_bytes() == (evaluated_run / unet).read_bytes()
    measured = weights_digest(_as_evaluated(run, evaluated_run))
    hub = export_run(run, REPO_ID, local_dir=tmp_path / "hub").folder

    manifest = json.loads((hub / "erasure.json").read_text())
    assert manifest["save"] == "full" and manifest["run_save"]["save"] == save  # whole components, and the run's way
    after = json.loads((hub / "eval.json").read_text())["after"]
    assert after["sha256"] == weights_digest(hub) != measured and after["measured_sha256"] == measured
    assert f"saved with --save {save}" in after["weights"][0]
    if save == "changed":  # the components it took from its base are named: all but the UNet it trained
        lent = after["weights"][0].split("which took ")[1].split(" from its base")[0].split(", ")
        assert "unet" not in lent and {"text_encoder", "vae", "tokenizer", "scheduler"} <= set(lent), lent
    assert after["weights"][0] in (hub / "README.md").read_text()
    if save == "lora":  # the merged UNet is, to the bit, the one the toolkit's loader gives the run (and eval)
        merged = load_file(str(hub / unet))
        loaded = load_model(str(run)).unet.state_dict()
        assert merged.keys() == loaded.keys() and all(torch.equal(merged[k], loaded[k]) for k in merged)

    again = export_run(hub, REPO_ID, local_dir=tmp_path / "again").folder  # the folder passes export's own checks
    assert json.loads((again / "eval.json").read_text())["after"] == after
    assert (again / "erasure.json").read_bytes() == (hub / "erasure.json").read_bytes()


def test_a_folder_exported_again_keeps_the_digest_erasure_eval_measured(evaluated_run, exported, tmp_path):
    # The --single-file folder's eval.json names that folder's digest (the single file in it); exported again without
    # the single file, the folder's digest changes again, and the weights `erasure eval` measured stay the run's.
    measured = json.loads((evaluated_run / "eval.json").read_text())["after"]["sha256"]
    first = json.loads((exported.folder / "eval.json").read_text())["after"]
    assert first["measured_sha256"] == measured != first["sha256"]
    again = export_run(exported.folder, REPO_ID, local_dir=tmp_path / "again").folder
    after = json.loads((again / "eval.json").read_text())["after"]
    assert after["sha256"] == weights_digest(again) != first["sha256"] and after["measured_sha256"] == measured


def test_a_reduced_lora_is_called_an_approximation_with_its_error(evaluated_run, tmp_path):
    first = export_run(evaluated_run, REPO_ID, local_dir=tmp_path / "hub", as_lora=1, lora_format="kohya")
    hub = first.folder
    reduction = json.loads((hub / "lora_reduction.json").read_text())
    assert reduction["relative_error"] > 0.01  # rank 1 leaves a visible error
    # the export's note gives the overall error and the worst layer's, each its own
    assert reduction["worst_layer_relative_error"] != reduction["relative_error"]
    assert (f"relative error {reduction['relative_error']:.4f}, worst layer "
            f"{reduction['worst_layer_relative_error']:.4f}") in " ".join(first.notes)  # fmt: skip
    # eval.json names the kohya file by the name it is written under, `<repo name>-lora.safetensors`
    kohya = [line for line in json.loads((hub / "eval.json").read_text())["after"]["weights"] if "kohya" in line]
    assert kohya == ["`tiny-no-cat-lora.safetensors`: `pytorch_lora_weights.safetensors` in the kohya layout, not "
                     "measured itself"] and (hub / "tiny-no-cat-lora.safetensors").is_file()  # fmt: skip
    for folder in (hub, export_run(hub, REPO_ID, local_dir=tmp_path / "again").folder):  # exported again too
        card = (folder / "README.md").read_text()
        assert "The erasure is also a LoRA" not in card and "approximates the erasure as a LoRA" in card
        assert f"relative error of {reduction['relative_error']:.4f}" in card
        # the file the card and eval.json cite for the error ships with it, exported again too
        assert json.loads((folder / "lora_reduction.json").read_text()) == reduction
        assert f"worst layer {reduction['worst_layer_relative_error']:.4f}" in card
        assert "measured on the\nfull weights of this repository, not on the LoRA" in card
        weights = json.loads((folder / "eval.json").read_text())["after"]["weights"]
        assert any("approximation" in line and "not measured" in line for line in weights)


def test_a_one_step_export_is_not_offered_to_diffusers_pipeline_and_refuses_kohya(tiny_pipeline_dir, tmp_path):
    from huggingface_hub import ModelCard

    from pipelines import InputError

    sets = ["steps=2", "batch_size=2", "forget_batch=1", "remain_prompts=8", "override=a dog", "prompt_templates={}",
            "lora_rank=2"]  # fmt: skip
    run = erase("sfd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=sets, progress=False)
    with pytest.raises(InputError, match="one-step generator") as refused:
        export_run(run, REPO_ID, local_dir=tmp_path / "kohya", no_eval=True, lora_format="kohya")
    assert "\n" not in str(refused.value) and not (tmp_path / "kohya").exists()

    hub = export_run(run, REPO_ID, local_dir=tmp_path / "hub", no_eval=True).folder
    card = ModelCard.load(hub / "README.md")
    # the Hub's diffusers snippet would be DiffusionPipeline.from_pretrained, which has no one-step pipeline
    assert card.data.to_dict()["library_name"] == "concept-erasure-toolkit"
    assert "`DiffusionPipeline.from_pretrained` does not" in card.text
    assert "pytorch_lora_weights.safetensors` holds the generator's change" in card.text and (
        hub / "pytorch_lora_weights.safetensors").is_file()  # fmt: skip


# --- an interrupted export leaves nothing behind ---------------------------------------------------


def test_an_export_removes_the_staging_folders_of_killed_exports_only(evaluated_run, tmp_path):
    killed = tmp_path / f".hub.staging-{dead_pid()}-k1ll3d"  # a SIGKILLed export's, gigabytes at SD size
    live = tmp_path / f".hub.staging-{os.getpid()}-l1ve"  # a concurrent export's, still being written
    other = tmp_path / f".hub2.staging-{dead_pid()}-x"  # another destination's
    for folder in (killed, live, other):
        folder.mkdir()
        (folder / "unet").mkdir()
    export_run(evaluated_run, REPO_ID, local_dir=tmp_path / "hub")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hub", live.name, other.name])


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_during_an_export_removes_its_staging_folder(evaluated_run, tmp_path, stop):
    """The export is forked at the point where its staging folder is half written, and stopped there by SIGTERM (a
    scheduler, `kill`) or SIGHUP (a closed terminal)."""
    import ui.hub

    ready, go = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: export, and wait for the signal halfway
        status = 0
        signal.signal(stop, signal.SIG_DFL)  # as a terminal starts a process (the suite may run under nohup)
        try:

            def half_written(*args, **kwargs):
                os.write(go, b"x")
                threading.Event().wait(60)

            ui.hub.write_hub_folder = half_written
            export_run(evaluated_run, REPO_ID, local_dir=tmp_path / "hub")
        except SystemExit as exc:
            status = exc.code
        except BaseException:
            status = 1
        os._exit(status)
    assert os.read(ready, 1) == b"x"
    assert [p.name for p in tmp_path.iterdir() if ".hub.staging-" in p.name]  # it is there, half written
    os.kill(pid, stop)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + stop  # as when the signal ends a process
    assert list(tmp_path.iterdir()) == []


# --- the push, against a local server that answers like the Hub -----------------------------------


class FakeHub(ThreadingHTTPServer):
    """The Hub endpoints that create_repo and upload_folder call: it answers that every file is a
    regular (non-LFS) upload, so contents arrive base64 in the commit's NDJSON, and records everything."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.created: list[dict] = []
        self.files: dict[str, bytes] = {}  # the repository's files, as commits leave them
        self.deleted: list[str] = []
        self.fail: dict[str, int] = {}  # route -> HTTP status to answer instead


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep the test output clean
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        hub = self.server
        hub.requests.append(("GET", self.path, self.headers.get("authorization")))
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/tree/main", self.path.split("?")[0]):  # the repository's files
            return self._reply(200, [{"type": "file", "path": path, "oid": "0" * 40, "size": len(data)}
                                     for path, data in hub.files.items()])  # fmt: skip
        self._reply(404, {"error": f"not served by the test hub: GET {self.path}"})

    def do_POST(self):
        hub = self.server
        hub.requests.append(("POST", self.path, self.headers.get("authorization")))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        path = self.path.split("?")[0]
        route = next((r for r in ("create", "validate-yaml", "preupload", "commit") if f"/{r}" in path), None)
        if route in hub.fail:
            return self._reply(hub.fail[route], {"error": f"the test hub fails {route}"})
        if path == "/api/repos/create":
            request = json.loads(body)
            hub.created.append(request)
            return self._reply(200, {"url": f"{hub.endpoint}/{request['organization']}/{request['name']}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/main", path):
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})  # fmt: skip
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/main", path):
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    hub.deleted.append(item["value"]["path"])
                    del hub.files[item["value"]["path"]]
            oid = "0" * 40
            return self._reply(200, {"commitUrl": f"{hub.endpoint}/{m.group(1)}/commit/{oid}", "commitOid": oid})
        self._reply(404, {"error": f"not served by the test hub: POST {path}"})


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()


def _cli(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """`erasure export` in a subprocess with its own HF_HOME and TMPDIR (huggingface_hub reads
    HF_ENDPOINT and HF_HUB_OFFLINE when imported)."""
    (tmp_path / "hf-home").mkdir(exist_ok=True)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    base.update(PYTHONPATH=str(REPO_ROOT), HF_HOME=str(tmp_path / "hf-home"), TMPDIR=str(tmp_path / "tmp"),
                HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost")  # fmt: skip
    base.update(env)
    return subprocess.run([sys.executable, "-m", "erasure", "export", *args], capture_output=True, text=True,
                          env=base, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_push_delivers_every_file_and_the_token_only_in_request_headers(evaluated_run, exported, fake_hub, tmp_path):
    token = f"hf_{secrets.token_hex(16)}"
    # The repository holds an earlier export's files: they go, .gitattributes (the Hub's own) stays.
    fake_hub.files = {".gitattributes": b"*.safetensors filter=lfs", "old-lora.safetensors": b"0", "README.md": b"x"}
    (tmp_path / "tmp" / f"erasure-export-{dead_pid()}-k1ll3d" / "repo").mkdir(parents=True)  # a killed push's
    result = _cli([str(evaluated_run), "--repo-id", REPO_ID, "--single-file", "--private"], tmp_path,
                  HF_ENDPOINT=fake_hub.endpoint, HF_TOKEN=token, HF_HUB_VERBOSITY="debug")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"pushed {len(exported.files)} files to {fake_hub.endpoint}/{REPO_ID}" in result.stdout
    # Every file of the folder that --local-dir writes arrives, with the same bytes, and nothing else stays.
    assert fake_hub.deleted == ["old-lora.safetensors"]
    assert fake_hub.files == {**_files(exported.folder), ".gitattributes": b"*.safetensors filter=lfs"}
    assert fake_hub.created == [{"name": "tiny-no-cat", "organization": "me", "visibility": "private"}]
    assert all(auth == f"Bearer {token}" for _, _, auth in fake_hub.requests)
    served = re.compile(r"/api/models/me/tiny-no-cat/tree/main(\?.*)?")
    assert not [r for r in fake_hub.requests if r[0] == "GET" and not served.fullmatch(r[1])]  # all served
    # The token is in no file (sent, local, temporary or cached) and in no line of output or debug log.
    assert "(authenticated: True)" in result.stderr  # huggingface_hub's debug log of each request is on
    assert token not in result.stdout + result.stderr
    assert not [n for n, data in fake_hub.files.items() if token.encode() in data]
    for root in (tmp_path, evaluated_run):
        assert not [p for p in root.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert not list((tmp_path / "tmp").glob("erasure-export-*"))  # the temporary Hub folder is gone


def test_a_push_asks_for_a_private_repository_only_with_private(fake_hub, tmp_path, monkeypatch):
    # Without --private the namespace's default visibility holds (an organisation's may be private): the push asks
    # for none, rather than for a public repository. In this process, the endpoint is huggingface_hub's setting.
    from huggingface_hub import constants

    from ui.hub import push

    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", f"hf_{secrets.token_hex(16)}")
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "erasure.json").write_text("{}")
    fake_hub.files = {"old-lora.safetensors": b"0"}  # an earlier export's file, which the card would not describe
    for private in (False, True):
        assert push(folder, REPO_ID, private=private, message="test") == f"{fake_hub.endpoint}/{REPO_ID}"
    assert fake_hub.created == [{"name": "tiny-no-cat", "organization": "me"},
                                {"name": "tiny-no-cat", "organization": "me", "visibility": "private"}]  # fmt: skip
    assert fake_hub.files == {"erasure.json": b"{}"} and fake_hub.deleted == ["old-lora.safetensors"]
    # a token without write access to the namespace is refused with 403: the same one line as a 401
    from pipelines import InputError

    fake_hub.fail["create"] = 403
    with pytest.raises(InputError, match=r"the Hub refused the token for me/tiny-no-cat \(HTTP 403\)"):
        push(folder, REPO_ID, private=False, message="test")


@pytest.mark.slow
@pytest.mark.parametrize(
    "route, status, code, message",
    [("commit", 400, 1, "the test hub fails commit"), ("create", 401, 2, "refused the token")],
)
def test_failed_push_is_one_line_and_leaves_nothing(route, status, code, message, evaluated_run, fake_hub, tmp_path):
    token = f"hf_{secrets.token_hex(16)}"
    fake_hub.fail[route] = status
    result = _cli([str(evaluated_run), "--repo-id", REPO_ID], tmp_path, HF_ENDPOINT=fake_hub.endpoint, HF_TOKEN=token)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and message in lines[0], result.stderr
    assert token not in result.stdout + result.stderr
    assert not list((tmp_path / "tmp").glob("erasure-export-*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "no Hugging Face token"),  # none in the environment, none stored in the empty HF_HOME
        ({"HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({"HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached"),
    ],
)
def test_push_without_token_or_network_fails_before_anything_is_built(env, message, evaluated_run, tmp_path):
    result = _cli([str(evaluated_run), "--repo-id", REPO_ID, "--single-file"], tmp_path, **env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not list((tmp_path / "tmp").glob("erasure-export-*"))
