"""The matrix every registered method passes, driven by the registry: a method's own TEST_SETTINGS (a few
steps, small batches) over its family's preset, on the embedded model of its kind, erasing "seven". It
changes only the components it says, trains no more than it counts, and its run saves and reloads bit
for bit; killed after a checkpoint, it resumes to the uninterrupted result (the 2-process matrix is in
test_distributed.py). A new method is in these tests by its registry line alone.

The scope rules themselves (which parameters each scope trains) are checked exactly on tiny Stable
Diffusion components, and Adapt-then-Unlearn on a tiny StyleGAN2 of another family."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erasure.api import erase
from erasure.config import build_config, parse_sets
from erasure.registry import METHODS, default_model
from erasure.training import RunContext
from pipelines import load_model

CONCEPT = "seven"
SCRIPT = Path(__file__).with_name("erase_run.py")


def components(model) -> list[str]:
    return ["generator", "discriminator"] if model.kind == "gan" else ["unet", "text_encoder", "vae"]


def states(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in getattr(model, name).state_dict().items()}
            for name in components(model) if getattr(model, name) is not None}  # fmt: skip


def changed_weights(run: Path) -> dict[str, torch.Tensor]:
    import json

    model = load_model(str(run))
    changed = json.loads((run / "erasure.json").read_text())["changed_components"]
    return {f"{c}.{k}": v for c in changed for k, v in getattr(model, c).state_dict().items()}


@pytest.mark.parametrize("key", list(METHODS))
def test_method_changes_only_what_it_says_and_round_trips(key, tmp_path):
    model = load_model(default_model(key))
    before = states(model)
    config = build_config(key, model.family, METHODS[key].test_settings)
    result = METHODS[key].entry(model, [CONCEPT], config, RunContext(seed=0, progress=False))
    after = states(result.model)

    assert result.changed and set(result.changed) <= set(before), result.changed
    moved = {(c, k) for c in before for k, v in before[c].items() if not torch.equal(v, after[c][k])}
    assert {c for c, _ in moved} <= set(result.changed), sorted(moved)[:5]
    for component in result.changed:  # each changed component did change: a weight matrix moved
        assert any(before[component][k].dim() >= 2 for c, k in moved if c == component), component
    # What moved is within what the method counts as trained.
    assert 0 < sum(before[c][k].numel() for c, k in moved) <= result.trainable_parameters

    result.model.save(tmp_path / "run")
    reloaded = states(load_model(str(tmp_path / "run")))
    for component in result.changed:
        assert all(torch.equal(after[component][k], reloaded[component][k]) for k in after[component]), component


@pytest.mark.slow
@pytest.mark.parametrize("key", list(METHODS))
def test_method_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(key, tmp_path):
    settings = [f"{k}={v}" for k, v in METHODS[key].test_settings.items()]
    model = default_model(key)
    straight = erase(key, [CONCEPT], model, out=tmp_path / "straight", sets=settings, checkpoint_every=1,
                     progress=False)  # fmt: skip
    command = [sys.executable, str(SCRIPT), key, model, CONCEPT, str(tmp_path / "killed"), "--kill-after", "2",
               *settings]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent)}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed").exists() and (tmp_path / ".killed.work").is_dir()
    resumed = erase(key, [CONCEPT], model, out=tmp_path / "killed", sets=settings, checkpoint_every=1, resume=True,
                    progress=False)  # fmt: skip
    a, b = changed_weights(straight), changed_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_sigterm_checkpoints_the_step_it_arrives_at_and_the_resumed_run_ends_as_the_uninterrupted_one(tmp_path):
    """A scheduler preempting the job sends SIGTERM: the run saves the step it is at, not only its last periodic
    checkpoint (here none: every 1000 steps), and `--resume` continues from there."""
    settings = [f"{k}={v}" for k, v in METHODS["esd"].test_settings.items()]
    model = default_model("esd")
    straight = erase("esd", [CONCEPT], model, out=tmp_path / "straight", sets=settings, progress=False)
    command = [sys.executable, str(SCRIPT), "esd", model, CONCEPT, str(tmp_path / "stopped"), "--term-after", "2",
               "--checkpoint-every", "1000", *settings]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent)}
    stopped = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 1 and "SIGTERM: stopped at a checkpoint of step 2/" in stopped.stderr, stopped.stderr
    assert "SIGTERM received: the run stops at the end of its current step" in stopped.stderr  # said when it arrives
    checkpoint = torch.load(tmp_path / ".stopped.work" / "checkpoint" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 2 and not (tmp_path / "stopped").exists()
    resumed = erase("esd", [CONCEPT], model, out=tmp_path / "stopped", sets=settings, resume=True, progress=False)
    a, b = changed_weights(straight), changed_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the scope rules, exactly, on tiny Stable Diffusion components (the sd1 family) ---------------------

# method key, --set options, the component it trains, a predicate for the parameters in scope
SCOPES = [
    ("esd", ["steps=2", "ddim_steps=3", "lr=1e-2"], "unet", lambda n: ".attn2." in n),
    ("esd", ["steps=2", "ddim_steps=3", "lr=1e-2", "scope=noxattn"], "unet",
     lambda n: ".attn2." not in n and not n.startswith(("time_embedding", "conv_out", "conv_norm_out"))),
    ("esd", ["steps=2", "ddim_steps=3", "lr=1e-2", "component=text_encoder", "scope=attn"], "text_encoder",
     lambda n: ".self_attn." in n),
    ("advunlearn", ["steps=2", "warmup=1", "attack_steps=2", "ddim_steps=3", "retain_batch=2", "lr=1e-2",
                    "batch_size=2"], "text_encoder", lambda n: "encoder.layers." in n or "final_layer_norm" in n),
    ("advunlearn", ["steps=2", "warmup=0", "attack=fast-at", "ddim_steps=3", "retain_batch=2", "lr=1e-2",
                    "scope=layers=1..1", "batch_size=2", "attack_batch=shared"], "text_encoder",
     lambda n: "encoder.layers.1." in n),
    # the paper's scope: every MLP and the last block's attention ({images}: a folder the test writes)
    ("fewshot", ["images={images}", "steps=2", "lr=1e-2", "stop_below=none"], "text_encoder",
     lambda n: ".mlp." in n or "encoder.layers.1.self_attn." in n),
    ("fewshot", ["images={images}", "steps=2", "lr=1e-2", "stop_below=none", "retain_weight=0.3", "retain_batch=2"],
     "text_encoder", lambda n: ".mlp." in n or "encoder.layers.1.self_attn." in n),  # the retain term, same scope
    # the one-step generator: a new UNet, every weight of it trained; the teacher's folder is the base
    ("sfd", ["steps=2", "batch_size=2", "forget_batch=1", "lr=1e-2", "fake_lr=1e-2", "remain_prompts=8",
             "override=a dog"], "unet", lambda n: True),
]  # fmt: skip


def _tiny_states(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()}
            for name in ("unet", "text_encoder", "vae")}  # fmt: skip


@pytest.mark.parametrize("key, sets, component, in_scope", SCOPES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SCOPES)])
def test_each_scope_trains_exactly_its_parameters(key, sets, component, in_scope, tiny_pipeline_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * i, dtype=np.uint8)).save(images / f"{i}.png")
    model = load_model(str(tiny_pipeline_dir))
    assert model.family.name == "sd1"
    config = build_config(key, model.family, parse_sets([s.format(images=images) for s in sets]))
    before = _tiny_states(model)
    result = METHODS[key].entry(model, ["a cat"], config, RunContext(seed=0, progress=False))
    after = _tiny_states(result.model)
    assert result.changed == [component]

    # The scope comes from the case's own predicate, not from what the method left trainable.
    scope = {n for n, _ in getattr(model, component).named_parameters() if in_scope(n)}
    assert result.trainable_parameters == sum(p.numel() for n, p in getattr(model, component).named_parameters()
                                              if n in scope)  # fmt: skip
    changed = {
        (name, k) for name, state in before.items() for k, v in state.items() if not torch.equal(v, after[name][k])
    }
    outside = sorted(f"{name}.{k}" for name, k in changed if name != component or k not in scope)
    assert not outside, f"out of scope but changed: {outside[:5]}"
    # At a large learning rate every weight matrix in scope moves (a LayerNorm's may not: the method's
    # gradient can miss it for a step or two).
    matrices = {k for k in scope if before[component][k].dim() >= 2}
    assert matrices and matrices <= {k for name, k in changed}, sorted(matrices - {k for _, k in changed})[:5]


def test_adapt_unlearn_on_a_stylegan2_of_another_family_from_image_folders(tiny_gan_checkpoint, tmp_path):
    folders = {}
    for name, value in (("negatives", 200), ("positives", 30)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), value + i, dtype=np.uint8)).save(folders[name] / f"{i}.png")
    model = load_model(str(tiny_gan_checkpoint))
    assert model.family.name == "stylegan2"
    sets = ["adapt_steps=2", "steps=2", "batch_size=2", "fisher_samples=2", f"negatives={folders['negatives']}",
            f"positives={folders['positives']}"]  # fmt: skip
    config = build_config("adapt-unlearn", model.family, parse_sets(sets))
    before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    result = METHODS["adapt-unlearn"].entry(model, ["a red square"], config, RunContext(seed=0, progress=False))
    after = result.model.generator.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    weights = {k for k, v in before.items() if k.endswith("weight") and not k.startswith("noises.")}
    assert weights & moved, "no generator weight moved"

    result.model.save(tmp_path / "run")
    reloaded = load_model(str(tmp_path / "run"))
    assert all(torch.equal(after[k], v) for k, v in reloaded.generator.state_dict().items())
    with torch.no_grad():
        assert torch.equal(result.model.images(result.model.latents([0, 1])), reloaded.images(reloaded.latents([0, 1])))


def test_every_method_is_listed_with_a_paper_and_its_test_settings_build():
    from pipelines.families import FAMILIES
    from ui.cli import main

    assert set(METHODS) >= {"esd", "advunlearn", "fewshot", "sfd", "text2unlearn", "adapt-unlearn"}
    for key, method in METHODS.items():
        assert method.paper.url.startswith("https://arxiv.org/") and method.paper.bibtex.startswith("@")
        _check_authors(method.paper)
        for family in FAMILIES.values():  # every family's preset is made of the method's own options
            build_config(key, family, method.test_settings)
    assert main(["methods"]) == 0


def _check_authors(paper) -> None:
    """The short author line (cards, `erasure methods`) is the BibTeX's surnames, in order (or its first ones, then
    et al.)."""
    authors = re.search(r"author=\{(.*?)\},", paper.bibtex).group(1).split(" and ")
    surnames = [name.split(",")[0].strip() for name in authors if name != "others"]
    short = paper.authors.removesuffix(" et al.").removesuffix(", et al.").split(", ")
    assert short == surnames[: len(short)], paper.title
    assert len(short) == len(surnames) or paper.authors.endswith("et al."), paper.title


def test_each_method_is_registered_with_the_paper_its_module_follows():
    """The paper a card and `erasure methods` cite for a method is the one its module says it implements."""
    import importlib

    from erasure.registry import ERASE_ANYTHING, preset_paper
    from pipelines.families import FAMILIES

    for key, method in METHODS.items():
        module_doc = " ".join(importlib.import_module(method.module).__doc__.split())
        assert method.paper.title in module_doc, key
    # a family's preset that follows another paper names it; the others follow the method's own
    assert preset_paper(FAMILIES["flux"], "esd") is ERASE_ANYTHING
    assert preset_paper(FAMILIES["flux"], "fewshot") is None and preset_paper(FAMILIES["sd1"], "esd") is None
