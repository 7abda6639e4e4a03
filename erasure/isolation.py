"""What `erase` and `evaluate` leave as they found them when a script or a notebook calls them.

- accelerate keeps one state per process (precision, device), which a run sets to its own: the caller's
  `Accelerator` would take the run's precision, and one created after the run would be refused.
- A run seeds the global random streams (torch, numpy, random) for its own draws; the caller's streams go on
  where they were.
- One call at a time: while diffusers loads a model it builds modules on the meta device by patching torch for
  the whole process, so a second thread building a model then gets empty weights. `pipelines.MODEL_WORK` (which
  `load_model` takes too) makes concurrent calls wait for each other instead.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

from pipelines import MODEL_WORK

Call = TypeVar("Call", bound=Callable)


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from .training import rng_state, set_rng_state  # what a checkpoint saves of the random streams

    with MODEL_WORK:
        shared = {kind: dict(kind._shared_state) for kind in (PartialState, AcceleratorState, GradientState)}
        streams = rng_state()
        try:
            yield
        finally:
            for kind, state in shared.items():
                kind._shared_state.clear()
                kind._shared_state.update(state)
            set_rng_state(streams)


def keeps_process_state(call: Call) -> Call:
    """`call` run inside `process_state_kept`."""

    @functools.wraps(call)
    def kept(*args, **kwargs):
        with process_state_kept():
            return call(*args, **kwargs)

    return kept
