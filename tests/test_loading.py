import time

import numpy as np
import pytest
import torch

from pipelines import InputError, load_model, resolve
from pipelines.single_file import save_single_file

from .conftest import tiny_text_encoder


def _same(a, b) -> bool:
    return len(a) == len(b) > 0 and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_local_folder_loads_with_all_parts(tiny_pipeline_dir, monkeypatch):
    model = load_model(str(tiny_pipeline_dir))
    assert model.kind == "text-to-image"
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size
    assert len(model.tokenizer) == 49408 and model.vae is not None and model.scheduler is not None
    assert model.source.origin == "local" and len(model.source.describe()["sha256"]) == 64
    # a folder named relative to where the command ran is recorded absolute: a run's base is found from anywhere
    monkeypatch.chdir(tiny_pipeline_dir.parent)
    assert resolve(tiny_pipeline_dir.name).describe()["path"] == str(tiny_pipeline_dir.resolve())


def test_generation_is_deterministic_per_seed(tiny_model):
    a = tiny_model.generate(["a cat", "a dog"], [0, 1, 2], steps=3, batch_size=6)
    assert _same(a[1], tiny_model.generate(["a cat", "a dog"], [0, 1, 2], steps=3, batch_size=6)[1])
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(a[0][1]))  # seeds differ
    # what a method resizes real images to is the side the pipeline draws (latent side x the VAE's factor)
    assert a[0][0].size == (tiny_model.resolution, tiny_model.resolution) == (16, 16)
    # Another batching draws the same noise per seed; BLAS kernels for other batch sizes may
    # round differently, by at most one grey level.
    b = tiny_model.generate(["a dog"], [2, 1], steps=3, batch_size=1)
    for x, y in zip([a[1][2], a[1][1]], b[0]):
        assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1
    # given embeddings (the attacks'), one a batch: each row is drawn from its own embedding, past the first batch too
    c = tiny_model.generate_each(tiny_model.encode(["a cat", "a dog"]), [2, 1], steps=3, batch_size=1)
    for x, y in zip([a[0][2], a[1][1]], c):
        assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1


def test_chunked_decoding_gives_diffusers_own_pixels(tiny_model):
    # 18 images in one batch: decoded as 16 + 2 by decode_latents, at once by the stock pipeline
    prompts, seeds = ["a cat", "a dog", "a red bird"], list(range(6))
    ours = [im for row in tiny_model.generate(prompts, seeds, steps=3, batch_size=18) for im in row]
    embeds = tiny_model.encode([p for p in prompts for _ in seeds])
    stock = tiny_model.pipe(
        prompt_embeds=embeds, negative_prompt_embeds=tiny_model.encode([""]).expand(len(embeds), -1, -1),
        num_inference_steps=3, guidance_scale=tiny_model.sampling["guidance"], output_type="pil",
        generator=[torch.Generator().manual_seed(s) for _ in prompts for s in seeds],
    ).images  # fmt: skip
    assert len(ours) == len(stock) == 18
    # exact here; BLAS kernels for the chunk's batch size may round by a grey level on other CPUs
    assert max(np.abs(np.asarray(a, int) - np.asarray(b, int)).max() for a, b in zip(ours, stock)) <= 1
    assert any(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, stock))


def test_single_file_checkpoint_loads_to_the_same_model(tiny_model, tiny_pipeline_dir, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_single_file(tiny_model, path)
    loaded = load_model(str(path), single_file_config=tiny_pipeline_dir)
    assert loaded.source.origin == "single-file"
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(tiny_model, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert _same(tiny_model.generate(["a cat"], [0], steps=3)[0], loaded.generate(["a cat"], [0], steps=3)[0])


def test_a_ckpt_loads_and_a_compressed_one_is_refused_before_torch_inflates_it(tiny_model, tiny_pipeline_dir,
                                                                             tmp_path):  # fmt: skip
    import io
    import zipfile

    from safetensors.torch import load_file

    save_single_file(tiny_model, tmp_path / "tiny.safetensors")
    torch.save({"state_dict": load_file(str(tmp_path / "tiny.safetensors"))}, tmp_path / "tiny.ckpt")
    loaded = load_model(str(tmp_path / "tiny.ckpt"), single_file_config=tiny_pipeline_dir)
    assert loaded.source.origin == "single-file" and loaded.family.name == "sd1"
    assert _same(tiny_model.generate(["a cat"], [0], steps=3)[0], loaded.generate(["a cat"], [0], steps=3)[0])
    # the same archive with deflated entries (torch.save never writes them; torch.load inflates whatever they declare)
    deflated = io.BytesIO()
    with zipfile.ZipFile(tmp_path / "tiny.ckpt") as original, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        for name in original.namelist():
            z.writestr(name, original.read(name))
    (tmp_path / "deflated.ckpt").write_bytes(deflated.getvalue())
    with pytest.raises(InputError, match=r"refused to load .*deflated\.ckpt: it holds compressed entries"):
        load_model(str(tmp_path / "deflated.ckpt"), single_file_config=tiny_pipeline_dir)


def test_pickled_weights_in_a_folder_are_checked_before_diffusers_loads_them(tiny_model, tiny_pipeline_dir, tmp_path):
    """A folder with `.bin` weights and no safetensors: diffusers and transformers torch.load them themselves, so
    they are checked first, as this project's own torch.load is: a file of torch's older format that declares
    storages it does not hold would load holding stray memory."""
    import io
    import shutil

    from safetensors.torch import load_file

    from .conftest import without_storage_bytes

    folder = tmp_path / "bin"
    shutil.copytree(tiny_pipeline_dir, folder)
    weights = next((folder / "text_encoder").glob("*.safetensors"))
    state = load_file(str(weights))
    weights.unlink()
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=False)
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(buffer.getvalue())
    loaded = load_model(str(folder))  # a sound one loads as before
    assert _same(tiny_model.generate(["a cat"], [0], steps=3)[0], loaded.generate(["a cat"], [0], steps=3)[0])
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(without_storage_bytes(buffer.getvalue()))
    with pytest.raises(InputError, match=r"pytorch_model.bin: it declares \d+ storage.s. whose bytes it does not hold"):
        load_model(str(folder))


def test_swapped_text_encoder_changes_outputs_and_survives_save(tiny_model, tmp_path):
    before = tiny_model.generate(["a cat"], [0, 1], steps=3)[0]
    tiny_model.replace("text_encoder", tiny_text_encoder(seed=7))
    after = tiny_model.generate(["a cat"], [0, 1], steps=3)[0]
    assert not _same(before, after)
    tiny_model.save(tmp_path / "saved")
    reloaded = load_model(str(tmp_path / "saved"))
    assert _same(after, reloaded.generate(["a cat"], [0, 1], steps=3)[0])
    # the component alone is plug-and-play: load it into a fresh copy of the base pipeline
    fresh = load_model(str(tiny_model.source.path))
    fresh.load_component("text_encoder", tmp_path / "saved" / "text_encoder")
    assert _same(after, fresh.generate(["a cat"], [0, 1], steps=3)[0])


def test_offline_hub_id_fails_fast_with_a_readable_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.time()
    with pytest.raises(InputError, match="erasure-tests/no-such-model"):
        resolve("erasure-tests/no-such-model")
    assert time.time() - started < 20
    for value in ("1", "true", "YES"):  # read as huggingface_hub reads it
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        with pytest.raises(InputError, match="HF_HUB_OFFLINE is set"):
            resolve("erasure-tests/no-such-model")


def test_a_mistyped_run_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`runs/esd-sevn` has a Hub id's shape; beside a runs/ folder it is a path with a typo (online, it would have
    fetched a stranger's model)."""
    (tmp_path / "runs" / "esd-seven").mkdir(parents=True)
    (tmp_path / "runs" / ".adv-seven.work").mkdir()  # a run still training: its staging folder is no model to suggest
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a lookup would fail with another message
    with pytest.raises(InputError, match=r"no such path: runs/esd-sevn .*did you mean runs/esd-seven\?"):
        resolve("runs/esd-sevn")
    with pytest.raises(InputError, match="no such path: runs/adv-sevn") as refusal:
        resolve("runs/adv-sevn")
    assert ".adv-seven.work" not in str(refusal.value)
    with pytest.raises(InputError, match=r"did you mean runs/\.adv-seven\.work\?"):  # a hidden name, among hidden names
        resolve("runs/.adv-sevn.work")


def test_bad_inputs_are_input_errors(tmp_path, tiny_pipeline_dir):
    with pytest.raises(InputError, match="no such path"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="not a model folder"):
        resolve(str(tmp_path))
    with pytest.raises(InputError, match="empty model name"):
        resolve("  ")
    junk = tmp_path / "junk.txt"
    junk.write_text("x")
    with pytest.raises(InputError, match="not a model"):
        resolve(str(junk))


def test_corrupt_safetensors_is_refused_before_loading(tmp_path, tiny_pipeline_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(InputError, match="corrupt safetensors"):
        load_model(str(broken))
    single = tmp_path / "broken.safetensors"
    single.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(InputError, match="corrupt safetensors"):
        load_model(str(single), single_file_config=tiny_pipeline_dir)
    # a component swapped in on its own is checked as a whole model is, not handed to the library unread
    with pytest.raises(InputError, match="corrupt safetensors"):
        load_model(str(tiny_pipeline_dir)).load_component("unet", broken / "unet")


def test_shipped_sd1_configs_describe_stable_diffusion_1(tmp_path):
    """The configs used for offline single-file SD 1.x loading build the real architecture sizes."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.diffusion import SHIPPED_CONFIGS

    root = SHIPPED_CONFIGS / "sd-v1"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(unet) / 1e6) == 860
    assert round(count(vae) / 1e6) == 84
    assert round(count(text) / 1e6) == 123


def _parameters_in_millions(root, names: dict[str, str]) -> dict[str, int]:
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    counts = {}
    with init_empty_weights():
        for folder, cls in names.items():
            if hasattr(diffusers, cls):
                model_cls = getattr(diffusers, cls)
                model = model_cls.from_config(model_cls.load_config(root / folder))
            else:
                model_cls = getattr(transformers, cls)
                model = model_cls(model_cls.config_class.from_pretrained(root / folder))
            counts[folder] = round(sum(p.numel() for p in model.parameters()) / 1e6)
    return counts


def test_shipped_sd2_and_sdxl_configs_build_the_real_architectures():
    """The configs of offline single-file SD 2.x and SDXL loading (and of real-size random models built for
    GPU checks) give the published parameter counts."""
    from pipelines.diffusion import SHIPPED_CONFIGS, _config_tokenizer

    sd2 = _parameters_in_millions(SHIPPED_CONFIGS / "sd-v2", {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                                                              "text_encoder": "CLIPTextModel"})  # fmt: skip
    assert sd2 == {"unet": 866, "vae": 84, "text_encoder": 340}
    xl = _parameters_in_millions(SHIPPED_CONFIGS / "sdxl-base", {
        "unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection"})  # fmt: skip
    assert xl == {"unet": 2567, "vae": 84, "text_encoder": 123, "text_encoder_2": 695}
    assert _config_tokenizer(SHIPPED_CONFIGS / "sd-v2" / "tokenizer").pad_token == "!"
    assert _config_tokenizer(SHIPPED_CONFIGS / "sdxl-base" / "tokenizer_2").pad_token == "!"
    assert _config_tokenizer(SHIPPED_CONFIGS / "sdxl-base" / "tokenizer").model_max_length == 77


def test_shipped_configs_give_each_family_its_prediction_type_and_text_activation():
    # A single file carries weights only: what the UNet predicts and how the text tower computes come from these
    # configs, and parameter counts cannot tell them apart. SD 2.x (768 px, the shipped layout) predicts v and
    # runs OpenCLIP's GELU; SDXL predicts eps, its CLIP-L encoder runs quick GELU and its OpenCLIP bigG one GELU.
    # A wrong entry would load the right weights into a model that draws noise.
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    from transformers import CLIPTextConfig

    from pipelines.diffusion import SHIPPED_CONFIGS

    sd2, xl = SHIPPED_CONFIGS / "sd-v2", SHIPPED_CONFIGS / "sdxl-base"
    assert DDIMScheduler.from_pretrained(sd2 / "scheduler").config.prediction_type == "v_prediction"
    assert EulerDiscreteScheduler.from_pretrained(xl / "scheduler").config.prediction_type == "epsilon"
    activations = {folder: CLIPTextConfig.from_pretrained(folder).hidden_act
                   for folder in (sd2 / "text_encoder", xl / "text_encoder", xl / "text_encoder_2")}  # fmt: skip
    assert list(activations.values()) == ["gelu", "quick_gelu", "gelu"]


def test_a_single_file_without_configs_gets_the_shipped_configs_of_its_architecture(tmp_path):
    # Offline, a single file given without --model-config is built from the configs shipped for what diffusers
    # recognises it as: SD 2.x's OpenCLIP-H width (1024) in the UNet's cross-attention, SDXL's OpenCLIP bigG
    # embedder, or SD 1.x. Another family's configs would build another architecture (or refuse the weights).
    from safetensors.torch import save_file

    from pipelines.diffusion import SHIPPED_CONFIGS, _shipped_config_for

    cross_attention = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    files = {"sd-v2": {cross_attention: torch.zeros(2, 1024)},
             "sdxl-base": {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)},
             "sd-v1": {cross_attention: torch.zeros(2, 768),
                       "model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(2)}}  # fmt: skip
    for name, weights in files.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(weights, str(path))
        assert _shipped_config_for(path) == SHIPPED_CONFIGS / name, name


def test_a_model_whose_card_names_no_sampling_draws_at_its_pipelines_default_guidance(tiny_model):
    # A real checkpoint carries no erasure_model.json: its samples, evaluations and card snippets use the guidance
    # its own diffusers pipeline defaults to (StableDiffusionPipeline's 7.5; FluxPipeline's 28 steps at 3.5), so
    # that the toolkit's images and a plain diffusers user's images of the same model agree.
    import inspect

    from diffusers import FluxPipeline, StableDiffusionPipeline

    from pipelines.diffusion import FLUX_SAMPLING

    def default(pipeline, name):
        return inspect.signature(pipeline.__call__).parameters[name].default

    assert "sampling" not in tiny_model.source.card
    assert tiny_model.sampling["guidance"] == default(StableDiffusionPipeline, "guidance_scale")
    assert FLUX_SAMPLING == {"steps": default(FluxPipeline, "num_inference_steps"),
                             "guidance": default(FluxPipeline, "guidance_scale")}  # fmt: skip


def test_a_models_digest_covers_its_weight_files_names_and_contents_pickled_ones_too(tmp_path):
    """The digest pins what was erased: another weight file, moved or changed, is another model; its configs are not
    weights (a run folder's own manifest is written after the digest of what it holds)."""
    import shutil

    from pipelines.loading import weights_digest

    model = tmp_path / "model"
    for part in ("unet", "vae"):
        (model / part).mkdir(parents=True)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet weights")
    (model / "vae" / "model.bin").write_bytes(b"vae weights, pickled")
    (model / "model_index.json").write_text("{}")
    digest = weights_digest(model)
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert weights_digest(model) == digest
    (model / "vae" / "model.bin").write_bytes(b"other vae weights")
    assert weights_digest(model) != digest
    (model / "vae" / "model.bin").write_bytes(b"vae weights, pickled")
    assert weights_digest(model) == digest
    shutil.move(model / "unet", model / "text_encoder")  # the same bytes as another component
    assert weights_digest(model) != digest


def test_model_config_is_taken_when_one_of_the_compared_models_is_a_single_file(tmp_path, tiny_pipeline_dir):
    """`eval FILE --baseline FOLDER --model-config DIR`: the configs are for the single file, which one of them is."""
    from pipelines.loading import ModelSource, check_model_config

    single = tmp_path / "erased.safetensors"
    single.write_bytes(b"")
    file_source = ModelSource(str(single), "text-to-image", single, "single-file")
    folder_source = ModelSource(str(tiny_pipeline_dir), "text-to-image", tiny_pipeline_dir, "local")
    check_model_config(str(tiny_pipeline_dir), file_source, folder_source)
    check_model_config(str(tiny_pipeline_dir), folder_source, file_source)
    with pytest.raises(InputError, match="applies to single-file checkpoints"):
        check_model_config(str(tiny_pipeline_dir), folder_source, folder_source)


def test_the_hub_is_reachable_when_the_host_and_port_of_hf_endpoint_accept_a_connection(monkeypatch):
    import socket

    from pipelines.loading import hub_reachable

    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable(timeout=2.0)
    assert not hub_reachable(timeout=2.0)  # the same port, closed
    # an endpoint without a port (a mirror) is probed on its scheme's: https 443, http 80
    probed = []

    def refuse(address, timeout=None):
        probed.append(address)
        raise OSError("refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for endpoint in ("https://hf-mirror.example", "http://hf-mirror.example"):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert not hub_reachable(timeout=1.0)
    assert probed == [("hf-mirror.example", 443), ("hf-mirror.example", 80)]


def test_an_exported_gan_folder_with_its_generator_in_a_subfolder_loads_as_the_gan(tmp_path):
    """`erasure export` of a GAN run puts the generator in generator/ (beside the card): such a folder is a GAN."""
    import shutil

    from pipelines.zoo import models as zoo

    (tmp_path / "hub" / "generator").mkdir(parents=True)
    for name in ("generator.safetensors", "generator_config.json"):
        shutil.copyfile(zoo.embedded_path("digits-gan") / name, tmp_path / "hub" / "generator" / name)
    assert resolve(str(tmp_path / "hub")).kind == "gan"
    assert _same(load_model(str(tmp_path / "hub")).generate([0, 1]), load_model("digits-gan").generate([0, 1]))
