"""The attacks `erasure eval --attack` runs on finished runs: the discrete UnlearnDiffAtk and textual inversion."""

import pytest
import torch

from evaluators.discrete_attack import DiscreteAttackSettings, discrete_attack, project_simplex, word_vocabulary
from evaluators.inversion_attack import InversionSettings, inversion_attack, remove_concept

from .conftest import NeverSees


def test_simplex_projection():
    assert torch.allclose(project_simplex(torch.tensor([[0.5, 0.5, 0.5]])), torch.full((1, 3), 1 / 3))
    assert torch.equal(project_simplex(torch.tensor([[2.0, 0.0]])), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(project_simplex(torch.tensor([[0.3, -0.2, 0.9]])), torch.tensor([[0.2, 0.0, 0.8]]))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 7, generator=g) * 3
    p = project_simplex(v)
    assert torch.allclose(p.sum(-1), torch.ones(50)) and (p >= 0).all()
    assert torch.allclose(project_simplex(p), p, atol=1e-6)  # points on the simplex stay
    # the closest point of the simplex: no random point of it is closer
    q = torch.distributions.Dirichlet(torch.ones(7)).sample((200,))
    for row in range(50):
        assert (v[row] - p[row]).norm() <= (v[row] - q).norm(dim=-1).min() + 1e-6


def test_discrete_attack_lowers_its_objective_and_its_prompts_re_encode():
    from pipelines import load_model

    model = load_model("digits")
    settings = DiscreteAttackSettings(tokens=2, steps=20, lr=0.2, check_every=10)
    out = discrete_attack(model, model, NeverSees(), "seven", ["a three"], [0, 1], settings)
    # the words found make the model denoise the base's "three" images better than the random start words
    assert out["objective"]["end"] < out["objective"]["start"] and len(out["loss"]) == 20
    vocabulary = set(word_vocabulary(model.tokenizer).tolist())
    for pair in out["per_pair"]:
        tokens = pair["adversarial_tokens"]
        assert len(tokens) == 2 and set(tokens) <= vocabulary
        ids = model.tokenizer(pair["adversarial_prompt"], add_special_tokens=False).input_ids
        assert ids[:2] == tokens and ids[2:] == model.tokenizer("a three", add_special_tokens=False).input_ids
    assert out["asr"] == 0 and out["pairs"] == 2 and out["seconds_per_pair"] > 0


def test_textual_inversion_learns_a_word_on_the_erased_model(tiny_model):
    # (a random tiny model: the loss falls as the word fits the few images)
    assert remove_concept("a red seven", {"seven"}) == "a red"
    out = inversion_attack(tiny_model, tiny_model, NeverSees(), "cat", ["a cat", "a photo of a cat"], [0],
                           InversionSettings(steps=30, lr=0.2, timesteps=(400, 600)))  # fmt: skip
    assert out["loss"]["last"] < out["loss"]["first"]
    assert [p["attacked_prompt"] for p in out["per_pair"]] == ["<v*> a", "<v*> a photo of a"]
    assert out["settings"]["images"] == 8  # the base model's: four seeds of each prompt


class AlwaysSees:
    """A judge that always sees the concept: every pair is present before any attack."""

    def detects(self, images, concept=None):
        return torch.ones(len(images), dtype=torch.bool)

    def describe(self):
        return {"judge": "always"}


def test_the_three_attacks_count_present_after_attack_alike():
    from evaluators.attack import AttackSettings, attack_success_rate
    from pipelines import load_model

    model = load_model("digits")
    args = (model, model, AlwaysSees(), "seven", ["a seven"], [0])
    outcomes = [
        attack_success_rate(*args, AttackSettings(steps=1)),
        discrete_attack(*args, DiscreteAttackSettings(steps=1)),  # stops at once: every pair is already a success
        inversion_attack(*args, InversionSettings(steps=1)),
    ]
    # the concept shows at the end of every attack on every pair (attack.outcome_shares)
    for out in outcomes:
        assert out["present_before_attack"] == out["present_after_attack"] == out["asr"] == 1.0
        assert all(pair["present_after_attack"] for pair in out["per_pair"])


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["unlearndiffatk", "textual-inversion"])  # embedding: test_evaluators.py
def test_eval_runs_each_attack_on_the_digits_model(attack, tmp_path):
    import json

    from erasure.evaluation import run_eval

    # the prompts a user brings are the ones attacked, not the built-in ones, each at its rows' seeds and guidance
    (tmp_path / "prompts.csv").write_text("prompt,seed,guidance\na blue italic seven,7,3\na blue italic seven,8,3\n"
                                          "the number 7 in green,9,\n")
    path = run_eval("digits", concepts=["seven"], baseline="digits", json_path=tmp_path / "e.json", samples=1,
                    attack=attack, attack_prompts=1, attack_seeds=2, attack_steps=2, progress=False,
                    prompts_file=tmp_path / "prompts.csv")  # fmt: skip
    [result] = json.loads(path.read_text())["concepts"]["seven"]["attacks"]
    # an unerased model draws the concept unattacked: every pair succeeds
    assert result["attack"] == attack and result["asr"] == 1.0 and result["pairs"] == 2
    assert result["settings"]["prompts"] == ["a blue italic seven"] and result["settings"]["guidance"] == [3.0]
    assert result["settings"]["seeds"] == [7, 8] and [p["seed"] for p in result["per_pair"]] == [7, 8]


def test_textual_inversion_leaves_out_every_word_that_names_the_concept(monkeypatch):
    """"7" is "seven" in the digits world's prompts: the attacked prompt must not name the concept by its other word
    (it did: "<v*> a red seven", and the word learnt then had the concept in plain text beside it)."""
    from pipelines import load_model
    from pipelines.families import get_family

    digits = get_family("digits")
    assert {"seven", "7"} <= digits.concept_words("7") and {"italic", "slanted"} <= digits.concept_words("slanted")
    assert {"italic", "slanted"} <= digits.concept_words("italic") and "thick" in digits.concept_words("bold")
    assert remove_concept("a slanted, italic three", digits.concept_words("slanted")) == "a three"
    assert get_family("sd1").concept_words("Van Gogh") == {"van", "gogh"}
    model = load_model("digits")
    tokenized, tokenize = [], model.tokenize
    monkeypatch.setattr(model, "tokenize", lambda texts: tokenized.append(list(texts)) or tokenize(texts))
    out = inversion_attack(model, model, NeverSees(), "7", ["a red seven", "the number 7"], [0],
                           InversionSettings(steps=1))  # fmt: skip
    assert [p["attacked_prompt"] for p in out["per_pair"]] == ["<v*> a red", "<v*> the number"]
    # the training images are prompt-major (four seeds of each): each is learnt under its own prompt's context
    assert ["a red"] * 4 + ["the number"] * 4 in tokenized
    assert out["images_showing_concept"] == 0.0  # NeverSees: the judge saw it in none of the training images
    # and the digest, the card and the preview's table say that its rate then means little
    from erasure.evaluation import reference_note

    assert reference_note(out) == ("the judge sees the concept in 0.0% of the images the word was learnt on: a low "
                                   "rate may mean it had little to learn, not that the erasure held")  # fmt: skip
    assert reference_note({**out, "images_showing_concept": 0.5}) is None


def test_the_attacks_say_whether_the_base_models_reference_shows_the_concept():
    """The embedding and discrete attacks pull each pair towards the base model's image of it: a pair whose
    reference lacks the concept ("a three" when erasing "seven") counts in the rate, and eval.json says so."""
    from evaluators.attack import AttackSettings, attack_success_rate
    from evaluators.detect import ConceptDetector
    from pipelines import load_model

    model = load_model("digits")
    judge = ConceptDetector("seven", "digits")  # digits-judge
    args = (model, model, judge, "seven", ["a seven", "a three"], [1000])
    outcomes = [attack_success_rate(*args, AttackSettings(steps=1)),
                discrete_attack(*args, DiscreteAttackSettings(steps=1))]
    for out in outcomes:
        assert [p["reference_shows_concept"] for p in out["per_pair"]] == [True, False]
        assert out["reference_shows_concept"] == 0.5
        # the base model is not erased: its "a seven" is a seven, so the only pair it can succeed on does
        assert out["asr_where_reference_shows"] == 1.0 and out["asr"] == 0.5
    # the terminal's digest, the card and the preview's table say so beside the rate
    from erasure.evaluation import reference_note, summary_lines
    from ui.model_card import attack_value

    note = "the base model's reference shows the concept in 50.0% of the pairs; attack success over those: 100.0%"
    assert reference_note(outcomes[0]) == note and note in attack_value({**outcomes[0], "attack": "embedding"})
    judged = {"before": 0.75, "after": 0.125, "difference": -0.625}  # the base's value first, then the erased one's
    report = {"concepts": {"seven": {"metrics": {"target_presence_judge": judged},
                                     "attack": {**outcomes[0], "attack": "embedding"}}}}  # fmt: skip
    assert summary_lines(report)[0] == "seven: target_presence_judge: 0.75 -> 0.125 (-0.625)"
    assert summary_lines(report)[-1] == f"seven: attack (embedding): {note}"
    assert reference_note({**outcomes[0], "reference_shows_concept": 1.0}) is None


def test_the_attacks_draw_each_prompt_at_its_own_guidance():
    """A prompt file's row may carry its guidance (I2P's `sd_guidance_scale`): the attacks draw that prompt's
    references, unattacked and attacked images at it, and the model's default for a prompt without one."""
    from evaluators.attack import AttackSettings, attack_success_rate, draw_embedded, draw_pairs
    from pipelines import load_model
    from pipelines.images import to_tensor

    model = load_model("digits")
    prompts, seeds, guidance = ["a seven", "a three"], [1000, 1001], [1.5, None]
    own = [to_tensor(model.generate([p], seeds, guidance=g)[0]) for p, g in zip(prompts, guidance)]
    assert torch.equal(draw_pairs(model, prompts, seeds, guidance), torch.cat(own))
    assert not torch.equal(own[0], draw_pairs(model, prompts[:1], seeds, [None]))  # the guidance tells
    with torch.no_grad():
        embeds = model.encode(prompts)
    own = [to_tensor(model.generate_each(embeds[i : i + 1], [1000 + i], guidance=g)) for i, g in enumerate(guidance)]
    assert torch.equal(draw_embedded(model, embeds, [1000, 1001], guidance), torch.cat(own))  # each at its own seed
    # each attack records the prompts' own guidance (test_a_prompt_files_rows_are_attacked_at_their_own_seeds);
    # without one, nothing is recorded: the model's default is in the report's settings
    plain = attack_success_rate(model, model, NeverSees(), "seven", prompts, [1000], AttackSettings(steps=1))
    assert "guidance" not in plain["settings"]


def test_a_prompt_files_rows_are_attacked_at_their_own_seeds():
    """UnlearnDiffAtk attacks each I2P prompt at its evaluation seed: a row with a seed is attacked at it (as the
    evaluation draws it), a row without one at the attack's own seeds; each prompt may then have seeds of its own."""
    from erasure.evaluation import _attack_list, _attacked_prompts
    from evaluators.attack import AttackSettings, attack_success_rate, draw_pairs
    from evaluators.prompt_files import PromptRow
    from pipelines import load_model
    from pipelines.images import to_tensor

    own = [1000, 1001]
    rows = [PromptRow("a seven", 7, 3.0), PromptRow("a seven", 9, 3.0), PromptRow("a three"), PromptRow("a seven"),
            PromptRow("a seven", 7, 3.0)]  # a row given twice is attacked once: the pair is the same
    assert _attacked_prompts(rows, ["built-in"], own, None) == (
        ["a seven", "a three", "a seven"], [3.0, None, None], [[7, 9], own, own])
    assert _attacked_prompts(rows, ["built-in"], own, 1) == (["a seven"], [3.0], [7, 9])
    assert _attacked_prompts([PromptRow("a three"), PromptRow("a one")], ["x"], own, None) == (
        ["a three", "a one"], [None, None], own)  # every prompt at the attack's seeds: one list for all
    assert _attacked_prompts([], ["x", "y"], own, 1) == (["x"], [None], own)
    assert _attack_list(["embedding", "unlearndiffatk", "embedding"]) == ["embedding", "unlearndiffatk"]  # each once

    model = load_model("digits")
    prompts, seeds = ["a seven", "a three"], [[1000], [1001, 1002]]
    own_images = [to_tensor(model.generate([p], s, guidance=g)[0]) for p, s, g in zip(prompts, seeds, [2.0, None])]
    assert torch.equal(draw_pairs(model, prompts, seeds, [2.0, None]), torch.cat(own_images))
    pairs = [("a seven", 1000), ("a three", 1001), ("a three", 1002)]
    for attack, settings in ((attack_success_rate, AttackSettings(steps=1)),
                             (discrete_attack, DiscreteAttackSettings(steps=1)),
                             (inversion_attack, InversionSettings(steps=1))):  # fmt: skip
        judge = _Recorder()
        out = attack(model, model, judge, "seven", prompts, seeds, settings, guidance=[2.0, None])
        assert [(p["prompt"], p["seed"]) for p in out["per_pair"]] == pairs and out["pairs"] == 3
        assert out["settings"]["seeds"] == seeds and out["settings"]["guidance"] == [2.0, None]
        if attack is discrete_attack:
            # its last step is checked though it is no multiple of check_every: each pair's words and prompt are
            # drawn at the pair's seed and its prompt's guidance (the erased model's images and the references first)
            assert len(judge.seen) == 3
            for image, pair, g in zip(judge.seen[2], out["per_pair"], [2.0, None, None]):
                own = to_tensor(model.generate([pair["adversarial_prompt"]], [pair["seed"]], guidance=g)[0])
                # up to a rounding step (a batch of two and a batch of one round differently on a CPU)
                assert (image - own[0]).abs().max() <= 1 / 255 + 1e-6, pair


def _quick_drawing(model, monkeypatch):
    """Two sampling steps (the model card's setting) keep an attack's drawing quick."""
    card = model.source.card
    monkeypatch.setitem(card, "sampling", {**card.get("sampling", {}), "steps": 2})
    return model


def _erased_and_base(tiny_pipeline_dir, monkeypatch):
    """Two copies of the tiny model, the "erased" one changed so that the two draw different images."""
    from pipelines import load_model

    erased, base = (_quick_drawing(load_model(str(tiny_pipeline_dir)), monkeypatch) for _ in range(2))
    with torch.no_grad():
        erased.unet.conv_out.weight.mul_(-1.0)
    return erased, base


class _Recorder(NeverSees):
    """NeverSees, keeping the images of each call."""

    def __init__(self):
        self.seen = []

    def detects(self, images, concept=None):
        self.seen.append(images.clone())
        return super().detects(images, concept)


def test_textual_inversion_learns_its_word_on_the_base_models_images(tiny_pipeline_dir, monkeypatch):
    # the word must be fitted to images that show the concept: the base model's (four seeds a prompt), not the
    # erased model's, from which the concept is gone
    from evaluators.attack import draw_pairs

    erased, base = _erased_and_base(tiny_pipeline_dir, monkeypatch)
    assert not torch.equal(erased.unet.conv_out.weight, base.unet.conv_out.weight)
    judge = _Recorder()
    out = inversion_attack(erased, base, judge, "cat", ["a cat"], [0], InversionSettings(steps=1))
    trained_on = judge.seen[0]  # the judge first scores the training images (images_showing_concept)
    assert out["settings"]["images"] == 4
    assert torch.equal(trained_on, draw_pairs(base, ["a cat"], [0, 1, 2, 3], [None]))
    # and whether the concept shows before the attack is judged on the erased model's images (after the attacked)
    assert len(judge.seen) == 3 and torch.equal(judge.seen[2], draw_pairs(erased, ["a cat"], [0], [None]))


def test_the_attacks_references_are_the_base_models_images_and_before_the_erased_models(tiny_pipeline_dir,
                                                                                       monkeypatch):
    # the embedding and discrete attacks pull each pair towards the base model's image of it, which must show the
    # concept (reference_shows_concept); whether it shows before the attack is the erased model's image
    from evaluators.attack import AttackTarget, draw_pairs
    from pipelines.images import encode_latents

    erased, base = _erased_and_base(tiny_pipeline_dir, monkeypatch)
    judge = _Recorder()
    target = AttackTarget.of(erased, base, judge, "cat", ["a cat"], [0, 1])
    references, plain = (draw_pairs(m, ["a cat"], [0, 1], [None]) for m in (base, erased))
    assert not torch.equal(references, plain)
    assert len(judge.seen) == 2 and torch.equal(judge.seen[0], plain) and torch.equal(judge.seen[1], references)
    with torch.no_grad():
        assert torch.equal(target.z_ref, encode_latents(erased, references))


def test_textual_inversion_starts_at_the_concepts_word_and_steps_in_units_of_the_embeddings_rms(tiny_model,
                                                                                                 monkeypatch):
    # lr is relative to the size of the vocabulary's embeddings, so that one setting suits every text encoder; the
    # word starts from the mean embedding of the concept's own tokens. Adam's first step moves a coordinate by ~lr.
    _quick_drawing(tiny_model, monkeypatch)
    family = tiny_model.family
    words = []
    encode_inserted = family.encode_inserted

    def recording(model, encoder, ids, word):
        words.append(word.detach().clone())
        return encode_inserted(model, encoder, ids, word)

    monkeypatch.setattr(family, "encode_inserted", recording)
    settings = InversionSettings(steps=2, lr=0.01)
    inversion_attack(tiny_model, tiny_model, NeverSees(), "cat", ["a cat"], [0], settings)
    with torch.no_grad():
        vocab = family.vocabulary(tiny_model, family.text_tower(tiny_model))
        ids = tiny_model.tokenizer("cat", add_special_tokens=False).input_ids
    rms = float(vocab.pow(2).mean().sqrt())
    assert len(words) == 3  # two steps, then the attacked prompts
    assert torch.allclose(words[0].flatten(), vocab[ids].mean(0))
    assert float((words[1] - words[0]).abs().max()) == pytest.approx(settings.lr * rms, rel=0.01)
    # a concept of several tokens starts at their mean, not at their sum
    words.clear()
    inversion_attack(tiny_model, tiny_model, NeverSees(), "red cat", ["a red cat"], [0], InversionSettings(steps=0))
    ids = tiny_model.tokenizer("red cat", add_special_tokens=False).input_ids
    assert len(ids) == 2 and torch.allclose(words[0].flatten(), vocab[ids].mean(0))


def test_the_discrete_attack_feeds_the_encoder_whole_words_at_every_step(monkeypatch):
    # UnlearnDiffAtk optimises word distributions but encodes their argmax words (straight-through): a mixture of
    # embeddings would be a prompt no one can type, and the words found would not do what the loss measured
    from evaluators.attack import AttackTarget
    from pipelines import load_model

    model = _quick_drawing(load_model("digits"), monkeypatch)
    encoded = []
    encode = AttackTarget.encode

    def recording(self, rows, words):
        encoded.append(words.detach().clone())
        return encode(self, rows, words)

    monkeypatch.setattr(AttackTarget, "encode", recording)
    settings = DiscreteAttackSettings(tokens=2, steps=3, lr=0.2, check_every=10)
    out = discrete_attack(model, model, NeverSees(), "seven", ["a three"], [0], settings)
    family = model.family
    with torch.no_grad():
        table = family.vocabulary(model, family.text_tower(model))  # every token's input embedding
    assert len(out["loss"]) == settings.steps and len(encoded) >= settings.steps + 1  # the start's, then each step's
    for words in encoded:
        assert words.shape[-2] == settings.tokens
        for row in words.reshape(-1, words.shape[-1]):
            # one token's embedding (up to the rounding of one_hot + p - p), not a blend of several
            assert float((table - row).abs().amax(-1).min()) < 1e-5


def test_an_attack_on_the_built_in_prompts_draws_its_pairs_apart_from_the_evaluations_seeds(monkeypatch):
    # `erasure eval` draws seeds 0, 1, ...; the attack's own pairs start at 1000, so that it is not measured on the
    # images the report already scored
    from erasure.evaluation import run_attack
    from pipelines import load_model

    model = _quick_drawing(load_model("digits"), monkeypatch)
    out = run_attack("embedding", model, model, "seven", 1, 2, 1, None, progress=False)
    assert out["attack"] == "embedding" and [p["seed"] for p in out["per_pair"]] == [1000, 1001]


class _Scripted:
    """A judge answering its calls in turn from a script (one list of answers per call), then seeing nothing."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.seen = []  # the images of each call

    def detects(self, images, concept=None):
        self.seen.append(images)
        answer = self.answers.pop(0) if self.answers else [False] * len(images)
        assert len(answer) == len(images)
        return torch.tensor(answer, dtype=torch.bool)

    def describe(self):
        return {"judge": "scripted"}


def test_a_discrete_attack_pair_stops_at_its_first_success_and_is_reported_at_its_words_and_step(monkeypatch):
    # a pair that succeeds at a check stops there: later steps score the others against their own references, its
    # record gives that step and those words, and the end objective is measured on the words the report gives
    from evaluators.attack import AttackTarget
    from pipelines import load_model
    from pipelines.images import to_tensor

    model = _quick_drawing(load_model("digits"), monkeypatch)
    rows, encoded = [], []
    loss, encode = AttackTarget.loss, AttackTarget.encode
    monkeypatch.setattr(AttackTarget, "loss", lambda self, cond, r, *a: rows.append(r) or loss(self, cond, r, *a))
    monkeypatch.setattr(AttackTarget, "encode",
                        lambda self, r, words: encoded.append(words.detach().clone()) or encode(self, r, words))
    # the erased model's images (pair 0 shows the concept unattacked), the references, then each check's: pair 1
    # succeeds at the first check (step 3), pair 2 never
    judge = _Scripted([True, False, False], [True] * 3, [True, False])
    settings = DiscreteAttackSettings(tokens=2, steps=9, lr=0.5, check_every=3)
    out = discrete_attack(model, model, judge, "seven", ["a three"], [0, 1, 2], settings)
    present, found, missed = out["per_pair"]
    # a pair present before is never attacked: no adversarial prompt of its random start words
    assert present["present_before_attack"] and present["adversarial_prompt"] is None
    assert present["adversarial_tokens"] is None and present["success_step"] is None
    assert found["success_step"] == 3 and found["present_after_attack"] and not found["present_before_attack"]
    assert missed["success_step"] is None and not missed["present_after_attack"]
    assert out["asr"] == pytest.approx(2 / 3) and out["present_before_attack"] == pytest.approx(1 / 3)
    assert [r.tolist() for r in rows if isinstance(r, torch.Tensor)] == [[1, 2]] * 3 + [[2]] * 6
    table = model.family.vocabulary(model, model.family.text_tower(model))
    for i, pair in ((1, found), (2, missed)):  # the last words encoded: the end objective's
        assert torch.equal(encoded[-1][i], table[pair["adversarial_tokens"]]), i
    # the check judged the adversarial prompt's image, which the report gives, not the plain prompt's
    checked = judge.seen[2][0]  # the first check (step 3), pair 1 (seed 1)
    adversarial, plain = (to_tensor(model.generate_jobs([text], [(0, 1)]))[0]
                          for text in (found["adversarial_prompt"], "a three"))  # fmt: skip
    # (drawn in a batch of two there, of one here: a pixel may round to the next of 255 levels)
    assert (checked - adversarial).abs().max() <= 1 / 255 + 1e-6 and (checked - plain).abs().mean() > 5e-3


def test_textual_inversion_reports_each_pairs_outcome_and_the_share_of_its_images_showing_the_concept():
    from pipelines import load_model

    model = load_model("digits")
    # the judge is asked about the four training images, then the attacked image, then the unattacked one
    judge = _Scripted([True, False, False, False], [True], [False])
    out = inversion_attack(model, model, judge, "seven", ["a seven"], [0], InversionSettings(steps=1))
    assert out["images_showing_concept"] == 0.25  # a share, not a count
    assert out["present_before_attack"] == 0.0 and out["present_after_attack"] == 1.0 and out["asr"] == 1.0
    [pair] = out["per_pair"]
    assert not pair["present_before_attack"] and pair["present_after_attack"]


def test_textual_inversion_trains_on_every_one_of_its_images(tiny_model, monkeypatch):
    # the batches are drawn from all four training images (an off-by-one in the draw leaves the last one out)
    import evaluators.inversion_attack as inversion

    batches, loss = [], inversion.classifier_loss
    monkeypatch.setattr(inversion, "classifier_loss", lambda m, z, *a: batches.append(z.detach()) or loss(m, z, *a))
    _quick_drawing(tiny_model, monkeypatch)
    inversion_attack(tiny_model, tiny_model, NeverSees(), "cat", ["a cat"], [0], InversionSettings(steps=6))
    assert len(torch.cat(batches).flatten(1).unique(dim=0)) == 4


def test_the_embedding_attack_draws_the_words_it_optimised(monkeypatch):
    # the images judged after the attack are drawn with the words its last step moved to, not its random start
    from evaluators.attack import AttackSettings, AttackTarget, attack_success_rate
    from pipelines import load_model

    model = _quick_drawing(load_model("digits"), monkeypatch)
    encoded, encode = [], AttackTarget.encode
    monkeypatch.setattr(AttackTarget, "encode",
                        lambda self, r, words: encoded.append(words.detach().clone()) or encode(self, r, words))
    attack_success_rate(model, model, NeverSees(), "seven", ["a three"], [0], AttackSettings(steps=2))
    assert len(encoded) == 3  # two steps, then the drawing
    assert not torch.equal(encoded[-1], encoded[0]) and not torch.equal(encoded[-1], encoded[1])


def test_an_attacks_loss_is_reported_as_the_means_of_its_first_and_last_ten_steps():
    from evaluators.attack import loss_ends

    assert loss_ends([float(i) for i in range(25)]) == {"first": 4.5, "last": 19.5}  # 0..9 and 15..24
    assert loss_ends([1.0, 3.0]) == {"first": 2.0, "last": 2.0} and loss_ends([]) == {"first": None, "last": None}


def test_an_interrupted_evaluation_resumes_with_the_attacks_it_finished(tmp_path, monkeypatch, caplog):
    # an attack of one concept takes hours at SD size: a stopped evaluation must not lose the ones it finished
    import json
    import logging

    import erasure.evaluation as evaluation
    from erasure.finished_attacks import FinishedAttacks, kept_attacks_message
    from pipelines.errors import InputError

    calls, results, real = [], [], evaluation.run_attack

    def attack_then_stop(kind, *args, **kwargs):
        calls.append(kind)
        if kind == "unlearndiffatk" and stop:
            raise KeyboardInterrupt  # Ctrl-C in the second attack
        results.append(json.loads(json.dumps(real(kind, *args, **kwargs), default=float)))
        return results[-1]

    monkeypatch.setattr(evaluation, "run_attack", attack_then_stop)
    settings = dict(concepts=["seven"], baseline="digits", json_path=tmp_path / "e.json", samples=1,
                    attack=["embedding", "unlearndiffatk"], attack_prompts=1, attack_seeds=1, attack_steps=2,
                    progress=False)  # fmt: skip
    stop = True
    with pytest.raises(KeyboardInterrupt) as interrupted:
        evaluation.run_eval("digits", **settings)
    partial = tmp_path / "e.partial.json"
    assert kept_attacks_message(interrupted.value) == (f"evaluation interrupted; the attacks it finished are kept in "
                                                       f"{partial} - rerun with --resume to run only the others")
    assert not (tmp_path / "e.json").exists() and partial.is_file()
    assert json.loads(partial.read_text())["attacks"] == {"seven": {"embedding": results[0]}}
    with caplog.at_level(logging.INFO), pytest.raises(InputError, match="other values of: attack_steps;"):
        evaluation.run_eval("digits", **{**settings, "attack_steps": 3}, resume=True)
    assert not any("loading model" in record.getMessage() for record in caplog.records)  # refused before any load

    stop, calls[:] = False, []
    report = json.loads(evaluation.run_eval("digits", **settings, resume=True).read_text())
    assert calls == ["unlearndiffatk"]  # the finished attack is not run again
    # the kept one first, in the order asked, and said to be kept (its seconds are the first evaluation's)
    assert report["concepts"]["seven"]["attacks"] == [{**results[0], "resumed": True}, results[1]]
    assert [line.endswith("kept from the interrupted evaluation)") for line in evaluation.summary_lines(report)
            if "attack (" in line] == [True, False]  # fmt: skip
    assert not partial.exists()  # the report holds them now
    # without --resume a partial record is said to be replaced, and none of its attacks is kept
    partial.write_text(json.dumps({"format": "erasure-eval-partial/1", "fingerprint": {},
                                   "attacks": {"seven": {"embedding": results[0]}}}))  # fmt: skip
    assert FinishedAttacks(tmp_path / "e.json", {}, resume=False).results == {}
    assert any("--resume keeps them" in record.getMessage() for record in caplog.records)
