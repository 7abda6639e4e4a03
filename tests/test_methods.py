"""The matrix every method must pass: a few steps at a large learning rate on tiny real components
change the parameters in scope, leave everything else bit-identical, and save/load round-trip."""

import numpy as np
import pytest
import torch
from PIL import Image

from erasure.config import build_config, parse_sets
from erasure.registry import METHODS
from erasure.training import RunContext
from pipelines import load_model

# method key, --set options, the component it trains, a predicate for the parameters in scope
CASES = [
    ("esd", ["iterations=2", "ddim_steps=3", "lr=1e-2"], "unet", lambda n: ".attn2." in n),
    ("esd", ["iterations=2", "ddim_steps=3", "lr=1e-2", "scope=noxattn"], "unet",
     lambda n: ".attn2." not in n and not n.startswith(("time_embedding", "conv_out", "conv_norm_out"))),
    ("esd", ["iterations=2", "ddim_steps=3", "lr=1e-2", "component=text_encoder", "scope=attn"], "text_encoder",
     lambda n: ".self_attn." in n),
    ("advunlearn", ["iterations=2", "warmup=1", "attack_steps=2", "ddim_steps=3", "retain_batch=2", "lr=1e-2",
                    "batch_size=2"], "text_encoder", lambda n: "encoder.layers." in n or "final_layer_norm" in n),
    ("advunlearn", ["iterations=2", "warmup=0", "attack=fast-at", "ddim_steps=3", "retain_batch=2", "lr=1e-2",
                    "scope=layers=1..1", "batch_size=2", "attack_batch=shared"], "text_encoder",
     lambda n: "encoder.layers.1." in n),
    # the paper's scope: every MLP and the last block's attention ({images}: a folder the test writes)
    ("fewshot", ["images={images}", "epochs=2", "lr=1e-2", "stop_below=none"], "text_encoder",
     lambda n: ".mlp." in n or "encoder.layers.1.self_attn." in n),
    ("fewshot", ["images={images}", "epochs=2", "lr=1e-2", "stop_below=none", "retain_weight=0.3", "retain_batch=2"],
     "text_encoder", lambda n: ".mlp." in n or "encoder.layers.1.self_attn." in n),  # the retain term, same scope
    # the one-step generator: a new UNet, every weight of it trained; the teacher's folder is the base
    ("sfd", ["iterations=2", "batch_size=2", "forget_batch=1", "generator_lr=1e-2", "fake_lr=1e-2",
             "remain_prompts=8", "override=a dog"], "unet", lambda n: True),
]  # fmt: skip


def _states(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()}
            for name in ("unet", "text_encoder", "vae")}  # fmt: skip


@pytest.mark.parametrize("key, sets, component, in_scope", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_method_changes_exactly_its_scope_and_round_trips(key, sets, component, in_scope, tiny_pipeline_dir, tmp_path):
    config_cls, entry = METHODS[key].load()
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * i, dtype=np.uint8)).save(images / f"{i}.png")
    config = build_config(config_cls, "sd", parse_sets([s.format(images=images) for s in sets]))
    model = load_model(str(tiny_pipeline_dir))
    before = _states(model)
    result = entry(model, ["a cat"], config, RunContext(seed=0, progress=False))
    after = _states(result.model)
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

    result.model.save(tmp_path / "run")
    reloaded = _states(load_model(str(tmp_path / "run")))
    for name in after:
        assert all(torch.equal(after[name][k], reloaded[name][k]) for k in after[name])


# GAN methods: key, --set options ({negatives}/{positives}: image folders the test writes), model
# (None: a tiny StyleGAN2 checkpoint), concept. Text-to-Unlearn needs a CLIP that sees the concept
# in some samples and not in others, which a random one does not: it runs on digits-gan.
GAN_CASES = [
    ("adapt-unlearn", ["adapt_steps=2", "unlearn_steps=2", "batch_size=2", "fisher_samples=2", "negatives={negatives}",
                       "positives={positives}"], None, "a red square"),
    ("text2unlearn", ["steps=2", "pool=200", "batch_size=4", "lr=0.01"], "digits-gan", "seven"),
]  # fmt: skip


@pytest.mark.parametrize("key, sets, model_name, concept", GAN_CASES, ids=[c[0] for c in GAN_CASES])
def test_gan_method_changes_the_generator_and_round_trips(key, sets, model_name, concept, tiny_gan_checkpoint,
                                                          tmp_path):  # fmt: skip
    config_cls, entry = METHODS[key].load()
    folders = {}
    for name, value in (("negatives", 200), ("positives", 30)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), value + i, dtype=np.uint8)).save(folders[name] / f"{i}.png")
    model = load_model(model_name or str(tiny_gan_checkpoint))
    config = build_config(config_cls, model.family, parse_sets([s.format(**folders) for s in sets]))
    before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    result = entry(model, [concept], config, RunContext(seed=0, progress=False))
    assert "generator" in result.changed
    after = result.model.generator.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    weights = {k for k, v in before.items() if k.endswith("weight") and not k.startswith("noises.")}
    assert weights & moved, "no generator weight moved"

    result.model.save(tmp_path / "run")
    reloaded = load_model(str(tmp_path / "run"))
    assert all(torch.equal(after[k], v) for k, v in reloaded.generator.state_dict().items())
    with torch.no_grad():
        assert torch.equal(result.model.images(result.model.latents([0, 1])), reloaded.images(reloaded.latents([0, 1])))


def test_every_method_has_a_case_in_the_matrix():
    covered = {key for key, *_ in CASES} | {key for key, *_ in GAN_CASES}
    assert covered == set(METHODS)


def test_every_method_is_listed_with_a_paper():
    from erasure.cli import main

    assert set(METHODS) == {"esd", "advunlearn", "fewshot", "sfd", "text2unlearn", "adapt-unlearn"}
    for method in METHODS.values():
        assert method.paper.url.startswith("https://arxiv.org/") and method.paper.bibtex.startswith("@")
    assert main(["methods"]) == 0
