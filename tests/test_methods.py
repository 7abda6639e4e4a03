"""The matrix every method must pass: a few steps at a large learning rate on tiny real components
change the parameters in scope, leave everything else bit-identical, and save/load round-trip."""

import pytest
import torch

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
]  # fmt: skip


def _states(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()}
            for name in ("unet", "text_encoder", "vae")}  # fmt: skip


@pytest.mark.parametrize("key, sets, component, in_scope", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_method_changes_exactly_its_scope_and_round_trips(key, sets, component, in_scope, tiny_pipeline_dir, tmp_path):
    config_cls, entry = METHODS[key].load()
    config = build_config(config_cls, "sd", parse_sets(sets))
    model = load_model(str(tiny_pipeline_dir))
    before = _states(model)
    result = entry(model, ["a cat"], config, RunContext(seed=0, progress=False))
    after = _states(result.model)
    assert result.changed == [component]

    trainable = {n for n, p in getattr(model, component).named_parameters() if p.requires_grad}
    assert trainable and all(in_scope(n) for n in trainable)
    assert result.trainable_parameters == sum(p.numel() for n, p in getattr(model, component).named_parameters()
                                              if n in trainable)  # fmt: skip
    for name, state in before.items():
        for k, v in state.items():
            changed = not torch.equal(v, after[name][k])
            if name == component and k in trainable:
                continue
            assert not changed, f"{name}.{k} is out of scope but changed"
    assert any(not torch.equal(before[component][k], after[component][k]) for k in trainable), "nothing trained"

    result.model.save(tmp_path / "run")
    reloaded = _states(load_model(str(tmp_path / "run")))
    for name in after:
        assert all(torch.equal(after[name][k], reloaded[name][k]) for k in after[name])


def test_every_method_is_listed_with_a_paper():
    from erasure.cli import main

    assert set(METHODS) == {"esd", "advunlearn", "fewshot", "sfd", "text2unlearn", "adapt-unlearn"}
    for method in METHODS.values():
        assert method.paper.url.startswith("https://arxiv.org/") and method.paper.bibtex.startswith("@")
    assert main(["methods"]) == 0
