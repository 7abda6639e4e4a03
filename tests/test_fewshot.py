"""Few-shot erasing: gradient ascent on the denoising loss of cached latents, its stopping rule, and
the checks of an image folder (before any model loads)."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from erasure.api import erase
from erasure.common import denoising_loss
from erasure.config import build_config, parse_sets
from erasure.fewshot import FewShotConfig
from erasure.fewshot import erase as fewshot_erase
from erasure.training import RunContext
from pipelines import InputError, load_model
from pipelines.images import encode_latents, load_square_images

# Where the family has no judge, digits-clip scores the quick samples (the tiny model draws noise).
QUICK = ["steps=3", "batch_size=2", "lr=1e-2", "stop_clip=digits-clip", "stop_samples=2", "stop_steps=2"]


def _write_images(folder, sizes=((16, 16), (40, 24), (20, 50)), formats=("PNG", "JPEG", "WEBP")):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, ((w, h), fmt) in enumerate(zip(sizes, formats)):
        mode = "RGBA" if fmt == "PNG" else "RGB"
        pixels = rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8)
        Image.fromarray(pixels, mode).save(folder / f"img{i}.{fmt.lower()}", format=fmt)
    return folder


@pytest.fixture
def image_folder(tmp_path):
    return _write_images(tmp_path / "cats")


def _probes(model, latents, seed=1):
    """Fixed (noise, t, caption) to score the denoising loss of the cached latents."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (len(latents),), generator=g)
    return noise, t


def test_images_past_the_pixel_budget_are_encoded_a_few_at_a_time(tiny_pipeline_dir, monkeypatch):
    import pipelines.images

    model = load_model(str(tiny_pipeline_dir))
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = encode_latents(model, images)  # the posterior's mean: no draw depends on the chunks
    chunks = []
    hook = model.vae.encoder.register_forward_hook(lambda module, inputs, output: chunks.append(len(inputs[0])))
    monkeypatch.setattr(pipelines.images, "ENCODE_PIXELS", 2 * 16 * 16)  # two of these images' pixels at once
    parts = encode_latents(model, images)
    hook.remove()
    assert chunks == [2, 2, 1] and torch.allclose(parts, whole, atol=1e-5)


def test_the_loss_is_the_negated_denoising_loss_of_the_cached_latents(tiny_pipeline_dir, image_folder):
    model = load_model(str(tiny_pipeline_dir))
    images = load_square_images(sorted(image_folder.iterdir()), 16)
    latents = encode_latents(model, images, torch.Generator().manual_seed(0))
    noise, t = _probes(model, latents)
    cond = model.encode(["a cat"] * len(latents))
    with torch.no_grad():  # the helper is the plain noise-prediction MSE of the noised latents
        noisy = model.scheduler.add_noise(latents, noise, t)
        by_hand = ((model.unet(noisy, t, cond).sample - noise) ** 2).mean()
        before = denoising_loss(model, latents, cond, noise, t)
    assert torch.allclose(before, by_hand)

    sets = [f"images={image_folder}", *QUICK, "steps=6", "stop_below=none"]
    config = build_config("fewshot", "sd1", parse_sets(sets))
    fewshot_erase(model, ["a cat"], config, RunContext(seed=0, progress=False))
    with torch.no_grad():  # ascent: the same latents are now denoised worse under the concept's caption
        after = denoising_loss(model, latents, model.encode(["a cat"] * len(latents)), noise, t)
    assert after > before + 0.02, (float(before), float(after))  # descent would lower it


def test_the_tokens_scope_changes_only_the_concepts_embedding_rows(tiny_pipeline_dir, image_folder):
    model = load_model(str(tiny_pipeline_dir))
    before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    unrelated, concept = model.encode(["dog", "the dog on grass"]), model.encode(["a cat"])
    sets = [f"images={image_folder}", *QUICK, "scope=tokens", "stop_below=none", "weight_decay=0.1"]
    config = build_config("fewshot", "sd1", parse_sets(sets))
    result = fewshot_erase(model, ["a cat"], config, RunContext(seed=0, progress=False))

    ids = model.tokenizer("a cat", add_special_tokens=False).input_ids
    width = model.text_encoder.config.hidden_size
    assert len(set(ids)) == 2 and result.trainable_parameters == 2 * width
    after = model.text_encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == 1 and changed[0].endswith("token_embedding.weight")
    rows = (before[changed[0]] != after[changed[0]]).any(dim=1).nonzero().flatten().tolist()
    assert rows == sorted(set(ids))  # both rows moved, no other word's embedding (no weight decay on them)
    assert torch.equal(model.encode(["dog", "the dog on grass"]), unrelated)  # prompts without the concept's tokens
    assert not torch.allclose(result.model.encode(["a cat"]), concept)  # the concept's own prompt moved


def test_the_tokens_scope_frees_the_rows_of_every_concepts_words(tiny_pipeline_dir):
    # erasing several concepts leaves each one's words trainable, not the first concept's alone; the mask lets through
    # exactly those rows of a gradient that reaches every word of the prompt
    from erasure.fewshot import train_concept_tokens

    model = load_model(str(tiny_pipeline_dir))
    size = train_concept_tokens(model.text_encoder, {"text_encoder": model.tokenizer}, ["cat", "red dog"])
    words = {i for w in ("cat", "red", "dog") for i in model.tokenizer(w, add_special_tokens=False).input_ids}
    assert size == len(words) * model.text_encoder.config.hidden_size
    model.encode(["a red cat and a dog on grass"], model.text_encoder).pow(2).sum().backward()
    weight = model.text_encoder.get_input_embeddings().weight
    assert set(weight.grad.abs().sum(1).nonzero().flatten().tolist()) == words


def test_the_retain_term_holds_prompts_without_the_concept_where_they_were(tiny_pipeline_dir, image_folder):
    # the same ascent with and without the term: prompts without the concept (COCO objects on a
    # real-family model) move far less with it, while the cached latents still get harder to denoise
    retain = ["a photo of a dog", "a photo of a bicycle", "a photo of a pizza"]
    base = load_model(str(tiny_pipeline_dir))
    latents = encode_latents(base, load_square_images(sorted(image_folder.iterdir()), 16), torch.Generator())
    noise, t = _probes(base, latents)
    caption = ["a photo of a cat"] * len(latents)
    with torch.no_grad():
        before_retain = base.encode(retain)
        before_loss = denoising_loss(base, latents, base.encode(caption), noise, t)
    drift, loss, logs = {}, {}, {}
    for weight in (0.0, 0.1):
        model = load_model(str(tiny_pipeline_dir))
        sets = [f"images={image_folder}", *QUICK, "steps=6", "stop_below=none", f"retain_weight={weight}",
                "retain_batch=4"]  # fmt: skip
        result = fewshot_erase(model, ["a cat"], build_config("fewshot", "sd1", parse_sets(sets)),
                               RunContext(seed=0, progress=False))  # fmt: skip
        with torch.no_grad():
            drift[weight] = float(((model.encode(retain) - before_retain) ** 2).mean())
            loss[weight] = float(denoising_loss(model, latents, model.encode(caption), noise, t))
        logs[weight] = result.logs
    assert "retain_drift" in logs[0.1] and "retain_drift" not in logs[0.0]
    assert drift[0.1] < 0.25 * drift[0.0], drift  # measured: 14 times less
    assert loss[0.1] > before_loss + 0.005, (loss, float(before_loss))  # the ascent itself still happens


def test_the_stopping_rule_ends_the_run_at_once_on_an_absent_concept(tiny_pipeline_dir, image_folder, tmp_path):
    # digits-clip sees no red seven in the tiny model's noise (0 of the 8 quick samples)
    sets = [f"images={image_folder}", *QUICK, "stop_samples=8"]
    out = erase("fewshot", ["a red seven"], str(tiny_pipeline_dir), out=tmp_path / "run", progress=False, sets=sets)
    manifest = json.loads((out / "erasure.json").read_text())
    outcome = manifest["fewshot"]
    assert outcome["images"] == 3 and outcome["epochs_run"] == 1 and outcome["updates"] == 1
    assert outcome["stopped_early"] and outcome["last_presence"] == 0.0
    assert manifest["changed_components"] == ["text_encoder"]
    load_model(str(out))  # the run folder is a loadable pipeline
    without = erase("fewshot", ["a red seven"], str(tiny_pipeline_dir), out=tmp_path / "all", progress=False,
                    sets=[*sets, "stop_below=none"])  # fmt: skip
    assert json.loads((without / "erasure.json").read_text())["fewshot"]["epochs_run"] == 3
    patient = erase("fewshot", ["a red seven"], str(tiny_pipeline_dir), out=tmp_path / "patient", progress=False,
                    sets=[*sets, "stop_patience=2"])  # fmt: skip
    assert json.loads((patient / "erasure.json").read_text())["fewshot"]["epochs_run"] == 2  # two checks in a row


def test_the_rule_on_several_concepts_waits_for_each_to_be_gone(tiny_pipeline_dir):
    # the check of two concepts is the larger share: one still shown every time keeps the run going, however absent
    # the other (their mean, 50%, would have stopped it under stop_below=0.6)
    from evaluators.detect import PresenceCheck

    model = load_model(str(tiny_pipeline_dir))
    check = PresenceCheck(model.family, ["cat", "dog"], clip="digits-clip")
    assert 0 <= check(model, 2, steps=2) <= 1  # the real detectors, on the tiny model's noise
    # detectors that see "cat" in every image and "dog" in none
    check.detectors = {"cat": lambda images: torch.ones(len(images), dtype=torch.bool),
                       "dog": lambda images: torch.zeros(len(images), dtype=torch.bool)}  # fmt: skip
    assert check(model, 2, steps=2) == 1.0


def test_the_quick_samples_go_round_the_target_prompts_each_at_its_own_seed(tiny_pipeline_dir):
    # sample i is prompt i mod P at seed i: a concept gone from one seed of its first prompt is not yet gone
    from evaluators.detect import PresenceCheck
    from pipelines.images import to_tensor

    model = load_model(str(tiny_pipeline_dir))
    check = PresenceCheck(model.family, ["cat"], clip="digits-clip")
    prompts = check.prompts["cat"]
    seen = []
    check.detectors = {"cat": lambda images: seen.append(images) or torch.zeros(len(images), dtype=torch.bool)}
    n = len(prompts) + 2
    check(model, n, steps=2)
    expected = to_tensor(model.generate_jobs(prompts, [(i % len(prompts), i) for i in range(n)], steps=2))
    assert len(prompts) >= 2 and torch.equal(seen[0], expected)


def test_steps_are_updates_and_the_rule_checks_at_the_end_of_each_epoch(tiny_pipeline_dir, tmp_path, monkeypatch):
    # 4 images at batch 2: two updates an epoch
    import erasure.fewshot as fewshot

    losses = []  # one per update actually made: a check after an epoch's first update would stop the run at 1
    monkeypatch.setattr(fewshot, "denoising_loss", lambda *args: losses.append(1) or denoising_loss(*args))
    folder = _write_images(tmp_path / "four", sizes=((16, 16),) * 4, formats=("PNG",) * 4)
    sets = [f"images={folder}", *QUICK, "steps=5", "stop_samples=8"]
    stopped = erase("fewshot", ["a red seven"], str(tiny_pipeline_dir), out=tmp_path / "stopped", progress=False,
                    sets=sets)  # fmt: skip
    outcome = json.loads((stopped / "erasure.json").read_text())["fewshot"]
    assert (outcome["images"], outcome["epochs_run"], outcome["updates"], outcome["stopped_early"]) == (4, 1, 2, True)
    assert len(losses) == 2
    whole = erase("fewshot", ["a red seven"], str(tiny_pipeline_dir), out=tmp_path / "whole", progress=False,
                  sets=[*sets, "stop_below=none"])  # fmt: skip
    outcome = json.loads((whole / "erasure.json").read_text())["fewshot"]
    assert (outcome["epochs_run"], outcome["updates"], outcome["stopped_early"]) == (3, 5, False)  # 2 + 2 + 1


def test_any_format_and_size_is_resized_and_cropped_to_the_model(image_folder):
    images = load_square_images(sorted(image_folder.iterdir()), 16)
    assert images.shape == (3, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize(
    "setup, images, message",
    [
        (lambda d: None, "{d}/missing", "does not exist"),
        (lambda d: (d / "file.png").write_bytes(b"x"), "{d}/file.png", "is not a folder"),
        (lambda d: (d / "empty").mkdir(), "{d}/empty", "is empty"),
        (lambda d: (_write_images(d / "mixed"), (d / "mixed" / "notes.txt").write_text("hello")), "{d}/mixed",
         "not readable images: notes.txt"),
        (lambda d: (_write_images(d / "broken"), (d / "broken" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")),
         "{d}/broken", "not readable images: cut.png"),
        (lambda d: _write_images(d / "three"), "{d}/three num_images=5", "holds 3 images, fewer than the 5 asked"),
    ],
    ids=["missing", "a-file", "empty", "non-image", "truncated", "too-few"],
)  # fmt: skip
def test_bad_image_folders_are_refused_before_any_model_loads(tiny_pipeline_dir, tmp_path, setup, images, message):
    # a model whose UNet weights are garbage: loading it would fail otherwise, so the folder check comes first
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    setup(tmp_path)
    folder, *rest = images.format(d=tmp_path).split(" ")
    with pytest.raises(InputError, match=message):
        erase("fewshot", ["a cat"], str(model), out=tmp_path / "run", sets=[f"images={folder}", *rest])
    assert not (tmp_path / "run").exists()


def test_a_model_without_builtin_images_needs_a_folder(tiny_pipeline_dir, tmp_path):
    with pytest.raises(InputError, match="pass --images DIR"):
        erase("fewshot", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run")
    with pytest.raises(InputError, match="sd1 family has no builtin images"):
        erase("fewshot", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=["images=builtin"])


def test_the_command_line_takes_images(tiny_pipeline_dir, image_folder, tmp_path, capsys, monkeypatch):
    from ui.cli import main

    sets = [arg for s in QUICK for arg in ("--set", s)]
    monkeypatch.chdir(image_folder.parent)
    code = main(["erase", "--method", "fewshot", "--model", str(tiny_pipeline_dir), "--concept", "a cat",
                 "--images", image_folder.name, *sets, "--quiet", "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 0 and (tmp_path / "run" / "text_encoder" / "config.json").is_file()
    # the folder is recorded as an absolute path: the run's manifest reruns it from any folder
    manifest = json.loads((tmp_path / "run" / "erasure.json").read_text())
    assert manifest["config"]["images"] == str(image_folder.absolute())
    monkeypatch.chdir(tmp_path / "run")
    assert main(["erase", "--config", ".", "--quiet", "--out", str(tmp_path / "again")]) == 0  # the run's folder
    assert main(["erase", "--method", "fewshot", "--concept", "seven", "--images", "", "--out",
                 str(tmp_path / "empty")]) == 2  # fmt: skip
    assert "images is empty" in capsys.readouterr().err
    assert main(["erase", "--method", "esd", "--concept", "seven", "--images", str(image_folder),
                 "--out", str(tmp_path / "esd")]) == 2  # fmt: skip
    assert "esd learns from no images; --images is for fewshot" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value, message",
    [("lr=nan", "lr must be a finite number, not nan"), ("lr=-1", "lr must be > 0, not -1"),
     ("adam_eps=0", "adam_eps must be > 0"), ("weight_decay=-1", "weight_decay must be >= 0"),
     ("adam_betas=0.9", "adam_betas must hold 2 values"),
     ("adam_betas=0.9,1.5", "adam_betas must be between 0 and 1 (1 excluded), not 1.5"),
     ("steps=0", "steps must be >= 1"), ("num_images=-1", "num_images must be >= 0"),
     ("stop_below=1.5", "stop_below must be between 0 and 1 (0 excluded)"),
     ("stop_steps=0", "stop_steps must be between 1 and 999, not 0"),
     ("prompt_templates=a photo", "must contain '{}'"), ("captions=poem", "choose one of: object, style"),
     ("scope=everything", "unknown text-encoder scope"), ("scope=token", "unknown text-encoder scope"),
     ("retain_weight=-1", "retain_weight must be >= 0"), ("retain_batch=0", "retain_batch must be >= 1"),
     ("stop_samples=0", "stop_samples must be >= 1"), ("stop_patience=0", "stop_patience must be >= 1")],
)  # fmt: skip
def test_bad_option_values_are_refused_before_any_model_loads(value, message, tiny_pipeline_dir, tmp_path):
    with pytest.raises(InputError, match=re.escape(message)):
        erase("fewshot", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=[value])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "shares, patience, epochs",
    [([0.0, 0.1, 0.0, 0.0, 0.5, 0.5], 2, 4),  # a check at the threshold is not under it: the count starts again
     ([0.5, 0.0, 0.5, 0.0, 0.0, 0.5], 2, 5),  # an epoch back above the threshold resets the count
     ([0.5, 0.5, 0.0, 0.5, 0.5, 0.5], 1, 3)],  # patience 1: the first check under it
)  # fmt: skip
def test_the_run_stops_after_stop_patience_checks_in_a_row_under_stop_below(tiny_pipeline_dir, image_folder,
                                                                             monkeypatch, shares, patience, epochs):
    # "in a row": a check at or above stop_below must reset the count, else scattered low checks add up and stop the
    # run while the concept still shows. The check's shares are scripted (3 images at batch 2: one update an epoch).
    import evaluators.detect

    calls = []

    class ScriptedCheck:
        def __init__(self, family, concepts, device="cpu", clip=None):
            pass

        def __call__(self, model, samples, steps):
            calls.append((samples, steps))
            return shares[len(calls) - 1]

    monkeypatch.setattr(evaluators.detect, "PresenceCheck", ScriptedCheck)
    model = load_model(str(tiny_pipeline_dir))
    sets = [f"images={image_folder}", *QUICK, "steps=6", "stop_below=0.1", f"stop_patience={patience}",
            "stop_samples=3", "stop_steps=4"]  # fmt: skip
    config = build_config("fewshot", "sd1", parse_sets(sets))
    result = fewshot_erase(model, ["a cat"], config, RunContext(seed=0, progress=False))
    outcome = result.outcome["fewshot"]
    assert (outcome["epochs_run"], outcome["updates"], outcome["stopped_early"]) == (epochs, epochs, True)
    assert outcome["last_presence"] == shares[epochs - 1]
    assert calls == [(3, 4)] * epochs  # one check at the end of each epoch, of stop_samples at stop_steps


def test_the_retain_drift_compares_each_retain_prompt_with_its_own_original_encoding(tiny_pipeline_dir, image_folder):
    # before the first update the encoder is the original, so each retain prompt's drift from its own cached encoding
    # is exactly 0; rows paired with another prompt's encoding would pull the prompts towards each other instead
    model = load_model(str(tiny_pipeline_dir))
    encoded, encode = [], model.encode
    model.encode = lambda prompts, *args: (encoded.append(list(prompts)), encode(prompts, *args))[1]
    sets = [f"images={image_folder}", *QUICK, "steps=1", "stop_below=none", "retain_weight=1", "retain_batch=4"]
    result = fewshot_erase(model, ["a cat"], build_config("fewshot", "sd1", parse_sets(sets)),
                           RunContext(seed=0, progress=False))  # fmt: skip
    assert result.logs["retain_drift"] == 0.0
    # the retain prompts (the first encoded, COCO's objects) leave the concept out: the term must not hold it
    assert "a photo of a dog" in encoded[0] and "a photo of a cat" not in encoded[0]


def test_each_epoch_visits_every_image_once_in_a_fresh_order(tiny_pipeline_dir, tmp_path, monkeypatch):
    # 4 images at batch 2: an epoch is 2 updates that see each cached latent once; the next epoch draws a new order
    # (one fixed order would pair the same images in every batch)
    import erasure.fewshot as fewshot

    batches = []

    def recording(model, x0, cond, noise, t):
        batches.append(x0.detach().flatten(1).sum(1).tolist())  # a latent is told by its sum
        return denoising_loss(model, x0, cond, noise, t)

    monkeypatch.setattr(fewshot, "denoising_loss", recording)
    folder = _write_images(tmp_path / "four", sizes=((16, 16),) * 4, formats=("PNG",) * 4)
    model = load_model(str(tiny_pipeline_dir))
    sets = [f"images={folder}", *QUICK, "steps=6", "stop_below=none"]
    config = build_config("fewshot", "sd1", parse_sets(sets))
    fewshot_erase(model, ["a cat"], config, RunContext(seed=0, progress=False))
    assert [len(b) for b in batches] == [2] * 6
    epochs = [batches[i] + batches[i + 1] for i in (0, 2, 4)]
    assert len(set(epochs[0])) == 4 and all(sorted(e) == sorted(epochs[0]) for e in epochs)  # each image once
    assert len({tuple(e) for e in epochs}) > 1  # not one order for every epoch


def test_builtin_images_are_the_familys_renders_each_captioned_with_its_own_concept(monkeypatch):
    # images=builtin on two concepts: num_images renders of each, drawn at the run's seed, and every batch row captioned
    # with its own image's concept (captions in another order than the images would ascend one concept's renders under
    # the other's name), in varied templates of the kind `captions` names (style: "... in the style of {}")
    import erasure.fewshot as fewshot
    from pipelines.families import FAMILIES

    cached, rows = [], []
    encode = fewshot.encode_latents

    def recording_encode(model, images, generator=None):
        cached.append((images, encode(model, images, generator)))
        return cached[-1][1]

    def recording_loss(model, x0, cond, noise, t):
        rows.append(x0.detach().clone())
        return denoising_loss(model, x0, cond, noise, t)

    monkeypatch.setattr(fewshot, "encode_latents", recording_encode)
    monkeypatch.setattr(fewshot, "denoising_loss", recording_loss)
    model = load_model("digits-sd")
    prompts, model_encode = [], model.encode
    model.encode = lambda texts, *args: (prompts.append(list(texts)), model_encode(texts, *args))[1]
    config = FewShotConfig(images="builtin", num_images=2, captions="style", steps=4, lr=1e-3, stop_below=None)
    concepts = ["seven", "three"]  # the paper's settings, not the digits preset (its own captions, a retain term)
    fewshot_erase(model, concepts, config, RunContext(seed=3, progress=False))
    (images, latents), = cached
    expected = torch.cat([FAMILIES["digits"].builtin_images(c, 2, seed=3) for c in concepts])
    assert torch.equal(images, expected)  # 2 of each, the run's seed's
    assert len(rows) == len(prompts) == 4
    for x0, texts in zip(rows, prompts):
        for row, text in zip(x0, texts):
            index = next(i for i, latent in enumerate(latents) if torch.equal(latent, row))
            template, _, concept = text.rpartition(" in the style of ")
            assert template and concept == concepts[index // 2], (index, text)
    assert len({text for texts in prompts for text in texts}) > 2  # not one template for every caption


def test_a_non_square_image_is_scaled_by_its_shorter_side_and_cropped_to_its_centre(tmp_path):
    stripes = np.zeros((16, 48, 3), dtype=np.uint8)  # red, green, blue thirds: only the green one is the centre
    stripes[:, :16, 0], stripes[:, 16:32, 1], stripes[:, 32:, 2] = 255, 255, 255
    Image.fromarray(stripes).save(tmp_path / "wide.png")
    Image.fromarray(stripes.transpose(1, 0, 2)).save(tmp_path / "tall.png")
    images = load_square_images([tmp_path / "wide.png", tmp_path / "tall.png"], 8)
    assert images.shape == (2, 3, 8, 8)
    # squeezed whole into the square instead, a third of it would be red and a third blue
    assert (images[:, 1].mean((1, 2)) > 0.95).all() and (images[:, [0, 2]].mean((2, 3)) < 0.02).all()


def test_an_image_folder_gives_exactly_the_count_asked_and_leaves_hidden_files_out(tmp_path):
    from pipelines.images import image_folder_files

    folder = _write_images(tmp_path / "cats")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # what a Mac leaves in a folder: not an image
    every = image_folder_files(folder)
    assert [p.name for p in every] == ["img0.png", "img1.jpeg", "img2.webp"]
    assert image_folder_files(folder, 3) == every and image_folder_files(folder, 2) == every[:2]
