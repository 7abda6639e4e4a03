import pytest
import torch
import torch.nn.functional as F

from erasure.advunlearn import SectionTimer
from erasure.common import attack_embeddings, fast_at_start
from pipelines.text_embeddings import encode_with_inserted, token_embeddings

from .conftest import stops_resumably


def _attack_objective(model):
    """The AdvUnlearn inner objective on the tiny model: make [adv; c] predict like a target."""
    ids = model.tokenize(["a cat"])
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 600])
    with torch.no_grad():
        target = model.unet(x_t, t, model.encode(["a dog"]).expand(2, -1, -1)).sample
    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)

    def loss_of(adv):
        cond = encode_with_inserted(model.text_encoder, ids, adv)
        return F.mse_loss(model.unet(x_t, t, cond.expand(2, -1, -1)).sample, target)

    return loss_of, ids


def _advunlearn(model, sets: list[str]):
    """The model AdvUnlearn returns after erasing "a cat" with `sets` ("key=value") over the family's preset."""
    from erasure.config import build_config, parse_sets
    from erasure.registry import METHODS
    from erasure.training import RunContext

    config = build_config("advunlearn", model.family, parse_sets(sets))
    return METHODS["advunlearn"].entry(model, ["a cat"], config, RunContext(seed=0, progress=False)).model


def test_inserted_embeddings_keep_the_prompt_around_them(tiny_model):
    ids = tiny_model.tokenize(["a cat"])
    with torch.no_grad():
        clean = tiny_model.encode(["a cat"])
        adv = torch.randn(1, 2, 16)
        attacked = encode_with_inserted(tiny_model.text_encoder, ids, adv)
    assert attacked.shape == clean.shape
    assert torch.allclose(attacked[:, 0], clean[:, 0], atol=1e-6)  # causal: the start token is unaffected
    assert not torch.allclose(attacked[:, 3], clean[:, 3])


def test_pgd_and_fast_at_lower_the_attack_objective(tiny_model):
    loss_of, ids = _attack_objective(tiny_model)
    start = token_embeddings(tiny_model.text_encoder, ids[:, 1:2]).detach()  # warm start from a real token
    with torch.no_grad():
        initial = loss_of(start).item()
    pgd = attack_embeddings(loss_of, start, "pgd", steps=20, lr=0.05)
    fast = attack_embeddings(loss_of, fast_at_start(start, 1e-3), "fast-at", steps=1, lr=1e-3)
    # the random start lies within lr / 1.25 of the start, and the step moves every coordinate by lr
    assert (fast - start).abs().max() <= 1e-3 * (1 + 1 / 1.25) + 1e-7
    # the random start is uniform on both sides (Wong et al.'s [-epsilon, epsilon]), not one-sided
    offsets = fast_at_start(torch.zeros(20_000), 1e-3)
    assert offsets.abs().max() <= 1e-3 / 1.25 and offsets.min() < -0.7e-3 and offsets.max() > 0.7e-3
    assert abs(float(offsets.mean())) < 3e-5
    # one PGD step is Adam's first: each coordinate moves by lr against the sign of its gradient
    adv = start.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(adv), adv)
    one, clear = attack_embeddings(loss_of, start, "pgd", steps=1, lr=0.05), grad.abs() > 1e-5
    torch.testing.assert_close(one[clear], (start - 0.05 * grad.sign())[clear], rtol=0, atol=1e-4)
    with torch.no_grad():
        assert loss_of(pgd).item() < initial
        assert loss_of(fast).item() < initial
    # the attack touches only the adversarial embeddings
    assert all(p.grad is None for p in tiny_model.text_encoder.parameters())
    assert all(p.grad is None for p in tiny_model.unet.parameters())


def test_erased_text_encoder_is_plug_and_play(tiny_pipeline_dir, tmp_path):
    """The saved text_encoder/ drops into another pipeline that shares the text-encoder architecture."""
    from diffusers import StableDiffusionPipeline

    from erasure.api import erase
    from pipelines import load_model

    from .conftest import tiny_components

    sets = ["steps=2", "warmup=0", "attack_steps=2", "ddim_steps=3", "retain_batch=2", "lr=1e-2"]
    run = erase("advunlearn", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=sets, progress=False)
    other = tiny_components(seed=5)  # other UNet and VAE weights, same text-encoder architecture
    other["text_encoder"] = tiny_components(seed=0)["text_encoder"]
    StableDiffusionPipeline(**other).save_pretrained(tmp_path / "other")
    second = load_model(str(tmp_path / "other"))
    before = second.generate(["a cat"], [0], steps=3)[0][0]
    second.load_component("text_encoder", run / "text_encoder")
    erased = load_model(str(run)).text_encoder.state_dict()
    assert all(torch.equal(v, erased[k]) for k, v in second.text_encoder.state_dict().items())
    after = second.generate(["a cat"], [0], steps=3)[0][0]
    assert before.tobytes() != after.tobytes()


def test_the_trajectory_bank_is_drawn_once_and_resumes_bit_identically(tiny_pipeline_dir, tmp_path, monkeypatch):
    import json

    from erasure.advunlearn import TrajectoryBank
    from erasure.api import erase
    from pipelines import load_model

    drawn, batches = [], TrajectoryBank.batches

    def recording(bank, step):  # the steps at which the bank is (re)drawn: each draw stacks new tensors
        before = bank.state.get("bank_x")
        out = batches(bank, step)
        if bank.state["bank_x"] is not before:
            drawn.append(step)
        return out

    monkeypatch.setattr(TrajectoryBank, "batches", recording)

    sets = ["steps=5", "warmup=1", "attack=fast-at", "ddim_steps=3", "retain_batch=2", "lr=1e-2", "batch_size=2",
            "bank_size=2", "bank_refresh=3"]  # fmt: skip
    kwargs = {"sets": sets, "seed": 4, "checkpoint_every": 2, "progress": False}
    whole = erase("advunlearn", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "whole", **kwargs)
    manifest = json.loads((whole / "erasure.json").read_text())["advunlearn"]
    seconds = manifest["seconds"]
    assert "bank" in seconds and "trajectories" not in seconds and "attack" in seconds
    assert drawn == [0, 3]  # first, then every bank_refresh=3 iterations (not one early or late)
    # on the CPU the two terms' UNet passes stay two calls by default: earlier versions' rounding, bit for bit
    assert manifest["shared_forward"] is False and "retain forward" in seconds
    monkeypatch.undo()

    def stop_at_3(step, total, logs):  # resumes from the checkpoint of step 2, before the bank's refresh
        if step == 3:
            raise KeyboardInterrupt

    with stops_resumably():
        erase("advunlearn", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "resumed", after_step=stop_at_3, **kwargs)
    resumed = erase("advunlearn", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "resumed", resume=True, **kwargs)
    a = load_model(str(whole)).text_encoder.state_dict()
    b = load_model(str(resumed)).text_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_drawing_the_bank_shows_its_own_progress(tiny_pipeline_dir, tmp_path, capsys):
    """Minutes at SD size before the first step: a bar of its own, so that the run does not look hung at 0."""
    from erasure.api import erase

    sets = ["steps=1", "warmup=0", "attack=fast-at", "ddim_steps=2", "retain_batch=2", "batch_size=2", "bank_size=3"]
    erase("advunlearn", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", sets=sets, progress=True)
    err = capsys.readouterr().err
    assert "advunlearn: drawing the bank's trajectories:   0%" in err and "0/6" in err, err[-2000:]
    assert err.index("drawing the bank") < err.index("advunlearn: 100%")  # before the first step's end


def test_a_bank_drawn_side_by_side_is_the_bank_drawn_one_entry_at_a_time(tiny_pipeline_dir, tmp_path):
    """bank_batch draws the same random numbers in the same order: only the UNet calls' batches change, and the
    losses of the second step (on bank entries, after an update) agree to rounding."""
    import json

    from erasure.api import erase

    sets = ["steps=2", "warmup=0", "attack=fast-at", "ddim_steps=4", "retain_batch=2", "batch_size=2", "bank_size=3"]
    logs = {}
    for per_call in (1, 2):
        run = erase("advunlearn", ["a cat", "a red car"], str(tiny_pipeline_dir), out=tmp_path / f"b{per_call}", seed=1,
                    sets=[*sets, f"bank_batch={per_call}"], progress=False)  # fmt: skip
        manifest = json.loads((run / "erasure.json").read_text())
        assert manifest["advunlearn"]["bank_entries_per_call"] == per_call
        logs[per_call] = manifest["final_logs"]
    assert set(logs[1]) >= {"unlearn", "retain"}
    # The retain term is ~1e-8 after one update, and Adam's first step is the sign of each gradient: rounding
    # in near-zero gradients moves it by up to ~1e-4 of itself.
    for key, rtol in (("unlearn", 1e-5), ("retain", 1e-2)):
        assert logs[1][key] > 0 and abs(logs[2][key] - logs[1][key]) <= rtol * logs[1][key], (key, logs)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_one_unet_call_for_both_terms_gives_the_two_calls_losses(family, tiny_pipeline_dir, tmp_path):
    """shared_forward (a GPU's default) runs the unlearning and retain terms' UNet passes as one batch: the
    losses of the second step (after an update through both terms) are the two calls' to rounding. SDXL's
    packed conditioning rows concatenate too."""
    import json

    from erasure.api import erase

    model = str(tiny_pipeline_dir)
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        from .conftest import tiny_sdxl_components

        model = str(tmp_path / "sdxl")
        StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(model)
    sets = ["steps=2", "warmup=1", "attack=fast-at", "ddim_steps=3", "retain_batch=2", "batch_size=2", "bank_size=2"]
    logs = {}
    for shared in ("false", "true"):
        run = erase("advunlearn", ["a cat"], model, out=tmp_path / shared, seed=2, progress=False,
                    sets=[*sets, f"shared_forward={shared}"])  # fmt: skip
        manifest = json.loads((run / "erasure.json").read_text())
        assert manifest["advunlearn"]["shared_forward"] is (shared == "true")
        assert ("retain forward" in manifest["advunlearn"]["seconds"]) is (shared == "false")
        logs[shared] = manifest["final_logs"]
    for key, rtol in (("unlearn", 1e-5), ("retain", 1e-2)):  # the retain term: as in the bank's test above
        assert logs["false"][key] > 0 and abs(logs["true"][key] - logs["false"][key]) <= rtol * logs["false"][key], (
            key, logs)  # fmt: skip


@pytest.mark.parametrize("samples", ["redrawn", "iteration"])
@pytest.mark.parametrize("attack", ["pgd", "fast-at"])
def test_each_attack_step_fits_a_batch_of_its_own_or_the_iterations(attack, samples, tiny_pipeline_dir):
    """redrawn (the paper's): every attack step draws x_t and t of its own, so the words found attack the prompt,
    not one (x_t, t); iteration: every step fits the batch the unlearning step then uses."""
    from pipelines import load_model

    model = load_model(str(tiny_pipeline_dir))
    sets = ["steps=1", "warmup=0", f"attack={attack}", f"attack_samples={samples}", "attack_steps=3", "ddim_steps=3",
            "retain_batch=2", "batch_size=1", "bank_size=32", "shared_forward=false"]  # fmt: skip
    inputs = []
    with torch.no_grad():
        clean = model.encode(["a cat"])
    model.unet.register_forward_pre_hook(lambda module, args: inputs.append((args[0].clone(), args[2].detach())))
    _advunlearn(model, sets)
    attack_steps = 3 if attack == "pgd" else 1
    *attacked, unlearned, retained = inputs[-(attack_steps + 2) :]
    distinct = len({tuple(x.flatten().tolist()) for x, _ in [*attacked, unlearned]})
    assert distinct == (attack_steps + 1 if samples == "redrawn" else 1)
    # from the first iteration after warmup (0 here) the unlearning step trains on the adversarial prompt
    assert not torch.equal(unlearned[1], clean)
    assert len(retained[0]) == 2  # retain_batch of the many retain prompts


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_compiled_unet_trains_the_encoder_the_eager_unet_trains(family, tiny_pipeline_dir, tmp_path):
    """compile_unet traces the UNet's calls in the step (the attack's and the two terms') as one graph each
    (fullgraph: a graph break fails the run); aot_eager runs the traced operators, so the encoder trained
    through it is the eager run's to rounding. SDXL's added conditioning traces too."""
    import json

    from torch._dynamo.utils import counters

    from erasure.api import erase
    from pipelines import load_model

    model = str(tiny_pipeline_dir)
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        from .conftest import tiny_sdxl_components

        model = str(tmp_path / "sdxl")
        StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(model)
    sets = ["steps=3", "warmup=1", "attack=pgd", "attack_steps=2", "ddim_steps=3", "retain_batch=2", "batch_size=2",
            "bank_size=2", "shared_forward=true", "lr=1e-2"]  # fmt: skip
    runs, graphs = {}, {}
    for backend in ("none", "aot_eager"):
        traced = counters["stats"]["unique_graphs"]
        runs[backend] = erase("advunlearn", ["a cat"], model, out=tmp_path / backend, seed=3, progress=False,
                              sets=[*sets, f"compile_unet={backend}"])  # fmt: skip
        graphs[backend] = counters["stats"]["unique_graphs"] - traced
        manifest = json.loads((runs[backend] / "erasure.json").read_text())
        assert manifest["advunlearn"]["compile_unet"] == {"choice": backend}
    assert graphs == {"none": 0, "aot_eager": 2}  # the attack's shape and the two terms' (one step's rows)
    before, eager, compiled = (load_model(source).text_encoder.state_dict() for source in (model, *runs.values()))
    moved = max((eager[k] - before[k]).abs().max().item() for k in eager)
    gap = max((compiled[k] - eager[k]).abs().max().item() for k in eager)
    assert moved > 1e-3 and gap <= 1e-4 * moved, (moved, gap)


def test_compiled_denoisers_of_runs_in_one_process_leave_no_cache_behind(tiny_model):
    """Every run's denoiser shares one code object: without `close`, a process that erases again and again (the
    preview, a benchmark) fills its cache up to the recompile limit, an error under fullgraph. A UNet given
    xformers' attention by the loader is traced on SDPA, and has its own attention back after the run."""
    import copy

    import torch._dynamo
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    from erasure.compiled import StepDenoiser

    family, cpu = tiny_model.family, torch.device("cpu")
    unet = copy.deepcopy(tiny_model.unet).requires_grad_(False)
    unet.set_attn_processor(XFormersAttnProcessor())
    cond = tiny_model.encode(["a cat"])
    _, *latent = family.latent_shape(tiny_model, 1)
    with torch._dynamo.config.patch(recompile_limit=2, cache_size_limit=2):
        for rows in (1, 2, 3):  # a new shape each time: without `close` the third fails
            denoise = StepDenoiser(family, unet, "aot_eager", cpu)
            out = denoise(torch.randn(rows, *latent), torch.full((rows,), 500), cond.expand(rows, -1, -1))
            assert out.shape == (rows, *latent)
            assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
            denoise.close()
            assert all(isinstance(p, XFormersAttnProcessor) for p in unet.attn_processors.values())


def test_cuda_graphs_are_refused_off_a_cuda_device(tiny_pipeline_dir, tmp_path):
    from erasure.api import erase
    from pipelines import InputError

    for choice in ("cudagraphs", "reduce-overhead"):
        with pytest.raises(InputError, match=f"compile_unet={choice} needs a CUDA device"):
            erase("advunlearn", ["a cat"], str(tiny_pipeline_dir), out=tmp_path / "run", progress=False,
                  sets=["steps=1", f"compile_unet={choice}"])  # fmt: skip
        assert not (tmp_path / "run").exists()


def test_a_run_records_the_cuda_graph_skips_of_its_own_compiling(tiny_model):
    # erasure.json counts the graphs that fell back to launching kernels one by one since this run began, not those of
    # runs before it in the process (the preview, a benchmark). Only the device's type is read: nothing compiles here.
    from torch._dynamo.utils import counters

    from erasure.compiled import StepDenoiser

    counters["inductor"]["cudagraph_skips"] += 3  # an earlier run's
    try:
        denoise = StepDenoiser(tiny_model.family, tiny_model.unet, "cudagraphs", torch.device("cuda"))
        counters["inductor"]["cudagraph_skips"] += 1
        assert denoise.record() == {"choice": "cudagraphs", "cudagraph_skips": 1}
        denoise.close()
    finally:
        counters["inductor"]["cudagraph_skips"] -= 4


def test_a_bank_drawn_on_a_gpu_puts_16_sd1_images_in_each_unet_call(tiny_model):
    from erasure.advunlearn import AdvUnlearnConfig, bank_entries_per_call

    family, cpu, gpu = tiny_model.family, torch.device("cpu"), torch.device("cuda")  # only the device's type is read
    _, _, height, width = family.latent_shape(tiny_model, 1)
    config = AdvUnlearnConfig(batch_size=8, retain_batch=5, bank_size=32)
    assert bank_entries_per_call(config, family, tiny_model, cpu) == 1  # the CPU's digests stay as they were
    assert bank_entries_per_call(config, family, tiny_model, gpu) == 16 * 64 * 64 // (8 * height * width)
    # the retain batches share those calls too: the larger of the two batches sets the size
    more_retain = AdvUnlearnConfig(batch_size=2, retain_batch=5, bank_size=32)
    assert bank_entries_per_call(more_retain, family, tiny_model, gpu) == 16 * 64 * 64 // (5 * height * width)
    chosen = AdvUnlearnConfig(batch_size=8, bank_size=32, bank_batch=3)
    assert [bank_entries_per_call(chosen, family, tiny_model, d) for d in (cpu, gpu)] == [3, 3]


def test_bank_settings_are_checked_before_loading():
    import pytest

    from erasure.config import build_config, parse_sets
    from pipelines import InputError

    for bad, message in (("bank_size=-1", "bank_size must be >= 0, not -1"), ("bank_refresh=-2", "bank_refresh"),
                         ("bank_batch=-1", "bank_batch must be >= 0, not -1"),
                         ("bank_size=0 bank_batch=4", r"bank_batch need bank_size > 0"),
                         ("bank_size=0 bank_refresh=3", r"bank_refresh and bank_batch need bank_size > 0"),
                         ("shared_forward=maybe", "shared_forward: 'maybe' is not a boolean"),
                         ("compile_unet=fast", "bad value for compile_unet: 'fast'; choose one of: none, cudagraphs")):
        with pytest.raises(InputError, match=message):
            build_config("advunlearn", "digits", parse_sets(bad.split()))


def test_a_section_inside_another_counts_in_both():
    import time

    # the paper's attack (attack_samples=redrawn, no bank) draws its trajectories inside the attack's section
    timer = SectionTimer()
    with timer("attack"):
        with timer("trajectories"):
            sum(range(10000))
    assert set(timer.seconds) == {"attack", "trajectories"}
    assert timer.seconds["attack"] >= timer.seconds["trajectories"] > 0
    # a section entered again adds its time to what it had (the attack runs once per iteration)
    timer = SectionTimer()
    with timer("attack"):
        time.sleep(0.05)
    with timer("attack"):
        pass
    assert timer.seconds["attack"] >= 0.05


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_the_retain_term_counts_by_its_weight(weight, tiny_pipeline_dir, monkeypatch):
    """The retain prompts enter the loss only through `retain_weight`: at 0 two runs on other retain prompts (drawn
    alike: the lists are the same length) train the same encoder, at 0.3 they do not."""
    from pipelines import load_model

    sets = ["steps=2", "warmup=1", "ddim_steps=3", "batch_size=2", "retain_batch=2", "bank_size=2", "lr=1e-2",
            f"retain_weight={weight}"]  # fmt: skip
    encoders = []
    for retain in (["a dog", "a red car"], ["a blue house", "a tree"]):
        model = load_model(str(tiny_pipeline_dir))
        monkeypatch.setattr(model.family, "retain_prompts", lambda concepts, rng, retain=retain: list(retain))
        encoders.append(_advunlearn(model, sets).text_encoder.state_dict())
    same = all(torch.equal(encoders[0][k], encoders[1][k]) for k in encoders[0])
    assert same == (weight == 0)


@pytest.mark.parametrize("init", ["latest", "random"])
def test_each_attack_starts_where_the_previous_one_ended_unless_asked_random(init, tiny_model, monkeypatch):
    """attack_init=latest warm-starts every iteration's PGD from the adversary the previous one found (what let the
    digits preset's one attack step per iteration hold); random starts each from fresh tokens."""
    import erasure.advunlearn

    calls = []

    def recording(loss_of, adv, mode, steps, lr):
        found = attack_embeddings(loss_of, adv, mode, steps, lr)
        calls.append((adv.detach().clone(), found.detach().clone()))
        return found

    monkeypatch.setattr(erasure.advunlearn, "attack_embeddings", recording)
    _advunlearn(tiny_model, ["steps=4", "warmup=1", "attack=pgd", "attack_steps=2", f"attack_init={init}",
                             "ddim_steps=3", "batch_size=2", "retain_batch=2", "bank_size=2", "lr=1e-2"])  # fmt: skip
    assert len(calls) == 3
    for (_, previous), (start, _) in zip(calls, calls[1:]):
        assert torch.equal(start, previous) == (init == "latest")
    starts = [start for start, _ in calls]
    assert all(not torch.equal(a, b) for i, a in enumerate(starts) for b in starts[i + 1 :])
    assert all(len(start) == 2 for start in starts)  # attack_batch=per-sample (the default): one per x_t sample


def test_the_retain_term_is_zero_while_the_encoder_is_the_original(tiny_model):
    """Each retain x_t and target is paired with the prompt it was drawn for: at the first step the encoder is still
    the original, so eps(x_r, t_r, E(r)) is the frozen model's own prediction there and the term is 0. Retain rows
    paired with other prompts (the list's first ones) leave it > 0."""
    from erasure.config import build_config
    from erasure.registry import METHODS
    from erasure.training import RunContext

    settings = {"steps": 1, "warmup": 1, "ddim_steps": 3, "batch_size": 2, "retain_batch": 2, "bank_size": 0}
    config = build_config("advunlearn", tiny_model.family, settings)
    logs = METHODS["advunlearn"].entry(tiny_model, ["a cat"], config, RunContext(seed=0, progress=False)).logs
    assert logs["unlearn"] > 0 and logs["retain"] < 1e-12


def test_the_paper_s_attack_fits_each_drawn_x_t_with_its_own_prompt_to_the_concept(tiny_model, monkeypatch):
    """attack_samples=redrawn: each attack step draws a bank entry and fits [adv; the entry's prompt] to the original
    model's prediction of that prompt there, eps*(x_t, t, c): not the iteration's prompt, nor eps*(x_t, t, "")."""
    import copy

    import erasure.advunlearn
    from erasure.advunlearn import TrajectoryBank
    from erasure.config import build_config
    from erasure.registry import METHODS
    from erasure.training import RunContext

    concepts, entries, matched = ["a cat", "a red car"], [], []
    encoder_base = copy.deepcopy(tiny_model.text_encoder)
    draw = TrajectoryBank.draw_concepts

    def recording_draw(bank, count, rows):
        drawn = draw(bank, count, rows)
        entries.extend(drawn)
        return drawn

    def checking_attack(loss_of, adv, mode, steps, lr):
        with torch.no_grad():
            found = loss_of(adv)
            references = []
            for index, x_t, t, *_ in entries:  # the bank: (prompt index, x_t, t, ...); the prompts are the concepts
                ids = tiny_model.tokenize([concepts[int(index)]])
                eps = tiny_model.unet(x_t, t, encode_with_inserted(tiny_model.text_encoder, ids, adv)).sample
                target = tiny_model.unet(x_t, t, tiny_model.encode([concepts[int(index)]], encoder_base)).sample
                references.append(F.mse_loss(eps, target))
        matched.append(any(torch.allclose(found, r, rtol=1e-5, atol=0) for r in references))
        return attack_embeddings(loss_of, adv, mode, steps, lr)

    monkeypatch.setattr(TrajectoryBank, "draw_concepts", recording_draw)
    monkeypatch.setattr(erasure.advunlearn, "attack_embeddings", checking_attack)
    settings = {"steps": 4, "warmup": 0, "attack": "fast-at", "attack_samples": "redrawn", "ddim_steps": 3,
                "batch_size": 1, "retain_batch": 2, "bank_size": 4, "lr": 1e-2}  # fmt: skip
    config = build_config("advunlearn", tiny_model.family, settings)
    METHODS["advunlearn"].entry(tiny_model, concepts, config, RunContext(seed=0, progress=False))
    assert len({int(index) for index, *_ in entries}) == 2 and matched == [True] * 4
