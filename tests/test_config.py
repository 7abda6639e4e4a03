import dataclasses
import re

import pytest

from erasure.config import build_config, describe_fields, load_yaml, parse_sets
from erasure.registry import METHODS, get_method
from pipelines.errors import InputError


def test_yaml_then_set_override_the_family_preset(tmp_path):
    from pipelines.families import get_family

    yaml_file = tmp_path / "esd.yaml"
    yaml_file.write_text("lr: 3.0e-4\nsteps: 12\nprompt_templates: ['a {}', '{}']\n")
    config = build_config("esd", "digits", load_yaml(yaml_file), parse_sets(["steps=7", "scope=noxattn"]))
    assert config.lr == 3e-4  # from YAML
    assert config.steps == 7  # --set wins over YAML
    assert config.scope == "noxattn"
    assert config.prompt_templates == ["a {}", "{}"]
    assert config.ddim_steps == get_family("digits").presets["esd"]["ddim_steps"] == 25  # family preset
    assert build_config("esd", "sd1").ddim_steps == 50  # the paper's default elsewhere


def test_full_weights_over_a_lora_preset_drop_the_presets_adapter_settings():
    """FLUX's ESD preset is a LoRA (EraseAnything's rank, alpha and targets): `--set lora_rank=0` asks for full
    weights, and the preset's alpha and targets go with its rank; the user's own are still refused without one."""
    preset = build_config("esd", "flux")
    assert preset.lora_rank == 8 and preset.lora_alpha == 8 and preset.lora_targets
    full = build_config("esd", "flux", parse_sets(["lora_rank=0"]))
    assert full.lora_rank == 0 and full.lora_alpha is None and full.lora_targets == []
    assert full.lr == preset.lr and full.scope == preset.scope  # the rest of the preset stays
    with pytest.raises(InputError, match="need lora_rank > 0"):
        build_config("esd", "flux", parse_sets(["lora_rank=0", "lora_targets=to_q"]))


def test_a_presets_unet_scope_goes_when_the_user_trains_the_text_encoder():
    """The digits ESD preset is ESD-u (scope noxattn, a UNet scope) and FLUX's targets the transformer's layers:
    `--set component=text_encoder` takes the text encoder's default scope and targets; the rest of the preset stays,
    and so does a scope the user names or a component equal to the preset's."""
    digits = build_config("esd", "digits")
    encoder = build_config("esd", "digits", parse_sets(["component=text_encoder"]))
    assert (digits.scope, encoder.scope) == ("noxattn", "full")
    assert (encoder.steps, encoder.lr, encoder.ddim_steps) == (digits.steps, digits.lr, digits.ddim_steps)
    assert build_config("esd", "digits", parse_sets(["component=text_encoder", "scope=mlp"])).scope == "mlp"
    assert build_config("esd", "digits", parse_sets(["component=unet"])).scope == "noxattn"
    flux = build_config("esd", "flux", parse_sets(["component=text_encoder", "scope=text_encoder:full"]))
    assert flux.lora_rank == 8 and flux.lora_targets == [] and flux.scope == "text_encoder:full"


def test_a_lora_run_takes_the_familys_lora_preset_under_the_users_own_choices():
    """On digits, ESD's, SFD's and STEREO's adapters need larger learning rates than their full weights
    (benchmarks/RESULTS.md, "The digits LoRA preset"): `--set lora_rank=R` alone takes them, an explicit lr wins,
    full weights keep the preset's."""
    full = build_config("esd", "digits")
    assert full.lr == 1e-4
    assert build_config("esd", "digits", parse_sets(["lora_rank=8"])).lr == 1e-3
    assert build_config("esd", "digits", parse_sets(["lora_rank=4", "lr=2e-4"])).lr == 2e-4
    assert build_config("esd", "digits", {"lora_rank": 8}, parse_sets(["lora_rank=0"])).lr == 1e-4
    assert build_config("stereo", "digits", parse_sets(["lora_rank=8"])).lr == 5e-4
    sfd = build_config("sfd", "digits", parse_sets(["lora_rank=8", "fake_lr=1e-4"]))
    assert (sfd.lr, sfd.fake_lr) == (1e-4, 1e-4)
    assert build_config("advunlearn", "digits", parse_sets(["lora_rank=8"])).lr == build_config(
        "advunlearn", "digits").lr  # no LoRA preset: the preset as it is
    assert build_config("esd", "sd1", parse_sets(["lora_rank=8"])).lr == 1e-5  # none measured on SD 1.x


def test_every_config_shares_the_common_options_and_one_check():
    from erasure.config import MethodConfig

    shared = [f.name for f in dataclasses.fields(MethodConfig)]
    assert shared == ["steps", "lr", "batch_size", "adam_betas", "prompt_templates"]
    for method in METHODS.values():
        assert issubclass(method.config, MethodConfig)
        assert [f.name for f in dataclasses.fields(method.config)][: len(shared)] == shared, method.key


@pytest.mark.parametrize("old, new", [("iterations", "steps"), ("epochs", "steps"), ("generator_lr", "lr")])
def test_an_option_of_an_earlier_version_is_refused_with_its_new_name(old, new):
    method = {"iterations": "esd", "epochs": "fewshot", "generator_lr": "sfd"}[old]
    with pytest.raises(InputError, match=f"unknown option '{old}'.*{old} is now {new}"):
        build_config(method, "sd1", {old: 1})


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["learning_rate=1"], "unknown option 'learning_rate'.*valid options: steps, lr, .*component, scope"),
        (["steps=many"], "steps: 'many' is not an integer"),
        (["lr=fast"], "lr: 'fast' is not a number"),
        (["component=vae"], "choose one of: unet, text_encoder"),
        (["scope=everything"], "unknown UNet scope 'everything'"),
        (["steps=0"], "steps"),
        (["prompt_templates=no placeholder"], "must contain"),
        (["lr"], "--set expects key=value"),
        (["adam_betas=0.9"], "adam_betas must hold 2 values, not 1"),  # Adam would fail after the model loads
        (["prompt_templates="], "prompt_templates needs at least one template"),  # nothing to train on
    ],
)
def test_bad_keys_and_values_are_refused_with_the_choices(pairs, message):
    with pytest.raises(InputError, match=message):
        build_config("esd", "sd1", parse_sets(pairs))


def test_every_method_has_a_documented_config():
    for method in METHODS.values():
        rows = describe_fields(method.config)
        assert rows and all(help_text for _, _, _, help_text in rows), method.key
        assert callable(method.entry)


def test_bad_yaml_is_an_input_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\nlr: [unclosed\n")
    with pytest.raises(InputError, match=r"not valid YAML \(line 3, column 1\): expected ','"):  # where, and what
        load_yaml(path)
    path.write_text("- a list\n")
    with pytest.raises(InputError, match="mapping"):
        load_yaml(path)
    with pytest.raises(InputError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_unknown_method_lists_the_methods():
    with pytest.raises(InputError, match="choose one of: esd, advunlearn"):
        get_method("magic")


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["rounds=3", "inversion_images=2"], "inversion_images \\(2\\) must give each of the 3 rounds"),
        (["guidance_scale=0.5"], "guidance_scale"),
        (["attack_tokens=76"], "attack_tokens"),
        (["retain_weight=-1"], "retain_weight"),
        (["retain_weight=nan"], "retain_weight"),
        (["scope=everything"], "unknown UNet scope 'everything'"),
    ],
)
def test_stereo_options_are_checked_before_any_model_loads(pairs, message):
    with pytest.raises(InputError, match=message):
        build_config("stereo", "sd1", parse_sets(pairs))


def test_a_run_takes_the_preset_then_its_config_file_then_set(tiny_pipeline_dir, tmp_path, monkeypatch):
    # erase(config_file=..., sets=...) is what `erasure erase --config F --set k=v` calls: --set must win over the
    # file, and the file over the family's preset, key by key (a preset for the tiny sd1 model, whose own is empty)
    import json

    from erasure.api import erase
    from pipelines.families import get_family

    monkeypatch.setitem(get_family("sd1").presets, "esd", {"ddim_steps": 4, "negative_guidance": 2.0, "steps": 5})
    config_file = tmp_path / "esd.yaml"
    config_file.write_text("steps: 2\nddim_steps: 2\nlr: 3.0e-4\n")
    run = erase("esd", ["cat"], str(tiny_pipeline_dir), out=tmp_path / "run", config_file=config_file,
                sets=["steps=1"], progress=False)  # fmt: skip
    config = json.loads((run / "erasure.json").read_text())["config"]
    assert (config["steps"], config["ddim_steps"], config["lr"]) == (1, 2, 3e-4)  # --set, then the file twice
    assert config["negative_guidance"] == 2.0  # neither sets it: the preset's


def test_set_reads_switches_lists_and_repeated_keys_as_a_shell_user_means_them():
    # 1 and 0 are on and off; the spaces after a list's commas are not part of its items (a template ' the {}'
    # would prompt with a leading space); of two --set of one key the last wins, as a later option does in a shell
    assert build_config("sfd", "sd1", parse_sets(["gradient_checkpointing=1"])).gradient_checkpointing is True
    assert build_config("sfd", "sd1", parse_sets(["gradient_checkpointing=0"])).gradient_checkpointing is False
    config = build_config("esd", "sd1", parse_sets(["prompt_templates=a {}, the {}", "steps=5", "steps=7"]))
    assert config.prompt_templates == ["a {}", "the {}"] and config.steps == 7


def test_a_config_file_may_be_empty_and_is_read_as_written(tmp_path):
    # an empty file (or one of comments) sets nothing; a fractional count is refused, not cut to the integer below
    path = tmp_path / "esd.yaml"
    path.write_text("# nothing yet\n")
    assert load_yaml(path) == {}
    path.write_text("steps: 2.5\n")
    with pytest.raises(InputError, match="steps: 2.5 is not an integer"):
        build_config("esd", "sd1", load_yaml(path))


def test_show_config_reads_back_as_the_same_config_and_names_resolved_defaults(tmp_path):
    # the file --show-config writes holds `lora_alpha: null`, which --config must read as None; ESD's scope defaults
    # to None, resolved from the component: the file gives the resolved value, and calls it the paper's default
    # only beside another value
    from erasure.config import config_yaml

    config = build_config("esd", "sd1", parse_sets(["lora_rank=4", "steps=9"]))
    path = tmp_path / "esd.yaml"
    path.write_text(config_yaml("esd", config, "sd1"))
    assert load_yaml(path)["lora_alpha"] is None
    assert build_config("esd", "sd1", load_yaml(path)) == config
    lines = config_yaml("esd", build_config("esd", "sd1"), "sd1").splitlines()
    assert lines[lines.index("scope: xattn") - 1].startswith("# scope (str or NoneType): UNet")
    lines = config_yaml("esd", build_config("esd", "sd1", parse_sets(["scope=full"])), "sd1").splitlines()
    assert "[paper default: xattn]" in lines[lines.index("scope: full") - 1]


def test_set_splits_at_the_first_equals_sign_only():
    # a value may hold '=' itself (a prompt template, a path); the key is what comes before the first one
    assert parse_sets(["prompt_templates=a {} with x=1", "lr=1e-4"]) == {
        "prompt_templates": "a {} with x=1", "lr": "1e-4"}
    config = build_config("esd", "sd1", parse_sets(["prompt_templates=['a {}, k=v', '{}=']"]))
    assert config.prompt_templates == ["a {}, k=v", "{}="]


@pytest.mark.parametrize(
    "method, pairs, message",
    [
        ("esd", ["lr=0"], "lr must be > 0, not 0"),  # (0, inf): the open end is refused
        ("esd", ["adam_betas=0.9,1"], "adam_betas must be between 0 and 1 (1 excluded), not 1"),
        ("fewshot", ["stop_below=0"], "stop_below must be between 0 and 1 (0 excluded), not 0"),
        ("fewshot", ["num_images=-1"], "num_images must be >= 0, not -1"),  # an integer without bounds: >= 0
        ("sfd", ["t_init=1000"], "t_init must be between 1 and 999, not 1000"),
        # a trajectory of one step would stop at its first step every time: x_t always the pure noise
        ("esd", ["ddim_steps=1"], "ddim_steps must be between 2 and 999, not 1"),
    ],
)
def test_each_bound_refuses_the_values_just_outside_it(method, pairs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        build_config(method, "sd1", parse_sets(pairs))


def test_each_bound_accepts_its_closed_ends():
    assert build_config("esd", "sd1", parse_sets(["adam_betas=0,0.5", "steps=1"])).adam_betas == [0.0, 0.5]
    assert build_config("fewshot", "sd1", parse_sets(["stop_below=1", "num_images=0"])).stop_below == 1.0
    assert build_config("sfd", "sd1", parse_sets(["t_init=1"])).t_init == 1
    assert build_config("sfd", "sd1", parse_sets(["t_init=999"])).t_init == 999
