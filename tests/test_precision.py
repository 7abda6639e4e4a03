"""`--dtype`: the weights' precision for generating (sample, eval, preview). `auto` is fp16 on a GPU and fp32 on
the CPU; a half-precision model draws what the float32 one draws, up to rounding; SDXL's VAE decodes in float32
where its config asks (as SDXL's pipeline does)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines import load_model
from pipelines.devices import resolve_dtype
from pipelines.errors import InputError

from .conftest import NeverSees, tiny_sdxl_components


def test_auto_is_half_on_a_gpu_and_float32_on_the_cpu():
    assert resolve_dtype("auto", "cuda:0") is torch.float16 and resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16 and resolve_dtype(None, "cpu") is torch.float32
    with pytest.raises(InputError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_fp16_on_the_cpu_is_said_once_to_be_slow_and_not_said_to_fail(tmp_path, capfd):
    from ui.cli import main

    assert main(["sample", "digits", "--prompt", "a red seven", "--n", "1", "--steps", "2", "--dtype", "fp16",
                 "--out", str(tmp_path / "s")]) == 0  # fmt: skip
    err = capfd.readouterr().err
    assert err.count("--dtype fp16 on the CPU works but is several times slower") == 1
    assert "cannot run with `cpu` device" not in err  # diffusers' warning, wrong since torch runs half on the CPU
    assert (tmp_path / "s" / "p0_s0.png").is_file()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_digits_model_draws_the_float32_images(dtype):
    full, half = load_model("digits"), load_model("digits", dtype=dtype)
    assert {p.dtype for name in ("unet", "text_encoder", "vae") for p in getattr(half, name).parameters()} == {dtype}
    # 10 sampling steps, not the model's 50: half precision on the CPU is slow, and rounding shows in fewer steps
    a = np.stack([np.asarray(im, float) for im in full.generate(["a red seven", "a blue two"], [0, 1], steps=10)[0]])
    b = np.stack([np.asarray(im, float) for im in half.generate(["a red seven", "a blue two"], [0, 1], steps=10)[0]])
    assert np.abs(a - b).mean() < 6  # pixel levels of 255: rounding, not another picture


def test_a_float32_component_swapped_into_a_half_precision_model_takes_the_models_precision(tiny_pipeline_dir):
    # a method's trained copy or a saved component is float32: left so, it meets a bfloat16 UNet
    from .conftest import tiny_text_encoder

    model = load_model(str(tiny_pipeline_dir), dtype=torch.bfloat16)
    model.replace("text_encoder", tiny_text_encoder(seed=7))
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.bfloat16}
    assert model.pipe.text_encoder is model.text_encoder


def test_sdxl_in_float16_decodes_its_vae_in_float32_and_keeps_it_half(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(tmp_path / "xl")
    full, half = load_model(str(tmp_path / "xl")), load_model(str(tmp_path / "xl"), dtype=torch.float16)
    assert half.vae.config.force_upcast and half.upcast_vae
    decode, seen = half.vae.decode, []

    def watched_decode(latents, *args, **kwargs):  # the real decode, noting the precision it runs in
        seen.append((latents.dtype, half.vae.dtype))
        return decode(latents, *args, **kwargs)

    half.vae.decode = watched_decode
    a = np.asarray(full.generate(["a cat"], [3], steps=3)[0][0], float)
    b = np.asarray(half.generate(["a cat"], [3], steps=3)[0][0], float)
    assert seen == [(torch.float32, torch.float32)] and half.vae.dtype == torch.float16
    assert np.abs(a - b).mean() < 6


def test_few_shot_encodes_its_images_through_a_float16_sdxl_vae_in_float32(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from pipelines.images import encode_latents

    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(tmp_path / "xl")
    full, half = load_model(str(tmp_path / "xl")), load_model(str(tmp_path / "xl"), dtype=torch.float16)
    encode, seen = half.vae.encode, []

    def watched_encode(pixels, *args, **kwargs):  # the real encode, noting the precision it runs in
        seen.append((pixels.dtype, half.vae.dtype))
        return encode(pixels, *args, **kwargs)

    half.vae.encode = watched_encode
    images = torch.rand(2, 3, 64, 64)
    a = encode_latents(full, images, torch.Generator().manual_seed(0))
    b = encode_latents(half, images, torch.Generator().manual_seed(0))
    assert seen == [(torch.float32, torch.float32)] and half.vae.dtype == torch.float16 and b.dtype == torch.float16
    torch.testing.assert_close(b.float(), a, atol=1e-2, rtol=1e-2)


def test_every_attack_runs_on_a_half_precision_model(tiny_pipeline_dir):
    """The attacks optimise their free words in float32 and run the model in its own precision."""
    from evaluators.attack import AttackSettings, attack_success_rate
    from evaluators.discrete_attack import DiscreteAttackSettings, discrete_attack
    from evaluators.inversion_attack import InversionSettings, inversion_attack

    # tiny components: bfloat16 on a CPU without native support for it is slow
    model = load_model(str(tiny_pipeline_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    prompts, seeds = ["a red cat"], [0, 1]
    embedding = attack_success_rate(model, model, NeverSees(), "cat", prompts, seeds, AttackSettings(steps=3))
    discrete = discrete_attack(model, model, NeverSees(), "cat", prompts, seeds,
                               DiscreteAttackSettings(tokens=2, steps=3, check_every=3))  # fmt: skip
    inversion = inversion_attack(model, model, NeverSees(), "cat", prompts, [0], InversionSettings(steps=3))
    for loss in (embedding["loss"]["last"], discrete["objective"]["end"], inversion["loss"]["last"]):
        assert np.isfinite(loss) and loss > 0


def test_sample_and_eval_take_dtype_and_eval_records_it(tmp_path):
    from erasure.evaluation import run_eval
    from erasure.sampling import sample

    # bfloat16 on a CPU without native support for it is slow: a few steps, one prompt of each kind
    grid = sample("digits", ["a red seven"], n=2, seed=0, out=tmp_path / "grid.png", steps=3, dtype="bf16")
    assert grid.is_file()
    (tmp_path / "target.txt").write_text("a red seven\n")
    (tmp_path / "preserved.txt").write_text("a blue two\n")
    path = run_eval("digits", concepts=["seven"], baseline="digits", json_path=tmp_path / "e.json", samples=1,
                    prompts_file=tmp_path / "target.txt", preserved_prompts_file=tmp_path / "preserved.txt",
                    dtype="bf16", progress=False)  # fmt: skip
    assert json.loads(path.read_text())["settings"]["dtype"] == "bf16"
    with pytest.raises(InputError, match="unknown dtype"):
        sample("digits", ["a seven"], n=1, seed=0, out=tmp_path / "x.png", dtype="half")
    assert not (tmp_path / "x.png").exists()
