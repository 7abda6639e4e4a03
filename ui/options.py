"""The Erase tab's method options, generated from each method's config dataclass.

The dataclass stays the single source of truth: every field becomes one input with the field's
help text, its paper default and its family presets; what the page sends back goes through the
same `build_config` validation as `--set`.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from erasure.config import describe_fields
from erasure.registry import METHODS

PAPER = "paper"  # the preset name of the dataclass defaults (the papers', for Stable Diffusion)


@dataclass(frozen=True)
class Option:
    """One config field of one method, as the page shows it."""

    method: str
    name: str
    type: Any
    type_name: str
    default: Any
    help: str
    presets: dict[str, Any]  # family -> tuned value, where the family's preset sets this field

    def value_for(self, preset: str) -> Any:
        return self.presets.get(preset, self.default)

    @property
    def optional(self) -> bool:
        return type(None) in get_args(self.type)

    @property
    def info(self) -> str:
        tuned = "".join(f"; {family}: {_show(v)}" for family, v in self.presets.items())
        return f"{self.help} ({self.type_name}; paper: {_show(self.default)}{tuned})".strip()


def method_options(method: str) -> list[Option]:
    from pipelines.families import FAMILIES

    config_cls = METHODS[method].config
    hints = typing.get_type_hints(config_cls)
    presets = {name: family.preset(method) for name, family in FAMILIES.items() if family.preset(method)}
    presets |= {f"{name} + LoRA": {**family.preset(method), **family.lora_preset(method)}
                for name, family in FAMILIES.items() if family.lora_preset(method)}  # fmt: skip
    return [
        Option(method, name, hints[name], type_name, default, help_text,
               {family: values[name] for family, values in presets.items() if name in values})
        for name, type_name, default, help_text in describe_fields(config_cls)
    ]  # fmt: skip


def preset_names(options: list[Option]) -> list[str]:
    families = dict.fromkeys(family for option in options for family in option.presets)
    return [PAPER, *families]


def to_field(option: Option, preset: str) -> Any:
    """The value an input shows: lists as comma-separated text, None as empty text."""
    value = option.value_for(preset)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "" if value is None else value


def from_field(option: Option, value: Any) -> Any:
    """What the page sent back, ready for `build_config` (which coerces and validates it)."""
    if isinstance(value, str) and not value.strip() and option.optional:
        return None
    if isinstance(value, float) and _base_type(option.type) is int and value.is_integer():
        return int(value)
    return value


def component(option: Option, preset: str):
    """A Gradio input for the option: dropdown for a choice, checkbox, number or text."""
    import gradio as gr

    label, info, value = option.name, option.info, to_field(option, preset)
    tp = _base_type(option.type)
    if get_origin(tp) is Literal:
        return gr.Dropdown(choices=[str(c) for c in get_args(tp)], value=value, label=label, info=info)
    if tp is bool:
        return gr.Checkbox(value=value, label=label, info=info)
    if tp in (int, float) and not option.optional:
        return gr.Number(value=value, label=label, info=info, precision=0 if tp is int else None)
    return gr.Textbox(value=value, label=label, info=info, placeholder="default" if option.optional else None)


def _base_type(tp: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if get_origin(tp) in (types.UnionType, typing.Union):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return "default" if value is None else str(value)
