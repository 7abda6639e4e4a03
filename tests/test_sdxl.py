"""The sdxl family on a tiny real `StableDiffusionXLPipeline` (two tiny CLIP text encoders, the second with
a projection; a UNet with SDXL's added text-time embedding): loading, the packed conditioning against the
pipeline's own `encode_prompt`, sampling against plain diffusers, both encoders as one text tower, every
method (their runs load in plain diffusers, or through the one-step recipe, and draw the toolkit's pixels;
killed, they resume), and the attacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pipelines import load_model
from pipelines.errors import InputError

from .conftest import NeverSees, tiny_sdxl_components


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    path = tmp_path_factory.mktemp("tiny-sdxl") / "sdxl"
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(path, safe_serialization=True)
    return path


def test_an_sdxl_folder_loads_as_the_sdxl_family_and_encodes_as_its_pipeline(tiny_sdxl_dir):
    from pipelines.families import FAMILIES
    from pipelines.families.sdxl import pooled_width, unpack

    model = load_model(str(tiny_sdxl_dir))
    assert model.family is FAMILIES["sdxl"] and type(model.pipe).__name__ == "StableDiffusionXLPipeline"
    prompts = ["a red seven", "a cat"]
    with torch.no_grad():
        cond = model.encode(prompts)
        tokens, pooled, time_ids = unpack(cond, pooled_width(model.unet))
        expected, _, expected_pooled, _ = model.pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        empty_tokens, empty_pooled, _ = unpack(model.encode([""]), pooled_width(model.unet))
    assert cond.shape == (2, 16 + 1, 32)
    torch.testing.assert_close(tokens, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    size = model.pipe.default_sample_size * model.pipe.vae_scale_factor
    assert time_ids.tolist() == [[size, size, 0, 0, size, size]] * 2
    assert not empty_tokens.any() and not empty_pooled.any()  # the pipeline's zeroed negative prompt


@pytest.mark.parametrize("zeros_for_empty", [True, False])
def test_the_family_denoises_as_the_pipeline_conditions_its_unet(tiny_sdxl_dir, zeros_for_empty):
    from diffusers import StableDiffusionXLPipeline

    from pipelines.families.sdxl import pooled_width, unpack

    model = load_model(str(tiny_sdxl_dir))
    model.pipe.register_to_config(force_zeros_for_empty_prompt=zeros_for_empty)
    pipe: StableDiffusionXLPipeline = model.pipe
    size = pipe.default_sample_size * pipe.vae_scale_factor
    prompts = ["a red seven", ""]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.family.denoise(model.unet, x, 500, model.encode(prompts))
        tokens, negative_tokens, pooled, negative_pooled = pipe.encode_prompt(
            prompts[:1], do_classifier_free_guidance=True, negative_prompt=None if zeros_for_empty else ""
        )
        projection = pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=tokens.dtype,
                                          text_encoder_projection_dim=projection)  # fmt: skip
        theirs = model.unet(x, 500, torch.cat([tokens, negative_tokens]), added_cond_kwargs={
            "text_embeds": torch.cat([pooled, negative_pooled]), "time_ids": time_ids.repeat(2, 1)}).sample  # fmt: skip
        _, empty_pooled, _ = unpack(model.encode([""]), pooled_width(model.unet))
    torch.testing.assert_close(ours, theirs)
    assert bool(empty_pooled.any()) != zeros_for_empty  # "" is encoded unless the pipeline zeroes it


def test_the_toolkit_draws_what_plain_diffusers_draws(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    model = load_model(str(tiny_sdxl_dir))
    ours = model.generate(["a red seven"], [3], steps=4, guidance=5.0)[0][0]
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    theirs = plain("a red seven", num_inference_steps=4, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(3)).images[0]  # fmt: skip
    assert _pixel_gap(ours, theirs) <= 1  # the same pixels, up to rounding


def _pixel_gap(a, b) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def _unet_changes(base: torch.nn.Module, erased: torch.nn.Module) -> set[str]:
    erased_state = erased.state_dict()
    return {k for k, v in base.state_dict().items() if not torch.equal(v, erased_state[k])}


def test_esd_erases_in_sdxl_cross_attention_and_the_run_loads_in_plain_diffusers(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from erasure.api import erase

    run = erase("esd", ["seven"], str(tiny_sdxl_dir), out=tmp_path / "run", progress=False,
                sets=["steps=3", "ddim_steps=3", "batch_size=2", "lr=1e-2"])  # fmt: skip
    base, erased = load_model(str(tiny_sdxl_dir)), load_model(str(run))
    changed = _unet_changes(base.unet, erased.unet)
    assert changed and all(".attn2." in k for k in changed)  # ESD-x: the cross-attention only
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert not _unet_changes(getattr(base, name), getattr(erased, name))
    ours = erased.generate(["a seven"], [5], steps=3, guidance=4.0)[0][0]
    plain = StableDiffusionXLPipeline.from_pretrained(run)
    theirs = plain("a seven", num_inference_steps=3, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(5)).images[0]  # fmt: skip
    assert _pixel_gap(ours, theirs) <= 1
    assert ours.tobytes() != base.generate(["a seven"], [5], steps=3, guidance=4.0)[0][0].tobytes()
    # the preview's before/after comparison takes the run as it takes any other
    from ui.compare import ModelCache, compare

    shown = compare(ModelCache(), str(tiny_sdxl_dir), [str(run)], ["a seven"], [5], steps=3, guidance=4.0)
    assert shown.erased[0][0].tobytes() == ours.tobytes() and shown.base[0][0].tobytes() != ours.tobytes()


def test_an_sdxl_run_is_evaluated_and_exported_for_plain_diffusers(tiny_sdxl_dir, tiny_open_clip, tmp_path):
    import json

    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    from erasure.api import erase
    from erasure.evaluation import run_eval
    from ui.hub import export_run

    run = erase("esd", ["seven"], str(tiny_sdxl_dir), out=tmp_path / "run", progress=False,
                sets=["steps=1", "ddim_steps=2"])  # fmt: skip
    report = json.loads(run_eval(str(run), samples=1, clip=tiny_open_clip, progress=False).read_text())
    scores = report["concepts"]["seven"]["metrics"]
    for name in ("target_presence_clip", "target_clip_score", "preserved_clip_score"):  # both models were scored
        metric = scores[name]
        assert metric["difference"] == pytest.approx(metric["after"] - metric["before"]), name
    assert scores["target_presence_clip"]["settings"]["images"] == len(report["concepts"]["seven"]["prompts"][
        "target_prompts"]["prompts"])  # one seed per prompt, each image judged
    assert report["after"]["family"] == report["before"]["family"] == "sdxl" and report["baseline_matches_run"]
    exported = export_run(run, "someone/sdxl-esd", local_dir=tmp_path / "hub")
    card = (exported.folder / "README.md").read_text()
    assert "**esd**" in card and "DiffusionPipeline.from_pretrained" in card
    pipe = DiffusionPipeline.from_pretrained(exported.folder)  # what the card's snippet does
    assert isinstance(pipe, StableDiffusionXLPipeline)


def test_esd_u_trains_everything_but_sdxl_cross_attention(tiny_sdxl_dir, tmp_path):
    from erasure.api import erase

    run = erase("esd", ["seven"], str(tiny_sdxl_dir), out=tmp_path / "run", progress=False,
                sets=["steps=2", "ddim_steps=3", "lr=1e-2", "scope=noxattn"])  # fmt: skip
    changed = _unet_changes(load_model(str(tiny_sdxl_dir)).unet, load_model(str(run)).unet)
    assert changed and not any(".attn2." in k for k in changed)
    # ESD-u: every non-cross-attention weight, SDXL's pooled-text/time-id embedding among them
    assert any(k.startswith("add_embedding.") for k in changed) and any(".resnets." in k for k in changed)


def test_esd_on_sdxl_starts_from_the_authors_sdxl_script():
    from erasure.config import build_config
    from pipelines.families import FAMILIES

    config = build_config("esd", FAMILIES["sdxl"])
    assert (config.steps, config.lr, config.sample_guidance, config.scope) == (200, 2e-4, 2.0, "xattn")
    assert build_config("esd", FAMILIES["sd1"]).lr == 1e-5  # the SD 1.x paper's
    # ESD-x's lr is not reused silently for another scope (the authors use 1e-5 there)
    for sets in ({"scope": "noxattn"}, {"component": "text_encoder"}):
        with pytest.raises(InputError, match="lr 0.0002 is ESD-x's"):
            build_config("esd", FAMILIES["sdxl"], sets).check(FAMILIES["sdxl"], ["a cat"])
    build_config("esd", FAMILIES["sdxl"], {"scope": "noxattn", "lr": 1e-5}).check(FAMILIES["sdxl"], ["a cat"])


def test_sfd_distils_sdxl_into_a_one_step_generator_that_plain_diffusers_reproduces(tiny_sdxl_dir, tmp_path):
    import json

    import numpy as np

    from erasure.api import erase
    from erasure.registry import METHODS
    from pipelines.one_step import PLAIN_DIFFUSERS_RECIPE_XL

    sets = [f"{k}={v}" for k, v in METHODS["sfd"].test_settings.items()] + ["override=a dog"]
    run = erase("sfd", ["a cat"], str(tiny_sdxl_dir), out=tmp_path / "run", progress=False, sets=sets)
    index = json.loads((run / "model_index.json").read_text())
    assert index["_class_name"] == "OneStepPipeline" and index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    model = load_model(str(run))
    assert model.kind == "one-step" and model.family.name == "sdxl"
    # the generator's UNet takes SDXL's added conditioning, and moved from the teacher's weights
    assert _unet_changes(load_model(str(tiny_sdxl_dir)).unet, model.unet)
    ours = model.generate(["a cat"], [0])[0][0]
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"<!-- one-step recipe sdxl -->\s*```python\n(.*?)```", readme, re.S)
    assert block and block.group(1) == PLAIN_DIFFUSERS_RECIPE_XL.format(folder='"runs/sfd-xl"', prompt="a cat")
    code = PLAIN_DIFFUSERS_RECIPE_XL.format(folder=repr(str(run)), prompt="a cat")
    code = code.replace('image.save("sample.png")', "")
    namespace: dict = {}
    exec(compile(code, "README recipe", "exec"), namespace)  # noqa: S102 - the README's own code
    assert np.abs(np.asarray(namespace["image"], float) - np.asarray(ours, float)).max() <= 1


def test_an_sfd_lora_on_sdxl_saves_as_adapters_alone_and_loads_as_the_same_generator(tiny_sdxl_dir, tmp_path):
    import numpy as np

    from erasure.api import erase
    from erasure.registry import METHODS

    sets = [f"{k}={v}" for k, v in METHODS["sfd"].test_settings.items()] + ["override=a dog", "lora_rank=2"]
    full = erase("sfd", ["a cat"], str(tiny_sdxl_dir), out=tmp_path / "full", progress=False, sets=sets)
    small = erase("sfd", ["a cat"], str(tiny_sdxl_dir), out=tmp_path / "small", progress=False, sets=sets, save="lora")
    assert not (small / "unet").exists() and (small / "pytorch_lora_weights.safetensors").is_file()
    a, b = load_model(str(full)), load_model(str(small))
    assert a.kind == b.kind == "one-step" and b.family.name == "sdxl"
    ours, again = a.generate(["a cat"], [0])[0][0], b.generate(["a cat"], [0])[0][0]
    assert np.abs(np.asarray(ours, float) - np.asarray(again, float)).max() <= 1
    assert _unet_changes(load_model(str(tiny_sdxl_dir)).unet, b.unet)  # the adapters are merged into the UNet

# --- the text tower: both encoders as one network, free words inserted into each ---------------------------


def test_a_word_inserted_in_both_encoders_encodes_as_the_prompt_that_holds_it(tiny_sdxl_dir):
    model = load_model(str(tiny_sdxl_dir))
    family, tower = model.family, model.family.text_tower(model)
    vocab = family.vocabulary(model, tower)
    assert vocab.shape == (len(model.tokenizer), 16 + 16)  # both encoders' input embeddings side by side
    seven = model.tokenizer("seven", add_special_tokens=False).input_ids
    # 13 words: with the word in front, the end token lands on the last of the 16 places (where a clamp one short
    # of it would read the word before)
    long = "a red cat on a blue mat in the big old green house"
    with torch.no_grad():
        inserted = family.encode_inserted(model, tower, model.tokenize(["a photo", "a red cat", long]),
                                          vocab[seven][None])  # fmt: skip
        plain = model.encode(["seven a photo", "seven a red cat", f"seven {long}"])
        nothing = family.encode_inserted(model, tower, model.tokenize(["a photo"]), vocab[:0][None])
    assert model.tokenize([f"seven {long}"])[0, 15] == model.tokenizer.eos_token_id
    # token rows of both encoders, the pooled embedding read at the end token one place on, the time ids
    assert torch.equal(inserted, plain)
    assert torch.equal(nothing, model.encode(["a photo"]))


def test_a_text_tower_scope_names_one_encoder_or_spans_both(tiny_sdxl_dir, tmp_path):
    from erasure.api import erase

    sets = ["steps=2", "warmup=1", "attack_steps=2", "ddim_steps=3", "retain_batch=2", "lr=1e-2", "batch_size=2"]
    base = load_model(str(tiny_sdxl_dir))
    for scope, trained in [("text_encoder_2:attn", {"text_encoder_2"}), ("text_encoder:mlp", {"text_encoder"}),
                           ("full", {"text_encoder", "text_encoder_2"})]:  # fmt: skip
        run = erase("advunlearn", ["seven"], str(tiny_sdxl_dir), out=tmp_path / scope.replace(":", "-"),
                    progress=False, sets=[*sets, f"scope={scope}"])  # fmt: skip
        erased = load_model(str(run))
        moved = {name: _unet_changes(getattr(base, name), getattr(erased, name))
                 for name in ("text_encoder", "text_encoder_2", "unet")}  # fmt: skip
        assert {name for name, keys in moved.items() if keys} == trained, scope
        # SDXL reads the first encoder's penultimate layer: its last block and final LayerNorm never train
        assert not any("encoder.layers.2." in k or "final_layer_norm" in k
                       for k in moved["text_encoder"])  # fmt: skip
        part = scope.split(":")[-1]
        for name in trained:
            assert all((".self_attn." in k) if part == "attn" else (".mlp." in k) if part == "mlp" else True
                       for k in moved[name])  # fmt: skip
    with pytest.raises(InputError, match="text_encoder_3") as refused:
        erase("advunlearn", ["seven"], str(tiny_sdxl_dir), out=tmp_path / "no", progress=False,
              sets=["scope=text_encoder_3:full"])  # fmt: skip
    assert "\n" not in str(refused.value) and not (tmp_path / "no").exists()


def test_few_shot_scope_takes_the_last_block_that_reaches_the_unet(tiny_sdxl_dir):
    """mlp+last-attn (the paper's): every MLP and the last block's attention of each encoder; SDXL reads the first
    encoder's penultimate layer, so its 'last block' is the one before its last (both tiny encoders: 3 blocks)."""
    from erasure.common import select_trainable

    model = load_model(str(tiny_sdxl_dir))
    tower = model.family.text_tower(model)
    select_trainable(tower, "text_encoder", "mlp+last-attn")
    trained = {n for n, p in tower.named_parameters() if p.requires_grad}
    first = {n for n in trained if n.startswith("text_encoder.")}
    second = {n for n in trained if n.startswith("text_encoder_2.")}
    assert any(".layers.1.self_attn." in n for n in first) and not any(".layers.2." in n for n in first)
    assert any(".layers.2.self_attn." in n for n in second) and not any(".layers.1.self_attn." in n for n in second)
    assert all(".mlp." in n or ".self_attn." in n for n in trained)


def _test_sets(key: str, images) -> list[str]:
    from erasure.registry import METHODS

    method, _, extra = key.partition("+")
    settings = {**METHODS[method].test_settings}
    if method == "fewshot":  # no offline CLIP for a real-world family's stopping rule: the fixed number of updates
        # (and a step that moves the token rows of a tiny random encoder enough to change a 16-px picture)
        settings.update(images=str(images), stop_below=None, lr=1e-2)
    return [f"{k}={'none' if v is None else v}" for k, v in settings.items()] + ([extra] if extra else [])


# every text-to-image method but SFD (its one-step pipeline is not diffusers' own: the recipe test above);
# ESD in the UNet and in the text encoders; few-shot on its token rows
SDXL_CELLS = ["esd", "esd+component=text_encoder", "advunlearn", "fewshot", "fewshot+scope=tokens", "stereo"]


@pytest.mark.slow
@pytest.mark.parametrize("key", SDXL_CELLS)
def test_each_method_erases_from_sdxl_and_plain_diffusers_draws_the_run(key, tiny_sdxl_dir, concept_images, tmp_path):
    import json

    from diffusers import StableDiffusionXLPipeline

    from erasure.api import erase

    run = erase(key.partition("+")[0], ["a cat"], str(tiny_sdxl_dir), out=tmp_path / "run", progress=False,
                sets=_test_sets(key, concept_images))  # fmt: skip
    manifest = json.loads((run / "erasure.json").read_text())
    text_tower = key.startswith(("advunlearn", "fewshot")) or "text_encoder" in key
    assert manifest["changed_components"] == (["text_encoder", "text_encoder_2"] if text_tower else ["unet"])
    base, erased = load_model(str(tiny_sdxl_dir)), load_model(str(run))
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        assert bool(_unet_changes(getattr(base, name), getattr(erased, name))) == (
            name in manifest["changed_components"]), name  # fmt: skip
    ours = erased.generate(["a cat"], [7], steps=4, guidance=5.0)[0][0]
    plain = StableDiffusionXLPipeline.from_pretrained(run)
    theirs = plain("a cat", num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(7))
    assert _pixel_gap(ours, theirs.images[0]) <= 1
    assert ours.tobytes() != base.generate(["a cat"], [7], steps=4, guidance=5.0)[0][0].tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("key", ["esd", "esd+component=text_encoder", "advunlearn", "fewshot", "stereo",
                                 "sfd+override=a dog"])  # fmt: skip
def test_each_method_killed_on_sdxl_resumes_to_the_uninterrupted_run(key, tiny_sdxl_dir, concept_images, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from erasure.api import erase

    method, sets = key.partition("+")[0], _test_sets(key, concept_images)
    straight = erase(method, ["a cat"], str(tiny_sdxl_dir), out=tmp_path / "straight", sets=sets, checkpoint_every=1,
                     progress=False)  # fmt: skip
    script = Path(__file__).with_name("erase_run.py")
    command = [sys.executable, str(script), method, str(tiny_sdxl_dir), "a cat", str(tmp_path / "killed"),
               "--kill-after", "2", *sets]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = erase(method, ["a cat"], str(tiny_sdxl_dir), out=tmp_path / "killed", sets=sets, checkpoint_every=1,
                    resume=True, progress=False)  # fmt: skip
    changed = json.loads((straight / "erasure.json").read_text())["changed_components"]
    a, b = load_model(str(straight)), load_model(str(resumed))
    for name in changed:
        assert not _unet_changes(getattr(a, name), getattr(b, name)), name


def test_each_attack_reaches_into_both_sdxl_encoders(tiny_sdxl_dir):
    from evaluators.attack import AttackSettings, AttackTarget, attack_success_rate
    from evaluators.discrete_attack import DiscreteAttackSettings, discrete_attack
    from evaluators.inversion_attack import InversionSettings, inversion_attack

    model = load_model(str(tiny_sdxl_dir))
    prompts, seeds = ["a cat", "a photo of a cat"], [0, 1]
    # the attacks' objective has a gradient in both parts of a free word: both encoders take it
    target = AttackTarget.of(model, model, NeverSees(), "cat", prompts, seeds)
    words = model.family.vocabulary(model, target.tower)[torch.tensor([[5, 6, 7]] * 4)].requires_grad_(True)
    target.loss(target.encode(slice(None), words), slice(None), (400, 600), torch.Generator().manual_seed(0)).backward()
    assert words.grad[..., :16].abs().sum() > 0 and words.grad[..., 16:].abs().sum() > 0

    embedding = attack_success_rate(model, model, NeverSees(), "cat", prompts, seeds, AttackSettings(steps=3))
    discrete = discrete_attack(model, model, NeverSees(), "cat", prompts, seeds,
                               DiscreteAttackSettings(tokens=2, steps=3, check_every=3))  # fmt: skip
    inversion = inversion_attack(model, model, NeverSees(), "cat", prompts, [0], InversionSettings(steps=3))
    assert embedding["pairs"] == discrete["pairs"] == 4 and inversion["pairs"] == 2
    assert [p["attacked_prompt"] for p in inversion["per_pair"]] == ["<v*> a", "<v*> a photo of a"]
    for pair in discrete["per_pair"]:  # the words found are words: their prompt re-encodes to them
        ids = model.tokenizer(pair["adversarial_prompt"], add_special_tokens=False).input_ids
        assert ids[:2] == pair["adversarial_tokens"]
    assert not any(p.requires_grad for name in ("text_encoder", "text_encoder_2", "unet")
                   for p in getattr(model, name).parameters())  # the attacks train no weight  # fmt: skip


@pytest.mark.slow
def test_eval_attacks_an_sdxl_run(tiny_sdxl_dir, tiny_open_clip, tmp_path):
    import json

    from erasure.evaluation import run_eval

    path = run_eval(str(tiny_sdxl_dir), concepts=["seven"], baseline=str(tiny_sdxl_dir), attack="embedding",
                    json_path=tmp_path / "eval.json", samples=1, clip=tiny_open_clip, attack_prompts=1,
                    attack_seeds=2, attack_steps=2, progress=False)  # fmt: skip
    [result] = json.loads(path.read_text())["concepts"]["seven"]["attacks"]
    assert result["attack"] == "embedding" and result["pairs"] == 2 and 0 <= result["asr"] <= 1


def test_methods_noise_and_walk_sdxl_as_it_was_trained_not_as_its_euler_sampler(tiny_sdxl_dir):
    """Euler's add_noise gives x0 + sigma * noise (sigma up to ~14.6) and DDIM's default clips x0 to [-1, 1]:
    the forward process of a method's loss and its trajectories must be latent diffusion's."""
    model = load_model(str(tiny_sdxl_dir))
    assert type(model.scheduler).__name__ == "EulerDiscreteScheduler" and "clip_sample" not in model.scheduler.config
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    abar = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy, target = model.family.noised(model, x0, noise, t)
    torch.testing.assert_close(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    assert target is noise
    scheduler = model.family.sampling_scheduler(model, 10, "cpu")
    assert not scheduler.config.clip_sample and not scheduler.config.set_alpha_to_one


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "legacy-ckpt"])
def test_a_single_file_is_recognised_by_its_text_embedders(tmp_path, fmt):
    """SDXL by its two `conditioner.embedders`, SD 2.x by its OpenCLIP tower, in safetensors or a pickled `.ckpt`
    (torch's zip format, or its legacy one, holding a Lightning `state_dict`)."""
    from safetensors.torch import save_file

    from pipelines.families import FAMILIES, detect

    towers = {"sdxl": "conditioner.embedders.1.model.ln_final.weight", "sd2": "cond_stage_model.model.ln_final.weight",
              "sd1": "cond_stage_model.transformer.text_model.final_layer_norm.weight"}  # fmt: skip
    for family, key in towers.items():
        weights = {key: torch.ones(2), "model.diffusion_model.x": torch.ones(1)}
        path = tmp_path / f"{family}.{fmt.split('-')[-1]}"
        if fmt == "safetensors":
            save_file(weights, str(path))
        else:
            torch.save({"state_dict": weights, "global_step": 1}, path, _use_new_zipfile_serialization=fmt == "ckpt")
        assert detect("text-to-image", path) is FAMILIES[family], (family, fmt)


def test_an_sdxl_run_exports_as_one_file_that_loads_back_to_the_same_weights(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from erasure.output import write_manifest
    from pipelines import resolve
    from pipelines.families import FAMILIES, detect
    from ui.hub import export_run

    folder = tmp_path / "base"
    StableDiffusionXLPipeline(**tiny_sdxl_components(2, second_width=24, second_layers=10)).save_pretrained(folder)
    run = tmp_path / "run"
    load_model(str(folder)).save(run, card={"erased": {"method": "esd", "concepts": ["seven"], "base_model": "x"}})
    write_manifest(run, {"method": "esd", "concepts": ["seven"], "base_model": resolve(str(folder)).describe(),
                         "config": {}, "seed": 0, "changed_components": ["unet"]})  # fmt: skip
    exported = export_run(run, "someone/sdxl-one-file", local_dir=tmp_path / "hub", no_eval=True, single_file=True)
    path = exported.folder / "sdxl-one-file.safetensors"
    assert "StableDiffusionXLPipeline.from_single_file" in (exported.folder / "README.md").read_text()
    assert detect("text-to-image", path) is FAMILIES["sdxl"]
    original, reloaded = load_model(str(folder)), load_model(str(path), single_file_config=str(exported.folder))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert not _unet_changes(getattr(original, name), getattr(reloaded, name)), name
    # and it encodes as the folder does: its second tokenizer pads with "!", as the folder's own does
    with torch.no_grad():
        assert torch.equal(original.encode(["a seven"]), reloaded.encode(["a seven"]))
    plain = StableDiffusionXLPipeline.from_single_file(str(path), config=str(exported.folder), local_files_only=True)
    assert not _unet_changes(original.text_encoder_2, plain.text_encoder_2)


def test_a_one_step_pipeline_draws_each_prompts_images_side_by_side():
    # With several prompts and num_images_per_prompt, row i of the output is prompt i // n with the noise of row i,
    # as in diffusers' pipelines: the token embeddings and SDXL's pooled embedding must be repeated alike, or the
    # UNet would see one prompt's tokens with another's pooled embedding.
    from diffusers import DDIMScheduler

    from pipelines.one_step import OneStepPipeline

    parts = tiny_sdxl_components()
    parts["scheduler"] = DDIMScheduler.from_config(parts["scheduler"].config)
    pipe = OneStepPipeline(**parts, t_init=500)
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    together = pipe(["a red seven", "a cat"], num_images_per_prompt=2, latents=z, output_type="latent").images
    for i, prompt in enumerate(["a red seven", "a red seven", "a cat", "a cat"]):
        alone = pipe(prompt, latents=z[i : i + 1], output_type="latent").images
        torch.testing.assert_close(together[i : i + 1], alone)
    # the time ids of a full, uncropped image of the UNet's size in pixels, as StableDiffusionXLPipeline adds them
    assert pipe.time_ids(2).tolist() == [[16, 16, 0, 0, 16, 16]] * 2


def test_an_sdxl_one_step_export_carries_the_two_encoder_recipe_that_draws_its_image(tiny_sdxl_dir, tmp_path):
    # A one-step folder does not load with DiffusionPipeline, so the card's recipe is how a diffusers user runs it:
    # an SDXL generator's UNet also takes the second encoder's pooled embedding and the time ids, so its card must
    # carry the two-encoder recipe, which, run on the exported folder, draws the toolkit's image of the generator.
    # The empty prompt too: the recipe encodes it, where StableDiffusionXLPipeline would zero a negative prompt.
    import numpy as np
    from diffusers import DDIMScheduler

    from erasure.output import write_manifest
    from pipelines import resolve
    from pipelines.cards import write_model_card
    from pipelines.one_step import OneStepPipeline
    from ui.hub import export_run

    parts = tiny_sdxl_components(3)
    parts["scheduler"] = DDIMScheduler.from_config(parts["scheduler"].config)
    run = tmp_path / "run"
    OneStepPipeline(**parts, t_init=500).save_pretrained(run, safe_serialization=True)
    write_model_card(run, {"family": "sdxl", "sampling": {"steps": 1, "guidance": 0.0}})
    write_manifest(run, {"method": "sfd", "concepts": ["a cat"], "base_model": resolve(str(tiny_sdxl_dir)).describe(),
                         "config": {}, "seed": 0, "changed_components": ["unet"]})  # fmt: skip
    hub = export_run(run, "someone/sfd-xl", local_dir=tmp_path / "hub", no_eval=True).folder
    card = (hub / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "text_encoder_2" in code and "time_ids" in code and '["a cat"]' in code
    code = code.replace('snapshot_download("someone/sfd-xl")', repr(str(hub))).replace('image.save("sample.png")', "")
    model = load_model(str(hub))
    for prompt in ("a cat", ""):
        namespace: dict = {}
        exec(compile(code.replace('["a cat"]', repr([prompt])), "model card recipe", "exec"), namespace)  # noqa: S102
        ours = model.generate([prompt], [0])[0][0]
        assert np.abs(np.asarray(namespace["image"], float) - np.asarray(ours, float)).max() <= 1, prompt
