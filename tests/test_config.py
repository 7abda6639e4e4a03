import pytest

from erasure.config import build_config, describe_fields, load_yaml, parse_sets
from erasure.registry import METHODS, get_method
from pipelines.errors import InputError


def test_yaml_then_set_override_the_family_preset(tmp_path):
    config_cls, _ = get_method("esd").load()
    yaml_file = tmp_path / "esd.yaml"
    yaml_file.write_text("lr: 3.0e-4\niterations: 12\nprompt_templates: ['a {}', '{}']\n")
    config = build_config(config_cls, "digits", load_yaml(yaml_file), parse_sets(["iterations=7", "scope=noxattn"]))
    assert config.lr == 3e-4  # from YAML
    assert config.iterations == 7  # --set wins over YAML
    assert config.scope == "noxattn"
    assert config.prompt_templates == ["a {}", "{}"]
    assert config.ddim_steps == config_cls.PRESETS["digits"]["ddim_steps"]  # family preset
    assert build_config(config_cls, "sd").ddim_steps == 50  # the paper's default elsewhere


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["learning_rate=1"], "unknown option 'learning_rate'.*valid options: component, scope"),
        (["iterations=many"], "iterations: 'many' is not an integer"),
        (["lr=fast"], "lr: 'fast' is not a number"),
        (["component=vae"], "choose one of: unet, text_encoder"),
        (["scope=everything"], "unknown UNet scope 'everything'"),
        (["iterations=0"], "iterations"),
        (["prompt_templates=no placeholder"], "must contain"),
        (["lr"], "--set expects key=value"),
    ],
)
def test_bad_keys_and_values_are_refused_with_the_choices(pairs, message):
    config_cls, _ = get_method("esd").load()
    with pytest.raises(InputError, match=message):
        build_config(config_cls, "sd", parse_sets(pairs))


def test_every_method_has_a_documented_config():
    for method in METHODS.values():
        config_cls, entry = method.load()
        rows = describe_fields(config_cls)
        assert rows and all(help_text for _, _, _, help_text in rows), method.key
        assert callable(entry)


def test_bad_yaml_is_an_input_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_yaml(path)
    path.write_text("- a list\n")
    with pytest.raises(InputError, match="mapping"):
        load_yaml(path)
    with pytest.raises(InputError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_unknown_method_lists_the_methods():
    with pytest.raises(InputError, match="choose one of: esd, advunlearn"):
        get_method("magic")
