"""`benchmarks/gpu_scale.py`, the prepared script of the GPU checks (issues 39, 40): it builds each family at real
size from the shipped configs, and runs end to end on toy components, so that device minutes are not spent on
a script that breaks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_scale.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("family", "pipeline", "millions"), [
    ("sd1", "StableDiffusionPipeline", {"unet": 860, "text_encoder": 123, "vae": 84}),
    ("sd2", "StableDiffusionPipeline", {"unet": 866, "text_encoder": 340, "vae": 84}),
    ("sdxl", "StableDiffusionXLPipeline", {"unet": 2567, "text_encoder": 123, "text_encoder_2": 695, "vae": 84}),
    ("flux", "FluxPipeline", {"transformer": 11901, "text_encoder": 123, "text_encoder_2": 4762, "vae": 84}),
])  # fmt: skip
def test_the_script_builds_each_family_at_its_real_size(family, pipeline, millions):
    pipe = _script().build_pipeline(family, "meta", seed=0)  # shapes only: no memory, no time
    assert type(pipe).__name__ == pipeline
    counts = {name: round(sum(p.numel() for p in part.parameters()) / 1e6)
              for name, part in pipe.components.items() if hasattr(part, "parameters")}  # fmt: skip
    assert counts == millions


@pytest.mark.parametrize("method", sorted(_script().METHOD_SETTINGS))
def test_each_methods_settings_in_the_script_are_settings_of_that_method(method, tmp_path):
    from PIL import Image

    from erasure.config import build_config, parse_sets

    family = "stylegan2" if method == "adapt-unlearn" else "sd1"
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    sets = [s.format(images=tmp_path / "images", steps=2) for s in _script().METHOD_SETTINGS[method]]
    build_config(method, family, parse_sets(sets))  # an unknown key or a value out of bounds raises InputError


@pytest.mark.slow
def test_the_script_runs_end_to_end_on_a_tiny_sdxl(tmp_path):
    command = [sys.executable, str(SCRIPT), "--family", "sdxl", "--tiny", "--device", "cpu", "--steps", "3",
               "--methods", "esd,sfd+lora_rank=2", "--batch", "2", "--sample-steps", "2",
               "--scratch", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.rindex("\n{\n") + 1 :])
    assert report["sample"]["toolkit_images_per_s"] > 0 and report["sample"]["plain_diffusers_images_per_s"] > 0
    for method in ("esd", "sfd+lora_rank=2"):  # AdvUnlearn on SDXL: tests/test_sdxl.py
        assert report["erase"][method]["steps_timed"] == 2 and report["erase"][method]["s_per_step_median"] > 0
        assert report["erase"][method]["peak_rss_gb"] > 0
    lora = json.loads((Path(report["erase"]["sfd+lora_rank=2"]["run"]) / "erasure.json").read_text())["lora"]
    assert lora["rank"] == 2 and lora["components"] == ["unet"]  # the setting after "+" reached the method
    assert report["single_file"]["unet_bit_identical"] is True


@pytest.mark.slow
def test_the_script_runs_end_to_end_on_a_tiny_flux(tmp_path):
    """FLUX: sampling against plain `FluxPipeline` at the same size and T5 length, and the family's ESD preset (a
    LoRA, kept as `--save lora`)."""
    command = [sys.executable, str(SCRIPT), "--family", "flux", "--tiny", "--device", "cpu", "--methods", "esd",
               "--steps", "3", "--batch", "2", "--sample-steps", "2", "--scratch", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.rindex("\n{\n") + 1 :])
    assert report["sample"]["plain_class"] == "FluxPipeline" and report["sample"]["toolkit_images_per_s"] > 0
    assert report["erase"]["esd"]["steps_timed"] == 2 and "single_file" not in report
    run = Path(report["erase"]["esd"]["run"])
    assert json.loads((run / "erasure.json").read_text())["lora"]["rank"] == 8 and not (run / "transformer").exists()


@pytest.mark.slow
def test_the_gan_script_runs_adapt_then_unlearn_with_run_options(tmp_path):
    """`benchmarks/gan_scale.py` (Adapt-then-Unlearn's memory at StyleGAN2 size) on a 16-px GAN: a run option
    after "+" reaches the run, not the method's config."""
    script = SCRIPT.parent / "gan_scale.py"
    command = [sys.executable, str(script), "--tiny", "--device", "cpu", "--steps", "2",
               "--methods", "adapt-unlearn,adapt-unlearn+mixed_precision=bf16", "--scratch", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.rindex("\n{\n") + 1 :])
    assert report["size"] == 16 and report["generator_m"] > 0 and report["discriminator_m"] > 0
    for variant in ("adapt-unlearn", "adapt-unlearn+mixed_precision=bf16"):
        figures = report["erase"][variant]
        # the registry's test settings adapt two models: 2 + 2 adaptation steps, 2 unlearning steps, 5 gaps timed
        assert figures["steps_timed"] == 5 and figures["s_per_step_median"] > 0 and figures["peak_rss_gb"] > 0
        manifest = json.loads((Path(figures["run"]) / "erasure.json").read_text())
        assert manifest["config"]["adapt_steps"] == 2 and manifest["config"]["steps"] == 2
        assert manifest["mixed_precision"] == ("bf16" if "bf16" in variant else "no")


def test_the_device_session_script_time_boxes_its_parts(tmp_path):
    """`benchmarks/device_session.sh` (the prepared commands of a session lent a GPU), checked on toy components:
    a part's JSON and its line in parts.jsonl; an unknown part is refused."""
    script = SCRIPT.parent / "device_session.sh"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEVICE_SESSION_TINY": "1", "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(script), "gan"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [json.loads(text) for text in (tmp_path / "parts.jsonl").read_text().splitlines()]
    assert line["part"] == "gan" and line["exit"] == 0
    output = (tmp_path / "gan.json").read_text()
    report = json.loads(output[output.rindex("\n{\n") + 1 :])
    assert set(report["erase"]) == {"adapt-unlearn", "adapt-unlearn+micro_batch=4"}
    assert all("error" not in figures for figures in report["erase"].values())
    refused = subprocess.run(["bash", str(script), "sd3"], capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 2 and "unknown part sd3" in refused.stderr
