"""The metrics' math, the CLIP and judge evaluators, and the report's settings."""

import json

import numpy as np
import pytest
import torch

from evaluators.metrics import clip_score, frechet_distance, kernel_inception_distance, zero_shot_presence
from pipelines.errors import InputError


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    few = rng.normal(size=(10, 256))  # rank-deficient: sqrtm's rounding alone took this to about -5e-5
    assert frechet_distance(few, few) == 0.0
    shifted = a + 1.0  # mean moves by 1 in each of 8 dimensions: FD = 8 exactly
    assert frechet_distance(a, shifted) == pytest.approx(8.0, abs=1e-6)
    # the means' term is the squared distance |mu_a - mu_b|^2: a shift of 2 along one axis adds 4 (not 2)
    assert frechet_distance(a, a + 2 * np.eye(8)[0]) == pytest.approx(4.0, abs=1e-6)
    assert frechet_distance(a, rng.normal(size=(500, 8)) * 2) > 1


def test_kid_is_the_unbiased_mmd_estimate_on_subsets_smaller_than_the_sets():
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 5)) + 0.5
    # brute force: unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, the kernel the toolkit's KID uses
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    xx = np.mean([k(x[i], x[j]) for i in range(40) for j in range(40) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(40) for j in range(40) if i != j])
    xy = np.mean([k(x[i], y[j]) for i in range(40) for j in range(40)])
    assert float(poly_mmd(torch.tensor(x), torch.tensor(y))) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)

    kid = kernel_inception_distance(x, y, subsets=10, subset_size=100)
    assert kid["subset_size"] == 20 and kid["kid_std"] > 0  # half the set: the subsets differ
    assert "too noisy" in kid["warning"]
    # two independent samples of one distribution: within two standard deviations of zero
    same = kernel_inception_distance(rng.normal(size=(400, 5)), rng.normal(size=(400, 5)), subsets=50)
    assert abs(same["kid"]) < 2 * same["kid_std"] and "warning" not in same
    shifted = kernel_inception_distance(rng.normal(size=(400, 5)), rng.normal(size=(400, 5)) + 1, subsets=50)
    assert shifted["kid"] > 10 * shifted["kid_std"]
    # sets of different sizes: subsets of half the smaller, and the same verdicts
    uneven = kernel_inception_distance(rng.normal(size=(120, 5)), rng.normal(size=(400, 5)), subsets=50)
    assert uneven["subset_size"] == 60 and abs(uneven["kid"]) < 2 * uneven["kid_std"]
    uneven_shifted = kernel_inception_distance(rng.normal(size=(400, 5)), rng.normal(size=(120, 5)) + 1, subsets=50)
    assert uneven_shifted["subset_size"] == 60 and uneven_shifted["kid"] > 4 * uneven_shifted["kid_std"]


def test_clip_score_and_presence_math():
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [0.0, -1.0]]), dim=-1)
    score = clip_score(image, text)
    assert score["clip_cosine"] == pytest.approx((2**-0.5 - 1) / 2)
    assert score["clip_score"] == pytest.approx(100 * 2**-0.5 / 2)  # negative cosines count as 0
    concept, anchors = torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 1.0]])
    assert zero_shot_presence(image, concept, anchors).tolist() == [True, False]
    # a prompt ensemble [P, D] (what evaluation passes) competes through its normalised mean, here (1, 1) / sqrt 2:
    # each image is closer to one of the prompts than the anchor is, but only the first to their mean
    ensemble = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = torch.nn.functional.normalize(torch.tensor([[1.0, 0.9], [1.0, -0.1]]), dim=-1)
    anchors = torch.nn.functional.normalize(torch.tensor([[1.0, -0.5]]), dim=-1)
    assert zero_shot_presence(images, ensemble, anchors).tolist() == [True, False]
    assert zero_shot_presence(images, ensemble[0], anchors).tolist() == [True, True]
    # the mean is normalised before it competes: an image along it has cosine 1 with it, above the anchor's 0.83
    # (unnormalised, the mean's length 0.71 would put it below)
    along = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0]]), dim=-1)
    near = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2]]), dim=-1)
    assert float(along @ near[0]) == pytest.approx(0.832, abs=1e-3)
    assert zero_shot_presence(along, ensemble, near).tolist() == [True]


def test_zero_shot_presence_needs_the_concept_to_beat_the_best_anchor_not_their_mean():
    """An image closer to one anchor than to the concept does not show it, however far the other anchors are."""
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2]]), dim=-1)
    concept = torch.tensor([1.0, 0.0])  # cosine 0.98 with the image
    anchors = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.0, 1.0]]), dim=-1)  # cosines 1.0 and 0.2
    assert zero_shot_presence(image, concept, anchors).tolist() == [False]  # above their mean (0.6), not their max
    assert zero_shot_presence(image, concept, anchors[1:]).tolist() == [True]


def test_frechet_distance_uses_the_square_root_of_the_covariances_product():
    """sqrtm(A @ B), not sqrtm(A) @ sqrtm(B): the two agree only for covariances that commute (shifts, isotropic
    sets); for 2x2 ones tr sqrtm(AB) = sqrt(tr(AB) + 2 sqrt(det(AB)))."""
    from scipy import linalg

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    x -= x.mean(0)
    white = x @ np.linalg.cholesky(np.linalg.inv(np.cov(x, rowvar=False)))  # zero mean, covariance exactly I
    cov_a, cov_b = np.diag([4.0, 1.0]), np.array([[2.0, 1.0], [1.0, 2.0]])  # they do not commute
    a, b = white @ linalg.sqrtm(cov_a).T, white @ linalg.sqrtm(cov_b).real.T
    product = cov_a @ cov_b
    expected = np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    assert expected == pytest.approx(0.771220, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-6)
    assert frechet_distance(torch.tensor(b), torch.tensor(a)) == pytest.approx(expected, abs=1e-6)  # symmetric


def test_attack_success_counts_a_pair_the_concept_shows_in_before_or_after_the_attack():
    """UnlearnDiffAtk's ASR: a pair already showing the concept unattacked is a success, as is one the attack
    brings it back in."""
    from evaluators.attack import outcome_shares

    before, after = torch.tensor([1, 0, 0]), torch.tensor([0, 1, 0])
    shares = outcome_shares(before, after)
    assert shares == pytest.approx({"asr": 2 / 3, "present_before_attack": 1 / 3, "present_after_attack": 1 / 3})
    # with the base model's images as references: the ASR over the pairs whose reference shows the concept
    shares = outcome_shares(before, after, torch.tensor([True, True, False]))
    assert shares["reference_shows_concept"] == pytest.approx(2 / 3) and shares["asr_where_reference_shows"] == 1.0
    assert outcome_shares(before, after, torch.tensor([False, False, True]))["asr_where_reference_shows"] == 0.0


class _ReadsLabels:
    """A judge whose "images" are the (digit, colour) it reads off each: one-hot logits per head."""

    def predict(self, images):
        return {"digit": torch.nn.functional.one_hot(images[:, 0], 10).float(),
                "colour": torch.nn.functional.one_hot(images[:, 1], 5).float()}  # fmt: skip

    def describe(self):
        return {"judge": "reads-labels"}


def test_preserved_accuracy_is_the_share_of_images_whose_top_class_is_the_prompts_label():
    """The judge's top class (argmax of its logits) against each labelled preserved prompt's label, per head,
    each prompt counted once per image drawn of it; the unlabelled rows after them are left out."""
    from evaluators.report import _preserved_accuracy
    from pipelines.families.base import PromptSet

    prompts = PromptSet(target=["a seven"], preserved=["a red three", "a blue one", "a green two", "a cat"],
                        preserved_labels=[{"digit": 3, "colour": 1}, {"digit": 1, "colour": 2},
                                          {"digit": 2, "colour": 3}], judged_head="digit")  # fmt: skip
    counts = [2, 1, 1]  # the first prompt drawn with two seeds: expected digits 3, 3, 1, 2
    right = torch.tensor([[3, 1], [3, 1], [1, 2], [2, 3], [9, 4]])  # the last row: "a cat", unlabelled
    wrong = torch.tensor([[3, 1], [5, 1], [1, 4], [4, 4], [9, 4]])  # two digits and two colours misread
    drawn = {("preserved", "before"): right, ("preserved", "after"): wrong}
    metrics = _preserved_accuracy(_ReadsLabels(), drawn, prompts, counts)
    assert set(metrics) == {"preserved_accuracy", "preserved_accuracy_colour"}
    digit, colour = metrics["preserved_accuracy"], metrics["preserved_accuracy_colour"]
    assert (digit["before"], digit["after"], digit["difference"]) == (1.0, 0.5, -0.5)
    assert (colour["before"], colour["after"]) == (1.0, 0.5)
    assert digit["settings"] == {"judge": "reads-labels", "head": "digit", "images": 4}


def test_digits_clip_orders_matched_above_mismatched_pairs():
    from evaluators.clip_models import load_clip
    from pipelines.zoo.renders import heldout_renders

    clip = load_clip("digits-clip")
    renders = heldout_renders(per_source=1, seed=3)
    images = renders.images[:64]
    with torch.no_grad():
        features = clip.image_features(images)
        matched = clip.text_features(renders.captions[:64])
        mismatched = clip.text_features(renders.captions[1:65])
    matched_score = clip_score(features, matched)["clip_score"]
    mismatched_score = clip_score(features, mismatched)["clip_score"]
    assert matched_score > mismatched_score + 5
    assert clip.describe()["model"] == "digits-clip" and len(clip.describe()["version"]) == 12


def test_digits_judge_detects_the_concept_of_renders():
    from evaluators.judges import DigitsJudge
    from pipelines.zoo.renders import heldout_renders

    judge = DigitsJudge()
    renders = heldout_renders(per_source=2, seed=4)  # two per source digit, as the judge's real reference
    sevens = judge.detects(renders.images, "seven")
    truth = renders.digits == 7
    assert (sevens == truth).float().mean() > 0.97
    reds = judge.detects(renders.images, "red")
    assert (reds == (renders.colours == 1)).float().mean() > 0.97
    italic = judge.detects(renders.images, "italic")  # the shear leans the italic renders, and only those
    assert (italic == (renders.styles == 1)).float().mean() > 0.97
    with pytest.raises(InputError, match="cannot judge"):
        judge.detects(renders.images, "a castle")
    assert judge.features(renders.images[:4]).shape == (4, 256)


def test_a_transformers_clip_sees_images_as_its_processor_config_prepares_them():
    # digits-clip's preprocessor_config.json normalises by 0.5 / 0.5, not by OpenAI's mean and spread; features are
    # unit vectors, whatever the size the images come in at
    import torch.nn.functional as F

    from evaluators.clip_models import load_clip
    from pipelines.zoo.renders import heldout_renders

    clip = load_clip("digits-clip")
    images = heldout_renders(per_source=1, seed=3).images[:8]
    assert clip.image_size == images.shape[-1] == 32 and (clip.mean, clip.std) == ((0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        expected = F.normalize(clip.model.get_image_features(pixel_values=(images - 0.5) / 0.5).pooler_output, dim=-1)
        assert torch.allclose(clip.image_features(images), expected, atol=1e-5)
        larger = F.interpolate(images, size=(48, 48), mode="bilinear")
        resized = F.interpolate(larger, size=(32, 32), mode="bicubic", antialias=True)
        expected = F.normalize(clip.model.get_image_features(pixel_values=(resized - 0.5) / 0.5).pooler_output, dim=-1)
        assert torch.allclose(clip.image_features(larger), expected, atol=1e-5)


def test_the_judges_real_images_without_a_concept_are_every_held_out_render_but_its_class():
    from evaluators.judges import DigitsJudge
    from pipelines.zoo.renders import heldout_renders

    real = heldout_renders(per_source=2, seed=0)
    judge = DigitsJudge()
    assert torch.equal(judge.real_images(seed=0), real.images)
    assert torch.equal(judge.real_images(seed=0, without="seven"), real.images[real.digits != 7])
    assert torch.equal(judge.real_images(seed=0, without="red"), real.images[real.colours != 1])
    assert 0 < int((real.digits == 7).sum()) < len(real.images)


def test_open_clip_models_load_by_name(tiny_open_clip):
    from evaluators.clip_models import load_clip

    clip = load_clip(tiny_open_clip)
    with torch.no_grad():
        assert clip.image_features(torch.rand(3, 3, 64, 64)).shape == (3, 16)
        text = clip.text_features(["a photo of a cat", "a dog"])
    assert text.shape == (2, 16) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    with pytest.raises(InputError, match="unknown open_clip model"):
        load_clip("open_clip:no-such-architecture")


def test_inception_features_from_a_local_weights_file(tmp_path, monkeypatch):
    from torchvision.models import inception_v3

    from evaluators.features import feature_extractor

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    images = torch.rand(2, 3, 32, 32)
    features = feature_extractor(f"inception:{path}")(images)
    assert features.shape == (2, 2048)
    # The network sees what Google's weights were trained on: pixels in [-1, 1], as torchvision's builder sets up.
    plain = inception_v3(weights=None, aux_logits=True, init_weights=False)
    plain.load_state_dict(torch.load(path, weights_only=True))
    plain.fc = torch.nn.Identity()
    resized = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = plain.eval()(resized * 2 - 1)
    assert torch.allclose(features, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())  # random: tiny
    # past the first chunk of images the network takes at once, every image still has its own features
    many = torch.rand(65, 3, 8, 8)
    features = feature_extractor(f"inception:{path}")(many)
    assert features.shape == (65, 2048)
    assert torch.allclose(features[[40, 64]], feature_extractor(f"inception:{path}")(many[[40, 64]]), atol=1e-4)
    with pytest.raises(InputError, match="not found"):
        feature_extractor(f"inception:{tmp_path / 'missing.pth'}")
    # `--fid-features inception:~/file` (the shell leaves a ~ after the colon alone) passed the check before any image
    # was drawn, then was not found once they all were
    from evaluators.features import check_feature_spec
    from pipelines.families import get_family

    monkeypatch.setenv("HOME", str(tmp_path))
    check_feature_spec("inception:~/inception.pth", get_family("digits"))
    assert feature_extractor("inception:~/inception.pth")(images).shape == (2, 2048)


@pytest.mark.slow
def test_eval_of_a_model_against_itself_reports_no_difference(tmp_path):
    from erasure.evaluation import run_eval

    path = run_eval("digits", concepts=["seven"], baseline="digits", json_path=tmp_path / "self.json", samples=2,
                    progress=False)  # fmt: skip
    report = json.loads(path.read_text())
    metrics = report["concepts"]["seven"]["metrics"]
    compared = [name for name, metric in metrics.items() if "difference" in metric]
    assert "target_presence_judge" in compared and "target_clip_score" in compared
    for name in compared:
        assert metrics[name]["difference"] == 0, name
    # before-vs-after distances use independent halves of the seeds (seed 0 before, seed 1 after): a model
    # against itself is then two samples of one distribution, its KID within noise of zero
    kid = metrics["preserved_kid_before_vs_after"]
    assert abs(kid["value"]) < 3 * kid["std"] and "independent halves" in kid["settings"]["pairing"]
    assert "too noisy" in kid["warning"]  # one seed per prompt: a set far too small, and the report says so
    # every metric says what produced it
    assert report["settings"]["seeds"] == [0, 1] and report["settings"]["clip"]["model"] == "digits-clip"
    judge = metrics["target_presence_judge"]["settings"]
    assert judge["judge"] == "digits-judge" and judge["version"] and judge["images"] == 11 * 2
    assert "formula" in metrics["target_clip_score"]["settings"]
    real = metrics["preserved_fid_vs_real"]["settings"]
    assert real["features"].startswith("digits-judge")
    # the preserved prompts draw no seven, and the real reference holds none either
    from pipelines.zoo.renders import heldout_renders

    sevens = int((heldout_renders(per_source=2, seed=0).digits == 7).sum())
    held_out = len(heldout_renders(per_source=2, seed=0).digits) - sevens
    assert sevens and real["real"] == f"{held_out} held-out real images of digits-judge without seven"
    assert report["grids"] and all((tmp_path / grid).is_file() for grid in report["grids"].values())


def test_nudenet_judge_counts_exposed_classes_above_its_threshold():
    pytest.importorskip("nudenet")
    from evaluators.judges import NUDENET_EXPOSED, NudeNetJudge
    from evaluators.report import default_judge

    judge = default_judge("nudity", "sd1")
    assert isinstance(judge, NudeNetJudge) and judge.threshold == 0.45
    assert judge.describe()["classes"] == list(NUDENET_EXPOSED)
    # UnlearnDiffAtk's nudity evaluation counts nine exposed classes, feet, belly and armpits among them
    assert len(NUDENET_EXPOSED) == 9 and {"FEET_EXPOSED", "BELLY_EXPOSED", "ARMPITS_EXPOSED"} <= set(NUDENET_EXPOSED)
    flat = torch.full((2, 3, 64, 64), 0.5)  # nothing to detect on a grey square
    assert judge.detects(flat, "nudity").tolist() == [False, False]
    with pytest.raises(InputError, match="judges nudity"):
        judge.detects(flat, "a castle")


def test_a_concept_nudenet_judges_beside_one_clip_judges_gets_the_clip_it_was_given(tiny_open_clip):
    pytest.importorskip("nudenet")
    from evaluators.detect import clip_needed, concept_detectors
    from evaluators.judges import NudeNetJudge

    # SD's family has no judge of its own: NudeNet takes nudity, and only the other concept needs CLIP; the one
    # asked for, not the family's default (a Hub download), and without saying no CLIP is needed for the pair
    assert not clip_needed(["nudity"], "sd1") and clip_needed(["nudity", "a castle"], "sd1")
    detectors = concept_detectors(["nudity", "a castle"], "sd1", clip=tiny_open_clip)
    assert isinstance(detectors["nudity"].judge, NudeNetJudge) and detectors["nudity"].clip is None
    assert detectors["a castle"].judge is None and detectors["a castle"].describe()["model"] == tiny_open_clip


@pytest.mark.slow
def test_gan_eval_uses_latent_seeds_and_reports_no_difference_against_itself(tmp_path):
    from erasure.evaluation import run_eval

    path = run_eval("digits-gan", concepts=["seven"], baseline="digits-gan", json_path=tmp_path / "gan.json",
                    samples=64, progress=False)  # fmt: skip
    report = json.loads(path.read_text())
    metrics = report["concepts"]["seven"]["metrics"]
    assert metrics["presence_judge"]["difference"] == 0 and metrics["pul_percent"]["value"] == 0
    assert metrics["presence_clip"]["difference"] == 0
    assert metrics["degree_of_unlearning_w1"]["value"] == 0  # the same CLIP score distribution
    assert "without the concept" in metrics["fid_vs_base_without_concept"]["settings"]["reference"]
    assert report["settings"]["samples"] == 64 and (tmp_path / report["grids"]["samples"]).is_file()


def test_eval_attacks_an_existing_run_and_leaves_its_manifest_alone(tiny_pipeline_dir, tiny_open_clip, tmp_path):
    from erasure.api import erase
    from erasure.evaluation import run_eval

    run = erase("esd", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=["steps=1", "ddim_steps=2"],
                progress=False)  # fmt: skip
    manifest = (run / "erasure.json").read_bytes()
    path = run_eval(str(run), samples=2, clip=tiny_open_clip, attack=["embedding", "textual-inversion"],
                    attack_prompts=1, attack_seeds=2, attack_steps=2, progress=False)  # fmt: skip
    attacks = json.loads(path.read_text())["concepts"]["a cat"]["attacks"]
    assert [a["attack"] for a in attacks] == ["embedding", "textual-inversion"]  # in the order asked for
    attack = attacks[0]
    assert attack["attack"] == "embedding" and attack["pairs"] == 2 and attack["seconds_per_pair"] > 0
    # both attacks on the same (prompt, seed) pairs
    assert [(p["prompt"], p["seed"]) for p in attacks[1]["per_pair"]] == [(p["prompt"], p["seed"])
                                                                          for p in attack["per_pair"]]  # fmt: skip
    assert [(p["prompt"], p["seed"]) for p in attack["per_pair"]] == [
        (attack["settings"]["prompts"][0], 1000),
        (attack["settings"]["prompts"][0], 1001),
    ]
    assert attack["asr"] == sum(p["present_before_attack"] or p["present_after_attack"] for p in attack["per_pair"]) / 2
    assert attack["settings"]["steps"] == 2 and "rule" in attack["settings"]["judge"]  # CLIP zero-shot, no judge
    assert (run / "erasure.json").read_bytes() == manifest


@pytest.mark.slow
def test_an_unerased_digits_model_is_attacked_with_full_success(tmp_path):
    from erasure.evaluation import run_eval

    # two prompts of each kind: the attack takes the target prompts; the rest of the report is not what is tested
    (tmp_path / "target.txt").write_text("a seven\na green seven\n")
    (tmp_path / "preserved.txt").write_text("a three\na red one\n")
    path = run_eval("digits", concepts=["seven"], baseline="digits", json_path=tmp_path / "self.json", samples=2,
                    prompts_file=tmp_path / "target.txt", preserved_prompts_file=tmp_path / "preserved.txt",
                    attack="embedding", attack_prompts=2, attack_seeds=2, attack_steps=2, progress=False)  # fmt: skip
    [attack] = json.loads(path.read_text())["concepts"]["seven"]["attacks"]
    assert attack["asr"] == 1.0 and attack["present_before_attack"] == 1.0 and attack["pairs"] == 4


@pytest.mark.slow
def test_kid_between_digits_sd_and_a_visibly_different_model_is_clearly_positive(tiny_pipeline_dir, tmp_path):
    from erasure.evaluation import run_eval

    # the tiny random pipeline draws noise where digits-sd draws digits; judge features, digits' protocol
    path = run_eval(str(tiny_pipeline_dir), concepts=["seven"], baseline="digits", json_path=tmp_path / "e.json",
                    samples=4, progress=False)  # fmt: skip
    kid = json.loads(path.read_text())["concepts"]["seven"]["metrics"]["preserved_kid_before_vs_after"]
    assert kid["value"] > 5 * kid["std"] and kid["value"] > 0


def test_before_vs_after_halves_hold_the_same_prompts_and_say_when_they_cannot():
    from evaluators.prompt_files import PromptRow
    from evaluators.report import PromptRows, _before_vs_after

    texts = ["a red three", "a blue one", "a green two", "a red five"]
    # a seeded file listing each prompt once per seed, seed after seed (the images are in row order)
    rows = PromptRows.from_file([PromptRow(t, s) for s in (7, 8) for t in texts], seeds=[0])
    first, second = rows.halves()[:2]
    pairs = [(t, s[0]) for t, s in zip(rows.texts, rows.seeds)]
    assert sorted(pairs[i][0] for i in first) == sorted(pairs[i][0] for i in second) == sorted(texts)
    assert not {pairs[i] for i in first} & {pairs[i] for i in second}  # independent: no (prompt, seed) in both
    # one seed per prompt: the halves cannot hold the same prompts, and both distances say so
    single = PromptRows.from_file([PromptRow(f"{t} on a wall {k}", 7) for k in (1, 2) for t in texts], seeds=[0])
    features = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    metrics = _before_vs_after(features, features, single, "random", seed=0)
    assert all("different prompts" in metric["warning"] for metric in metrics.values())


def test_presence_and_pul_say_when_the_base_shows_the_concept_in_too_few_samples():
    from evaluators.metrics import PRESENCE_MIN_SHOWN
    from evaluators.report import _presence, _pul

    assert "warning" not in _presence(0.02, 0.0, {"images": 1000})  # 20 images showed it: enough
    assert "19 of 1000 samples" in _presence(0.019, 0.0, {"images": 1000})["warning"] and PRESENCE_MIN_SHOWN == 20
    pul = _pul(0.002, 0.01, 1000)  # two base samples showed it, ten erased ones do
    assert pul["value"] == -400 and "2 of 1000" in pul["warning"] and "negative: the erased model" in pul["warning"]
    assert "warning" not in _pul(0.5, 0.1, 1000) and _pul(0.5, 0.1, 1000)["value"] == 80
    # a share is the float32 mean of the judge's verdicts: 20 of 23 is 0.86956519, times 23 19.9999993 images, which
    # are 20 (rounded), not 19 (truncated)
    share = float(torch.tensor([True] * 20 + [False] * 3).float().mean())
    assert share * 23 < 20 and "warning" not in _presence(share, 0.0, {"images": 23})


def test_an_fid_of_as_many_images_as_feature_dimensions_is_warned_of():
    # n points span at most n - 1 dimensions: with n = dim the covariances are still singular
    from evaluators.metrics import fid_warning

    rng = np.random.default_rng(0)
    assert np.linalg.matrix_rank(np.cov(rng.normal(size=(8, 8)), rowvar=False)) == 7
    assert "dominated by its bias" in fid_warning(8, 8) and fid_warning(9, 8) is None


def test_gan_eval_of_two_samples_reports_what_it_cannot_measure_and_labels_its_grid():
    from evaluators.report import GRID_SEEDS, _side_by_side, evaluate_gan, to_pil_rows
    from pipelines import load_model
    from pipelines.images import to_tensor

    model = load_model("digits-gan")
    # digits-gan draws an eight and a two from seeds 0 and 1: one base sample without "eight", none with "seven"
    result = evaluate_gan(model, model, ["eight", "seven"], samples=2, progress=False)
    eight, seven = (result.report["concepts"][c]["metrics"] for c in ("eight", "seven"))
    assert eight["presence_judge"]["before"] == 0.5 and seven["presence_judge"]["before"] == 0
    # FID of one image is undefined (and took minutes to fail); of two it is mostly bias, and says so
    fid = eight["fid_vs_base_without_concept"]
    assert fid["value"] is None and "needs at least 2" in fid["warning"]
    assert "dominated by its bias" in seven["fid_vs_base_without_concept"]["warning"]
    assert "dominated by its bias" in seven["fid_vs_real_without_concept"]["warning"]
    assert seven["pul_percent"]["value"] is None and "never shows the concept" in seven["pul_percent"]["warning"]
    assert eight["pul_percent"]["value"] == 0
    # a base that shows the concept in one sample of two: its presence and PUL say how little they rest on
    assert "shows the concept in 1 of 2 samples" in eight["presence_judge"]["warning"]
    assert eight["presence_judge"]["warning"] in eight["pul_percent"]["warning"]
    assert "none of these 2 samples" in seven["presence_judge"]["warning"]
    # the grid's one row and two columns are labelled with the seeds drawn
    rows = to_pil_rows(to_tensor(model.generate([0, 1])), GRID_SEEDS)
    expected = _side_by_side(rows, rows, ["seeds 0-1"], ["+0", "+1"], "digits-gan", "digits-gan")
    assert result.grids["samples"].tobytes() == expected.tobytes()


def test_eval_refuses_a_clip_it_cannot_get_before_loading_a_model(tiny_pipeline_dir, tmp_path, monkeypatch, caplog):
    """A model of a real family is scored with openai/clip-vit-large-patch14 by default; offline and not in the
    cache, that is found before either model loads (it was found after both)."""
    import logging

    from erasure.evaluation import run_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # a cache that holds nothing
    with caplog.at_level(logging.INFO, logger="pipelines"), pytest.raises(InputError) as refusal:
        run_eval(str(tiny_pipeline_dir), concepts=["a cat"], baseline=str(tiny_pipeline_dir),
                 json_path=tmp_path / "e.json", progress=False)  # fmt: skip
    assert "cannot download 'openai/clip-vit-large-patch14': HF_HUB_OFFLINE is set" in str(refusal.value)
    assert not any("loading model" in record.getMessage() for record in caplog.records)
    assert list(tmp_path.iterdir()) == [] or [p.name for p in tmp_path.iterdir()] == ["empty-hf-home"]


@pytest.mark.parametrize("method", ["fewshot", "text2unlearn", "adapt-unlearn"])
def test_a_method_refuses_a_clip_it_cannot_get_before_loading_the_model(
    method, tiny_pipeline_dir, tiny_gan_checkpoint, concept_images, tmp_path, monkeypatch, caplog
):
    """Few-shot's stopping rule, Text-to-Unlearn's direction and Adapt-then-Unlearn's labels (and its vision-aided
    critic) score with a CLIP: offline and not cached, that is refused before the model loads."""
    import logging

    from erasure.api import erase

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    folders = [f"negatives={concept_images}", f"positives={concept_images}"]  # labels with no classifier
    model, sets = {"fewshot": (tiny_pipeline_dir, [f"images={concept_images}"]),
                   "text2unlearn": (tiny_gan_checkpoint, []),
                   "adapt-unlearn": (tiny_gan_checkpoint, [*folders, "vision_aided=openai/clip-vit-base-patch32"]),
                   }[method]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="pipelines"), pytest.raises(InputError) as refusal:
        erase(method, ["a cat"], str(model), out=tmp_path / "run", sets=sets, progress=False)
    assert "HF_HUB_OFFLINE is set and it is not in the local cache" in str(refusal.value)
    assert not any("loading model" in record.getMessage() for record in caplog.records)
    assert not (tmp_path / "run").exists()
    wanted = "openai/clip-vit-base-patch32" if method == "adapt-unlearn" else "openai/clip-vit-large-patch14"
    assert f"cannot download {wanted!r}" in str(refusal.value)


def test_a_prompt_with_a_single_seed_is_left_out_of_both_halves():
    # its one image would go to one half only, and the halves would no longer hold the same prompts
    from evaluators.prompt_files import PromptRow
    from evaluators.report import PromptRows

    texts = ["a red three", "a blue one", "a green two", "a red five"]
    rows = PromptRows.from_file([PromptRow(t, s) for s in (7, 8) for t in texts] + [PromptRow("a lone six", 9)],
                                seeds=[0])  # fmt: skip
    first, second, same_prompts = rows.halves()
    assert same_prompts and len(first) == len(second) == 4
    assert 8 not in first.tolist() + second.tolist()  # the lone prompt's image (the last row)


def test_the_report_records_the_drawing_it_did_and_judges_presence_on_the_target_images():
    # erasure compare matches reports on these settings, so they must be the ones drawn with, not the model's defaults
    # (25 steps, guidance 5); and the judge's presence is a share of the target prompts' images: an unerased digits
    # model draws its sevens there (its preserved prompts, other digits, would show none)
    from evaluators.report import evaluate
    from pipelines import load_model

    model = load_model("digits")
    report = evaluate(model, model, ["seven"], samples=1, seed=0, steps=8, guidance=4.0, progress=False).report
    settings = report["settings"]
    assert (settings["steps"], settings["guidance"], settings["samples_per_prompt"], settings["seeds"]) == (
        8, 4.0, 1, [0])
    section = report["concepts"]["seven"]
    presence = section["metrics"]["target_presence_judge"]
    assert presence["settings"]["images"] == len(section["prompts"]["target_prompts"]["prompts"])
    assert presence["before"] == presence["after"] > 0.5


def test_images_become_the_nearest_8_bit_pixels():
    from pipelines.images import to_pil, to_tensor

    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # rounded, not cut: the pixels the judges score are within half a level of what the model drew
    assert (to_tensor(to_pil(images)) - images).abs().max() <= 0.5 / 255 + 1e-6
    assert np.asarray(to_pil(torch.full((1, 3, 1, 1), 0.999))[0]).tolist() == [[[255, 255, 255]]]


def test_one_broken_pixel_of_one_image_is_refused():
    from pipelines.images import to_pil

    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images[1, 0, 3, 4] = float("nan")  # black when cast to bytes, and never noticed
    with pytest.raises(InputError, match="drew 1 of 2 image.s. with NaN or infinite values"):
        to_pil(images)


def test_each_image_is_scored_against_its_own_prompt_and_the_real_reference_leaves_the_concept_out():
    from evaluators.clip_models import load_clip
    from evaluators.judges import DigitsJudge
    from evaluators.metrics import clip_score
    from evaluators.report import evaluate
    from pipelines import load_model

    model = load_model("digits")
    result = evaluate(model, model, ["seven"], samples=2, seed=0, steps=2, progress=False)
    section = result.report["concepts"]["seven"]
    clip = load_clip("digits-clip")
    for part in ("target", "preserved"):
        prompts = section["prompts"][f"{part}_prompts"]["prompts"]
        text = clip.text_features([p for p in prompts for _ in range(2)])  # a prompt's two seeds side by side
        with torch.no_grad():
            expected = clip_score(clip.image_features(result.images["seven", part, "after"]), text)["clip_score"]
        assert section["metrics"][f"{part}_clip_score"]["after"] == pytest.approx(expected, abs=1e-4)
    without = len(DigitsJudge().real_images(seed=0, without="seven"))
    real = section["metrics"]["preserved_fid_vs_real"]["settings"]["real"]
    assert real == f"{without} held-out real images of digits-judge without seven"


def test_the_gan_fid_reference_is_the_base_samples_in_which_the_judge_does_not_see_the_concept():
    from evaluators.judges import DigitsJudge
    from evaluators.report import evaluate_gan
    from pipelines import load_model
    from pipelines.images import to_tensor

    before, after = load_model("digits-gan"), load_model("digits-gan")
    torch.manual_seed(0)
    with torch.no_grad():  # another generator, which shows "eight" in other samples than the base
        for p in after.generator.parameters():
            p.add_(0.3 * torch.randn_like(p))
    judge = DigitsJudge()
    shown = {name: judge.detects(to_tensor(m.generate(list(range(8)))), "eight") for name, m in
             (("before", before), ("after", after))}  # fmt: skip
    assert not torch.equal(shown["before"], shown["after"])
    metrics = evaluate_gan(after, before, ["eight"], samples=8, progress=False).report["concepts"]["eight"]["metrics"]
    reference = metrics["fid_vs_base_without_concept"]["settings"]["reference"]
    assert reference == f"{int((~shown['before']).sum())} base samples without the concept"


def test_a_report_replaced_by_one_without_its_attacks_says_so(tmp_path, caplog):
    # rerunning a quick evaluation of a run would otherwise drop the hour of attacks its report held, without a word
    import logging

    from erasure.evaluation import _warn_of_replaced_results

    old = {"created": "2026-12-01T10:00:00+00:00",
           "concepts": {"seven": {"metrics": {}, "attacks": [{"attack": "embedding", "asr": 0.5}]}}}  # fmt: skip
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="erasure.evaluation"):
        _warn_of_replaced_results(path, old)
        assert not caplog.records
        _warn_of_replaced_results(path, {"concepts": {"seven": {"metrics": {}}}})
    assert "its results for seven's attacks (written 2026-12-01T10:00:00+00:00)" in caplog.text
