"""Score Forgetting Distillation and the one-step pipeline: the SiD loss, a frozen teacher, the
conditions of the forgetting term, save/load and the plain-diffusers recipe, bit-identical resume."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from erasure.api import erase
from erasure.config import build_config, parse_sets
from erasure.sfd import erase as sfd_erase
from erasure.sfd import sid_loss
from erasure.training import RunContext
from pipelines import InputError, load_model
from pipelines.families import get_family
from pipelines.one_step import PLAIN_DIFFUSERS_RECIPE

from .conftest import stops_resumably

FAST = ["steps=2", "batch_size=2", "forget_batch=1", "lr=1e-3", "fake_lr=1e-3", "remain_prompts=8",
        "override=a dog", "prompt_templates={}"]  # fmt: skip
README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_sid_loss_with_alpha_one_is_p_minus_s_times_s_minus_x_over_w():
    g = torch.Generator().manual_seed(0)
    p, s, x = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    w = (p - x).abs().mean(dim=(1, 2, 3))
    expected = ((p - s) * (s - x)).sum(dim=(1, 2, 3)) / w
    assert torch.allclose(sid_loss(p, s, x, alpha=1.0), expected, atol=1e-5)
    # alpha weighs the (p - s)^2 term: alpha = 0 leaves (p - s)(p - x) / w
    assert torch.allclose(sid_loss(p, s, x, alpha=0.0), ((p - s) * (p - x)).sum(dim=(1, 2, 3)) / w, atol=1e-5)
    # w is a constant of the gradient (stop-gradient), x_g is not
    x.requires_grad_(True)
    sid_loss(p, s, x, alpha=1.0).sum().backward()
    assert torch.allclose(x.grad, -(p - s) / w.view(-1, 1, 1, 1), atol=1e-5)


def test_the_fake_scores_loss_is_the_eps_error_for_a_v_predicting_network_too():
    from erasure.sfd import fake_score_loss

    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    abar = torch.tensor([0.999, 0.5, 0.006]).view(-1, 1, 1, 1)  # SD's schedule spans about these
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    eps_of_out = abar.sqrt() * out + (1 - abar).sqrt() * x_t  # the eps a v prediction implies at x_t
    expected = torch.nn.functional.mse_loss(eps_of_out, noise)
    assert torch.allclose(fake_score_loss(out, v, abar, "v_prediction"), expected, atol=1e-6)
    assert torch.equal(fake_score_loss(out, noise, abar, "epsilon"), torch.nn.functional.mse_loss(out, noise))


def test_remain_prompts_can_come_from_a_file_without_the_concept(tiny_pipeline_dir, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a tree\na cat on a mat\na red car\na photo of a tree\n")
    model = load_model(str(tiny_pipeline_dir))
    config = build_config("sfd", "sd1", parse_sets(FAST + ["steps=1", f"remain_prompt_file={captions}"]))
    config.check(model.family, ["cat"])
    result = sfd_erase(model, ["cat"], config, RunContext(seed=0, progress=False))
    assert result.outcome["sfd"]["remain_prompts"] == 2  # the tree and the car: the cat left out, no repeats
    captions.write_text("a cat\nthe cat sleeps\n")
    with pytest.raises(InputError, match="every prompt mentions cat"):
        config.check(model.family, ["cat"])
    with pytest.raises(InputError, match="remain_prompt_file .*missing.txt: no such file"):
        build_config("sfd", "sd1", {"remain_prompt_file": str(tmp_path / "missing.txt")}).check(model.family, ["cat"])


def _run_with_hooks(tiny_pipeline_dir, sets):
    """One SFD iteration on the tiny pipeline, recording (which net, timesteps, conditions, whether its input carries
    a graph) of every UNet call."""
    model = load_model(str(tiny_pipeline_dir))
    teacher_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    calls = []

    def record(module, args, kwargs):
        t, cond = args[1], args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        net = "teacher" if module is model.unet else "student"
        calls.append((net, torch.as_tensor(t).clone(), cond.detach().clone(), args[0].requires_grad))

    # deepcopy carries the hook over to the generator and fake-score copies; `module` tells them apart.
    model.unet.register_forward_pre_hook(record, with_kwargs=True)
    config = build_config("sfd", "sd1", parse_sets(sets))
    result = sfd_erase(model, ["cat"], config, RunContext(seed=0, progress=False))
    return model, teacher_before, calls, result


def test_the_teacher_never_changes_and_the_forgetting_term_uses_the_override(tiny_pipeline_dir):
    sets = FAST + ["steps=1", "t_init=990"]  # t_init outside [t_min, t_max): generator calls stand out
    model, teacher_before, calls, result = _run_with_hooks(tiny_pipeline_dir, sets)
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in teacher_before.items())
    assert result.model.unet is not model.unet and result.changed == ["unet"]

    with torch.no_grad():
        concept, override = model.encode(["cat"])[0], model.encode(["a dog"])[0]
    generator_calls = [c for net, t, c, _ in calls if net == "student" and bool((t == 990).all())]
    fake_calls = [c for net, t, c, _ in calls if net == "student" and not bool((t == 990).any())]
    teacher_calls = [c for net, _, c, _ in calls if net == "teacher"]
    assert len(generator_calls) == 2 and len(fake_calls) == 2 and len(teacher_calls) == 1
    # rows: 2 remain prompts, then the forget prompt; the teacher's batch is [unconditional; conditional]
    for cond in generator_calls + fake_calls:
        assert torch.equal(cond[2], concept) and not torch.equal(cond[0], concept)
    teacher_cond = teacher_calls[0][3:]
    assert torch.equal(teacher_cond[2], override) and not torch.equal(teacher_cond[2], concept)
    assert torch.equal(teacher_cond[:2], generator_calls[1][:2])  # remain rows: the teacher sees the same prompt
    # SiD's gradient reaches G through x_t = sqrt(abar) x_g + sqrt(1 - abar) noise too, where the generator step
    # queries the fake score and the teacher: their x_t carries G's graph; the fake score's own step's does not
    queried = [(net, graph) for net, t, _, graph in calls if not bool((t == 990).any())]
    assert queried == [("student", False), ("student", True), ("teacher", True)]


def _trained_generator(tiny_pipeline_dir, sets):
    """The generator's weights after an SFD run of `sets` on a fresh copy of the tiny pipeline."""
    model = load_model(str(tiny_pipeline_dir))
    config = build_config("sfd", "sd1", parse_sets(sets))
    return sfd_erase(model, ["cat"], config, RunContext(seed=0, progress=False)).model.unet.state_dict()


def test_the_forgetting_term_is_weighed_by_forget_weight(tiny_pipeline_dir):
    # The override reaches the generator's loss only through the forgetting term: weighed by 0 it cannot change the
    # generator, bit for bit; weighed by 1 it does.
    def generator(weight, override):
        return _trained_generator(tiny_pipeline_dir, FAST + ["steps=1", f"forget_weight={weight}",
                                                             f"override={override}"])  # fmt: skip

    unweighted_dog, unweighted_tree = generator(0, "a dog"), generator(0, "a red tree")
    assert all(torch.equal(unweighted_dog[k], unweighted_tree[k]) for k in unweighted_dog)
    weighted_dog, weighted_tree = generator(1, "a dog"), generator(1, "a red tree")
    assert not all(torch.equal(weighted_dog[k], weighted_tree[k]) for k in weighted_dog)


def test_the_generator_steps_at_lr_and_not_at_the_fake_scores_rate(tiny_pipeline_dir):
    # Adam's first step moves each weight by at most its learning rate (|m / sqrt(v)| <= 1), and by about that much
    # wherever the gradient is not tiny: one step at lr 1e-4 beside a fake score at 1e-2 moves the generator 1e-4
    teacher = load_model(str(tiny_pipeline_dir)).unet.state_dict()
    generator = _trained_generator(tiny_pipeline_dir, FAST + ["steps=1", "lr=1e-4", "fake_lr=1e-2"])
    moved = max(float((generator[k] - teacher[k]).abs().max()) for k in teacher)
    assert 0.5e-4 < moved < 1.01e-4  # (float32 weights near 1 round a step of 1e-4 by ~1e-7)


def test_the_guided_teacher_is_unconditional_at_guidance_0_and_conditional_at_1(tiny_pipeline_dir, monkeypatch):
    # p is the teacher's x0 under eps_u + w (eps_c - eps_u): at w = 0 the unconditional prediction alone, at w = 1
    # the conditional one alone (a target built from eps_c + w (eps_c - eps_u) is neither).
    import pipelines.one_step as one_step

    combined = []  # the prediction of each x0_from_prediction call: p's is the step's last
    x0_from_prediction = one_step.x0_from_prediction

    def recording(x_t, out, abar, prediction="epsilon"):
        combined.append(out.detach().clone())
        return x0_from_prediction(x_t, out, abar, prediction)

    monkeypatch.setattr(one_step, "x0_from_prediction", recording)

    def one_step_at(guidance):
        """The teacher's [unconditional; conditional] predictions and the guided one p is made of."""
        model = load_model(str(tiny_pipeline_dir))
        teacher_out = []

        def record(module, args, out):  # deepcopy carries it over to the generator and the fake score
            if module is model.unet:
                teacher_out.append(out.sample.detach().clone())

        model.unet.register_forward_hook(record)
        combined.clear()
        config = build_config("sfd", "sd1", parse_sets(FAST + ["steps=1", f"guidance={guidance}"]))
        sfd_erase(model, ["cat"], config, RunContext(seed=0, progress=False))
        assert len(teacher_out) == 1  # one generator step: one teacher query
        return (*teacher_out[0].chunk(2), combined[-1])

    eps_u, eps_c, guided = one_step_at(0)
    assert not torch.allclose(eps_u, eps_c, atol=1e-3)  # the two are told apart
    assert torch.allclose(guided, eps_u, atol=1e-5)
    eps_u, eps_c, guided = one_step_at(1)
    assert torch.allclose(guided, eps_c, atol=1e-5)


def test_distill_only_has_no_forget_rows_and_keeps_the_concept_in_the_prompts(tiny_pipeline_dir):
    sets = [s for s in FAST if not s.startswith("override")] + ["steps=1", "distill_only=true", "t_init=990"]
    _, _, calls, result = _run_with_hooks(tiny_pipeline_dir, sets)
    assert all(len(c) == 2 for net, _, c, _ in calls if net == "student")
    assert result.outcome["sfd"]["overrides"] == {}
    assert any(re.search(r"\b(seven|7)\b", p) for p in get_family("digits").remain_prompts([], 0, 400))


def test_the_users_override_comes_first_and_only_distilling_needs_none():
    digits = get_family("digits")
    assert build_config("sfd", digits, {}).overrides(digits, ["seven"]) == {"seven": "eight"}  # the next digit
    # a family's default must not hide what the user asked the concept to become
    assert build_config("sfd", digits, {"override": "a nine"}).overrides(digits, ["seven"]) == {"seven": "a nine"}
    build_config("sfd", "sd1", {"distill_only": True}).check(get_family("sd1"), ["cat"])  # nothing to refuse


def test_the_remain_prompts_leave_the_concept_out_and_the_score_losses_noise_as_ddpm_does(tiny_pipeline_dir):
    # The remain prompts leave the concept out (COCO's "a photo of a cat" for "cat"), unless only distilling, whose
    # teacher is the whole distribution; the losses' own forward process is diffusers' DDPM one, eps its target.
    from diffusers import DDPMScheduler

    from erasure.sfd import _Batches

    model = load_model(str(tiny_pipeline_dir))
    ddpm = DDPMScheduler.from_config(model.scheduler.config)
    run = RunContext(seed=0, progress=False)
    for extra, keeps_the_concept in (([], False), (["distill_only=true"], True)):
        config = build_config("sfd", "sd1", parse_sets(FAST + ["remain_prompts=80", *extra]))
        batches = _Batches(model, config.overrides(model.family, ["cat"]), ddpm.alphas_cumprod, config, run)
        assert "a photo of a dog" in batches.remain and ("a photo of a cat" in batches.remain) == keeps_the_concept
    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(batches.rows, 4, 8, 8, generator=generator) for _ in range(2))
    batches.noise = lambda: noise
    x_t, t, wanted, abar = batches.noisy(x0)
    assert ((config.t_min <= t) & (t < config.t_max)).all() and torch.equal(wanted, noise)
    torch.testing.assert_close(x_t, ddpm.add_noise(x0, noise, t))
    torch.testing.assert_close(abar.flatten(), ddpm.alphas_cumprod[t])


def test_the_one_step_pipeline_saves_loads_and_samples_bit_for_bit(tiny_pipeline_dir, tmp_path):
    run = erase("sfd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=FAST + ["t_init=500"],
                progress=False)  # fmt: skip
    index = json.loads((run / "model_index.json").read_text())
    assert index["_class_name"] == "OneStepPipeline" and index["t_init"] == 500  # the generator's, not the default
    assert sorted(p.suffix for p in (run / "unet").iterdir()) == [".json", ".safetensors"]
    assert json.loads((run / "erasure_model.json").read_text())["sampling"] == {"steps": 1, "guidance": 0.0}
    first, second = load_model(str(run)), load_model(str(run))
    assert first.kind == "one-step"
    a = first.generate(["a cat", "a dog"], [0, 1])
    b = second.generate(["a cat", "a dog"], [0, 1])
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    # one image depends only on its prompt and seed, as for the teacher's pipeline
    alone = first.generate(["a dog"], [1])[0][0]
    assert np.array_equal(np.asarray(alone), np.asarray(a[1][1]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(a[0][1]))
    # a one-step generator draws in one step, unguided: --steps and --guidance are refused, not silently ignored
    from erasure.sampling import sample

    for option in ({"steps": 4}, {"guidance": 7.5}):
        with pytest.raises(InputError, match=f"is a one-step generator: --{next(iter(option))} does not apply"):
            sample(str(run), ["a cat"], n=1, seed=0, out=tmp_path / "grid.png", **option)


def test_the_readme_recipe_reproduces_the_pipeline_with_plain_diffusers(tiny_pipeline_dir, tmp_path):
    run = erase("sfd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=FAST, progress=False)
    block = re.search(r"<!-- one-step recipe -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert block and block.group(1) == PLAIN_DIFFUSERS_RECIPE.format(folder='"runs/sfd-seven"', prompt="a seven")
    code = PLAIN_DIFFUSERS_RECIPE.format(folder=repr(str(run)), prompt="a cat").replace('image.save("sample.png")', "")
    namespace: dict = {}
    exec(compile(code, "README recipe", "exec"), namespace)  # noqa: S102 - the README's own code
    expected = load_model(str(run)).generate(["a cat"], [0])[0][0]
    assert np.abs(np.asarray(namespace["image"], float) - np.asarray(expected, float)).max() <= 1


@pytest.mark.parametrize("lora", [[], ["lora_rank=4"]], ids=["full", "lora"])
def test_an_interrupted_run_resumes_to_a_bit_identical_end(lora, tiny_pipeline_dir, tmp_path):
    sets = FAST + ["steps=4", "ema_decay=0.5", *lora]
    kwargs = {"sets": sets, "seed": 3, "checkpoint_every": 2, "progress": False}
    whole = erase("sfd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "whole", **kwargs)

    def stop_at_3(step, total, logs):
        if step == 3:
            raise KeyboardInterrupt

    with stops_resumably():
        erase("sfd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "resumed", after_step=stop_at_3, **kwargs)
    resumed = erase("sfd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "resumed", resume=True, **kwargs)
    a, b = load_model(str(whole)).unet.state_dict(), load_model(str(resumed)).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_values_are_refused(tiny_pipeline_dir, tmp_path):
    for bad in ["alpha=0", "lr=nan", "fake_lr=-1", "forget_weight=-1", "guidance=inf", "t_min=0",
                "t_min=500,t_max=400", "t_init=1000", "steps=0", "batch_size=0", "forget_batch=-1",
                "ema_decay=1", "adam_betas=0.9", "prompt_templates=a photo", "override= ",
                "remain_prompts=0"]:  # fmt: skip
        with pytest.raises(InputError, match=bad.split("=")[0]):  # each refusal names the value it refuses
            build_config("sfd", "sd1", parse_sets(bad.split(",")))
    with pytest.raises(InputError, match="forget_batch = 0"):
        build_config("sfd", "sd1", parse_sets(["forget_batch=0"]))
    with pytest.raises(InputError, match="gradient_checkpointing: 'maybe' is not a boolean"):
        build_config("sfd", "sd1", parse_sets(["gradient_checkpointing=maybe"]))
    with pytest.raises(InputError, match="lora_alpha and lora_targets need lora_rank > 0"):
        build_config("sfd", "sd1", parse_sets(["lora_alpha=4"]))
    # a real model needs to be told what the concept becomes, before anything loads
    with pytest.raises(InputError, match="override"):
        erase("sfd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=["steps=1"], progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(InputError, match="sfd needs what 'a cat' becomes.*digits family has no default"):
        erase("sfd", ["a cat"], "digits", out=tmp_path / "run2", sets=["steps=1"], progress=False)
    assert not (tmp_path / "run2").exists() and not list(tmp_path.glob(".run2*"))


def test_a_one_step_run_is_evaluated_against_its_teacher_and_exported(tiny_pipeline_dir, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from erasure.evaluation import run_eval
    from ui.hub import export_run

    run = erase("sfd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=FAST, progress=False)
    report = json.loads(run_eval(str(run), samples=1, clip="digits-clip", progress=False).read_text())
    assert report["baseline_matches_run"] and report["before"]["sha256"] != report["after"]["sha256"]
    hub = export_run(run, "me/tiny-sfd", local_dir=tmp_path / "hub").folder
    assert (hub / "eval.json").is_file()
    card = ModelCard.load(hub / "README.md")
    metadata = card.data.to_dict()  # diffusers' DiffusionPipeline cannot load a one-step folder: the toolkit's library
    assert metadata["pipeline_tag"] == "text-to-image" and metadata["library_name"] == "concept-erasure-toolkit"
    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(code.replace('snapshot_download("me/tiny-sfd")', repr(str(hub))), namespace)  # noqa: S102
    expected = load_model(str(run)).generate(["cat"], [0])[0][0]
    assert np.abs(np.asarray(namespace["image"], float) - np.asarray(expected, float)).max() <= 1
    assert (tmp_path / "sample.png").is_file()


def test_the_embedding_attack_on_a_one_step_generator_uses_its_own_noise():
    from evaluators.attack import AttackSettings, attack_success_rate
    from evaluators.report import default_judge
    from pipelines.diffusion import OneStepModel
    from pipelines.one_step import OneStepPipeline, one_step_sample, seed_noise

    teacher = load_model("digits-sd")
    parts = {k: getattr(teacher, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    one_step = OneStepModel(OneStepPipeline(**parts, t_init=625), teacher.source)
    # the noise the attack optimises against is the noise the pipeline samples each seed with
    with torch.no_grad():
        embeds = one_step.encode(["a seven", "a seven"])
        latents = one_step_sample(one_step.unet, one_step.scheduler.alphas_cumprod, 625,
                                  seed_noise([3, 4], (4, 8, 8), "cpu"), embeds)  # fmt: skip
        piped = one_step.pipe(prompt_embeds=embeds, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                              output_type="latent").images  # fmt: skip
    assert torch.equal(latents, piped)
    judge = default_judge("seven", "digits")
    outcome, attacked = attack_success_rate(one_step, teacher, judge, "seven", ["a seven"], [0, 1],
                                            AttackSettings(steps=2), return_images=True)  # fmt: skip
    assert outcome["pairs"] == 2 and "one-step" in outcome["settings"]["method"]
    # the report is the judge's verdict on the images the attack drew: success = seen before or after it
    seen = judge.detects(attacked, "seven").bool().tolist()
    assert [p["present_after_attack"] for p in outcome["per_pair"]] == seen and len(seen) == 2
    hits = [p["present_before_attack"] or p["present_after_attack"] for p in outcome["per_pair"]]
    assert outcome["asr"] == sum(hits) / 2


def test_an_sfd_lora_run_is_the_teacher_plus_adapters_that_plain_diffusers_loads(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = erase("sfd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", progress=False,
                sets=FAST + ["lora_rank=4", "ema_decay=0.5", "lr=0.05"])  # fmt: skip
    manifest = json.loads((run / "erasure.json").read_text())
    assert manifest["lora"]["components"] == ["unet"] and manifest["lora"]["parameters"] == manifest[
        "trainable_parameters"] > 0  # only the generator's adapters are the run's (the fake score's are dropped)
    # the generator is the teacher's UNet plus the adapters: loaded by diffusers' own loader into the base's
    # pipeline, its UNet runs the README's one-step recipe to the toolkit's pixels
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_lora_weights(str(run))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    adapted = tmp_path / "adapted"
    pipe.save_pretrained(adapted)
    index = json.loads((run / "model_index.json").read_text())
    (adapted / "model_index.json").write_text(json.dumps({**json.loads((adapted / "model_index.json").read_text()),
                                                          "t_init": index["t_init"]}))  # fmt: skip
    code = PLAIN_DIFFUSERS_RECIPE.format(folder=repr(str(adapted)), prompt="a cat")
    namespace: dict = {}
    exec(compile(code.replace('image.save("sample.png")', ""), "README recipe", "exec"), namespace)  # noqa: S102
    ours = load_model(str(run))
    assert ours.kind == "one-step"
    expected = np.asarray(ours.generate(["a cat"], [0])[0][0], float)
    assert np.abs(np.asarray(namespace["image"], float) - expected).max() <= 1
    teacher_step = OneStepOfTeacher(tiny_pipeline_dir, index["t_init"])
    assert np.abs(teacher_step - expected).max() > 1  # the adapters changed the generator
    # --save lora: the adapters alone, loading as the same one-step generator
    small = erase("sfd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "small", progress=False, save="lora",
                  sets=FAST + ["lora_rank=4", "ema_decay=0.5", "lr=0.05"])  # fmt: skip
    assert not (small / "unet").exists()
    again = load_model(str(small))
    assert again.kind == "one-step"
    assert np.abs(np.asarray(again.generate(["a cat"], [0])[0][0], float) - expected).max() <= 1
    # exported, the generator's adapters are merged into the Hub folder's UNet: the README's recipe runs on it
    from ui.hub import export_run

    hub = export_run(small, "someone/small", local_dir=tmp_path / "hub", no_eval=True).folder
    namespace = {}
    code = PLAIN_DIFFUSERS_RECIPE.format(folder=repr(str(hub)), prompt="a cat").replace('image.save("sample.png")', "")
    exec(compile(code, "README recipe", "exec"), namespace)  # noqa: S102
    assert np.abs(np.asarray(namespace["image"], float) - expected).max() <= 1


def OneStepOfTeacher(base: Path, t_init: int) -> np.ndarray:  # noqa: N802 - reads as the thing it draws
    """The teacher's own UNet taken one step (no training): what the generator starts from."""
    from pipelines.one_step import OneStepPipeline

    teacher = load_model(str(base))
    pipe = OneStepPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                           unet=teacher.unet, scheduler=teacher.scheduler, t_init=t_init)  # fmt: skip
    from pipelines.diffusion import one_step_model

    return np.asarray(one_step_model(pipe, teacher.source).generate(["a cat"], [0])[0][0], float)


@pytest.mark.parametrize("lora", [[], ["lora_rank=4"]], ids=["full", "lora"])
def test_gradient_checkpointing_trades_memory_for_time_and_changes_nothing(lora, tiny_pipeline_dir, monkeypatch):
    import erasure.checkpointing as checkpointing

    recomputed = []  # the switches each recomputed block ran with: (any adapter off, any weight trained)
    as_recorded = checkpointing._as_recorded

    def counting(block, recorded):
        adapters, grads = recorded
        recomputed.append((any(off for _, off in adapters), any(flag for _, flag in grads)))
        return as_recorded(block, recorded)

    monkeypatch.setattr(checkpointing, "_as_recorded", counting)

    def trained(*extra):
        model = load_model(str(tiny_pipeline_dir))
        config = build_config("sfd", get_family("sd1"), parse_sets(FAST + ["lr=0.05", *lora, *extra]))
        return sfd_erase(model, ["cat"], config, RunContext(seed=0, progress=False)).model.unet.state_dict()

    plain = trained()
    assert not recomputed
    checkpointed = trained("gradient_checkpointing=true")
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    # blocks were recomputed in each role: trained, frozen (fake score, or the teacher), adapters off (LoRA's teacher)
    assert (False, True) in recomputed and any(not trains for _, trains in recomputed)
    assert any(off for off, _ in recomputed) == bool(lora)


def test_the_one_step_pipeline_decodes_the_same_images_for_every_output_type():
    from pipelines.one_step import OneStepPipeline

    from .conftest import tiny_components

    names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    parts = {k: v for k, v in tiny_components().items() if k in names}
    pipe = OneStepPipeline(**parts, t_init=625)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pipe(["a cat", "a dog"], latents=z).images
    arrays = pipe(["a cat", "a dog"], latents=z, output_type="np").images
    assert len(images) == len(arrays) == 2
    assert all(np.abs(np.asarray(a, float) - b * 255).max() <= 1 for a, b in zip(images, arrays))
    # decoded a few latents at a time (16 in the pipeline), every chunk's images are kept, each as decoded at once
    from pipelines.images import decode_latents

    chunked = decode_latents(pipe.vae, pipe(["a cat", "a dog"], latents=z, output_type="latent").images, chunk=1)
    assert len(chunked) == 2 and all(np.abs(np.asarray(a, float) - np.asarray(b, float)).max() <= 1
                                     for a, b in zip(chunked, images))  # fmt: skip
