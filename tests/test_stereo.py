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
    config = build_config("stereo", model.family, parse_sets([*QUICK, "search_lr=0.1", "lr=1e-12",
                                                              "anchor_prompts=a dog"]))  # fmt: skip
    result = stereo_erase(model, ["a cat"], config, RunContext(seed=0, progress=False))
    after = result.model.unet.state_dict()
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 1e-6
    assert result.outcome["stereo"]["words"] == 2 and result.changed == ["unet"]
    assert result.outcome["stereo"]["anchors"] == ["a dog"]  # the anchors asked for, not the family's


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

    erased_counts = []  # how many predictions each step's target moves away from: the whole erased set's
    target = stereo.compositional_target

    def counting(eps_empty, eps_anchor, eps_erased, scale):
        erased_counts.append(len(eps_erased))
        return target(eps_empty, eps_anchor, eps_erased, scale)

    monkeypatch.setattr(stereo, "compositional_target", counting)
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
    assert erased_counts == [3, 3, 3]


def test_the_word_is_fitted_on_the_unet_it_is_given_not_the_models_own(tiny_model):
    # Stage 1 inverts each word on its erased copy of the UNet: fitted on the model's own (original) UNet, it would be
    # a word the original draws the concept with, not one the erased copy still does.
    import copy

    model = tiny_model
    erased = copy.deepcopy(model.unet)
    latents = encode_latents(model, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                            torch.Generator().manual_seed(0))  # fmt: skip
    calls = {"given": 0, "own": 0}
    hooks = [unet.register_forward_hook(lambda *_, key=key: calls.update({key: calls[key] + 1}))
             for key, unet in (("given", erased), ("own", model.unet))]  # fmt: skip
    config = build_config("stereo", model.family, parse_sets(["inversion_steps=3", "inversion_batch=2"]))
    start = torch.zeros(model.text_encoder.config.hidden_size)
    invert(model, erased, latents, ["a", "a"], start, config, RunContext(seed=0, progress=False), "test")
    for hook in hooks:
        hook.remove()
    assert calls == {"given": 3, "own": 0}


def test_each_search_round_erases_the_word_the_last_one_found_and_inverts_its_own_images(tiny_pipeline_dir,
                                                                                         monkeypatch):  # fmt: skip
    # Stage 1 searches thoroughly only if each round erases what the round before it found (not the concept again),
    # and inverts its word from its own share of the original model's images, drawn at seeds 2,000,000 and up, far
    # from the evaluation's and its attacks'.
    import erasure.stereo as stereo

    model = load_model(str(tiny_pipeline_dir))
    erased_in_round, inverted, seeds = [], [], []
    erase_round, invert_word, generate_jobs = stereo._erase_round, stereo.invert, model.generate_jobs

    def recording_round(searcher, draws, previous, *args):
        erased_in_round.append(previous)
        return erase_round(searcher, draws, previous, *args)

    def recording_invert(model_, unet, latents, *args):
        word = invert_word(model_, unet, latents, *args)
        inverted.append((latents.clone(), word))
        return word

    def recording_jobs(prompts, jobs, **kwargs):
        seeds.extend(seed for _, seed in jobs)
        return generate_jobs(prompts, jobs, **kwargs)

    monkeypatch.setattr(stereo, "_erase_round", recording_round)
    monkeypatch.setattr(stereo, "invert", recording_invert)
    monkeypatch.setattr(model, "generate_jobs", recording_jobs)
    config = build_config("stereo", model.family, parse_sets([*QUICK, "steps=1"]))
    stereo_erase(model, ["a cat"], config, RunContext(seed=0, progress=False))
    assert erased_in_round[0] is None and torch.equal(erased_in_round[1], inverted[0][1])
    (first, _), (second, _) = inverted
    assert len(first) == len(second) == 2 and not any(torch.equal(a, b) for a in first for b in second)
    assert seeds == [2_000_000, 2_000_001, 2_000_002, 2_000_003]


def test_a_search_round_moves_the_concepts_prediction_towards_negative_guidance(tiny_model, monkeypatch):
    """As ESD's test in test_esd.py, for stage 1's erasing: after a few steps the searched copy's prediction for the
    concept, on x_t it never trained on, has moved towards eps(empty) - eta (eps(concept) - eps(empty)) of the UNet it
    started from. The target's arguments swapped train towards the concept (at the default eta 0: on the spot).
    Every step's target is that UNet's: a teacher that trained along with the copy would move its own target."""
    import copy

    import torch.nn.functional as F

    import erasure.stereo
    from erasure.common import esd_target, select_trainable
    from erasure.stereo import _Draws, _erase_round

    from .conftest import record_esd_targets

    model, family, eta = tiny_model, tiny_model.family, 2.0
    with torch.no_grad():
        cond, uncond = model.encode(["a cat"]), model.encode([""])
        noise = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        x_t, t_lo, t_hi = family.trajectory(model.unet, family.sampling_scheduler(model, 3, "cpu"), cond, uncond, 1,
                                            3.0, noise)  # fmt: skip
        t = torch.full((len(x_t),), (t_lo + t_hi) // 2)
        base = model.unet  # the UNet the search starts from, left as it is (the search trains a copy)
        eps_empty, eps_concept = (family.denoise(base, x_t, t, c.expand(len(x_t), -1, -1)) for c in (uncond, cond))
    target = esd_target(eps_empty, eps_concept, eta)

    sets = [*QUICK, "prompt_templates={}", "search_steps=8", "search_lr=1e-2", f"search_guidance={eta}"]
    config = build_config("stereo", family, parse_sets(sets))
    run = RunContext(seed=0, progress=False)
    searcher = copy.deepcopy(model.unet)
    select_trainable(searcher, "unet", config.scope)
    targets = record_esd_targets(family, monkeypatch, erasure.stereo)
    _erase_round(searcher, _Draws(model, family.text_tower(model), ["a cat"], config, run), None, 0, config, run)
    monkeypatch.undo()
    with torch.no_grad():
        after = family.denoise(searcher, x_t, t, cond.expand(len(x_t), -1, -1))
        assert len(targets) == 8 and all(torch.allclose(eps, family.denoise(base, *inputs), atol=1e-5)
                                         for pair in targets for eps, *inputs in pair)  # fmt: skip
    moved, wanted = (after - eps_concept).flatten(), (target - eps_concept).flatten()
    assert F.cosine_similarity(moved, wanted, dim=0) > 0.5  # (at this rate it overshoots the target)


def test_the_adversarial_words_are_warm_started_and_their_term_trains_the_unet(tiny_pipeline_dir, monkeypatch):
    # attack_tokens: each step's attack starts where the last one ended (within fast AT's random start), and its
    # term reaches the weights: a detached term would leave the attack's step size without effect on the UNet.
    import erasure.stereo as stereo

    attacks = []  # (start, result) of each step's attack
    attack = stereo.attack_embeddings

    def recording(loss_of, start, *args):
        adv = attack(loss_of, start, *args)
        attacks.append((start.clone(), adv.clone()))
        return adv

    monkeypatch.setattr(stereo, "attack_embeddings", recording)
    unets = []
    for attack_lr in (1e-3, 0.5):
        model = load_model(str(tiny_pipeline_dir))
        sets = [*QUICK, "rounds=1", "steps=3", "attack_tokens=2", f"attack_lr={attack_lr}"]
        config = build_config("stereo", model.family, parse_sets(sets))
        unets.append(stereo_erase(model, ["a cat"], config, RunContext(seed=0, progress=False)).model.unet.state_dict())
    for (_, ended), (start, _) in zip(attacks[0:2], attacks[1:3]):
        assert (start - ended).abs().max() <= 1e-3 / 1.25 + 1e-7
    assert any(not torch.equal(unets[0][k], unets[1][k]) for k in unets[0])


def test_the_retain_weight_weighs_the_retain_term(tiny_pipeline_dir):
    # retain_weight: the term keeps the original UNet's predictions on its own images; at two weights the trained
    # UNets differ (a weight ignored, or a term compared with the student's own prediction, would leave them equal)
    unets = []
    for weight in (1.0, 8.0):
        model = load_model(str(tiny_pipeline_dir))
        sets = [*QUICK, "rounds=1", "steps=2", f"retain_weight={weight}", "retain_images=2", "retain_batch=2"]
        config = build_config("stereo", model.family, parse_sets(sets))
        unets.append(stereo_erase(model, ["a cat"], config, RunContext(seed=0, progress=False)).model.unet.state_dict())
    assert any(not torch.equal(unets[0][k], unets[1][k]) for k in unets[0])


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


def test_every_search_round_trains_the_scopes_weights_alone(tiny_model, monkeypatch):
    # the searcher is frozen while a word is inverted on it; the next round trains its scope again, not the whole UNet
    import random

    import erasure.stereo as stereo
    from erasure.common import select_trainable

    model = tiny_model
    config = build_config("stereo", model.family, parse_sets([*QUICK, "search_steps=1", "inversion_steps=1"]))
    select_trainable(model.unet, "unet", config.scope)  # the searcher is a copy, scoped the same way
    scope = {n for n, p in model.unet.named_parameters() if p.requires_grad}
    trained, erase_round = [], stereo._erase_round

    def recording(searcher, *args):
        trained.append({n for n, p in searcher.named_parameters() if p.requires_grad})
        return erase_round(searcher, *args)

    monkeypatch.setattr(stereo, "_erase_round", recording)
    run, encoder = RunContext(seed=0, progress=False), model.family.text_tower(model)
    vocab = model.family.vocabulary(model, encoder)
    random.seed(0)
    stereo._search(model, stereo._Draws(model, encoder, ["a cat"], config, run),
                   initial_word(model, vocab, ["a cat"], ""), config, run)  # fmt: skip
    assert len(scope) < len(list(model.unet.parameters())) and trained == [scope, scope]


def test_the_retain_images_are_drawn_from_the_retain_prompts_in_turn(tiny_model, monkeypatch):
    # one image per retain prompt (79 of them for SD 1.x; 4 images here), each encoded with its own prompt
    import random

    from erasure.stereo import _Draws, _RetainTerm

    model = tiny_model
    config = build_config("stereo", model.family, parse_sets([*QUICK, "retain_weight=1", "retain_images=4"]))
    drawn, generate_jobs = [], model.generate_jobs

    def recording(prompts, jobs, **kwargs):
        drawn.append([prompts[i] for i, _ in jobs])
        return generate_jobs(prompts, jobs, **kwargs)

    monkeypatch.setattr(model, "generate_jobs", recording)
    run, encoder = RunContext(seed=0, progress=False), model.family.text_tower(model)
    term = _RetainTerm(model, model.unet, _Draws(model, encoder, ["a cat"], config, run), ["a cat"], config, run)
    prompts = model.family.retain_prompts(["a cat"], random.Random(0))
    assert drawn == [prompts[:4]] and len(set(prompts[:4])) == 4
    with torch.no_grad():
        assert torch.allclose(term.conds, model.encode(prompts[:4], encoder))
