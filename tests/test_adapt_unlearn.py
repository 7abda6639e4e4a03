"""Adapt-then-Unlearn: its two regularisers on small tensors, both stages on tiny real StyleGAN2
networks (this project's implementation), bit-identical resume, and the digits-gan run folder."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from erasure.adapt_unlearn import (
    AdaptUnlearnConfig,
    adapt,
    ewc_penalty,
    parameter_distance,
    repulsion,
    unlearn,
)
from erasure.api import erase
from erasure.config import build_config
from erasure.training import RunContext
from pipelines import InputError, load_model

from .conftest import check_truncation_centre_follows_the_mapping, stops_resumably, tiny_gan


@pytest.mark.parametrize("form", ["el2", "il2", "nl2"])
def test_each_repulsion_falls_as_the_parameters_move_away(form):
    theta_n = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    theta = {"w": torch.tensor([1.5, -1.0], requires_grad=True), "b": torch.tensor([0.0], requires_grad=True)}
    d = parameter_distance(theta, [theta_n])
    # mean over tensors of each tensor's mean squared difference: ((0.25 + 1) / 2 + 0.25) / 2
    assert float(d.detach()) == pytest.approx(0.4375)
    value = repulsion(d, form, alpha=2.0)
    expected = {"el2": np.exp(-2 * 0.4375), "il2": 1 / (2 * 0.4375), "nl2": -2 * 0.4375}[form]
    assert float(value.detach()) == pytest.approx(expected)
    value.backward()
    # Gradient descent moves theta along -grad: away from the adapted parameters in every coordinate.
    for name in theta:
        step = -theta[name].grad
        assert torch.all(step * (theta[name].detach() - theta_n[name]) > 0), name


def test_the_distance_sums_over_adapted_models():
    theta = {"w": torch.zeros(3)}
    one, two = {"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}
    assert float(parameter_distance(theta, [one, two])) == pytest.approx(1 + 4)


@pytest.mark.parametrize("form", ["el2", "il2", "nl2"])
def test_the_repulsion_is_weighed_by_repulsion_weight_when_set_else_by_the_papers(form):
    # repulsion_weight, when given, replaces the paper's weight (100 for el2, 1 otherwise) in stage 2's term. The
    # distance is the one test_the_distance_sums_over_adapted_models sums: 1 + 4.
    from erasure.adapt_unlearn import _Repulsion

    theta = {"w": torch.zeros(3)}
    one, two = {"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}
    unweighted = float(repulsion(torch.tensor(5.0), form, alpha=0.5))
    for weight, expected in ((2.5, 2.5), (None, {"el2": 100.0, "il2": 1.0, "nl2": 1.0}[form])):
        config = AdaptUnlearnConfig(repulsion=form, repulsion_weight=weight, alpha=0.5)
        assert config.weight == expected
        term = _Repulsion(theta, [one, two], config)
        assert float(term(None, None)) == pytest.approx(expected * unweighted)
        assert float(term.logs["distance"]) == pytest.approx(5.0)


def test_ewc_is_zero_at_its_anchor_and_grows_away_from_it():
    anchor = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    fisher = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([1.0])}
    assert float(ewc_penalty(anchor, anchor, fisher, 10.0)) == 0.0
    values = []
    for scale in (0.1, 0.2, 0.4):
        moved = {n: t + scale for n, t in anchor.items()}
        values.append(float(ewc_penalty(moved, anchor, fisher, 10.0)))
    # weight / 2 * (2 * s^2 + 0 * s^2 + 1 * s^2): quadratic, and blind where the Fisher is zero
    assert values == pytest.approx([5 * 3 * s**2 for s in (0.1, 0.2, 0.4)])
    only_unweighted = {"a": anchor["a"] + torch.tensor([0.0, 5.0]), "b": anchor["b"]}
    assert float(ewc_penalty(only_unweighted, anchor, fisher, 10.0)) == 0.0


def test_stage_ones_ewc_penalty_measures_the_copy_from_where_it_started(monkeypatch):
    # the anchor is the generator before adapting: the penalty the second step pays is the first step's weights'
    # (an anchor that followed the trained weights would make it 0 at every step)
    import erasure.adapt_unlearn as adapt_unlearn
    from erasure.adapt_unlearn import fisher_diagonal

    generator, discriminator = tiny_gan()
    generator.requires_grad_(True)
    start = {n: p.detach().clone() for n, p in generator.named_parameters()}
    fisher = fisher_diagonal(generator, discriminator, 2, seed=0)
    logs, stage = [], adapt_unlearn._adversarial_stage

    def recording(*args, **kwargs):
        out = stage(*args, **kwargs)
        logs.append(out[0])
        return out

    monkeypatch.setattr(adapt_unlearn, "_adversarial_stage", recording)
    images, run = torch.rand(8, 3, 16, 16), RunContext(seed=0, progress=False)
    after_one = adapt(generator, discriminator, images, fisher, AdaptUnlearnConfig(adapt_steps=1, batch_size=4,
                      ema_decay=0, ewc_weight=1e6), run, {}, "adapt")  # fmt: skip
    adapt(generator, discriminator, images, fisher, AdaptUnlearnConfig(adapt_steps=2, batch_size=4, ema_decay=0,
          ewc_weight=1e6), run, {}, "adapt")  # fmt: skip
    expected = float(ewc_penalty(after_one, start, fisher, 1e6))
    assert expected > 0 and logs[1]["term"] == pytest.approx(expected, rel=1e-4)


def test_the_fisher_in_chunks_of_whole_stddev_groups_is_the_fisher_of_all_samples_at_once():
    from erasure.adapt_unlearn import fisher_diagonal, stddev_chunks

    # the discriminator groups sample j with j + 4 (8 samples, groups of 4: m = 2): a chunk takes both groups' rows
    assert stddev_chunks(8, 4, 4) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert stddev_chunks(8, 4, 0) == stddev_chunks(8, 4, 8) == [list(range(8))]
    assert stddev_chunks(6, 4, 4) == [list(range(6))]  # 6 is not a multiple of 4: one group of one each, kept whole
    generator, discriminator = tiny_gan(size=16)
    generator.requires_grad_(True)
    whole = fisher_diagonal(generator, discriminator, 8, seed=3, instance_noise=0.1)
    chunked = fisher_diagonal(generator, discriminator, 8, seed=3, instance_noise=0.1, chunk=4)
    assert whole.keys() == chunked.keys() and any(v.abs().sum() > 0 for v in whole.values())
    # the paper's code: the synthesis convolutions alone, every one of them (not the mapping, input or ToRGB layers)
    assert set(whole) == {n for n, _ in generator.named_parameters() if n.startswith("convs.")}
    assert all(torch.allclose(whole[k], chunked[k], rtol=1e-4, atol=1e-12) for k in whole)
    # consecutive chunks of 4 would group other samples together: another Fisher, which the chunking avoids
    consecutive = {k: torch.zeros_like(v) for k, v in whole.items()}
    for half in (slice(0, 4), slice(4, 8)):
        part = _fisher_of_rows(generator, discriminator, 8, 3, 0.1, half)
        consecutive = {k: consecutive[k] + part[k] for k in consecutive}
    assert not all(torch.allclose(whole[k], consecutive[k], rtol=1e-4, atol=1e-12) for k in whole)


def _fisher_of_rows(generator, discriminator, samples, seed, instance_noise, rows):
    """The Fisher terms of `rows` with the discriminator seeing only those rows (a naive chunking)."""
    noise = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, generator.config.style_dim, generator=noise)
    size = generator.config.size
    jitter = instance_noise * torch.randn((samples, 3, size, size), generator=noise)
    params = {n: p for n, p in generator.named_parameters() if p.requires_grad}
    logits = discriminator(generator(z[rows], randomize_noise=False) + jitter[rows]).flatten()
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(logits)):
        grads = torch.autograd.grad(logits[i], list(params.values()), retain_graph=True, allow_unused=True)
        for (name, _), grad in zip(params.items(), grads):
            if grad is not None:
                out[name] += grad ** 2 / samples
    return out


def _adversarial_step(micro_batch: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Both networks' weights and the step's logs after one StyleGAN2 step (R1 and instance noise on, an EWC-like
    parameter term) with plain SGD, whose update is the gradient itself: no Adam normalisation to magnify rounding."""
    from erasure.gan_training import AdversarialSettings, adversarial_step
    from erasure.training import Network, TrainingLoop

    generator, discriminator = tiny_gan()
    generator.requires_grad_(True)
    discriminator.requires_grad_(True)
    anchor = {n: p.detach().clone() + 0.01 for n, p in generator.named_parameters()}
    networks = {name: Network(module, torch.optim.SGD(module.parameters(), lr=1.0), None)
                for name, module in (("generator", generator), ("discriminator", discriminator))}  # fmt: skip
    loop = TrainingLoop(RunContext(seed=0, progress=False), networks, desc="test")
    settings = AdversarialSettings(lr=1.0, betas=(0.0, 0.99), r1=10.0, r1_every=1, instance_noise=0.1)
    torch.manual_seed(5)

    def term(images, pooled):
        return sum(((p - anchor[n]) ** 2).sum() for n, p in generator.named_parameters())

    logs = adversarial_step(loop, torch.rand(8, 3, 16, 16) * 2 - 1, 0, settings, term, micro_batch=micro_batch)
    assert set(logs) == {"d", "r1", "g", "term"}
    return {f"{name}.{n}": p.detach().clone() for name, module in (("g", generator), ("d", discriminator))
            for n, p in module.named_parameters()}, logs  # fmt: skip


def test_a_micro_batched_adversarial_step_is_the_whole_batch_step():
    """micro_batch=4 on a batch of 8 (stddev groups of 4: two parts of whole groups, samples 0, 2, 4, 6 and 1, 3,
    5, 7): the same noise, the same discriminator inputs, the gradients accumulated: both networks take the step
    of the whole batch, and its logs are the whole batch's (each part's loss weighed by its share)."""
    before = {f"{name}.{n}": p.detach().clone() for name, module in zip("gd", tiny_gan())
              for n, p in module.named_parameters()}  # fmt: skip
    (whole, whole_logs), (micro, micro_logs) = _adversarial_step(0), _adversarial_step(4)
    moved = [k for k in whole if not torch.equal(whole[k], before[k])]
    assert any(k.startswith("g.") for k in moved) and any(k.startswith("d.") for k in moved)
    for key in whole:
        assert torch.allclose(whole[key], micro[key], rtol=1e-5, atol=1e-6), key
    for key in whole_logs:
        assert float(micro_logs[key]) == pytest.approx(float(whole_logs[key]), rel=1e-5), key


def test_stage_two_trains_the_generator_and_never_changes_the_adapted_models():
    generator, discriminator = tiny_gan()
    generator.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in generator.named_parameters()}
    adapted = [{n: p + 0.01 * torch.randn_like(p) for n, p in before.items()} for _ in range(2)]
    kept = [{n: t.clone() for n, t in theta.items()} for theta in adapted]
    config = AdaptUnlearnConfig(steps=3, batch_size=4, adapted_models=2)
    logs = unlearn(generator, discriminator, torch.rand(8, 3, 16, 16), adapted, config,
                   RunContext(seed=0, progress=False), {})  # fmt: skip
    assert logs["distance"] > 0
    assert all(torch.equal(a[n], k[n]) for a, k in zip(adapted, kept) for n in a)
    assert any(not torch.equal(p, before[n]) for n, p in generator.named_parameters())


@pytest.mark.parametrize("stage", ["adapt", "unlearn"])
def test_both_stages_keep_the_generators_average_the_authors_code_keeps(stage):
    """`ema_decay` (the authors' g_ema): the adapted model, and the unlearned generator, are the average
    decay * theta_0 + (1 - decay) * theta_1 after one step, where theta_1 is what the step without an EMA leaves
    (the average does not change the training); 0 leaves the trained weights as they were."""

    def one_step(decay: float) -> dict[str, torch.Tensor]:
        generator, discriminator = tiny_gan()
        generator.requires_grad_(True)
        config = AdaptUnlearnConfig(steps=1, adapt_steps=1, batch_size=4, ema_decay=decay)
        images, run = torch.rand(8, 3, 16, 16), RunContext(seed=0, progress=False)
        if stage == "adapt":
            kept = copy.deepcopy(discriminator.state_dict())
            adapted = adapt(generator, discriminator, images, None, config, run, {}, "adapt")
            # stage 1 adapts copies: stage 2 starts from the GAN's own discriminator, not the adapted one
            assert all(torch.equal(kept[k], v) for k, v in discriminator.state_dict().items())
            return adapted
        theta = {n: p.detach() + 0.01 for n, p in generator.named_parameters()}
        unlearn(generator, discriminator, images, [theta], config, run, {})
        return {n: p.detach().clone() for n, p in generator.named_parameters()}

    start = {n: p.detach().clone() for n, p in tiny_gan()[0].named_parameters()}
    trained, averaged = one_step(0.0), one_step(0.9)
    assert any(not torch.equal(trained[n], start[n]) for n in start)
    for name in start:
        assert torch.allclose(averaged[name], 0.9 * start[name] + 0.1 * trained[name], atol=1e-6), name
    assert AdaptUnlearnConfig().ema_decay == pytest.approx(0.5 ** 0.0032)  # the authors' accum = 0.5^(32/10^4)


def _folder(path, count, value):
    path.mkdir()
    for i in range(count):
        pixels = np.full((20, 24, 3), value + 10 * i, dtype=np.uint8)  # any size: resized to the GAN's
        Image.fromarray(pixels).save(path / f"{i}.png")
    return path


FOLDERS_RUN = ["adapt_steps=4", "steps=4", "batch_size=2", "fisher_samples=2", "r1_every=2"]


def test_both_stages_resume_to_a_bit_identical_end(tiny_gan_checkpoint, tmp_path):
    sets = FOLDERS_RUN + [f"negatives={_folder(tmp_path / 'neg', 3, 200)}",
                          f"positives={_folder(tmp_path / 'pos', 3, 20)}"]  # fmt: skip
    kwargs = {"out": tmp_path / "whole", "sets": sets, "seed": 3, "checkpoint_every": 2, "progress": False}
    whole = erase("adapt-unlearn", ["a red square"], str(tiny_gan_checkpoint), **kwargs)

    calls = []

    def interrupt_at(n):
        def after_step(step, total, logs):
            calls.append(step)
            if len(calls) == n:
                raise KeyboardInterrupt

        return after_step

    kwargs["out"] = tmp_path / "resumed"
    with stops_resumably():  # in stage 1, after its checkpoint at step 2
        erase("adapt-unlearn", ["a red square"], str(tiny_gan_checkpoint), after_step=interrupt_at(3), **kwargs)
    calls.clear()
    with stops_resumably():  # stage 1 ends; stage 2 is stopped after its step 2
        erase("adapt-unlearn", ["a red square"], str(tiny_gan_checkpoint), after_step=interrupt_at(4), resume=True,
              **kwargs)  # fmt: skip
    resumed = erase("adapt-unlearn", ["a red square"], str(tiny_gan_checkpoint), resume=True, **kwargs)

    for name in ("generator.safetensors", "discriminator.safetensors"):
        a, b = load_file(whole / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    manifest = json.loads((resumed / "erasure.json").read_text())
    assert manifest["adapt_unlearn"]["negatives"] == 3 and manifest["adapt_unlearn"]["positives"] == 3
    original = load_model(str(tiny_gan_checkpoint))
    erased = load_model(str(resumed))
    assert erased.kind == "gan" and not torch.equal(erased.generator.input.input, original.generator.input.input)


def test_the_adapted_concept_share_is_measured_on_the_adapted_parameters(tiny_gan_checkpoint):
    # the adapted model's share (stage 1's effect in the run's record) is drawn with its own parameters, not the
    # base's: biases that turn every render white make every sample bright
    from erasure.adapt_unlearn import concept_share

    model = load_model(str(tiny_gan_checkpoint))
    theta = {n: p.detach().clone() for n, p in model.generator.named_parameters()}
    bright = {n: t + 10 if n.startswith("to_rgb") and n.endswith(".bias") else t for n, t in theta.items()}
    detectors = {"bright": lambda images: images.mean((1, 2, 3)) > 0.9}
    assert concept_share(model, theta, detectors, samples=8) == 0.0
    assert concept_share(model, bright, detectors, samples=8) == 1.0


def test_the_vision_aided_critic_needs_a_transformers_clip(tiny_open_clip):
    from erasure.gan_training import CLIPFeatureDiscriminator
    from evaluators.clip_models import load_clip

    with pytest.raises(InputError, match="transformers CLIP"):
        CLIPFeatureDiscriminator.from_clip(load_clip(tiny_open_clip))
    critic = CLIPFeatureDiscriminator.from_clip(load_clip("digits-clip"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    logits, pooled = critic(images)
    assert logits.shape == (2, 1) and pooled.shape[0] == 2
    # digits-clip's own normalisation maps [-1, 1] onto itself: the zoo recipe feeds images as they are
    plain = CLIPFeatureDiscriminator(critic.vision, critic.head)
    assert torch.allclose(plain(images)[0], logits, atol=1e-5)
    # the head reads each layer's class token and mean patch token: the last layer's (the tower's own output) too
    seen = []
    critic.head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        critic(images)
        last = critic.vision(pixel_values=critic.preprocess(images)).last_hidden_state
    width, layers = last.shape[-1], critic.vision.config.num_hidden_layers
    assert seen[0].shape == (2, 2 * width * layers)
    assert torch.allclose(seen[0][:, -2 * width :], torch.cat([last[:, 0], last[:, 1:].mean(1)], -1), atol=1e-5)


def test_positives_are_labelled_by_clip_zero_shot_on_other_gans(tiny_gan_checkpoint, tiny_open_clip, tmp_path):
    sets = FOLDERS_RUN + [f"negatives={_folder(tmp_path / 'neg', 2, 200)}", f"clip={tiny_open_clip}", "pool=64",
                          "adapt_steps=1", "steps=1"]  # fmt: skip
    run = erase("adapt-unlearn", ["a red square"], str(tiny_gan_checkpoint), out=tmp_path / "run", sets=sets,
                progress=False)  # fmt: skip
    outcome = json.loads((run / "erasure.json").read_text())["adapt_unlearn"]
    assert outcome["pool"] == 64 and outcome["negatives"] == 2
    assert 0 < outcome["positives"] <= 64 and len(outcome["adapted_concept_share"]) == 1


def test_clip_zero_shot_detection_tells_a_concept_apart():
    from evaluators.detect import ConceptDetector
    from pipelines.zoo.renders import heldout_renders

    renders = heldout_renders(per_source=1, seed=0)
    detector = ConceptDetector("seven", "digits", classifier="clip")
    seen = detector(renders.images)
    sevens = renders.digits == 7
    assert detector.judge is None and detector.describe()["model"] == "digits-clip"
    assert seen[sevens].float().mean() > 0.8 and seen[~sevens].float().mean() < 0.1


def test_digits_gan_run_uses_the_judge_and_saves_a_loadable_generator(tmp_path):
    sets = [
        "pool=300",
        "num_negatives=8",
        "adapt_steps=2",
        "steps=2",
        "batch_size=4",
        "fisher_samples=4",
        "vision_aided=digits-clip",
    ]
    run = erase("adapt-unlearn", ["seven"], "digits-gan", out=tmp_path / "run", sets=sets, progress=False)
    manifest = json.loads((run / "erasure.json").read_text())
    assert manifest["config"]["instance_noise"] == 0.1  # the digits preset
    outcome = manifest["adapt_unlearn"]
    assert outcome["negatives"] == 8 and outcome["pool"] == 300
    assert 250 < outcome["positives"] < 292  # digits-gan draws a seven about one time in ten
    assert manifest["changed_components"] == ["generator", "discriminator"]
    assert "clip" in manifest["final_logs"]  # the vision-aided critic trained beside the discriminator
    erased = load_model(str(run))
    assert erased.generate([0, 1])[0].size == (32, 32)


def test_bad_values_and_folders_are_refused_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an image")
    for sets, message in [
        ({"negatives": str(bad)}, "notes.txt"),
        ({"positives": str(tmp_path / "missing")}, "missing"),
        ({"repulsion": "l1"}, "el2"),
        ({"alpha": float("nan")}, "alpha"),
        ({"repulsion_weight": -1.0}, "repulsion_weight"),
        ({"adapt_steps": 0}, "adapt_steps"),
        ({"unlearn_lr": 0.0}, "unlearn_lr"),
        ({"num_negatives": -1}, "num_negatives"),
        ({"fisher_batch": -1}, "fisher_batch must be >= 0"),
        ({"fisher_batch": 2.5}, "fisher_batch"),
        ({"micro_batch": -1}, "micro_batch must be >= 0"),
        ({"instance_noise": float("inf")}, "instance_noise"),
        ({"adam_betas": [0.0, 1.0]}, "adam_betas"),
        ({"classifier": "bogus"}, "classifier must be"),
        ({"vision_aided": "bogus"}, "unknown CLIP"),
        ({"vision_aided": "open_clip:ViT-B-32"}, "transformers CLIP"),
    ]:
        with pytest.raises(InputError, match=message):
            build_config("adapt-unlearn", "digits", sets)


def test_too_few_flagged_samples_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="fewer than the 50 negatives"):
        erase("adapt-unlearn", ["seven"], "digits-gan", out=tmp_path / "run", progress=False,
              sets=["pool=100", "num_negatives=50"])  # fmt: skip
    with pytest.raises(InputError, match="fewer than the 100 positives"):  # a pool of 100 holds some sevens
        erase("adapt-unlearn", ["seven"], "digits-gan", out=tmp_path / "run", progress=False,
              sets=["pool=100", "num_negatives=1", "num_positives=100"])  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_named_image_classifier_labels_the_samples(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from evaluators.detect import concept_detectors

    labels = {0: "clean", 1: "bangs"}
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, id2label=labels, label2id={v: k for k, v in labels.items()})  # fmt: skip
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    # a mean and a spread of the processor's own, which the detector must normalise with as the model was trained
    mean, std = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1), torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    images = torch.rand(64, 3, 16, 16)
    with torch.no_grad():  # a bias that splits these images between the two labels
        logits = model(pixel_values=(images - mean) / std).logits
        model.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median() + 1e-4
    model.save_pretrained(tmp_path / "clf")
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=mean.flatten().tolist(),
                      image_std=std.flatten().tolist()).save_pretrained(tmp_path / "clf")  # fmt: skip
    detector = concept_detectors(["bangs"], "stylegan2", classifier=f"image-classifier:{tmp_path / 'clf'}",
                                 label="bangs")["bangs"]  # fmt: skip
    with torch.no_grad():
        expected = model(pixel_values=(images - mean) / std).logits.argmax(-1) == 1
    assert 0 < int(expected.sum()) < len(images) and torch.equal(detector(images), expected)
    with pytest.raises(InputError, match="its labels: bangs, clean"):
        concept_detectors(["x"], "stylegan2", classifier=f"image-classifier:{tmp_path / 'clf'}", label="hat")
    with pytest.raises(InputError, match="classifier_label"):
        build_config("adapt-unlearn", "stylegan2", {"classifier": f"image-classifier:{tmp_path / 'clf'}"})


def test_the_fisher_is_the_mean_over_samples_of_the_squared_logit_gradients():
    # a mean over the samples: a sum would scale the EWC penalty with fisher_samples, and ewc_weight with it
    from erasure.adapt_unlearn import fisher_diagonal

    generator, discriminator = tiny_gan(size=16)
    generator.requires_grad_(True)
    fisher = fisher_diagonal(generator, discriminator, 8, seed=3, instance_noise=0.1)
    by_hand = _fisher_of_rows(generator, discriminator, 8, 3, 0.1, slice(0, 8))  # all rows at once: one group set
    assert all(torch.allclose(fisher[k], by_hand[k], rtol=1e-4, atol=1e-12) for k in fisher)


def test_stage_one_adapts_to_the_negatives_and_stage_two_unlearns_on_the_positives(tiny_gan_checkpoint, tmp_path,
                                                                                     monkeypatch):
    # the copies adapt towards the concept (negatives show it) and the generator is then trained on the rest: the
    # other way round would repel the generator from everything but the concept. Bright negatives, dark positives
    # (and not as many) tell the two sets apart.
    import erasure.adapt_unlearn as adapt_unlearn

    seen, returned = {}, []

    def recording(name, stage):
        def record(generator, discriminator, images, *args, **kwargs):
            seen[name] = images.detach().cpu().clone()
            returned.append(stage(generator, discriminator, images, *args, **kwargs))
            return returned[-1]

        return record

    monkeypatch.setattr(adapt_unlearn, "adapt", recording("adapt", adapt_unlearn.adapt))
    monkeypatch.setattr(adapt_unlearn, "unlearn", recording("unlearn", adapt_unlearn.unlearn))
    rates, networks = [], adapt_unlearn.adversarial_networks
    monkeypatch.setattr(adapt_unlearn, "adversarial_networks", lambda run, g, d, settings, critic=None: rates.append(
        settings.lr) or networks(run, g, d, settings, critic))  # fmt: skip
    sets = ["adapt_steps=1", "steps=1", "batch_size=2", "fisher_samples=2", "lr=0.003", "unlearn_lr=0.001",
            "ema_decay=0", "adapted_models=2", f"negatives={_folder(tmp_path / 'neg', 3, 200)}",
            f"positives={_folder(tmp_path / 'pos', 4, 20)}"]  # fmt: skip
    run = erase("adapt-unlearn", ["a red square"], str(tiny_gan_checkpoint), out=tmp_path / "run", sets=sets,
                progress=False)  # fmt: skip
    assert (len(seen["adapt"]), len(seen["unlearn"])) == (3, 4)
    assert seen["adapt"].mean() > seen["unlearn"].mean() + 0.5  # the bright images are stage 1's
    assert rates == [0.003, 0.003, 0.001]  # unlearn_lr is stage 2's alone
    first, second = returned[:2]  # each adapted model is drawn from its own seed: two models, not one twice
    assert any(not torch.equal(first[n], second[n]) for n in first)
    outcome = json.loads((run / "erasure.json").read_text())["adapt_unlearn"]
    assert (outcome["negatives"], outcome["positives"]) == (3, 4)
    check_truncation_centre_follows_the_mapping(str(tiny_gan_checkpoint), run, atol=1e-6)


def test_the_discriminators_adam_is_corrected_for_the_lazy_r1_steps():
    # StyleGAN2 (Karras et al. 2020, appendix B): with R1 every k steps the discriminator's Adam takes lr * c and
    # betas ** c, c = k / (k + 1); the generator's keeps its own, there being no lazy generator regulariser here.
    from erasure.gan_training import AdversarialSettings, adversarial_networks

    generator, discriminator = tiny_gan()
    generator.requires_grad_(True)
    settings = AdversarialSettings(lr=0.002, betas=(0.5, 0.99), r1=10.0, r1_every=16, instance_noise=0.0)
    critic = SimpleNamespace(head=torch.nn.Linear(4, 1))  # all the networks read of a vision-aided critic
    networks = adversarial_networks(RunContext(seed=0, progress=False), generator, discriminator, settings, critic)
    g, d = networks["generator"].optimizer.param_groups[0], networks["discriminator"].optimizer.param_groups[0]
    assert (g["lr"], g["betas"]) == (0.002, (0.5, 0.99))
    head = networks["clip_head"].optimizer.param_groups[0]  # no R1 on the vision-aided head: no correction either
    assert (head["lr"], head["betas"]) == (0.002, (0.5, 0.99))
    assert d["lr"] == pytest.approx(0.002 * 16 / 17)
    assert d["betas"] == pytest.approx((0.5 ** (16 / 17), 0.99 ** (16 / 17)))


def _sgd_step(lr: float = 1e-3, r1: float = 0.0, r1_every: int = 1, instance_noise: float = 0.0):
    """One adversarial step with plain SGD (the update is -lr times the gradient): the networks before and after, and
    what the discriminator was fed and the generator was called with, in order."""
    from erasure.gan_training import AdversarialSettings, adversarial_step
    from erasure.training import Network, TrainingLoop

    generator, discriminator = tiny_gan()
    generator.requires_grad_(True)
    discriminator.requires_grad_(True)
    before = copy.deepcopy(generator), copy.deepcopy(discriminator)
    networks = {name: Network(module, torch.optim.SGD(module.parameters(), lr=lr), None)
                for name, module in (("generator", generator), ("discriminator", discriminator))}  # fmt: skip
    loop = TrainingLoop(RunContext(seed=0, progress=False), networks, desc="test")
    settings = AdversarialSettings(lr=lr, betas=(0.0, 0.99), r1=r1, r1_every=r1_every, instance_noise=instance_noise)
    calls, fed = [], []
    generator.register_forward_hook(lambda module, args, kwargs, out: calls.append((args, kwargs, out.detach())),
                                    with_kwargs=True)  # fmt: skip
    discriminator.register_forward_pre_hook(lambda module, args: fed.append(args[0].detach()))
    torch.manual_seed(5)
    adversarial_step(loop, torch.rand(4, 3, 16, 16) * 2 - 1, 0, settings)
    return before, (generator, discriminator), calls, fed


def test_the_adversarial_step_moves_each_network_its_own_way():
    # the non-saturating logistic losses: the discriminator's falls on the step's fakes and real images, and the
    # generator's samples of its update then score higher with the discriminator they were trained against
    (g0, d0), (g1, d1), calls, fed = _sgd_step()
    fake, real = fed[:2]  # the discriminator update's inputs, without instance noise

    def d_loss(d):
        return float(F.softplus(d(fake)).mean() + F.softplus(-d(real)).mean())

    (z,), noise, _ = calls[-1]  # the generator update's latents and noise maps
    with torch.no_grad():
        assert d_loss(d1) < d_loss(d0)
        assert float(d1(g1(z, **noise)).mean()) > float(d1(g0(z, **noise)).mean())


def test_the_lazy_r1_penalty_is_scaled_by_its_interval():
    # every r1_every steps the penalty stands for r1_every steps' worth, r1 / 2 * r1_every * grad(R1) in the
    # discriminator's gradient: with SGD, the updates' differences from an unpenalised step are in that ratio
    _, (_, plain), _, _ = _sgd_step(lr=1.0)
    moved = {}
    for every in (1, 4):
        _, (_, d), _, _ = _sgd_step(lr=1.0, r1=1.0, r1_every=every)
        moved[every] = torch.cat([(p - q).detach().flatten() for p, q in zip(d.parameters(), plain.parameters())])
    assert moved[1].abs().max() > 1e-4
    assert torch.allclose(moved[4], 4 * moved[1], rtol=1e-3, atol=1e-6)


def test_the_generators_update_shows_the_discriminator_its_samples_through_instance_noise():
    # instance noise goes on every discriminator input, the generator update's too
    for noise in (0.1, 0.0):
        _, _, calls, fed = _sgd_step(instance_noise=noise)
        assert float((fed[-1] - calls[-1][2]).std()) == pytest.approx(noise, rel=0.1)


def test_a_real_batch_is_drawn_from_the_images_and_scaled_to_the_generators_range():
    from erasure.gan_training import real_batch

    images = torch.rand(5, 3, 4, 4)
    torch.manual_seed(0)
    batch = real_batch(images, 64, RunContext(seed=0, progress=False), 4)
    assert batch.shape == (64, 3, 4, 4)
    # each row is one of the images, mapped from [0, 1] to the generator's [-1, 1], and every image is drawn (the
    # last one too: 64 draws miss one of 5 with probability 5 * 0.8^64 < 1e-5)
    drawn = [next(i for i, image in enumerate(images) if torch.allclose((row + 1) / 2, image)) for row in batch]
    assert set(drawn) == set(range(5))


def test_a_pool_that_holds_just_the_samples_asked_for_is_split_not_refused():
    from erasure.gan_training import split_pool

    images = torch.arange(6.0).view(6, 1, 1, 1)
    detected = torch.tensor([True, False, True, False, False, False])
    negatives, positives = split_pool(images, detected, 2, 4, "x")
    assert negatives.flatten().tolist() == [0.0, 2.0] and positives.flatten().tolist() == [1.0, 3.0, 4.0, 5.0]
