"""STEREO: the compositional target on small tensors, textual inversion finding a word the UNet denoises
into the images, and stage 2 starting again from the original UNet (tiny real components)."""

import pytest
import torch

from erasure.api import erase
from erasure.common import denoising_loss
from erasure.config import build_config, parse_sets
from erasure.stereo import compositional_target, initial_word, invert
from erasure.stereo import erase as stereo_erase
from erasure.training import RunContext
from pipelines import load_model
from pipelines.errors import InputError
from pipelines.images import encode_latents
from pipelines.text_embeddings import encode_with_inserted, token_embeddings

QUICK = ["rounds=2", "search_steps=2", "inversion_steps=2", "inversion_images=4", "inversion_batch=2", "ddim_steps=3",
         "batch_size=2", "steps=2", "prompt_templates={},a {}"]  # fmt: skip


def test_the_target_weighs_the_anchor_s_minus_one_and_the_erased_words_s_plus_one():
    empty, anchor = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0])
    erased = [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 2.0])]  # mean difference from empty: (1, 1)
    assert torch.allclose(compositional_target(empty, anchor, erased, 2.0), torch.tensor([1 + 1 - 3, 0 + 1 - 3.0]))
    # s = 1: no anchor, twice the negative guidance of ESD's eta = 1
    assert torch.allclose(compositional_target(empty, anchor, erased, 1.0), empty - 2 * torch.tensor([1.0, 1.0]))


def test_inversion_finds_a_word_the_unet_denoises_its_images_with(tiny_model):
    model = tiny_model
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = encode_latents(model, images, torch.Generator().manual_seed(0))
    contexts = ["a", "a", "the", "the"]
    config = build_config("stereo", model.family, parse_sets(["inversion_steps=40", "inversion_lr=0.05",
                                                              "inversion_batch=4"]))  # fmt: skip
    with torch.no_grad():
        start = token_embeddings(model.text_encoder, torch.tensor(model.tokenizer("cat").input_ids[1:2]))[0]
    ids = model.tokenize(contexts)
    g = torch.Generator().manual_seed(1)
    noise, t = torch.randn(latents.shape, generator=g), torch.randint(0, 1000, (4,), generator=g)

    def loss_with(word):
        with torch.no_grad():
            return float(denoising_loss(model, latents, encode_with_inserted(model.text_encoder, ids, word), noise, t))

    word = invert(model, model.unet, latents, contexts, start, config, RunContext(seed=0, progress=False), "test")
    assert word.shape == (1, 1, model.text_encoder.config.hidden_size)
    assert loss_with(word) < loss_with(start.view(1, 1, -1)) - 1e-4


def test_inverted_words_start_from_the_concept_or_from_the_word_asked_for(tiny_model):
    model = tiny_model
    vocab = model.family.vocabulary(model, model.family.text_tower(model))
    mean_of = lambda text: vocab[model.tokenizer(text, add_special_tokens=False).input_ids].mean(0)  # noqa: E731
    assert torch.equal(initial_word(model, vocab, ["red cat"], ""), mean_of("red cat"))
    assert torch.allclose(initial_word(model, vocab, ["cat", "dog"], ""), (mean_of("cat") + mean_of("dog")) / 2)
    assert torch.equal(initial_word(model, vocab, ["cat"], "object"), mean_of("object"))
    with pytest.raises(InputError, match="inversion_init must be a word"):
        build_config("stereo", model.family, parse_sets(["inversion_init=  "]))


def test_the_inversion_weight_decay_pulls_the_word_towards_zero(tiny_model):
    model = tiny_model
    latents = encode_latents(model, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                            torch.Generator().manual_seed(0))  # fmt: skip
    start = torch.randn(model.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    norms = {}
    for decay in (0.0, 20.0):
        sets = ["inversion_steps=5", "inversion_lr=0.01", "inversion_batch=2", f"inversion_weight_decay={decay}"]
        config = build_config("stereo", model.family, parse_sets(sets))
        run = RunContext(seed=0, progress=False)
        norms[decay] = float(invert(model, model.unet, latents, ["a", "a"], start, config, run, "test").norm())
    # AdamW shrinks by (1 - lr * decay) per step: 0.8 ** 5 = 0.33 of the norm, where Adam's 5 steps of at most
    # lr each move it by at most 0.05.
    assert norms[20.0] < 0.5 * norms[0.0]


def test_stage_two_starts_again_from_the_original_unet(tiny_pipeline_dir):
    # a large stage-1 learning rate and a vanishing stage-2 one: what stage 1 did must not reach the result
    model = load_model(str(tiny_pipeline_dir))
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    config = build_config("stereo", model.family, parse_sets([*QUICK, "search_lr=0.1", "lr=1e-12"]))
    result = stereo_erase(model, ["a cat"], config, RunContext(seed=0, progress=False))
    after = result.model.unet.state_dict()
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 1e-6
    assert result.outcome["stereo"]["words"] == 2 and result.changed == ["unet"]


def test_stage_two_erases_the_concept_and_every_word_stage_one_found_in_turn(tiny_pipeline_dir, monkeypatch):
    # The robustness is in stage 2 erasing the found words as well as the concept's prompt: over as many steps as
    # the erased set has members, the trained UNet is conditioned on each of them once (erasing the concept's prompt
    # alone would leave the words stage 1 found working).
    import erasure.stereo as stereo

    model = load_model(str(tiny_pipeline_dir))
    found = {}
    search = stereo._found_words

    def keeping_the_words(model_, draws, *args):
        found["draws"], found["words"] = draws, search(model_, draws, *args)
        return found["words"]

    trained_on = []  # the conditioning of each query of stage 2's trained UNet (stage 1 trains a copy)
    denoise = stereo._Draws.denoise

    def recording(self, unet, x_t, t, cond):
        if getattr(unet, "module", unet) is model.unet:
            trained_on.append(cond.detach().clone())
        return denoise(self, unet, x_t, t, cond)

    monkeypatch.setattr(stereo, "_found_words", keeping_the_words)
    monkeypatch.setattr(stereo._Draws, "denoise", recording)
    config = build_config("stereo", model.family, parse_sets([*QUICK, "steps=3", "prompt_templates={}"]))
    stereo_erase(model, ["a cat"], config, RunContext(seed=0, progress=False))
    with torch.no_grad():
        erased_set = [model.encode(["a cat"]), *(found["draws"].word(w) for w in found["words"])]
    assert len(erased_set) == 3 and len(trained_on) == 3
    assert not torch.allclose(erased_set[1], erased_set[2]) and not torch.allclose(erased_set[0], erased_set[1])
    for member in erased_set:
        assert sum(torch.equal(cond, member) for cond in trained_on) == 1


@pytest.mark.slow
def test_a_run_killed_in_stage_two_resumes_from_its_words_without_stage_one_checkpoints(tmp_path):
    """Stage 1 (3 erasing + 3 inversion steps) hands on its words only; killed at stage 2's second step, the
    run keeps those words and no stage-1 checkpoint, and resumes to the uninterrupted weights."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from erasure.registry import METHODS
    from tests.test_methods import changed_weights

    settings = [f"{k}={v}" for k, v in METHODS["stereo"].test_settings.items()]
    straight = erase("stereo", ["seven"], "digits", out=tmp_path / "straight", sets=settings, checkpoint_every=1,
                     progress=False)  # fmt: skip
    script = Path(__file__).with_name("erase_run.py")
    command = [sys.executable, str(script), "stereo", "digits", "seven", str(tmp_path / "killed"), "--kill-after",
               "8", *settings]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    work = tmp_path / ".killed.work"
    kept = sorted(p.name for p in work.rglob("*") if p.is_dir() or p.suffix == ".safetensors")
    assert any(name == "stereo-words.safetensors" for name in kept), kept
    assert not any(name.startswith(("search-", "invert-")) for name in kept), kept
    resumed = erase("stereo", ["seven"], "digits", out=tmp_path / "killed", sets=settings, checkpoint_every=1,
                    resume=True, progress=False)  # fmt: skip
    a, b = changed_weights(straight), changed_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
