"""Every text-to-image method on a tiny real Stable Diffusion 2.x model: an OpenCLIP-style text tower (GELU,
"!" padding) and a v-prediction scheduler. Each run changes only its component and loads with plain
`StableDiffusionPipeline`, which draws the toolkit's pixels; SFD distils the v-prediction teacher into a
one-step generator that the README's plain-diffusers recipe reproduces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from erasure.api import erase
from erasure.registry import METHODS
from pipelines import load_model

from .conftest import tiny_components


@pytest.fixture(scope="module")
def tiny_sd2_dir(tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from pipelines.tokenizer import clip_tokenizer

    parts = tiny_components(seed=1)
    config = parts["text_encoder"].config
    config.hidden_act = "gelu"
    torch.manual_seed(1)
    parts["text_encoder"] = CLIPTextModel(config)
    parts["tokenizer"] = clip_tokenizer(16, pad_token="!")
    parts["scheduler"] = parts["scheduler"].from_config(parts["scheduler"].config, prediction_type="v_prediction")
    path = tmp_path_factory.mktemp("tiny-sd2") / "sd2"
    StableDiffusionPipeline(**parts).save_pretrained(path, safe_serialization=True)
    return path


TEXT_TO_IMAGE = [key for key, m in METHODS.items() if m.model_kind == "text-to-image" and key != "sfd"]


@pytest.mark.slow
@pytest.mark.parametrize("key", TEXT_TO_IMAGE)
def test_each_method_erases_from_sd2_and_plain_diffusers_draws_the_run(key, tiny_sd2_dir, concept_images, tmp_path):
    from diffusers import StableDiffusionPipeline

    settings = {**METHODS[key].test_settings}
    if key == "fewshot":  # no offline CLIP for a real-world family's stopping rule: the fixed number of updates
        settings.update(images=str(concept_images), stop_below=None)
    run = erase(key, ["a cat"], str(tiny_sd2_dir), out=tmp_path / "run", progress=False,
                sets=[f"{k}={'none' if v is None else v}" for k, v in settings.items()])  # fmt: skip
    manifest = json.loads((run / "erasure.json").read_text())
    assert manifest["base_model"]["family"] == "sd2"
    base, erased = load_model(str(tiny_sd2_dir)), load_model(str(run))
    for name in ("unet", "text_encoder", "vae"):
        same = all(torch.equal(a, b) for a, b in zip(getattr(base, name).state_dict().values(),
                                                       getattr(erased, name).state_dict().values()))  # fmt: skip
        assert same == (name not in manifest["changed_components"]), name
    ours = erased.generate(["a cat"], [7], steps=4, guidance=5.0)[0][0]
    plain = StableDiffusionPipeline.from_pretrained(run, safety_checker=None, requires_safety_checker=False)
    theirs = plain("a cat", num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(7))
    gap = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs.images[0], dtype=np.int16)).max()
    assert gap <= 1


def test_sfd_distils_a_v_prediction_teacher_and_plain_diffusers_reproduces_the_generator(tiny_sd2_dir, tmp_path):
    from pipelines.one_step import PLAIN_DIFFUSERS_RECIPE, x0_from_prediction

    # x0 from v inverts the v of a known x0 and noise
    x0, noise, abar = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor(0.3)
    x_t, v = abar.sqrt() * x0 + (1 - abar).sqrt() * noise, abar.sqrt() * noise - (1 - abar).sqrt() * x0
    assert torch.allclose(x0_from_prediction(x_t, v, abar, "v_prediction"), x0, atol=1e-5)
    sets = [f"{k}={v}" for k, v in METHODS["sfd"].test_settings.items()] + ["override=a dog"]
    run = erase("sfd", ["a cat"], str(tiny_sd2_dir), out=tmp_path / "run", progress=False, sets=sets)
    model = load_model(str(run))
    assert model.kind == "one-step" and model.scheduler.config.prediction_type == "v_prediction"
    ours = model.generate(["a cat"], [0])[0][0]
    code = PLAIN_DIFFUSERS_RECIPE.format(folder=repr(str(run)), prompt="a cat").replace('image.save("sample.png")', "")
    namespace: dict = {}
    exec(compile(code, "README recipe", "exec"), namespace)  # noqa: S102 - the README's own code
    assert np.abs(np.asarray(namespace["image"], float) - np.asarray(ours, float)).max() <= 1


def test_an_sd2_run_exports_as_one_file_that_loads_back_to_the_same_weights(tmp_path):
    """SD 2.x's OpenCLIP tower in the original layout (`cond_stage_model.model.*`, fused q/k/v); read back by
    the toolkit and by diffusers' own converter."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasure.output import write_manifest
    from pipelines import resolve
    from pipelines.families import FAMILIES, detect
    from pipelines.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer
    from ui.hub import export_run

    parts = tiny_components(seed=2)
    torch.manual_seed(2)  # an OpenCLIP-style tower: GELU, "!" padding, no projection
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=parts["unet"].config.cross_attention_dim, intermediate_size=32,
        num_attention_heads=2, num_hidden_layers=3, max_position_embeddings=16, hidden_act="gelu",
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=0))  # fmt: skip
    parts["tokenizer"] = clip_tokenizer(16, pad_token="!")
    parts["scheduler"] = parts["scheduler"].from_config(parts["scheduler"].config, prediction_type="v_prediction")
    folder, run = tmp_path / "base", tmp_path / "run"
    StableDiffusionPipeline(**parts).save_pretrained(folder)
    load_model(str(folder)).save(run, card={"erased": {"method": "esd", "concepts": ["a cat"], "base_model": "x"}})
    write_manifest(run, {"method": "esd", "concepts": ["a cat"], "base_model": resolve(str(folder)).describe(),
                         "config": {}, "seed": 0, "changed_components": ["unet"]})  # fmt: skip
    exported = export_run(run, "someone/sd2-one-file", local_dir=tmp_path / "hub", no_eval=True, single_file=True)
    path = exported.folder / "sd2-one-file.safetensors"
    assert detect("text-to-image", path) is FAMILIES["sd2"]
    original = load_model(str(folder))
    reloaded = load_model(str(path), single_file_config=str(exported.folder))
    plain = StableDiffusionPipeline.from_single_file(str(path), config=str(exported.folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        ours = getattr(original, name).state_dict()
        for other in (getattr(reloaded, name).state_dict(), getattr(plain, name).state_dict()):
            assert ours.keys() == other.keys() and all(torch.equal(ours[k], other[k]) for k in ours), name
    assert plain.scheduler.config.prediction_type == "v_prediction"


def test_a_v_prediction_model_is_noised_and_aimed_at_as_diffusers_defines_v(tiny_sd2_dir):
    # A method's loss compares the UNet's output with `noised`'s target: on SD 2.x at 768 px that target is v, and a
    # v of the wrong sign or mix would train every v-prediction run towards another model. Diffusers' own
    # `get_velocity` (DDPM's, with the model's schedule) defines it, and x0_from_prediction inverts it.
    from diffusers import DDPMScheduler

    from pipelines.one_step import x0_from_prediction

    model = load_model(str(tiny_sd2_dir))
    assert model.family.name == "sd2" and model.scheduler.config.prediction_type == "v_prediction"
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 900])
    noisy, target = model.family.noised(model, x0, noise, t)
    ddpm = DDPMScheduler.from_config(model.scheduler.config)
    torch.testing.assert_close(noisy, ddpm.add_noise(x0, noise, t))
    torch.testing.assert_close(target, ddpm.get_velocity(x0, noise, t))
    abar = ddpm.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x0_from_prediction(noisy, target, abar, "v_prediction"), x0, atol=1e-5, rtol=1e-5)
    # SFD's score losses noise in float32 on their own (not `noised`): the same x_t, and v as the fake score's target
    from erasure.config import build_config
    from erasure.sfd import _Batches
    from erasure.training import RunContext

    config = build_config("sfd", "sd2", {"override": "a dog", "batch_size": 1, "forget_batch": 1})
    batches = _Batches(model, {"a cat": "a dog"}, ddpm.alphas_cumprod, config, RunContext(seed=0, progress=False))
    batches.noise = lambda: noise  # two rows: one remain, one forget
    noisy, t, target, _ = batches.noisy(x0)
    torch.testing.assert_close(noisy, ddpm.add_noise(x0, noise, t))
    torch.testing.assert_close(target, ddpm.get_velocity(x0, noise, t))


def test_the_attacks_diffusion_classifier_aims_a_v_prediction_model_at_v(tiny_sd2_dir):
    # the attacks' objective: the UNet's output at x_t against diffusers' own v (get_velocity), at the timestep
    # range asked for; with the noise as the target, a v-prediction model's attack would pull towards another image
    from diffusers import DDPMScheduler

    from evaluators.attack import classifier_loss

    model = load_model(str(tiny_sd2_dir))
    ddpm = DDPMScheduler.from_config(model.scheduler.config)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = model.encode(["a cat", "a photo"])
        loss = classifier_loss(model, x0, cond, (600, 601), torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)  # the same draws: the timesteps, then the noise
        t, noise = torch.randint(600, 601, (2,), generator=g), torch.randn(x0.shape, generator=g)
        v = model.unet(ddpm.add_noise(x0, noise, t), t, cond).sample
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(v, ddpm.get_velocity(x0, noise, t)))
