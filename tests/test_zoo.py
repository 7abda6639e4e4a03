"""The embedded digits world: the shipped models load through the public paths and generate
deterministically; every training recipe runs (a few steps) and yields loadable models."""

import numpy as np
import pytest
import torch

from pipelines import InputError, load_model, resolve
from pipelines.cards import read_model_card
from pipelines.zoo import models as zoo
from pipelines.zoo.renders import RenderSampler, source_digits


def test_renders_and_captions():
    train, heldout = source_digits("train"), source_digits("heldout")
    assert len(train[1]) + len(heldout[1]) == 1797 and 0.18 < len(heldout[1]) / 1797 < 0.22
    batch = RenderSampler(seed=0).sample(32)
    assert batch.images.shape == (32, 3, 32, 32) and 0 <= batch.images.min() and batch.images.max() <= 1
    assert all(isinstance(c, str) and c for c in batch.captions)
    again = RenderSampler(seed=0).sample(32)
    assert torch.equal(batch.images, again.images) and batch.captions == again.captions


def test_shipped_digits_sd_is_a_plain_stable_diffusion_folder():
    from diffusers import StableDiffusionPipeline

    path = zoo.embedded_path("digits")
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32)  # no special casing
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer("a red seven").input_ids[0] == 49406
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert resolve("digits").family.name == "digits"


def test_shipped_models_generate_deterministically():
    model = load_model("digits")
    a = model.generate(["a red seven"], [0, 1], steps=10)[0]
    b = model.generate(["a red seven"], [0, 1], steps=10)[0]
    assert len(a) == len(b) == 2 and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert a[0].size == (32, 32)
    gan = load_model("digits-gan")
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(gan.generate([3, 4]), gan.generate([3, 4])))


@pytest.mark.slow
def test_every_recipe_runs_and_builds_loadable_models(tmp_path, monkeypatch):
    from evaluators.clip_models import load_clip
    from evaluators.judges import DigitsJudge
    from pipelines.files import normal_mode
    from zoo.build import build_zoo

    report = build_zoo(tmp_path, seed=1, scale=0.001)
    assert set(report["seconds"]) == {"digits-judge", "digits-clip", "digits-sd", "digits-gan"}
    monkeypatch.setenv("ERASURE_ZOO", str(tmp_path))
    model = load_model("digits")
    assert len(model.tokenizer) == 49408
    assert model.generate(["a seven"], [0], steps=2)[0][0].size == (32, 32)
    assert load_model("digits-gan").generate([0])[0].size == (32, 32)
    assert DigitsJudge().predict(torch.rand(2, 3, 32, 32))["digit"].shape == (2, 10)
    assert load_clip("digits-clip").text_features(["a red seven"]).shape[0] == 1
    card = read_model_card(tmp_path / "digits-sd")
    assert card["family"] == "digits" and card["seed"] == 1
    # each model is built aside and put in place whole; its files readable as any other (safetensors writes 0600)
    built = ["digits-clip", "digits-gan", "digits-judge", "digits-sd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == built
    assert all(f.stat().st_mode & 0o777 == normal_mode() for f in tmp_path.rglob("*.safetensors"))
    build_zoo(tmp_path, seed=2, scale=0.001, only=("digits-judge",))  # a rebuild replaces the model
    assert read_model_card(tmp_path / "digits-judge")["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == built


def test_unknown_and_missing_embedded_models(tmp_path, monkeypatch):
    from pipelines.errors import InputError

    monkeypatch.setenv("ERASURE_ZOO", str(tmp_path))
    with pytest.raises(InputError, match="erasure zoo build"):
        resolve("digits")
    with pytest.raises(InputError, match="evaluator model"):
        monkeypatch.delenv("ERASURE_ZOO")
        resolve("digits-judge")


@pytest.fixture(scope="module")
def digits_clip_model():
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(zoo.embedded_path("digits-clip"), dtype=torch.float32)


@pytest.fixture(scope="module")
def digits_sd_pipe():
    return load_model("digits-sd").pipe


def gan_stage(stage: str, clip_model):
    """A runner of one digits-gan stage at test size: train from scratch, or sharpen the shipped model."""
    from zoo import gan_recipe

    if stage == "first":
        return lambda out, **kw: gan_recipe.train_gan(out, batch=2, seed=0, clip_vision=clip_model.vision_model, **kw)
    source = zoo.embedded_path("digits-gan")
    return lambda out, **kw: gan_recipe.sharpen_gan(source, out, batch=2, seed=0, clip_model=clip_model, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["first", "sharpen"])
def test_interrupted_gan_training_resumes_from_its_checkpoint_bit_identically(
    tmp_path, monkeypatch, stage, digits_clip_model, digits_sd_pipe
):
    from erasure.training import TrainingLoop

    run = gan_stage(stage, digits_clip_model)
    # The vision-aided discriminator's head trains too: a resume that lost it would differ.
    settings = {"steps": 4, "snapshot_every": 2}
    if stage == "sharpen":  # the third stage's score distillation as well
        from zoo.score_distillation import ScoreDistillation

        distillation = ScoreDistillation(digits_sd_pipe, styled=True, colour_blind=True)
        settings.update(distillation=distillation, distillation_weight=1.0)
    # Its parent folder does not exist yet: the first checkpoint must still be written.
    straight = run(tmp_path / "new" / "straight", **settings)

    save = TrainingLoop.save_checkpoint

    class Interrupted(Exception):
        pass

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(TrainingLoop, "save_checkpoint", save_then_interrupt)
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", **settings)
    checkpoint = tmp_path / ".resumed-checkpoint"
    assert (checkpoint / "checkpoint.pt").exists() and not (tmp_path / "resumed").exists()
    with pytest.raises(InputError, match="was made with other values of: steps"):
        run(tmp_path / "resumed", **{**settings, "steps": 6})

    monkeypatch.setattr(TrainingLoop, "save_checkpoint", save)
    resumed = run(tmp_path / "resumed", **settings)
    assert not checkpoint.exists()
    assert straight.state_dict().keys() == resumed.state_dict().keys()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_sharpening_lowers_the_zero_shot_entropy(digits_clip_model):
    """The class-aware term reaches the generator: a few steps with it leave digits-clip surer of
    the samples' digit than the same steps without it, and than before."""
    from erasure.training import RunContext
    from pipelines.gan_checkpoints import load_gan_folder
    from zoo import gan_recipe

    entropy = gan_recipe.ZeroShotEntropy(digits_clip_model, "digit")
    z = torch.randn(64, 128, generator=torch.Generator().manual_seed(7))

    def per_sample_entropy(generator) -> float:
        with torch.no_grad():
            return float(entropy.of_images(generator(z, randomize_noise=False).clamp(-1, 1))[0])

    def generator_after(steps: int, weight: float):
        torch.manual_seed(0)
        generator, discriminator, _ = load_gan_folder(zoo.embedded_path("digits-gan"))
        generator, discriminator = generator.float(), discriminator.float()
        training = gan_recipe.AdversarialTraining(
            generator, discriminator, digits_clip_model.vision_model, 8, RenderSampler("train", seed=0),
            RunContext(seed=None, progress=False), "test", {},
        )  # fmt: skip
        for step in range(1, steps + 1):
            real = training.sampler.sample(8).images * 2 - 1
            training.step(real, step, lambda fake, pooled: weight * entropy.generator_loss(pooled))
        return generator

    before = per_sample_entropy(generator_after(0, 0.0))
    plain, sharpened = per_sample_entropy(generator_after(5, 0.0)), per_sample_entropy(generator_after(5, 20.0))
    assert sharpened < plain and sharpened < before


@pytest.mark.parametrize("styled, colour_blind", [(True, True), (False, False)])  # the recipe's, and neither
@pytest.mark.slow
def test_score_distillation_alone_draws_the_captioned_digits_from_noise(digits_clip_model, digits_sd_pipe, styled,
                                                                        colour_blind):  # fmt: skip
    """Its gradient carries digits-sd's knowledge of each caption: images optimised from noise by
    it alone become the captioned digits (read by digits-clip's zero-shot classifier)."""
    from zoo import gan_recipe
    from zoo.score_distillation import ScoreDistillation

    torch.manual_seed(0)
    distillation = ScoreDistillation(digits_sd_pipe, guidance=5.0, styled=styled, colour_blind=colour_blind)
    digits = torch.arange(10)
    colours, styles = digits % 5, digits % 3
    # a dark, faintly noisy start (the renders' background), kept in [-1, 1] as a generator's output
    raw = (-1.5 + 0.1 * torch.randn(10, 3, 32, 32)).requires_grad_(True)
    optimiser = torch.optim.Adam([raw], lr=0.05)
    reader = gan_recipe.ZeroShotEntropy(digits_clip_model, "digit")

    def recognised() -> int:
        with torch.no_grad():
            return int((reader.probabilities_of(raw.tanh()).argmax(-1) == digits).sum())

    assert recognised() <= 3
    for _ in range(40):
        optimiser.zero_grad()
        distillation.loss(raw.tanh(), digits, colours, styles).backward()
        optimiser.step()
    assert recognised() >= 9


def test_colour_blind_score_distillation_moves_only_each_pixels_brightest_channel(digits_sd_pipe):
    from zoo.score_distillation import ScoreDistillation

    torch.manual_seed(0)
    images = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_(True)
    labels = torch.tensor([1, 4, 7, 9])
    ScoreDistillation(digits_sd_pipe, colour_blind=True).loss(images, labels, labels % 5, labels % 3).backward()
    brightest = images.detach().argmax(1, keepdim=True)
    moved = images.grad != 0
    assert moved.any(1).float().mean() > 0.99  # every pixel's brightness is moved ...
    assert torch.equal(moved, torch.zeros_like(moved).scatter_(1, brightest, True))  # ... through that channel alone


def test_the_held_out_split_shares_no_handwriting_with_the_training_split_and_is_the_one_the_models_left_out():
    """The shipped judge, CLIP and generators were trained on the training split: held-out digits that moved into it
    (a split drawn again, or rounded otherwise) would be scored as unseen handwriting when they are not."""
    import hashlib

    train, heldout = source_digits("train"), source_digits("heldout")
    seen = {bytes(row) for row in (train[0] * 16).round().to(torch.uint8).flatten(1).numpy()}
    assert not any(bytes(row) in seen for row in (heldout[0] * 16).round().to(torch.uint8).flatten(1).numpy())
    assert torch.bincount(heldout[1]).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]  # a fifth of each, rounded
    assert hashlib.sha256(heldout[0].numpy().tobytes()).hexdigest().startswith("3b9303c914673bb4")


def test_renders_are_drawn_in_every_colour_and_style_and_captioned_with_what_they_show():
    """Held-out renders (what judges and CLIP are measured on) are captioned in full: digit, colour and style."""
    from pipelines.tokenizer import plain_words
    from pipelines.zoo.renders import heldout_renders
    from pipelines.zoo.world import COLOURS, DIGIT_WORDS, STYLE_WORDS, STYLES

    for batch in (heldout_renders(per_source=1, seed=0), RenderSampler(seed=0, p_partial=0.0).sample(200)):
        assert set(batch.colours.tolist()) == set(range(len(COLOURS)))
        assert set(batch.styles.tolist()) == set(range(len(STYLES)))
        for text, d, c, s in zip(batch.captions, batch.digits, batch.colours, batch.styles):
            words = plain_words(text)
            assert {DIGIT_WORDS[d], str(int(d))} & set(words), text
            assert COLOURS[c] in words and set(STYLE_WORDS[STYLES[s]]) & set(words), text


def test_a_render_is_its_colour_at_full_ink_and_its_caption_says_an_before_a_vowel_sound():
    """A stroke at full ink is the colour's RGB: ink past 1 would push red's green and blue up, towards another
    colour. Captions say "an 8", as the prompts a user types do."""
    import random
    import re

    from pipelines.zoo.renders import caption, render
    from pipelines.zoo.world import COLOUR_RGB, COLOURS

    sources, _ = source_digits("heldout")
    colours = torch.arange(10) % len(COLOURS)
    images = render(sources[:10], colours, torch.arange(10) % 3, augment=False)
    expected = torch.tensor([COLOUR_RGB[COLOURS[c]] for c in colours])
    torch.testing.assert_close(images.flatten(2).max(-1).values, expected)
    rng = random.Random(0)
    texts = [caption(8, c % 5, c % 3, rng, p_partial=p) for c in range(200) for p in (0.0, 1.0)]  # "a {d}": partial
    assert not [t for t in texts if re.search(r"\ba (8|eight|italic|upright)\b", t)]
    assert any(re.search(r"\ban 8\b", t) for t in texts)


def test_a_concept_names_one_class_of_the_digits_world_or_none():
    from pipelines.zoo.world import WorldConcept, parse_concept

    seven = WorldConcept("digit", 7)
    assert all(parse_concept(text) == seven for text in ("seven", "7", "the digit 7", "seven 7"))
    assert parse_concept("slanted digits") == WorldConcept("style", 1) and parse_concept("red").name == "red"
    for text in ("a red seven", "italic 7", "seven or eight", "10", "a cat"):  # two classes, or none of the world
        assert parse_concept(text) is None, text
