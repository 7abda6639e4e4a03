"""The flux family on a tiny real `FluxPipeline` (a FluxTransformer2DModel of one double- and one single-stream
block, a CLIP text encoder for the pooled embedding, a T5 encoder with a real T5 tokenizer, a 4-channel VAE):
detection, the packed conditioning against the pipeline's `encode_prompt`, sampling against plain diffusers,
ESD as a LoRA on the transformer (EraseAnything's preset) loading in plain diffusers, eval, the embedding attack
through both encoders, export, and the refusals of what FLUX cannot take."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from erasure.api import erase
from pipelines import load_model
from pipelines.errors import InputError

from .conftest import NeverSees, stops_resumably, tiny_flux_components

T5_LENGTH = 12  # the tiny T5 tokenizer's length (FluxPipeline's default, 512, is the real T5's)
QUICK = ["steps=3", "ddim_steps=4", "batch_size=2", "lr=0.1"]


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    from diffusers import FluxPipeline

    path = tmp_path_factory.mktemp("tiny-flux") / "flux"
    FluxPipeline(**tiny_flux_components()).save_pretrained(path, safe_serialization=True)
    # a 16-px model: the toolkit draws at the size its card names (FLUX.1's own: 1024)
    (path / "erasure_model.json").write_text(json.dumps({"sampling": {"steps": 4, "guidance": 3.5, "resolution": 16}}))
    return path


def _plain(folder: Path, lora_run: Path | None = None, seed: int = 7, weight_name: str | None = None) -> np.ndarray:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)
    if lora_run is not None:
        pipe.load_lora_weights(str(lora_run), weight_name=weight_name)
    image = pipe("a photo of a cat", height=16, width=16, num_inference_steps=4, guidance_scale=3.5,
                 max_sequence_length=T5_LENGTH, generator=torch.Generator().manual_seed(seed)).images[0]  # fmt: skip
    return np.asarray(image, float)


def _kohya_draw(base: Path, folder: Path, file: str) -> np.ndarray:
    """Plain diffusers' image of `base` with the kohya file `file` of `folder` (not a diffusers file: diffusers'
    converter reads it)."""
    return _plain(base, lora_run=folder, weight_name=file)


def _ours(folder: Path, seed: int = 7) -> np.ndarray:
    return np.asarray(load_model(str(folder)).generate(["a photo of a cat"], [seed])[0][0], float)


def test_a_flux_folder_loads_as_the_flux_family_and_draws_as_plain_diffusers(tiny_flux_dir):
    from pipelines.families import FAMILIES
    from pipelines.families.flux import pooled_width, unpack

    model = load_model(str(tiny_flux_dir))
    assert model.family is FAMILIES["flux"] and model.unet is model.pipe.transformer
    prompts = ["a red seven", "a photo of a cat"]
    with torch.no_grad():
        tokens, pooled = unpack(model.encode(prompts), pooled_width(model.unet))
        expected, expected_pooled, _ = model.pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=T5_LENGTH)
    assert torch.equal(tokens, expected) and torch.equal(pooled, expected_pooled)
    assert np.abs(_ours(tiny_flux_dir) - _plain(tiny_flux_dir)).max() <= 1
    # A T5 tokenizer that allows more than FluxPipeline's default length (512) is cut where the pipeline cuts it: T5's
    # padding rows are attended to, so another length would condition the transformer on another prompt
    model.pipe.tokenizer_2.model_max_length = 600
    with torch.no_grad():
        tokens, _ = unpack(model.encode(prompts[:1]), pooled_width(model.unet))
        expected = model.pipe.encode_prompt(prompts[:1], prompt_2=None)[0]
    assert tokens.shape[1] == 512 and torch.equal(tokens, expected)


def test_the_flux_denoiser_and_trajectory_follow_the_pipeline(tiny_flux_dir):
    """`denoise` packs latents into the transformer's patches and back as FluxPipeline does; the trajectory's Euler
    steps, run to the end, are the pipeline's own sampling of the same noise at the training resolution, under FLUX.1
    [dev]'s scheduler, which shifts its sigmas by the image's length in 2x2 patches (`use_dynamic_shifting`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    model = load_model(str(tiny_flux_dir))
    config = model.scheduler.config
    model.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, use_dynamic_shifting=True)
    family = model.family
    scheduler = family.sampling_scheduler(model, 4, "cpu")
    shape = family.latent_shape(model, 1)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    cond = model.encode(["a photo of a cat"])
    x_0, t, t_next = family.trajectory(model.unet, scheduler, cond, None, 4, 3.5, noise)
    assert t == 0 and t_next > t
    tokens, pooled = cond[:, :-1], cond[:, -1, : model.unet.config.pooled_projection_dim]
    packed = FluxPipeline._pack_latents(noise, 1, shape[1], shape[2], shape[3])
    latents = model.pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, latents=packed, height=16, width=16,
                         num_inference_steps=4, guidance_scale=3.5, output_type="latent").images  # fmt: skip
    expected = FluxPipeline._unpack_latents(latents, 16, 16, model.pipe.vae_scale_factor)
    torch.testing.assert_close(scheduler.sigmas, model.pipe.scheduler.sigmas)
    assert torch.allclose(x_0, expected, atol=1e-5)


def test_esd_on_flux_is_a_lora_on_the_transformer_that_plain_diffusers_loads(tiny_flux_dir, tmp_path):
    """The family's preset is EraseAnything's: rank-8 adapters on the double-stream blocks' add_q_proj / add_k_proj;
    `FluxPipeline.load_lora_weights(run)` on the base draws the toolkit's image of the run."""
    from safetensors import safe_open

    run = erase("esd", ["cat"], str(tiny_flux_dir), out=tmp_path / "run", progress=False, sets=QUICK)
    manifest = json.loads((run / "erasure.json").read_text())
    assert manifest["changed_components"] == ["transformer"]
    assert manifest["lora"]["rank"] == 8 and manifest["lora"]["components"] == ["transformer"]
    with safe_open(str(run / "pytorch_lora_weights.safetensors"), "pt") as f:
        layers = {key.split(".lora_")[0] for key in f.keys()}
    block = "transformer.transformer_blocks.0.attn"
    assert layers == {f"{block}.add_q_proj", f"{block}.add_k_proj"}
    ours = _ours(run)
    assert np.abs(_plain(tiny_flux_dir, lora_run=run) - ours).max() <= 1
    assert np.abs(_ours(tiny_flux_dir) - ours).max() > 1  # the adapters changed the picture
    small = erase("esd", ["cat"], str(tiny_flux_dir), out=tmp_path / "small", progress=False, sets=QUICK,
                  save="lora")  # fmt: skip
    assert not (small / "transformer").exists() and np.abs(_ours(small) - ours).max() <= 1
    from ui.hub import export_run  # exported: the adapters merged into the Hub folder's transformer

    hub = export_run(small, "someone/small", local_dir=tmp_path / "hub", no_eval=True).folder
    assert np.abs(_plain(hub) - ours).max() <= 1


def test_esd_on_flux_starts_from_eraseanythings_config_at_its_512_px(tiny_flux_dir):
    # EraseAnything's config.yaml and train_flux_lora.py: lr 1e-3, 200 steps, x_t from 28 steps at guidance 3, ESD's
    # eta 1, on 512 px images. A FLUX.1 checkpoint carries no card and draws at 1024 px; training there would cost
    # four times the transformer's work per step and leave the paper's setting. A smaller model trains at its own size.
    from erasure.config import build_config

    config = build_config("esd", "flux")
    assert (config.lr, config.steps, config.ddim_steps) == (1e-3, 200, 28)
    assert (config.sample_guidance, config.negative_guidance) == (3.0, 1.0)
    model = load_model(str(tiny_flux_dir))
    assert model.family.image_resolution(model) == model.resolution == 16
    model.source.card = {}
    assert model.resolution == 1024 and model.family.image_resolution(model) == 512
    side = 512 // model.pipe.vae_scale_factor
    assert model.family.latent_shape(model, 2) == (2, 4, side, side)


def test_a_flux_run_is_evaluated_and_exported(tiny_flux_dir, tiny_open_clip, tmp_path):
    from erasure.evaluation import run_eval
    from ui.hub import export_run

    run = erase("esd", ["cat"], str(tiny_flux_dir), out=tmp_path / "run", progress=False, sets=QUICK)
    report = json.loads(run_eval(str(run), samples=1, clip=tiny_open_clip, progress=False).read_text())
    scores = report["concepts"]["cat"]["metrics"]
    assert 0 <= scores["target_presence_clip"]["after"] <= 1 and report["after"]["family"] == "flux"
    with pytest.raises(InputError, match="a flux run has no such form"):  # before anything is written
        export_run(run, "someone/flux-esd", local_dir=tmp_path / "hub", single_file=True)
    exported = export_run(run, "someone/flux-esd", local_dir=tmp_path / "hub")
    assert "pytorch_lora_weights.safetensors" in exported.files
    card = (exported.folder / "README.md").read_text()
    assert "load_lora_weights" in card and "gao2025eraseanything" in card  # the preset's paper is cited too
    assert "num_inference_steps=4, guidance_scale=3.5" in card  # the card's sampling
    kohya = export_run(run, "someone/flux-kohya", local_dir=tmp_path / "kohya", lora_format="kohya")
    assert "flux-kohya-lora.safetensors" in (kohya.folder / "README.md").read_text()
    assert np.abs(_kohya_draw(tiny_flux_dir, kohya.folder, "flux-kohya-lora.safetensors") - _ours(run)).max() <= 1
    # A base whose card names none (a Hub FLUX.1): FLUX's own sampling, not Stable Diffusion's.
    (run / "erasure_model.json").write_text(json.dumps({**json.loads((run / "erasure_model.json").read_text()),
                                                         "sampling": {"resolution": 16}}))  # fmt: skip
    card = (export_run(run, "someone/flux", local_dir=tmp_path / "hub2").folder / "README.md").read_text()
    assert "num_inference_steps=28, guidance_scale=3.5" in card
    for attack in ("unlearndiffatk", "textual-inversion"):  # one tokenizer's words; no T5 inversion yet
        with pytest.raises(InputError, match=f"--attack {attack} on flux models"):
            run_eval(str(run), attack=attack, samples=1, clip=tiny_open_clip, progress=False)
    attacked = run_eval(str(run), attack="embedding", samples=1, clip=tiny_open_clip, attack_prompts=1, attack_seeds=2,
                        attack_steps=2, json_path=tmp_path / "attacked.json", progress=False)  # fmt: skip
    [result] = json.loads(attacked.read_text())["concepts"]["cat"]["attacks"]
    assert result["attack"] == "embedding" and result["pairs"] == 2 and 0 <= result["asr"] <= 1


# Every kind of block layer but a single-stream block's q, k, v and MLP input: diffusers' converter splits that
# fused layer at FLUX.1's own widths (3072, 12288), so the tiny model's cannot go through it; the test after this
# one checks it at those widths.
BLOCK_TARGETS = ["add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out", "ff.net.0.proj", "ff.net.2",
                 "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear", "norm.linear",
                 "blocks.0.proj_out"]  # fmt: skip


def test_a_flux_lora_in_sd_scripts_layout_loads_through_diffusers_converter(tiny_flux_dir, tmp_path):
    """`export --lora-format kohya` of a FLUX run: the blocks' adapters under Black Forest Labs' layer names (q, k,
    v fused); diffusers' converter reads the file back and draws the toolkit's image of the run. An adapter of an
    embedder or the final layer, which that converter drops, is refused before anything is written."""
    from safetensors import safe_open

    from ui.hub import export_run

    sets = QUICK + ["scope=full", "lora_rank=2", "lora_alpha=4", f"lora_targets={','.join(BLOCK_TARGETS)}"]
    run = erase("esd", ["cat"], str(tiny_flux_dir), out=tmp_path / "run", progress=False, sets=sets)
    exported = export_run(run, "someone/blocks", local_dir=tmp_path / "hub", no_eval=True, lora_format="kohya")
    with safe_open(str(exported.folder / "blocks-lora.safetensors"), "pt") as f:
        layers = {key.split(".")[0] for key in f.keys()}
        qkv = f.get_tensor("lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight")
    assert layers == {f"lora_unet_double_blocks_0_{side}_{name}" for side in ("img", "txt")
                      for name in ("attn_proj", "mlp_0", "mlp_2", "mod_lin")} | {
        "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_single_blocks_0_linear2",
        "lora_unet_single_blocks_0_modulation_lin"}  # fmt: skip
    assert qkv.shape == (3 * 16, 3 * 2) and not qkv[:16, 2:].any()  # q, k and v on the block diagonal
    ours = _ours(run)
    assert np.abs(_kohya_draw(tiny_flux_dir, exported.folder, "blocks-lora.safetensors") - ours).max() <= 1
    assert np.abs(_ours(tiny_flux_dir) - ours).max() > 1
    embedder = erase("esd", ["cat"], str(tiny_flux_dir), out=tmp_path / "embedder", progress=False,
                     sets=[*QUICK, "steps=1", "scope=full", "lora_rank=2", "lora_targets=x_embedder,add_q_proj"])
    with pytest.raises(InputError, match="x_embedder would be lost"):
        export_run(embedder, "someone/x", local_dir=tmp_path / "refused", no_eval=True, lora_format="kohya")
    assert not (tmp_path / "refused").exists()


def test_fused_flux_layers_come_back_as_their_parts_at_flux1_width(tmp_path):
    """At FLUX.1's widths (3072; a single-stream block's MLP 12288), through diffusers' own writer and converter:
    each part's update B A alpha / rank comes back from the fused layer, a part without an adapter (the single
    block's k) as none, and a layer of its own unchanged."""
    from diffusers import FluxPipeline

    from pipelines.families import FAMILIES
    from pipelines.kohya import write_kohya

    width, rank, alpha = 3072, 2, 4.0
    shapes = {"transformer_blocks.0.attn.to_q": (width, width), "transformer_blocks.0.attn.to_k": (width, width),
              "transformer_blocks.0.attn.to_v": (width, width), "single_transformer_blocks.0.attn.to_q": (width, width),
              "single_transformer_blocks.0.attn.to_v": (width, width),
              "single_transformer_blocks.0.proj_mlp": (width, 4 * width),
              "single_transformer_blocks.0.proj_out": (5 * width, width)}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    layers = {}
    for module, (inputs, outputs) in shapes.items():
        layers[f"{module}.lora_A.weight"] = torch.randn(rank, inputs, generator=generator)
        layers[f"{module}.lora_B.weight"] = torch.randn(outputs, rank, generator=generator)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata={"r": rank, "lora_alpha": alpha})  # fmt: skip
    kohya = write_kohya(tmp_path / "pytorch_lora_weights.safetensors", FAMILIES["flux"], None,
                        tmp_path / "kohya.safetensors")  # fmt: skip
    converted = FluxPipeline.lora_state_dict(str(tmp_path), weight_name=kohya.name)
    back = {key.removeprefix("transformer."): value for key, value in converted.items()}
    assert {key.split(".lora_")[0] for key in back} == set(shapes) | {"single_transformer_blocks.0.attn.to_k"}
    for module in shapes:
        expected = layers[f"{module}.lora_B.weight"] @ layers[f"{module}.lora_A.weight"] * alpha / rank
        update = back[f"{module}.lora_B.weight"] @ back[f"{module}.lora_A.weight"]
        assert torch.allclose(update, expected, atol=1e-4), module
    missing = back["single_transformer_blocks.0.attn.to_k.lora_B.weight"]
    assert not (missing @ back["single_transformer_blocks.0.attn.to_k.lora_A.weight"]).any()


def test_a_word_inserted_in_both_flux_encoders_encodes_as_the_prompt_that_holds_it(tiny_flux_dir):
    model = load_model(str(tiny_flux_dir))
    family, tower = model.family, model.family.text_tower(model)
    vocab = family.vocabulary(model, tower)
    assert vocab.shape == (len(model.tokenizer), 16 + 24) and family.word_parts(model) == (16, 24)
    seven = model.tokenizer("seven", add_special_tokens=False).input_ids
    # the word's T5 half is T5's own "seven": a word in both vocabularies
    assert model.pipe.tokenizer_2.convert_ids_to_tokens(family.t5_ids_of_clip_tokens(model)[seven].tolist()) == [
        "\u2581seven"]
    with torch.no_grad():
        inserted = family.encode_inserted(model, tower, model.tokenize(["a photo", "a red cat"]), vocab[seven][None])
        plain = model.encode(["seven a photo", "seven a red cat"])
        nothing = family.encode_inserted(model, tower, model.tokenize(["a photo"]), vocab[:0][None])
        unchanged = model.encode(["a photo"])  # (T5 differs in the last bit with and without autograd)
    # CLIP's word after its start token and its pooled end token one place on; T5's word in front
    assert torch.allclose(inserted, plain, atol=1e-6)
    assert torch.equal(nothing, unchanged)


def test_the_embedding_attack_reaches_into_both_flux_encoders(tiny_flux_dir):
    from evaluators.attack import AttackSettings, AttackTarget, attack_success_rate

    model = load_model(str(tiny_flux_dir))
    prompts, seeds = ["a cat", "a photo of a cat"], [0, 1]
    target = AttackTarget.of(model, model, NeverSees(), "cat", prompts, seeds)
    assert target.alphas is None  # a flow-matching model: the velocity loss
    words = model.family.vocabulary(model, target.tower)[torch.tensor([[5, 6, 7]] * 4)].requires_grad_(True)
    target.loss(target.encode(slice(None), words), slice(None), (400, 600), torch.Generator().manual_seed(0)).backward()
    assert words.grad[..., :16].abs().sum() > 0 and words.grad[..., 16:].abs().sum() > 0
    out, attacked = attack_success_rate(model, model, NeverSees(), "cat", prompts, seeds,
                                        AttackSettings(steps=20, lr=0.5), return_images=True)  # fmt: skip
    assert out["pairs"] == 4 and len(attacked) == 4 and json.dumps(out)
    # the diffusion-classifier loss the attack minimises goes down
    assert out["loss"]["last"] < out["loss"]["first"]


def test_the_attn_and_mlp_scopes_take_t5s_blocks_too(tiny_flux_dir):
    # T5 (FLUX's second encoder) names a block's attention `SelfAttention` and its MLP `DenseReluDense`, not CLIP's
    # `self_attn` / `mlp`: a scope that knew only CLIP's names would train nothing of it
    from erasure.common import select_trainable

    model = load_model(str(tiny_flux_dir))
    tower = model.family.text_tower(model)
    for scope, part in (("attn", ".SelfAttention."), ("mlp", ".DenseReluDense.")):
        select_trainable(tower, "text_encoder", f"text_encoder_2:{scope}")
        names = {n for n, p in tower.named_parameters() if p.requires_grad}
        assert names and all(part in n for n in names), scope


def _fewshot_sets(images: Path, *extra: str) -> list[str]:
    from erasure.registry import METHODS

    settings = {**METHODS["fewshot"].test_settings, "images": str(images), "stop_below": "none", "lr": 1e-2}
    return [f"{k}={v}" for k, v in settings.items()] + list(extra)


def _changed(base, run, name: str) -> set[str]:
    before = dict(getattr(base, name).named_parameters())
    return {n for n, p in getattr(run, name).named_parameters() if not torch.equal(p, before[n])}


def test_fewshot_erases_from_both_flux_text_encoders(tiny_flux_dir, concept_images, tmp_path):
    """Gradient ascent on the flow-matching loss of a few images: the scope's blocks of CLIP and of T5 move
    (few-shot's default: every MLP and the last block's attention), the rest stays; the run loads in plain
    `FluxPipeline` and draws the toolkit's pixels."""
    from diffusers import FluxPipeline

    run = erase("fewshot", ["cat"], str(tiny_flux_dir), out=tmp_path / "run", progress=False,
                sets=_fewshot_sets(concept_images))  # fmt: skip
    assert json.loads((run / "erasure.json").read_text())["changed_components"] == ["text_encoder", "text_encoder_2"]
    base, erased = load_model(str(tiny_flux_dir)), load_model(str(run))
    t5 = _changed(base, erased, "text_encoder_2")
    assert t5 and all(".DenseReluDense." in n or ".SelfAttention." in n for n in t5)
    assert _changed(base, erased, "text_encoder") and not _changed(base, erased, "transformer")
    ours = _ours(run)
    plain = FluxPipeline.from_pretrained(run)
    theirs = plain("a photo of a cat", height=16, width=16, num_inference_steps=4, guidance_scale=3.5,
                   max_sequence_length=T5_LENGTH, generator=torch.Generator().manual_seed(7)).images[0]  # fmt: skip
    assert np.abs(np.asarray(theirs, float) - ours).max() <= 1 and np.abs(_ours(tiny_flux_dir) - ours).max() > 1


def test_fewshot_tokens_on_flux_moves_only_the_concepts_rows_of_each_vocabulary(tiny_flux_dir, concept_images,
                                                                               tmp_path):  # fmt: skip
    run = erase("fewshot", ["cat"], str(tiny_flux_dir), out=tmp_path / "run", progress=False,
                sets=_fewshot_sets(concept_images, "scope=tokens"))  # fmt: skip
    base, erased = load_model(str(tiny_flux_dir)), load_model(str(run))
    for name, tokenizer in (("text_encoder", base.tokenizer), ("text_encoder_2", base.pipe.tokenizer_2)):
        before = getattr(base, name).get_input_embeddings().weight
        rows = (getattr(erased, name).get_input_embeddings().weight != before).any(dim=1).nonzero().flatten().tolist()
        assert rows == tokenizer("cat", add_special_tokens=False).input_ids, name  # its own tokenizer's ids


def test_a_fewshot_lora_on_flux_holds_clip_only(tiny_flux_dir, concept_images, tmp_path):
    """diffusers' FLUX LoRA file has no place for T5's adapters: a scope that trains T5 as LoRA is refused before
    loading; on CLIP alone, plain `load_lora_weights` draws the run, from its diffusers file and from its kohya
    export (`lora_te1_`)."""
    from ui.hub import export_run

    with pytest.raises(InputError, match="not text_encoder_2"):
        erase("fewshot", ["cat"], str(tiny_flux_dir), out=tmp_path / "refused", progress=False,
              sets=_fewshot_sets(concept_images, "lora_rank=2"))  # fmt: skip
    assert not (tmp_path / "refused").exists()
    run = erase("fewshot", ["cat"], str(tiny_flux_dir), out=tmp_path / "run", progress=False,
                sets=_fewshot_sets(concept_images, "lora_rank=2", "scope=text_encoder:full", "lr=0.1"))  # fmt: skip
    assert json.loads((run / "erasure.json").read_text())["lora"]["components"] == ["text_encoder"]
    ours = _ours(run)
    assert np.abs(_plain(tiny_flux_dir, lora_run=run) - ours).max() <= 1
    exported = export_run(run, "someone/clip", local_dir=tmp_path / "hub", no_eval=True, lora_format="kohya")
    assert np.abs(_kohya_draw(tiny_flux_dir, exported.folder, "clip-lora.safetensors") - ours).max() <= 1
    assert np.abs(_ours(tiny_flux_dir) - ours).max() > 1


@pytest.mark.parametrize(("method", "sets", "message"), [
    ("advunlearn", [], "advunlearn cannot erase from flux"),
    ("stereo", [], "stereo cannot erase from flux"),
    ("sfd", [], "sfd cannot erase from flux"),
    ("esd", ["scope=xattn"], "no cross-attention"),
])  # fmt: skip
def test_what_flux_cannot_take_is_refused_before_loading(method, sets, message, tiny_flux_dir, tmp_path):
    with pytest.raises(InputError, match=message):
        erase(method, ["cat"], str(tiny_flux_dir), out=tmp_path / "run", progress=False, sets=sets)
    assert not (tmp_path / "run").exists()


def test_an_interrupted_flux_esd_run_resumes_to_the_uninterrupted_adapters(tiny_flux_dir, tmp_path):
    from safetensors.torch import load_file

    kwargs = {"sets": QUICK + ["steps=4"], "checkpoint_every": 2, "progress": False, "save": "lora"}

    def stop_at_3(step, total, logs):
        if step == 3:
            raise KeyboardInterrupt

    whole = erase("esd", ["cat"], str(tiny_flux_dir), out=tmp_path / "whole", **kwargs)
    with stops_resumably():
        erase("esd", ["cat"], str(tiny_flux_dir), out=tmp_path / "resumed", after_step=stop_at_3, **kwargs)
    resumed = erase("esd", ["cat"], str(tiny_flux_dir), out=tmp_path / "resumed", resume=True, **kwargs)
    a, b = (load_file(str(run / "pytorch_lora_weights.safetensors")) for run in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_partial_flux_trajectory_stops_at_its_steps_noise_level_with_the_window_of_that_step(tiny_flux_dir):
    # ESD queries the transformer at a timestep in [t, t_next): t, the noise level x_t reached after `stop` Euler
    # steps, and t_next, the level that step started from (1000 sigma); a window from the wrong neighbour would
    # query the model at noise levels x_t never had.
    model = load_model(str(tiny_flux_dir))
    family = model.family
    scheduler = family.sampling_scheduler(model, 4, "cpu")
    noise = torch.randn(family.latent_shape(model, 1), generator=torch.Generator().manual_seed(3))
    cond = model.encode(["a photo of a cat"])
    sigmas = scheduler.sigmas
    _, t, t_next = family.trajectory(model.unet, scheduler, cond, None, 2, 3.5, noise)
    assert (t, t_next) == (int(sigmas[2] * 1000), int(sigmas[1] * 1000)) and t < t_next
    x_0, t, t_next = family.trajectory(model.unet, scheduler, cond, None, 0, 3.5, noise)
    assert torch.equal(x_0, noise) and t == 1000  # no step taken: the pure noise at sigma 1


def test_the_flux_training_target_is_the_velocity_the_schedulers_euler_step_follows(tiny_flux_dir):
    # A method's loss compares the transformer's output with `noised`'s target: FLUX predicts the velocity
    # noise - x0, so one Euler step of the model's own FlowMatchEulerDiscreteScheduler along that target takes the
    # noised latent at one sigma to the noised latent at the next. A velocity of the wrong sign would train every
    # FLUX run to walk away from its data.
    model = load_model(str(tiny_flux_dir))
    family = model.family
    scheduler = family.sampling_scheduler(model, 4, "cpu")
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    t = scheduler.timesteps[1:2]
    x_t, target = family.noised(model, x0, noise, t)
    sigma, after = scheduler.sigmas[1], scheduler.sigmas[2]
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * noise)
    stepped = scheduler.step(target, t[0], x_t).prev_sample
    torch.testing.assert_close(stepped, family.noised(model, x0, noise, scheduler.timesteps[2:3])[0])
    assert 0 < after < sigma < 1


def test_the_flux_family_scales_vae_latents_as_the_pipeline_unscales_them_before_decoding(tiny_flux_dir):
    # Few-shot erasing trains on real images' latents: `scale_latents` must be the inverse of FluxPipeline's own
    # `latents / scaling_factor + shift_factor` before it decodes, so that the transformer sees latents of the
    # distribution it samples (FLUX's VAE has a shift, unlike SD's: subtracting it after scaling would not undo it).
    model = load_model(str(tiny_flux_dir))
    config = model.vae.config
    assert config.shift_factor and config.scaling_factor != 1
    latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    scaled = model.family.scale_latents(model, latents)
    torch.testing.assert_close(scaled / config.scaling_factor + config.shift_factor, latents)


def test_the_embedding_attack_steps_each_encoders_part_of_a_word_in_units_of_its_own_rms(tiny_flux_dir):
    # T5's input embeddings are far larger than CLIP's: in units of the whole vocabulary's RMS, the CLIP part of a
    # free word would jump far past its encoder's scale. Adam's first step moves a coordinate by ~lr.
    from evaluators.attack import AttackSettings, AttackTarget, attack_success_rate

    model = load_model(str(tiny_flux_dir))
    encoded, encode = [], AttackTarget.encode

    def recording(self, rows, words):
        encoded.append(words.detach().clone())
        return encode(self, rows, words)

    settings = AttackSettings(steps=1, lr=0.01)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AttackTarget, "encode", recording)
        attack_success_rate(model, model, NeverSees(), "cat", ["a cat"], [0], settings)
    widths = model.family.word_parts(model)
    vocab = model.family.vocabulary(model, model.family.text_tower(model))
    for moved, rows in zip((encoded[1] - encoded[0]).split(widths, dim=-1), vocab.split(widths, dim=-1)):
        assert float(moved.abs().max()) == pytest.approx(settings.lr * float(rows.pow(2).mean().sqrt()), rel=0.01)
