"""Text-to-Unlearn: the concept direction on a tiny CLIP, frozen layers that stay bit-identical,
bit-identical resume, several concepts, and the degree of unlearning."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from erasure.api import erase
from erasure.text2unlearn import (
    TextToUnlearnConfig,
    directional_loss,
    mapper_direction,
    push_floors,
    push_term,
    shifted_features,
    text_direction,
)
from erasure.training import RunContext
from evaluators.metrics import wasserstein_1d
from pipelines import InputError, load_model
from pipelines.images import to_pil

from .conftest import check_truncation_centre_follows_the_mapping, stops_resumably

FAST = ["steps=4", "pool=200", "batch_size=4", "lr=0.01"]


def test_the_text_direction_points_from_the_neutral_prompts_to_the_concept(tiny_open_clip):
    from evaluators.clip_models import load_clip

    clip = load_clip(tiny_open_clip)
    concept, neutral = ["a red square", "a photo of a red square"], ["a blue circle", "a photo of a blue circle"]
    direction = text_direction(clip, concept, neutral)
    with torch.no_grad():
        c, n = clip.text_features(concept).mean(0), clip.text_features(neutral).mean(0)
    assert float(direction.norm()) == pytest.approx(1.0)
    assert torch.allclose(direction, (c - n) / (c - n).norm(), atol=1e-6)
    assert float(direction @ c) > float(direction @ n)


def test_the_mapper_direction_points_the_way_clip_sees_the_concepts_images_lie():
    # Trained to add the concept, the mapper moves renders' CLIP image embeddings the way held-out sevens lie from the
    # other digits: the direction is edited minus original renders (0.84 here; -0.43 with a mapper trained to take
    # sevens away). At the default 200 steps it is clearer still; below ~20 its sign follows the seed.
    from evaluators.clip_models import load_clip
    from pipelines.zoo.renders import heldout_renders

    model, clip = load_model("digits-gan"), load_clip("digits-clip", "cpu")
    renders = heldout_renders(per_source=1, seed=0)
    with torch.no_grad():
        features = clip.image_features(renders.images)
    sevens = renders.digits == 7
    reference = torch.nn.functional.normalize(features[sevens].mean(0) - features[~sevens].mean(0), dim=-1)
    config = TextToUnlearnConfig(mapper_steps=40, mapper_samples=32, batch_size=8, mapper_lr=0.03)
    generator = model.generator.eval().requires_grad_(False)
    direction = mapper_direction(generator, clip, model.family.prompt_set("seven").clip_concept, config,
                                 RunContext(seed=0, progress=False))  # fmt: skip
    assert float(direction @ reference) > 0.5


def test_the_directional_loss_is_lowest_when_images_move_against_the_direction():
    direction = torch.tensor([1.0, 0.0])
    frozen = torch.zeros(3, 2)
    against, along = frozen - direction, frozen + direction
    assert float(directional_loss(against, frozen, direction)) == pytest.approx(0.0)
    assert float(directional_loss(along, frozen, direction)) == pytest.approx(2.0)


def test_a_render_that_has_not_moved_pulls_no_gradient():
    """At the first step the student is the frozen generator: torch's cosine of the zero vector had a gradient of
    ~1e8 there, which filled Adam's second moment and stalled every later step."""
    frozen = torch.randn(4, 8)
    student = torch.cat([frozen[:2], frozen[2:] + 1e-3]).requires_grad_()  # two rows unmoved, two moved a little
    direction = torch.nn.functional.normalize(torch.randn(8), dim=0)
    loss = directional_loss(student, frozen, direction)
    loss.backward()
    assert not student.grad[:2].any()
    assert 0 < float(student.grad[2:].norm()) < 1e3  # the moved rows' cosine: finite, of order 1 / length
    moved = student[2:].detach() - frozen[2:]
    cos = torch.nn.functional.cosine_similarity(moved, -direction[None], dim=-1)
    assert float(loss.detach()) == pytest.approx(float((2 + (1 - cos).sum()) / 4), abs=1e-6)


def test_the_push_stops_at_the_floor():
    direction = torch.tensor([1.0, 0.0])
    features = torch.tensor([[0.9, 0.1], [0.2, 0.5]], requires_grad=True)  # projections 0.9 and 0.2
    moved = features - torch.tensor([[0.5, 0.0], [0.5, 0.0]])
    assert float(push_term(features, moved, direction, None).detach()) == pytest.approx(0.05)  # 0.4, -0.3: no floor
    stopped = push_term(features, moved, direction, 0.3)
    assert float(stopped.detach()) == pytest.approx(0.3)  # (0.9 - 0.3 + 0) / 2
    (grad,) = torch.autograd.grad(stopped, features)
    assert torch.equal(grad[1], torch.zeros(2)) and grad[0, 0] > 0  # the render below the floor is left alone


def test_the_push_is_weighed_by_push_weight_alone(tmp_path, monkeypatch):
    # push_weight = 0 leaves the push out, whatever the term is: a huge push in its place changes nothing, bit for bit,
    # while weighed by push_weight > 0 it moves the generator.
    import erasure.text2unlearn as text2unlearn

    def trained(name, *sets):
        run = erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / name, sets=[*FAST, "steps=2", *sets],
                    progress=False)  # fmt: skip
        return load_file(run / "generator.safetensors")

    plain = trained("plain", "push_weight=0")
    pushed = []

    def huge_push(features, moved, direction, floor):
        pushed.append(len(features))
        return 1e3 * features.sum()

    monkeypatch.setattr(text2unlearn, "push_term", huge_push)
    unweighted = trained("unweighted", "push_weight=0")
    assert pushed and all(torch.equal(plain[k], unweighted[k]) for k in plain)
    weighted = trained("weighted", "push_weight=1")
    assert not all(torch.equal(plain[k], weighted[k]) for k in plain)


def test_the_loss_is_its_weighted_terms_at_a_rate_that_falls_at_the_end(tmp_path, monkeypatch):
    # Each term is weighed by its own option, the rate follows lr_decay, and a trained mapping moves the truncation
    # centre: one run with every weight set apart (a weight dropped from the loss reads as 1), lr_decay=0.5 of 4
    # steps (lr until the last two steps' fall: lr * (4 - step) / 2, capped at lr), `augment` views, train_mapping.
    from erasure.training import RunContext, TrainingLoop

    optimizers, rates, losses, logs = [], [], [], []
    adam, update = RunContext.adam, TrainingLoop.update
    monkeypatch.setattr(RunContext, "adam", lambda self, *a, **k: optimizers.append(adam(self, *a, **k)) or
                        optimizers[-1])  # fmt: skip
    monkeypatch.setattr(TrainingLoop, "update", lambda self, name, loss=None: losses.append(float(loss.detach())) or
                        update(self, name, loss))  # fmt: skip

    def after_step(step, total, step_logs):
        rates.append(optimizers[-1].param_groups[0]["lr"])
        logs.append(step_logs)

    weights = {"direction_weight": 2.0, "push_weight": 0.5, "preserve_pixel": 3.0, "preserve_clip": 5.0}
    sets = [*FAST, "lr_decay=0.5", "augment=2", "train_mapping=true", *(f"{k}={v}" for k, v in weights.items())]
    run = erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / "run", sets=sets, after_step=after_step,
                progress=False)  # fmt: skip
    assert rates == pytest.approx([0.01, 0.01, 0.01, 0.005])
    terms = ("dir_0", "push_0", "keep_pixel", "keep_clip")
    for loss, step_logs in zip(losses, logs):
        assert loss == pytest.approx(sum(w * step_logs[t] for w, t in zip(weights.values(), terms)), rel=1e-4)
    # the first step's student is the frozen generator: seen through the same shifts, their features agree; later
    # they do not, and the CLIP term keeps them together
    assert logs[0]["keep_pixel"] == 0 and logs[0]["keep_clip"] == pytest.approx(0, abs=1e-6)
    assert all(step_logs["keep_clip"] > 1e-6 for step_logs in logs[1:])
    check_truncation_centre_follows_the_mapping("digits-gan", run, atol=1e-5)


def test_with_two_concepts_only_the_codes_that_show_neither_are_kept_as_they_were(tmp_path, monkeypatch):
    # a code that shows "red" but not "seven" is one to unlearn, not one to preserve: each step's preservation terms
    # see exactly the half of its batch drawn from codes that show neither concept
    import torch.nn.functional as F

    kept, mse_loss = [], F.mse_loss
    monkeypatch.setattr(F, "mse_loss", lambda images, target, *a, **k: kept.append(len(images)) or
                        mse_loss(images, target, *a, **k))  # fmt: skip
    run = erase("text2unlearn", ["red", "seven"], "digits-gan", out=tmp_path / "run", sets=FAST, progress=False)
    outcome = json.loads((run / "erasure.json").read_text())["text2unlearn"]
    assert outcome["concept_bearing_codes"] > 0 and kept == [2, 2, 2, 2]  # batch_size=4: 2 of each half, 4 steps


def test_the_floor_sees_the_renders_as_the_push_does():
    """With `augment` views the push compares shifted views' features with the floor: the floor is taken through the
    same views (it was taken unshifted), without moving the training's random numbers."""
    from evaluators.clip_models import load_clip

    clip = load_clip("digits-clip", "cpu")
    renders = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    direction = torch.nn.functional.normalize(torch.randn(clip.text_features(["a seven"]).shape[-1]), dim=0)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    floor = push_floors(clip, renders, [direction], views=3)
    assert torch.equal(torch.get_rng_state(), state)  # the training's random numbers are left where they were
    (shifted,) = shifted_features(clip, [renders], 3)  # the same shifts: the generator is where it was
    assert floor == [pytest.approx((shifted @ direction).mean().item(), abs=1e-6)]
    unshifted = (clip.image_features(renders) @ direction).mean().item()
    assert push_floors(clip, renders, [direction], views=0) == [pytest.approx(unshifted, abs=1e-6)]
    assert abs(floor[0] - unshifted) > 1e-4


def test_each_render_is_scored_by_the_mean_of_its_own_shifted_views():
    # a uniform render is the same under every shift (replicated edges): its shifted features are its own, whatever
    # renders share its batch (a mean over the wrong axis mixed the views of several renders into each row)
    from evaluators.clip_models import load_clip

    clip = load_clip("digits-clip", "cpu")
    renders = torch.tensor([0.1, 0.9, 0.5]).view(3, 1, 1, 1).expand(3, 3, 32, 32) * torch.tensor([1.0, 0.2, 0.6]).view(
        1, 3, 1, 1
    )
    (shifted,) = shifted_features(clip, [renders], views=4)
    assert torch.allclose(shifted, clip.image_features(renders), atol=1e-5)


def test_the_pool_is_labelled_by_the_prompts_that_give_the_direction(tmp_path):
    """`prompt_templates` name the concept for the direction and for the pool's labels alike (the labels kept the
    family's ensemble: 22 sevens in this pool where "a red {}" sees 20)."""
    from erasure.gan_training import sample_pool
    from evaluators.detect import ConceptDetector

    pool = sample_pool(load_model("digits-gan"), 200)  # the codes FAST's pool draws

    def seen(templates: list[str]) -> int:
        return int(ConceptDetector("seven", "digits", classifier="clip", templates=templates)(pool).sum())

    assert seen(["a red {}"]) != seen([])
    sets = [*FAST, "steps=1", "prompt_templates=a red {}", "neutral_prompts=a three"]
    run = erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / "run", sets=sets, progress=False)
    outcome = json.loads((run / "erasure.json").read_text())["text2unlearn"]
    assert outcome["concept_bearing_codes"] == seen(["a red {}"])
    assert outcome["prompts"]["seven"] == {"concept_prompts": ["a red seven"], "neutral_prompts": ["a three"]}
    # the pool's renders are the model's own of latent seeds 10^6, 10^6 + 1, ...: the codes the method trains on,
    # none of which the evaluation (seeds 0, 1, ...) draws
    drawn = load_model("digits-gan").generate([1_000_000, 1_000_199])
    for image, render in zip(drawn, to_pil(pool[[0, 199]])):  # a batch of 2 against one of 200: within rounding
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(render, dtype=int)).max() <= 1


def test_only_the_resolutions_named_train(tmp_path):
    sets = [*FAST, "resolutions=[4, 8]"]
    run = erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / "run", sets=sets, progress=False)
    base, erased = load_model("digits-gan").generator.state_dict(), load_model(str(run)).generator.state_dict()
    moved = {k for k in base if not torch.equal(base[k], erased[k])}
    trained = ("input.", "conv1.", "convs.0.", "convs.1.")
    assert moved and all(k.startswith(trained) for k in moved), sorted(moved)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in moved if k.startswith("convs.")} == {"convs.0", "convs.1"}
    with pytest.raises(InputError, match="not a resolution of this 32px generator"):
        erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / "big", sets=[*FAST, "resolutions=[64]"])
    assert not (tmp_path / "big").exists()


def test_frozen_layers_stay_bit_identical_and_the_rest_moves(tmp_path):
    run = erase("text2unlearn", ["seven"], out=tmp_path / "run", sets=FAST, progress=False)  # a GAN method's default
    assert json.loads((run / "erasure.json").read_text())["base_model"]["spec"] == "digits-gan"
    base, erased = load_model("digits-gan").generator.state_dict(), load_model(str(run)).generator.state_dict()
    frozen = [k for k in base if k.startswith(("style.", "to_rgb1.", "to_rgbs."))]
    assert frozen and all(torch.equal(base[k], erased[k]) for k in frozen)
    # the mapping is frozen: so is the truncation centre the checkpoint tracked
    assert torch.equal(load_model("digits-gan").latent_avg, load_model(str(run)).latent_avg)
    moved = [k for k in base if k.startswith("convs.") and k.endswith("weight") and not torch.equal(base[k], erased[k])]
    assert moved
    outcome = json.loads((run / "erasure.json").read_text())["text2unlearn"]
    assert outcome["direction"] == "text" and 0 < outcome["concept_bearing_codes"] < 200


def test_an_interrupted_run_resumes_to_a_bit_identical_end(tmp_path):
    # with the learning-rate decay and the push's floor, both of which must resume exactly
    kwargs = {"sets": [*FAST, "lr_decay=0.5", "push_stop=true", "push_weight=10"], "seed": 2, "checkpoint_every": 2,
              "progress": False}  # fmt: skip
    whole = erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / "whole", **kwargs)

    def stop_at_3(step, total, logs):
        if step == 3:
            raise KeyboardInterrupt

    with stops_resumably():
        erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / "resumed", after_step=stop_at_3, **kwargs)
    resumed = erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / "resumed", resume=True, **kwargs)
    a, b = load_file(whole / "generator.safetensors"), load_file(resumed / "generator.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_several_concepts_and_the_mapper_direction(tmp_path):
    sets = FAST + ["direction=mapper", "mapper_steps=2", "mapper_samples=8", "train_torgb=true", "push_weight=1"]
    run = erase("text2unlearn", ["red", "seven"], "digits-gan", out=tmp_path / "run", sets=sets, progress=False)
    manifest = json.loads((run / "erasure.json").read_text())
    assert manifest["text2unlearn"]["direction"] == "mapper"
    assert set(manifest["text2unlearn"]["prompts"]) == {"red", "seven"}
    assert {"dir_0", "dir_1", "push_0", "push_1", "keep_pixel", "keep_clip"} <= set(manifest["final_logs"])


def test_a_run_interrupted_while_its_mapper_trains_resumes_to_a_bit_identical_end(tmp_path):
    kwargs = {"sets": [*FAST, "direction=mapper", "mapper_steps=4", "mapper_samples=8"], "seed": 1,
              "checkpoint_every": 2, "progress": False}  # fmt: skip
    whole = erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / "whole", **kwargs)
    calls = []

    def stop_in_the_mapper(step, total, logs):  # the mapper's 3rd step: after its checkpoint at step 2
        calls.append(step)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with stops_resumably():
        erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / "resumed", after_step=stop_in_the_mapper,
              **kwargs)  # fmt: skip
    assert (tmp_path / ".resumed.work" / "checkpoint" / "mapper-0" / "checkpoint.pt").is_file()
    resumed = erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / "resumed", resume=True, **kwargs)
    a, b = load_file(whole / "generator.safetensors"), load_file(resumed / "generator.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_values_are_refused():
    from erasure.config import build_config

    for sets, message in [({"batch_size": 3}, "even"), ({"lr": 0.0}, "lr"), ({"direction": "other"}, "mapper"),
                          ({"preserve_clip": float("inf")}, "preserve_clip"), ({"push_weight": -1.0}, "push_weight"),
                          ({"augment": -1}, "augment"), ({"mapper_steps": 0}, "mapper_steps"),
                          ({"mapper_lr": float("nan")}, "mapper_lr"),
                          ({"prompt_templates": ["a {x}"]}, "braces"), ({"clip": "bogus"}, "unknown CLIP"),
                          ({"resolutions": [6]}, "power of two"), ({"resolutions": [2]}, "power of two"),
                          ({"lr_decay": 1.5}, "lr_decay")]:  # fmt: skip
        with pytest.raises(InputError, match=message):
            build_config("text2unlearn", "digits", sets)


def test_a_pool_the_host_cannot_hold_is_refused_before_it_is_drawn(tmp_path):
    from erasure.gan_training import available_host_memory, check_pool_memory

    check_pool_memory(2000, 32, available=2**30)  # digits-gan's pool: 25 MB
    # a fifth of the host is left to the run itself: a pool that would fill 90% of it is refused too
    with pytest.raises(InputError, match="lower it with --set pool=N"):
        check_pool_memory(2000, 32, available=int(2000 * 3 * 32 * 32 * 4 / 0.9))
    with pytest.raises(InputError, match=r"pool of 2000 samples at 1024 px takes 23.4 GiB .* --set pool=N"):
        check_pool_memory(2000, 1024, available=16 * 2**30)
    if available_host_memory() is None:
        pytest.skip("this host does not say how much memory it has")
    # 10^7 renders of 32 px are 123 GB: refused through the real run at once, nothing left behind
    with pytest.raises(InputError, match="lower it with --set pool=N"):
        erase("text2unlearn", ["seven"], "digits-gan", out=tmp_path / "run", sets=[*FAST, "pool=10000000"],
              progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_wasserstein_1d():
    a = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert wasserstein_1d(a, a) == 0.0
    assert wasserstein_1d(a, a + 0.5) == pytest.approx(0.5)
    assert wasserstein_1d(torch.tensor([0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.5)
