"""Method configs: one dataclass per method is the single source of truth.

Every method's config is a `MethodConfig`: the options all methods share (steps, lr, batch_size,
adam_betas, prompt_templates), redeclared where the method's paper default or meaning differs,
then the method's own options, and one `check(family, concepts)`.

Values are resolved in this order: the dataclass defaults (the paper's, for Stable Diffusion),
the model family's preset for the method (pipelines/families), a YAML file, then each
`--set key=value`. Unknown keys and values of the wrong type are refused with the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pipelines.errors import InputError


@dataclass
class MethodConfig:
    """What every method's options hold. A method redeclares those whose paper default or meaning differs (the
    others keep these defaults, which are ESD's and AdvUnlearn's), and adds its own; `__post_init__` checks what
    relates its values, `check` what depends on the model."""

    steps: int = field(default=1000, metadata={"bounds": "[1, inf)", "help": "optimiser steps"})
    lr: float = field(default=1e-5, metadata={"bounds": "(0, inf)", "help": "Adam learning rate"})
    batch_size: int = field(default=1, metadata={"bounds": "[1, inf)", "help": "samples per step"})
    adam_betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], metadata={"bounds": "[0, 1)", "length": 2, "help": "Adam betas"}
    )
    prompt_templates: list[str] = field(
        default_factory=lambda: ["{}"],
        metadata={"templates": True, "help": "templates filled with each concept ('{}' = the concept)"},
    )

    def check(self, family, concepts: Sequence[str]) -> None:
        """Refuse what this config cannot do on models of `family` (pipelines.families.Family) for
        `concepts`; called once, before any model loads. Nothing by default."""


# The run's own options, beside every method's config (`erase --mixed-precision ...`; erasure.training.RunContext)
MIXED_PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZER_STATES = ("fp32", "8bit")
FROZEN_PRECISIONS = ("auto", "full", "half")

# Options that earlier versions named otherwise: a file or a command line that still uses the old name
# is told the new one (and is not silently translated).
RENAMED_OPTIONS = {
    "iterations": "steps", "unlearn_steps": "steps", "generator_lr": "lr", "concept_prompts": "prompt_templates",
    "epochs": "steps (few-shot: updates, an epoch being images / batch_size of them)",
}  # fmt: skip


def describe_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each option of a config dataclass."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        rows.append((f.name, _type_name(hints[f.name]), _default(f), f.metadata.get("help", "")))
    return rows


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple):
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise InputError."""
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(name, option, value)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[0] if errors else f"bad value for {name}: {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise InputError(f"bad value for {name}: {value!r}; choose one of: {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (item_type, *_) = get_args(tp)
        if isinstance(value, str):
            value = _split_list(name, value)
        if not isinstance(value, (list, tuple)):
            raise InputError(f"bad value for {name}: {value!r} is not a list")
        items = [coerce(name, item_type, v) for v in value]
        return items if origin is list else tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise InputError(f"bad value for {name}: {value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise InputError(f"bad value for {name}: {value!r} is not an integer")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        except (TypeError, ValueError):
            raise InputError(f"bad value for {name}: {value!r} is not an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise InputError(f"bad value for {name}: {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InputError(f"bad value for {name}: {value!r} is not a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise InputError(f"bad value for {name}: {value!r} is not a string")
        return str(value)
    raise TypeError(f"config field {name} has an unsupported type {tp!r}")


def _split_list(name: str, text: str) -> list:
    """A list from the command line: `a,b,c`, or a YAML list `['a photo of {}, in a museum', b]` when an
    item holds a comma."""
    import yaml

    if text.strip().startswith("["):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise InputError(f"bad value for {name}: {text!r} is not a YAML list") from None
        if not isinstance(value, list):
            raise InputError(f"bad value for {name}: {text!r} is not a YAML list")
        return value
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """`["lr=1e-4", "scope=attn"]` -> {"lr": "1e-4", "scope": "attn"}."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if path.is_dir():
        raise InputError(f"config file {path} is a folder; give a YAML file or a run's erasure.json")
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise InputError(f"config file {path}: cannot read it as UTF-8 text ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping of option: value")
    return data


RUN_FORMAT_PREFIX = "erasure-run/"


def load_config_file(path: str | Path) -> tuple[dict[str, Any], dict | None]:
    """Method options from `path`: a YAML file of `option: value`, or a finished run's erasure.json (or its folder).

    For a run's erasure.json the options are its resolved config, and the manifest comes back too
    (method, concepts, base model, seed), so that a rerun can reproduce the run.
    """
    from .output import MANIFEST, manifest_problem

    if Path(path).is_dir() and (Path(path) / MANIFEST).is_file():  # a run folder stands for its manifest
        path = Path(path) / MANIFEST
    data = load_yaml(path)
    if not str(data.get("format", "")).startswith(RUN_FORMAT_PREFIX):
        return data, None
    problem = manifest_problem(data)
    if problem:
        raise InputError(f"{path} is a run manifest that cannot be rerun ({problem})")
    return data["config"], data


def config_yaml(method: str, config: Any, family) -> str:
    """`config` as a YAML file that `--config` reads back, each option with its help and paper default."""
    from pipelines.families import get_family

    family = getattr(family, "name", family)
    defaults = {name: default for name, _, default, _ in describe_fields(type(config))}
    values = config_to_dict(config)
    lines = [
        f"# {method} options for the {family} model family: paper defaults, then the family's preset,",
        f"# then --config and --set. Use it with: erasure erase --method {method} --config THIS_FILE",
    ]
    lora = get_family(family).lora_preset(method) if getattr(config, "lora_rank", 0) else {}
    lora.pop("lora_rank", None)
    if lora:
        lines.append(f"# With LoRA adapters, the {family} preset also takes: "
                     f"{', '.join(f'{k}={_yaml_value(v)}' for k, v in lora.items())} (unless set).")
    bounds = {f.name: f.metadata.get("bounds") for f in dataclasses.fields(config)}
    resolved = _resolved_defaults(config, defaults)
    for name, type_name, _, help_text in describe_fields(type(config)):
        default = resolved.get(name, defaults[name])
        paper = "" if values[name] == _plain(default) else f" [paper default: {_yaml_value(default)}]"
        kind = f"{type_name}, {bounds[name]}" if bounds[name] else type_name
        lines.append(f"# {name} ({kind}){paper}{': ' + help_text if help_text else ''}")
        lines.append(f"{name}: {_yaml_value(values[name])}")
    return "\n".join(lines) + "\n"


def _resolved_defaults(config: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """The defaults of the options whose default, None, `__post_init__` resolves from the others (ESD's scope from
    its component), as they resolve beside this config's other values."""
    unresolved = [name for name, default in defaults.items() if default is None]
    if not unresolved:
        return {}
    kwargs = {f.name: None if f.name in unresolved else getattr(config, f.name)
              for f in dataclasses.fields(config) if f.init}  # fmt: skip
    try:
        built = type(config)(**copy.deepcopy(kwargs))
    except (ValueError, InputError):
        return {}
    return {name: _plain(getattr(built, name)) for name in unresolved}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _yaml_value(value: Any) -> str:
    """One value in YAML flow style (lists on one line, strings quoted when YAML needs it)."""
    import yaml

    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=2**31)
    return text.strip().removesuffix("...").strip()  # a lone scalar ends with a document-end marker


def build_config(method: str, family, *layers: dict[str, Any]):
    """The config of `method` (a registry key): its defaults, the preset of `family` (a Family or its
    name) for it, then each layer of overrides. A run with LoRA adapters (lora_rank > 0) also takes the
    family's LoRA preset for what no layer sets.

    Every value is checked against its field's rules (check_field) before the dataclass is built,
    whether it came from a default, a preset, a file or `--set`.
    """
    from pipelines.families import get_family

    from .registry import get_method

    cls = get_method(method).config
    family = get_family(family)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    preset = family.preset(method)
    for layer in (preset, *layers):
        for key, value in layer.items():
            if key not in fields:
                renamed = f" ({key} is now {RENAMED_OPTIONS[key]})" if key in RENAMED_OPTIONS else ""
                raise InputError(f"unknown option {key!r} for {cls.__name__}{renamed}; valid options: "
                                 f"{', '.join(fields)}")  # fmt: skip
            values[key] = coerce(key, hints[key], value)
    chosen = {key for layer in layers for key in layer}
    if "lora_rank" in chosen and values["lora_rank"] == 0:  # full weights: the preset's adapter settings go too
        for key in ("lora_alpha", "lora_targets"):
            if key in preset and key not in chosen:
                del values[key]
    # A preset's value chosen for another option's preset value (the digits ESD preset's UNet scope, ESD-u) goes when
    # the user changes that option (`component=text_encoder`): the method's default for the user's choice applies.
    for name, f in fields.items():
        follows = f.metadata.get("follows")
        if follows in chosen and name in preset and name not in chosen and \
                values[follows] != preset.get(follows, _default(fields[follows])):  # fmt: skip
            del values[name]
    if values.get("lora_rank"):  # adapters: the family's LoRA preset over its preset, under the user's own choices
        for key, value in family.lora_preset(method).items():
            if key != "lora_rank" and key not in chosen:
                values[key] = coerce(key, hints[key], value)
    for name, f in fields.items():
        check_field(f, values[name] if name in values else _default(f))
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise InputError(f"bad config: {exc}") from None


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def check_field(f: dataclasses.Field, value: Any) -> None:
    """The rules of a config field, from its metadata:

    - `bounds`: an interval (see pipelines/bounds.py) for the number or for each number of a list;
      integers without one must be >= 0, and every float must be finite;
    - `length`: the exact length of a list (Adam's two betas);
    - `templates`: each string holds `{}` (the concept) and no other braces; the list may be empty
      only when its default is.

    (`input`: a file or folder the method reads, whose contents a resume checks: see `input_digests`.)
    """
    from pipelines.bounds import check_number

    items = value if isinstance(value, (list, tuple)) else [value]
    bounds = f.metadata.get("bounds")
    for item in items:
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, int):
            check_number(f.name, item, bounds or "[0, inf)")
        elif isinstance(item, float):
            check_number(f.name, item, bounds)
    if "length" in f.metadata and len(items) != f.metadata["length"]:
        raise InputError(f"{f.name} must hold {f.metadata['length']} values, not {len(items)}")
    if f.metadata.get("templates"):
        if not items and _default(f):
            raise InputError(f"{f.name} needs at least one template")
        for template in items:
            if "{}" not in template or _braces_besides_concept(template):
                raise InputError(f"{f.name}: {template!r} must contain '{{}}' (the concept) and no other braces")


def _braces_besides_concept(template: str) -> bool:
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return True
    return False


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: _plain(v) for k, v in dataclasses.asdict(config).items()}


def input_digests(config: Any) -> dict[str, str]:
    """A digest of what each file or folder a config names holds (`"input"` fields: few-shot's images, SFD's prompt
    file, ...): a run resumes only on the same contents, which its path alone does not promise."""
    from pipelines.components import files_digest

    digests = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("input") and isinstance(value, str) and Path(value).expanduser().exists():
            digests[f.name] = files_digest(Path(value).expanduser())
    return digests
