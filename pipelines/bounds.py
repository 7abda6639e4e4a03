"""The one place that knows which numbers are acceptable: for config fields and command-line options alike.

A bound is written as an interval, `[1, inf)` or `(0, 1]`, in a config field's metadata
(`"bounds"`) or in an option's `type=` (`number(int, "[1, 1000]")`). Every float must also be
finite, bounded or not: a NaN learning rate would train a model of NaNs and call it finished.
This module imports nothing heavy: the command line checks its options before torch loads.
"""

from __future__ import annotations

import argparse
import math
import numbers
import re
from dataclasses import dataclass

from .errors import InputError

SEED_BOUNDS = "[0, 4294967295]"  # what every seeded library (torch, numpy, random) accepts
COUNT = "[1, inf)"
# Sampling steps: DDIM's leading spacing with steps_offset=1 (SD 1.x/2.x, digits) starts 1000 steps at timestep 1000,
# one past the 1000-entry schedule (an IndexError inside diffusers).
MAX_STEPS = 999
STEPS = f"[1, {MAX_STEPS}]"
TRAJECTORY_STEPS = f"[2, {MAX_STEPS}]"  # a partial DDIM trajectory that stops at a random step takes two at least
GUIDANCE = "[0, inf)"
TRUNCATION = "[0, 1]"
LORA_STRENGTH = "[0, 2]"  # an erasure adapter's weight: 0 off, 1 as trained, above 1 pushed further
_INTERVAL = re.compile(r"^\s*([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(inf|[-+0-9.e]+)\s*([\])])\s*$")


@dataclass(frozen=True)
class Bounds:
    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> Bounds:
        match = _INTERVAL.match(text)
        if match is None:
            raise ValueError(f"not an interval: {text!r}")
        opening, low, high, closing = match.groups()
        return cls(float(low), float(high), opening == "(", closing == ")")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """In words a user reads at once: ">= 1", "> 0", "between 0 and 1 (1 excluded)"."""
        low, high = _number(self.low), _number(self.high)
        if math.isinf(self.high):
            return f"{'>' if self.low_open else '>='} {low}"
        if math.isinf(self.low):
            return f"{'<' if self.high_open else '<='} {high}"
        excluded = [str(v) for v, open_ in ((low, self.low_open), (high, self.high_open)) if open_]
        return f"between {low} and {high}" + (f" ({' and '.join(excluded)} excluded)" if excluded else "")


def _number(value: float | int) -> str:
    if isinstance(value, int):
        return str(value) if len(str(value)) <= 30 else f"{str(value)[:12]}... ({len(str(value))} digits)"
    return str(int(value)) if value.is_integer() else str(value)


def violation(value: float | int, bounds: str | Bounds | None, integer: bool = False) -> str | None:
    """What is wrong with `value` ("must be >= 1, not 0"), or None when it is acceptable. `integer`: a whole number
    (an int, not 2.0), as a count or a seed must be."""
    # From Python, "0" or True would otherwise fail later, deep in torch, or pass as 1
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"must be {'a whole number' if integer else 'a number'}, not {value!r}"
    if integer and not isinstance(value, numbers.Integral):
        return f"must be a whole number, not {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, not {value}"
    if bounds is None:
        return None
    interval = Bounds.parse(bounds) if isinstance(bounds, str) else bounds
    return None if value in interval else f"must be {interval.describe()}, not {_number(value)}"


def check_number(name: str, value: float | int, bounds: str | Bounds | None, integer: bool = False) -> None:
    """InputError unless `value` is a finite number within `bounds` (None: any finite value); `integer`: whole."""
    problem = violation(value, bounds, integer)
    if problem:
        raise InputError(f"{name} {problem}")


def number(kind: type, bounds: str | None = None):
    """An argparse `type=`: parses an int or a float and checks it (argparse then exits 2 with the reason)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        problem = violation(value, bounds)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


seed = number(int, SEED_BOUNDS)
