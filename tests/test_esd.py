import pytest
import torch

from erasure.common import esd_target, select_trainable
from pipelines.errors import InputError

from .conftest import record_esd_targets


def test_esd_target_is_negative_guidance():
    eps_empty = torch.tensor([1.0, 0.0, -2.0])
    eps_concept = torch.tensor([3.0, 1.0, -2.0])
    assert torch.equal(esd_target(eps_empty, eps_concept, 1.0), torch.tensor([-1.0, -1.0, -2.0]))
    assert torch.equal(esd_target(eps_empty, eps_concept, 0.0), eps_empty)
    assert torch.allclose(esd_target(eps_empty, eps_concept, 2.0), 3 * eps_empty - 2 * eps_concept)


def test_partial_trajectory_stops_at_the_requested_noise_level(tiny_model):
    scheduler = tiny_model.family.sampling_scheduler(tiny_model, 10, "cpu")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, uncond = tiny_model.encode(["a cat"]), tiny_model.encode([""])
    trajectory = tiny_model.family.trajectory
    x0, t0, t0_end = trajectory(tiny_model.unet, scheduler, cond, uncond, 0, 3.0, noise)
    assert torch.equal(x0, noise) and t0 == int(scheduler.timesteps[0]) and t0_end == min(t0 + 100, 1000)
    x4, t4, t4_end = trajectory(tiny_model.unet, scheduler, cond, uncond, 4, 3.0, noise)
    assert t4 == int(scheduler.timesteps[4]) and t4_end == t4 + 100 and not torch.equal(x4, noise)


def test_trajectories_that_stop_apart_share_each_unet_call(tiny_model):
    """A bank's trajectories run side by side: each row is its own trajectory, at max(stops) UNet calls in all."""
    scheduler = tiny_model.family.sampling_scheduler(tiny_model, 6, "cpu")
    noise = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    stops, prompts = [2, 5, 0, 5, 3], ["a cat", "a dog", "a cat", "a red car", "a dog"]
    with torch.no_grad():
        conds, uncond = tiny_model.encode(prompts), tiny_model.encode([""])
    family = tiny_model.family
    calls = []
    hook = tiny_model.unet.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    together = family.trajectories(tiny_model.unet, scheduler, conds, uncond, stops, 3.0, noise)
    hook.remove()
    assert calls == [8, 8, 6, 4, 4]  # rows still running, twice for classifier-free guidance
    for i, stop in enumerate(stops):
        alone, *_ = family.trajectory(tiny_model.unet, scheduler, conds[i : i + 1], uncond, stop, 3.0, noise[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(together[2], noise[2])


def test_unet_scopes(tiny_model):
    unet = tiny_model.unet
    select_trainable(unet, "unet", "xattn")
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert names and all(".attn2." in n for n in names)
    select_trainable(unet, "unet", "noxattn")
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert not any(".attn2." in n or n.startswith("time_embedding") for n in names)
    assert any(".attn1." in n for n in names) and any("resnets" in n for n in names)
    select_trainable(unet, "unet", "attn")  # self- and cross-attention (FLUX's transformer: its joint attention)
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert any(".attn1." in n for n in names) and any(".attn2." in n for n in names)
    assert all(".attn" in n for n in names)
    with pytest.raises(InputError, match="unknown UNet scope"):
        select_trainable(unet, "unet", "selfattn")


def test_text_encoder_scopes(tiny_model):
    encoder = tiny_model.text_encoder
    select_trainable(encoder, "text_encoder", "full")
    names = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert any("final_layer_norm" in n for n in names) and not any("embeddings" in n for n in names)
    select_trainable(encoder, "text_encoder", "mlp")
    names = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert names and all(".mlp." in n for n in names) and any("layers.1." in n for n in names)
    select_trainable(encoder, "text_encoder", "layers=0..0")
    names = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert names and all("layers.0." in n for n in names)
    select_trainable(encoder, "text_encoder", "layers=0..1")  # both ends included: every block of the tiny encoder
    names = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert {int(n.split("layers.")[1].split(".")[0]) for n in names} == {0, 1}
    with pytest.raises(InputError, match="unknown text-encoder scope"):
        select_trainable(encoder, "text_encoder", "layers=a..b")


def test_esd_refuses_a_scope_the_family_lacks_before_loading():
    # ESD in the text encoder checks the encoder its scope names (an SD 1.x model has one) before any model loads
    from erasure.config import build_config
    from pipelines.families import FAMILIES

    config = build_config("esd", FAMILIES["sd1"], {"component": "text_encoder", "scope": "text_encoder_2:full"})
    with pytest.raises(InputError, match="names 'text_encoder_2'; sd1 models have: text_encoder$"):
        config.check(FAMILIES["sd1"], ["a cat"])
    # FLUX's transformer has no cross-attention: ESD-x and ESD-u ("all but attn2": all of it) are both refused
    for scope in ("xattn", "noxattn"):
        with pytest.raises(InputError, match="no cross-attention"):
            build_config("esd", FAMILIES["flux"], {"scope": scope}).check(FAMILIES["flux"], ["a cat"])


@pytest.mark.parametrize("key, sets", [
    ("esd", {}),
    ("advunlearn", {"warmup": 8, "retain_weight": 0.0, "bank_size": 0}),  # no attack, no retain term: ESD's loss
])  # fmt: skip
def test_training_moves_the_concepts_prediction_towards_negative_guidance(key, sets, tiny_model):
    """Which way the loss pushes: after a few steps the erased model's prediction for the concept, on x_t it never
    trained on, has moved from the base's towards eps(empty) - eta (eps(concept) - eps(empty)). A swapped sign or
    swapped arguments train towards the concept, and every structural test (scope, round trip, resume) still passes.
    eta = 2: at eta = 1 a wrong sign, eps(empty) + eta (eps(concept) - eps(empty)), is the base's own prediction."""
    import copy

    import torch.nn.functional as F

    from erasure.config import build_config
    from erasure.registry import METHODS
    from erasure.training import RunContext

    family, eta = tiny_model.family, 2.0
    unet_base = copy.deepcopy(tiny_model.unet)  # ESD trains the model's own UNet
    with torch.no_grad():
        cond, uncond = tiny_model.encode(["a cat"]), tiny_model.encode([""])
        scheduler = family.sampling_scheduler(tiny_model, 3, "cpu")
        noise = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        x_t, t_lo, t_hi = family.trajectory(tiny_model.unet, scheduler, cond, uncond, 1, 3.0, noise)
        t = torch.full((len(x_t),), (t_lo + t_hi) // 2)
        eps_empty, eps_concept = (family.denoise(unet_base, x_t, t, c.expand(len(x_t), -1, -1)) for c in (uncond, cond))
    target = esd_target(eps_empty, eps_concept, eta)

    settings = {"steps": 8, "ddim_steps": 3, "batch_size": 2, "lr": 1e-2, "negative_guidance": eta, **sets}
    config = build_config(key, family, settings)
    erased = METHODS[key].entry(tiny_model, ["a cat"], config, RunContext(seed=0, progress=False)).model
    with torch.no_grad():
        after = family.denoise(erased.unet, x_t, t, erased.encode(["a cat"]).expand(len(x_t), -1, -1))
    moved, wanted = (after - eps_concept).flatten(), (target - eps_concept).flatten()
    assert F.cosine_similarity(moved, wanted, dim=0) > 0.5
    assert F.mse_loss(after, target) < F.mse_loss(eps_concept, target)


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_x_t_comes_from_the_model_being_erased_and_the_target_from_the_original(component, tiny_model, monkeypatch):
    """As ESD's code: x_t is sampled by the model as it is now (its UNet; its trained encoder's conditioning), at
    every stop of the trajectory and for every concept, while the target's eps("") and eps(c) are the original
    model's at every step. Sampling with the frozen copy, skipping stop 0, training one concept of two or a target
    taken under the encoder being trained all leave every structural test passing."""
    import copy

    from erasure.config import build_config
    from erasure.registry import METHODS
    from erasure.training import RunContext

    family, concepts = tiny_model.family, ["a cat", "a red car"]
    base_unet = copy.deepcopy(tiny_model.unet)
    with torch.no_grad():
        original = {p: tiny_model.encode([p]) for p in ["", *concepts]}
    sampled = []
    trajectory = family.trajectory

    def recording_trajectory(unet, scheduler, cond, uncond, stop, guidance, noise):
        with torch.no_grad():  # the concept under the encoder as it is now
            now = [p for p in concepts if torch.equal(cond, tiny_model.encode([p]))]
        sampled.append((unet, now, stop, cond.clone()))
        return trajectory(unet, scheduler, cond, uncond, stop, guidance, noise)

    monkeypatch.setattr(family, "trajectory", recording_trajectory)
    targets = record_esd_targets(family, monkeypatch)
    settings = {"steps": 8, "ddim_steps": 2, "batch_size": 2, "lr": 1e-2, "component": component}
    config = build_config("esd", family, settings)
    erased = METHODS["esd"].entry(tiny_model, concepts, config, RunContext(seed=0, progress=False)).model
    monkeypatch.undo()

    assert len(sampled) == len(targets) == 8
    assert {stop for *_, stop, _ in sampled} == {0, 1}
    assert all(len(now) == 1 for _, now, *_ in sampled) and {now[0] for _, now, *_ in sampled} == set(concepts)
    assert all(unet is erased.unet for unet, *_ in sampled)  # the UNet trained in place, not a frozen copy
    if component == "text_encoder":  # the encoder did move, so sampling with the original's would differ
        assert not any(torch.equal(cond, original[now[0]]) for _, now, _, cond in sampled[1:])
    with torch.no_grad():
        for (_, now, *_), ((eps_empty, x_t, t, _), (eps_concept, *_)) in zip(sampled, targets):
            for eps, prompt in ((eps_empty, ""), (eps_concept, now[0])):
                cond = original[prompt].expand(len(x_t), -1, -1)
                torch.testing.assert_close(family.denoise(base_unet, x_t, t, cond), eps, rtol=0, atol=1e-6)
