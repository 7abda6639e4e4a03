"""Tiny real components (diffusers UNet/VAE/scheduler, transformers CLIP text model, the real CLIP
tokenizer) for fast CPU tests; no mocks of any library."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile

_HOME = tempfile.mkdtemp(prefix="erasure-tests-home-")
os.environ.setdefault("HF_HOME", os.path.join(_HOME, "hf"))
os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(_HOME, "gradio"))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two threads in a run of its own; one in each pytest-xdist worker, as the workers share the cores. Scripts the tests
# start read the number back (tests/erase_run.py), so that they sum as the test's process does.
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
os.environ["ERASURE_TEST_THREADS"] = str(TEST_THREADS)
torch.set_num_threads(TEST_THREADS)


@contextlib.contextmanager
def stops_resumably():
    """The block ends a run with a Ctrl-C after a checkpoint: it comes through as the KeyboardInterrupt it is, and
    names the run folder that `resume=True` continues."""
    from erasure.output import resumable_run

    with pytest.raises(KeyboardInterrupt) as stopped:
        yield
    assert resumable_run(stopped.value) is not None


def tiny_components(seed: int = 0) -> dict:
    """The parts of a StableDiffusionPipeline at toy size (16x16 images, 8x8 latents)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )  # fmt: skip
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
        )
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": clip_tokenizer(16),
        "scheduler": scheduler, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
    }  # fmt: skip


def tiny_sdxl_components(seed: int = 0, second_width: int = 16, second_layers: int = 3) -> dict:
    """A tiny SDXL; a single file needs a second encoder of another width than the first (diffusers tells
    the two apart by width) and of at least 10 layers (it recognises SDXL by its 10th)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipelines.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB_SIZE, intermediate_size=32, num_attention_heads=2, max_position_embeddings=16,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)  # fmt: skip
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + second_width, norm_num_groups=4, attention_head_dim=2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # fmt: skip
    return {
        "unet": unet, "vae": vae, "scheduler": scheduler,
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text, hidden_size=16, num_hidden_layers=3)),
        "tokenizer": clip_tokenizer(16),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(
            **text, hidden_size=second_width, num_hidden_layers=second_layers, projection_dim=8)),
        "tokenizer_2": clip_tokenizer(16, pad_token="!"),
    }  # fmt: skip


def tiny_t5_tokenizer(max_length: int = 12):
    """A real T5TokenizerFast over a small unigram vocabulary (the real one is a 790 KB SentencePiece model)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    words = "a an the photo of image painting picture cat dog seven three red blue green car tree house".split()
    characters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = ["<pad>", "</s>", "<unk>", *(f"\u2581{w}" for w in words), "\u2581", *characters]
    tokenizer = Tokenizer(models.Unigram([(piece, -float(i)) for i, piece in enumerate(pieces)], unk_id=2))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)  # fmt: skip


def tiny_flux_components(seed: int = 0) -> dict:
    """The parts of a FluxPipeline at toy size: one double- and one single-stream block, CLIP-L-like pooled and
    T5-like token embeddings, a 16-channel packed latent of a 4-channel VAE (16x16 images)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from pipelines.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(seed)
    t5_tokenizer = tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    ))  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "tokenizer": clip_tokenizer(16),
            "text_encoder_2": t5, "tokenizer_2": t5_tokenizer, "scheduler": scheduler}  # fmt: skip


# Tests CI leaves out, to stay within its 30 minutes on 2 cores (the machine's speed varies by a fifth between runs):
# `pytest -m ""` runs them too, about 5 minutes more. Each one's point is also made in CI, on another case:
# two processes against one for ESD, Text-to-Unlearn and Adapt-then-Unlearn; kill-and-resume on SDXL for ESD,
# AdvUnlearn and few-shot, on digits for ESD, AdvUnlearn, few-shot and Text-to-Unlearn, and the resume of STEREO,
# SFD and Adapt-then-Unlearn, bit for bit, in their own test files; the attacks through
# `erasure eval` with embedding and guidance, and each attack on a prompt file's rows; KID against itself; compiling
# on SD 1.x; the GPU script on a tiny FLUX.
EXTENDED = {
    "tests/test_distributed.py::test_every_method_trains_as_one_on_two_processes[advunlearn]",
    "tests/test_distributed.py::test_every_method_trains_as_one_on_two_processes[fewshot]",
    "tests/test_distributed.py::test_every_method_trains_as_one_on_two_processes[sfd]",
    "tests/test_distributed.py::test_every_method_trains_as_one_on_two_processes[stereo]",
    "tests/test_sdxl.py::test_each_method_killed_on_sdxl_resumes_to_the_uninterrupted_run[esd+component=text_encoder]",
    "tests/test_sdxl.py::test_each_method_killed_on_sdxl_resumes_to_the_uninterrupted_run[stereo]",
    "tests/test_sdxl.py::test_each_method_killed_on_sdxl_resumes_to_the_uninterrupted_run[sfd+override=a dog]",
    "tests/test_methods.py::test_method_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run[stereo]",
    # their resume is bit-identical in test_adapt_unlearn.py and test_sfd.py; the kill is the loop's, as other methods'
    "tests/test_methods.py::test_method_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run[adapt-unlearn]",
    "tests/test_methods.py::test_method_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run[sfd]",
    "tests/test_evaluators.py::test_kid_between_digits_sd_and_a_visibly_different_model_is_clearly_positive",
    "tests/test_attacks.py::test_eval_runs_each_attack_on_the_digits_model[unlearndiffatk]",
    "tests/test_attacks.py::test_eval_runs_each_attack_on_the_digits_model[textual-inversion]",
    "tests/test_advunlearn.py::test_a_compiled_unet_trains_the_encoder_the_eager_unet_trains[sdxl]",
    "tests/test_gpu_scale.py::test_the_script_runs_end_to_end_on_a_tiny_sdxl",
    # the two longest of the suite (92 s and 77 s of a worker's time in CI on 2026-12-07): evaluation on one process,
    # and each GAN method's training on one, are tested throughout; text2unlearn trains on two processes in CI
    "tests/test_distributed.py::test_eval_on_two_processes_reports_what_one_process_does",
    "tests/test_distributed.py::test_every_method_trains_as_one_on_two_processes[adapt-unlearn]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in EXTENDED:
            item.add_marker(pytest.mark.extended)


def without_storage_bytes(legacy: bytes) -> bytes:
    """A file in torch's older format, cut after its object and given an empty list of storages: torch.load would
    allocate the storages the object declares and fill none of them."""
    import io
    import pickle
    import pickletools

    stream = io.BytesIO(legacy)
    for _ in range(4):  # magic number, version, system facts, the object
        for _ in pickletools.genops(stream):
            pass
    return legacy[: stream.tell()] + pickle.dumps([], protocol=2)  # as torch.save writes it


def dead_pid() -> int:
    """The id of a process that has ended (a killed writer's, in the name of the staging folder it left)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def tiny_text_encoder(seed: int):
    return tiny_components(seed)["text_encoder"]


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A saved tiny StableDiffusionPipeline folder (diffusers layout, safetensors)."""
    from diffusers import StableDiffusionPipeline

    path = tmp_path_factory.mktemp("tiny") / "tiny-sd"
    StableDiffusionPipeline(**tiny_components()).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def tiny_model(tiny_pipeline_dir):
    from pipelines import load_model

    return load_model(str(tiny_pipeline_dir))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty temporary working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> str:
    """The name `load_clip` takes for a tiny open_clip model with random weights (the real classes)."""
    import json

    import open_clip

    folder = tmp_path_factory.mktemp("open-clip-config")
    (folder / "erasure-tiny-test.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(folder)
    return "open_clip:erasure-tiny-test"


def tiny_gan(seed: int = 0, size: int = 16):
    """A tiny StyleGAN2 generator and discriminator (this project's implementation)."""
    from pipelines.stylegan2 import Discriminator, Generator, StyleGAN2Config

    config = StyleGAN2Config(size=size, style_dim=8, n_mlp=2, channels={4: 8, 8: 8, 16: 4, 32: 4})
    torch.manual_seed(seed)
    return Generator(config).eval(), Discriminator(config).eval()


def check_truncation_centre_follows_the_mapping(base: str, run, atol: float) -> None:
    """A GAN run that trains the mapping saves, as the centre truncation pulls towards, the mean w of its own mapping
    (StyleGAN2's 4096 codes of seed 0), not the base model's."""
    from pipelines import load_model

    base_model, erased = load_model(base), load_model(str(run))
    z = torch.randn(4096, erased.generator.config.style_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        centre = erased.generator.mapping(z).mean(0, keepdim=True)
    assert torch.allclose(erased.latent_avg, centre, atol=atol)
    assert not torch.allclose(base_model.latent_avg, centre, atol=atol)


def record_esd_targets(family, monkeypatch, method=None) -> list:
    """Record each ESD step's target pair with the inputs of the two no-grad denoiser calls it came from:
    [((eps_empty, x_t, t, cond), (eps_concept, x_t, t, cond)), ...], so that a test can recompute them on the
    model they should have come from (`method`: the module whose `esd_target` is recorded; ESD's by default).
    `monkeypatch.undo()` ends the recording."""
    import erasure.esd
    from erasure.common import esd_target

    calls, targets = [], []
    denoise = family.denoise

    def recording_denoise(unet, x_t, t, cond):
        if not torch.is_grad_enabled():
            calls.append((x_t.clone(), t.clone(), cond.clone()))
        return denoise(unet, x_t, t, cond)

    def recording_target(eps_empty, eps_concept, eta):
        targets.append(((eps_empty.clone(), *calls[-2]), (eps_concept.clone(), *calls[-1])))
        return esd_target(eps_empty, eps_concept, eta)

    monkeypatch.setattr(family, "denoise", recording_denoise)
    monkeypatch.setattr(method or erasure.esd, "esd_target", recording_target)
    return targets


@pytest.fixture(scope="session")
def tiny_gan_checkpoint(tmp_path_factory):
    """A rosinality-format `.pt` (generator and discriminator) of a tiny StyleGAN2."""
    from pipelines.gan_checkpoints import save_rosinality

    path = tmp_path_factory.mktemp("tiny-gan") / "tiny-stylegan2.pt"
    save_rosinality(path, *tiny_gan())
    return path


@pytest.fixture(scope="module")
def concept_images(tmp_path_factory):
    """A few pictures of "the concept" for few-shot erasing (random, but real image files)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


class NeverSees:
    """A judge that never sees the concept: the attacks then run all their steps."""

    def detects(self, images, concept=None):
        return torch.zeros(len(images), dtype=torch.bool)

    def describe(self):
        return {"judge": "never"}
