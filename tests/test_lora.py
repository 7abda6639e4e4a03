"""LoRA erasures (`--set lora_rank=R`): each method that trains a UNet or text encoder trains peft adapters on its
scope instead; the run holds them as the standard diffusers LoRA file, which plain diffusers' `load_lora_weights`
applies to the base model's pipeline to draw the toolkit's own images of the run; `--save lora` keeps that file
alone; a killed LoRA run resumes to the uninterrupted adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from erasure.api import erase
from erasure.registry import METHODS
from pipelines import load_model
from pipelines.errors import InputError

from .conftest import record_esd_targets, tiny_sdxl_components


def _sets(key: str, images: Path, **extra) -> list[str]:
    settings = {**METHODS[key].test_settings, **extra}
    if key == "fewshot":
        settings.update(images=str(images), stop_below=None)
    return [f"{k}={'none' if v is None else v}" for k, v in settings.items()]


def _plain_draw(pipeline_class, base: Path, run: Path) -> np.ndarray:
    pipe = pipeline_class.from_pretrained(base)
    pipe.load_lora_weights(str(run))  # diffusers' own loader, the standard file name
    image = pipe("a cat", num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(7))
    return np.asarray(image.images[0], float)


def _toolkit_draw(model_path) -> np.ndarray:
    return np.asarray(load_model(str(model_path)).generate(["a cat"], [7], steps=4, guidance=5.0)[0][0], float)


@pytest.mark.parametrize(("key", "component"), [("esd", "unet"), ("advunlearn", "text_encoder"),
                                                ("fewshot", "text_encoder"), ("stereo", "unet")])  # fmt: skip
def test_a_lora_run_loads_in_plain_diffusers_and_draws_the_toolkit_images(key, component, tiny_pipeline_dir,
                                                                          concept_images, tmp_path):  # fmt: skip
    from diffusers import StableDiffusionPipeline

    run = erase(key, ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", progress=False,
                sets=_sets(key, concept_images, lora_rank=4, lora_alpha=8, lr=1e-2))  # fmt: skip
    manifest = json.loads((run / "erasure.json").read_text())
    lora = manifest["lora"]
    assert lora["components"] == [component] and lora["rank"] == 4 and lora["alpha"] == 8
    assert lora["parameters"] == manifest["trainable_parameters"] > 0  # only the adapters trained
    with safe_open(str(run / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, settings = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    # The standard names (CLIP's under `text_model.`, as ComfyUI and transformers < 5.6 expect), and only the
    # LoraConfig fields every peft release takes
    assert keys and all(k.startswith("text_encoder.text_model." if component == "text_encoder" else "unet.")
                        for k in keys)  # fmt: skip
    assert {k.split(".", 1)[1] for k in settings} == {"r", "lora_alpha", "target_modules"}
    ours = _toolkit_draw(run)
    assert np.abs(_plain_draw(StableDiffusionPipeline, tiny_pipeline_dir, run) - ours).max() <= 1
    assert np.abs(_toolkit_draw(tiny_pipeline_dir) - ours).max() > 1  # the adapters changed the picture


def test_an_esd_lora_run_aims_at_the_base_models_predictions_at_every_step(tiny_model, tiny_pipeline_dir,
                                                                          monkeypatch):  # fmt: skip
    """Under LoRA the frozen original is the trained UNet with its adapters switched off: every step's eps(empty) and
    eps(concept) are the base UNet's, not a target that moves with the adapters it trains."""
    from erasure.config import build_config
    from erasure.training import RunContext

    family = tiny_model.family
    targets = record_esd_targets(family, monkeypatch)
    config = build_config("esd", family, {**METHODS["esd"].test_settings, "lora_rank": 4, "lr": 1e-2})
    erased = METHODS["esd"].entry(tiny_model, ["a cat"], config, RunContext(seed=0, progress=False)).model
    monkeypatch.undo()
    base = load_model(str(tiny_pipeline_dir)).unet
    assert len(targets) == config.steps
    with torch.no_grad():
        for step in targets:
            for eps, x_t, t, cond in step:
                torch.testing.assert_close(family.denoise(base, x_t, t, cond), eps, rtol=0, atol=1e-6)
        # and the adapters did change the UNet's prediction by then, so the check above could fail
        x_t, t, cond = targets[-1][1][1:]
        assert (family.denoise(erased.unet, x_t, t, cond) - family.denoise(base, x_t, t, cond)).abs().max() > 1e-4


def test_an_sdxl_lora_run_adapts_both_text_encoders(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(tmp_path / "xl")
    run = erase("advunlearn", ["a cat"], str(tmp_path / "xl"), out=tmp_path / "run", progress=False,
                sets=_sets("advunlearn", tmp_path, lora_rank=2))  # fmt: skip
    assert json.loads((run / "erasure.json").read_text())["lora"]["components"] == ["text_encoder", "text_encoder_2"]
    assert np.abs(_plain_draw(StableDiffusionXLPipeline, tmp_path / "xl", run) - _toolkit_draw(run)).max() <= 1


def test_save_lora_keeps_the_adapters_alone_and_loads_as_the_full_run(tiny_pipeline_dir, tmp_path):
    sets = _sets("esd", tmp_path, lora_rank=4)
    full = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "full", progress=False, sets=sets)
    small = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "small", progress=False, sets=sets,
                  save="lora")  # fmt: skip
    assert not (small / "unet").exists() and (small / "pytorch_lora_weights.safetensors").is_file()
    from safetensors.torch import load_file

    a, b = (load_file(str(run / "pytorch_lora_weights.safetensors")) for run in (full, small))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same seed: the same adapters
    assert np.abs(_toolkit_draw(small) - _toolkit_draw(full)).max() <= 1
    # every component is the base's: the run lends them, the adapters are merged in at load
    assert json.loads((small / "erasure.json").read_text())["save"] == "lora"
    # Exported, it is the erased model for plain `from_pretrained` (the adapters merged into its UNet) and for the
    # toolkit, and the adapter file for the base's `load_lora_weights`.
    from diffusers import StableDiffusionPipeline

    from ui.hub import export_run

    hub = export_run(small, "someone/small", local_dir=tmp_path / "hub", no_eval=True).folder
    assert all(p.stat().st_nlink == 1 for p in hub.rglob("*") if p.is_file())  # copies: no file shared with the base
    pipe = StableDiffusionPipeline.from_pretrained(hub)
    plain = pipe("a cat", num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(7))
    assert np.abs(np.asarray(plain.images[0], float) - _toolkit_draw(small)).max() <= 1
    assert np.abs(_toolkit_draw(hub) - _toolkit_draw(small)).max() <= 1
    assert np.abs(_plain_draw(StableDiffusionPipeline, tiny_pipeline_dir, hub) - _toolkit_draw(small)).max() <= 1


@pytest.mark.parametrize(("sets", "save", "says"), [
    (["steps=2"], "lora", "--save lora keeps a run's LoRA adapters"),
    (["lora_alpha=4"], "full", "need lora_rank > 0"),
    (["lora_rank=-1"], "full", "lora_rank"),
    (["lora_rank=4", "lora_targets=no_such_layer"], "full", "match no Linear or Conv2d layer"),
])  # fmt: skip
def test_lora_settings_that_cannot_work_are_refused_in_one_line(sets, save, says, tiny_pipeline_dir, tmp_path):
    with pytest.raises(InputError, match=says) as refused:
        erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", progress=False, sets=sets, save=save)
    assert "\n" not in str(refused.value) and not (tmp_path / "run").exists()


def test_lora_targets_narrow_the_scope_to_the_named_layers(tiny_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    run = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", progress=False,
                sets=_sets("esd", tmp_path, lora_rank=2, lora_targets="to_k,to_v"))  # fmt: skip
    keys = load_file(str(run / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in keys)  # ESD-x's scope, then k and v


@pytest.mark.slow
def test_a_killed_lora_run_resumes_to_the_uninterrupted_adapters(tiny_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    sets = _sets("esd", tmp_path, lora_rank=4)
    straight = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "straight", sets=sets,
                     checkpoint_every=1, progress=False)  # fmt: skip
    script = Path(__file__).with_name("erase_run.py")
    command = [sys.executable, str(script), "esd", str(tiny_pipeline_dir), "a cat", str(tmp_path / "killed"),
               "--kill-after", "2", *sets]  # fmt: skip
    killed = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(script.parent.parent)},
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "killed", sets=sets,
                    checkpoint_every=1, resume=True, progress=False)  # fmt: skip
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_lora_erasures_stack_in_one_pipeline_with_strengths(tiny_pipeline_dir, tmp_path):
    """benchmarks/lora_stack.py's stacking: both runs' files in one base pipeline (plain `load_lora_weights`,
    `set_adapters`); strength 0 switches an erasure off, 1 and 1 apply both."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lora_stack", Path(__file__).parent.parent / "benchmarks" /
                                                  "lora_stack.py")  # fmt: skip
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    runs = [erase("esd", [concept], str(tiny_pipeline_dir), out=tmp_path / concept, progress=False,
                  sets=_sets("esd", tmp_path, lora_rank=4)) for concept in ("a cat", "a dog")]  # fmt: skip

    def draw(model):
        return np.asarray(model.generate(["a cat"], [7], steps=4, guidance=5.0)[0][0], float)

    first_only = draw(stack.stacked(str(tiny_pipeline_dir), runs, [1.0, 0.0]))
    assert np.abs(first_only - _toolkit_draw(runs[0])).max() <= 1
    both = draw(stack.stacked(str(tiny_pipeline_dir), runs, [1.0, 1.0]))
    assert np.abs(both - first_only).max() > 1 and np.abs(both - _toolkit_draw(runs[1])).max() > 1


def test_a_full_weight_run_reduces_to_a_lora_by_svd_with_its_error(tiny_pipeline_dir, tmp_path):
    """`export --as-lora R`: the change of every Linear / Conv2d weight cut to rank R. At a rank no layer exceeds
    the reduction is exact and plain `load_lora_weights` draws the run (ESD-x: only the cross-attention's output
    biases are left out, a pixel level at most); at rank 1 its error is reported."""
    from diffusers import StableDiffusionPipeline

    from ui.hub import export_run

    run = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", progress=False,
                sets=_sets("esd", tmp_path))  # fmt: skip
    exact = export_run(run, "someone/exact", local_dir=tmp_path / "exact", no_eval=True, as_lora=64)
    report = json.loads((exact.folder / "lora_reduction.json").read_text())
    assert report["relative_error"] < 1e-5 and any("relative error" in n for n in exact.notes)
    # the to_out bias of each cross-attention, which ESD-x also moved, kept apart (and no tensor that did not move)
    attn2 = sum(name.endswith(".attn2") for name, _ in load_model(str(run)).unet.named_modules())
    assert report["changed_tensors_left_out"] == attn2 > 0
    rough = export_run(run, "someone/rough", local_dir=tmp_path / "rough", no_eval=True, as_lora=1)
    assert json.loads((rough.folder / "lora_reduction.json").read_text())["relative_error"] > 0.05
    plain = _plain_draw(StableDiffusionPipeline, tiny_pipeline_dir, exact.folder)
    assert np.abs(plain - _toolkit_draw(run)).max() <= 2 and np.abs(plain - _toolkit_draw(tiny_pipeline_dir)).max() > 2
    with pytest.raises(InputError, match="trained as LoRA adapters"):
        lora_run = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "lora", progress=False,
                         sets=_sets("esd", tmp_path, lora_rank=2))  # fmt: skip
        export_run(lora_run, "someone/x", local_dir=tmp_path / "x", no_eval=True, as_lora=2)


def _kohya_draw(pipeline_class, base: Path, folder: Path, file: str) -> np.ndarray:
    pipe = pipeline_class.from_pretrained(base)
    pipe.load_lora_weights(str(folder), weight_name=file)  # a non-diffusers file: diffusers' converter reads it
    image = pipe("a cat", num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(7))
    return np.asarray(image.images[0], float)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_export_loads_back_through_diffusers_converter(family, tiny_pipeline_dir, tmp_path):
    """`export --lora-format kohya`: the UNet's adapters (ESD, every layer: attention, convolutions, SDXL's added
    embedding under its SGM name) and the text encoders' (AdvUnlearn: SDXL's two as te1 / te2) in the kohya
    layout; plain diffusers' `load_lora_weights` converts the file and draws the toolkit's image of the run."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    from ui.hub import export_run

    if family == "sdxl":
        pipeline_class, base = StableDiffusionXLPipeline, tmp_path / "xl"
        pipeline_class(**tiny_sdxl_components()).save_pretrained(base)
    else:
        pipeline_class, base = StableDiffusionPipeline, tiny_pipeline_dir
    for key, extra in [("esd", {"scope": "full", "lr": 1e-2}), ("advunlearn", {"lora_alpha": 8})]:
        run = erase(key, ["a cat"], str(base), out=tmp_path / key, progress=False,
                    sets=_sets(key, tmp_path, lora_rank=2, **extra))  # fmt: skip
        exported = export_run(run, f"someone/{key}", local_dir=tmp_path / f"hub-{key}", no_eval=True,
                              lora_format="kohya")  # fmt: skip
        file = f"{key}-lora.safetensors"
        assert {file, "pytorch_lora_weights.safetensors"} <= set(exported.files)
        with safe_open(str(exported.folder / file), "pt") as f:
            names = list(f.keys())
        assert all(n.startswith(("lora_unet_", "lora_te")) for n in names)
        if family == "sdxl" and key == "esd":
            assert any(n.startswith("lora_unet_label_emb_0_0.") for n in names)  # SGM names
            assert any(n.startswith("lora_unet_input_blocks_") for n in names)
        if family == "sdxl" and key == "advunlearn":
            assert {n.split("_text_model")[0] for n in names} == {"lora_te1", "lora_te2"}
        ours = _toolkit_draw(run)
        assert np.abs(_kohya_draw(pipeline_class, base, exported.folder, file) - ours).max() <= 1
        assert np.abs(_toolkit_draw(base) - ours).max() > 1
        card = (exported.folder / "README.md").read_text()
        assert "load_lora_weights" in card and file in card


def test_kohya_export_of_a_reduced_full_weight_run_and_its_refusal(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ui.hub import export_run

    run = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", progress=False,
                sets=_sets("esd", tmp_path))  # fmt: skip
    with pytest.raises(InputError, match="not trained as one"):
        export_run(run, "someone/x", local_dir=tmp_path / "x", no_eval=True, lora_format="kohya")
    assert not (tmp_path / "x").exists()
    exported = export_run(run, "someone/reduced", local_dir=tmp_path / "reduced", no_eval=True, as_lora=64,
                          lora_format="kohya")  # fmt: skip
    # an SD file is in the kohya layout A1111 and ComfyUI load, not FLUX's, which A1111 does not
    card = (exported.folder / "README.md").read_text()
    assert "`reduced-lora.safetensors` is the same LoRA in the kohya layout, which A1111 and ComfyUI load" in card
    assert "FLUX" not in card
    kohya = _kohya_draw(StableDiffusionPipeline, tiny_pipeline_dir, exported.folder, "reduced-lora.safetensors")
    plain = _plain_draw(StableDiffusionPipeline, tiny_pipeline_dir, exported.folder)
    assert np.abs(kohya - plain).max() <= 1


def test_sample_draws_a_lora_run_at_a_strength(tiny_pipeline_dir, tmp_path, capsys):
    """`erasure sample RUN --lora-strength W`: 0 is the base model's image, 1 the run's; a full-weight run or a
    strength outside [0, 2] is refused in one line."""
    from PIL import Image

    from ui.cli import main

    run = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", progress=False,
                sets=_sets("esd", tmp_path, lora_rank=4, lr=1e-2))  # fmt: skip
    full = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "full", progress=False,
                 sets=_sets("esd", tmp_path))  # fmt: skip

    def sample(model, *extra):  # in this process: each `erasure sample` subprocess would cost its imports
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        capsys.readouterr()
        try:
            code = main(["sample", str(model), "--prompt", "a cat", "--n", "1", "--steps", "4", "--out", str(out),
                         *extra])  # fmt: skip
        except SystemExit as refused:  # argparse's refusal of a value
            code = refused.code
        return code, capsys.readouterr().err, (np.asarray(Image.open(out), float) if out.exists() else None)

    base, erased = sample(tiny_pipeline_dir)[2], sample(run)[2]
    assert np.abs(sample(run, "--lora-strength", "0")[2] - base).max() == 0
    assert np.abs(sample(run, "--lora-strength", "1")[2] - erased).max() <= 1
    for model, strength, message in [(full, "0.5", "not trained as LoRA"), (run, "3", "between 0 and 2")]:
        code, err, image = sample(model, "--lora-strength", strength)
        assert code != 0 and image is None and message in err.strip().splitlines()[-1]


def test_a_reductions_reported_error_is_the_relative_frobenius_error_of_its_adapters(tiny_pipeline_dir, tmp_path):
    # `export --as-lora` tells the card's reader how far the LoRA is from the run: the error it reports must be
    # ||dW - B A|| / ||dW|| over every reduced layer (and the worst layer's on its own), recomputed here from the
    # adapters and the two models' weights; a squared or unnormalised figure would understate it.
    from erasure.lora import reduce_to_lora

    run = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", progress=False,
                sets=_sets("esd", tmp_path))  # fmt: skip
    adapters, report = reduce_to_lora(run, 1)
    ours = dict(load_model(str(run)).unet.named_modules())
    base = dict(load_model(str(tiny_pipeline_dir)).unet.named_modules())
    errors, changes = [], []
    for key, a in adapters["unet"].items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            delta = (ours[name].weight - base[name].weight).detach().double().flatten(1)
            b = adapters["unet"][f"{name}.lora_B.weight"].double().flatten(1)
            errors.append((delta - b @ a.double().flatten(1)).pow(2).sum().item())
            changes.append(delta.pow(2).sum().item())
    assert report["rank"] == 1 and len(errors) > 1
    assert report["relative_error"] == pytest.approx((sum(errors) / sum(changes)) ** 0.5, abs=2e-6)
    worst = max((e / c) ** 0.5 for e, c in zip(errors, changes))
    assert report["worst_layer_relative_error"] == pytest.approx(worst, abs=2e-6)
    assert 0 < report["relative_error"] <= report["worst_layer_relative_error"] < 1


def test_kohya_files_name_sd1s_text_encoder_lora_te_and_fluxs_clip_lora_te1_as_sd_scripts_does(tmp_path):
    # sd-scripts names SD 1.x's one text encoder `lora_te_` and keeps `lora_te1_` / `lora_te2_` for SDXL's two; UIs
    # key on those prefixes by architecture, and diffusers' converter, which reads either for SD 1.x, cannot tell
    # them apart. The UNet keeps its diffusers module names, and alpha is the one the adapters were trained at. FLUX's
    # CLIP, beside its T5, is `lora_te1_` in sd-scripts' FLUX layout (lora_flux.py), as SDXL's first encoder is.
    from diffusers import FluxPipeline, StableDiffusionPipeline

    from pipelines.families import FAMILIES
    from pipelines.kohya import kohya_state
    from pipelines.lora_files import LORA_FILE

    generator = torch.Generator().manual_seed(0)
    text = "text_model.encoder.layers.0.self_attn.q_proj"
    unet = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    text_layers = {f"{text}.lora_A.weight": torch.randn(2, 16, generator=generator),
                   f"{text}.lora_B.weight": torch.randn(16, 2, generator=generator)}  # fmt: skip
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, text_encoder_lora_layers=text_layers,
        unet_lora_layers={f"{unet}.lora_A.weight": torch.randn(2, 16, generator=generator),
                          f"{unet}.lora_B.weight": torch.randn(8, 2, generator=generator)},
        text_encoder_lora_adapter_metadata={"r": 2, "lora_alpha": 4},
        unet_lora_adapter_metadata={"r": 2, "lora_alpha": 4},
    )  # fmt: skip
    state = kohya_state(tmp_path / LORA_FILE, FAMILIES["sd1"])
    names = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj",
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"}  # fmt: skip
    parts = ("lora_down.weight", "lora_up.weight", "alpha")
    assert set(state) == {f"{name}.{part}" for name in names for part in parts}
    assert all(state[f"{name}.alpha"].item() == 4 for name in names)
    FluxPipeline.save_lora_weights(tmp_path / "flux", text_encoder_lora_layers=text_layers,
                                   text_encoder_lora_adapter_metadata={"r": 2, "lora_alpha": 4})  # fmt: skip
    flux = kohya_state(tmp_path / "flux" / LORA_FILE, FAMILIES["flux"])
    assert set(flux) == {f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{part}" for part in parts}
