"""Logging: the toolkit logs through `logging`, and quiets diffusers/transformers only inside its own calls.

Loading a pipeline makes those libraries print load bars and warnings that mean nothing to our users
(e.g. the missing safety checker). They are silenced for the duration of the load and their
verbosity is put back afterwards, so an application that imports the toolkit keeps its settings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

PROJECT_LOGGERS = ("erasure", "pipelines", "evaluators", "ui", "zoo")


@contextmanager
def quiet_libraries() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [
        (lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)
    ]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bar in saved:
            lib.set_verbosity(verbosity)
            lib.enable_progress_bar() if bar else lib.disable_progress_bar()


def log_to_stderr(verbose: bool = False) -> None:
    """For the command line: the toolkit's own messages on stderr (INFO with --verbose, else WARNING)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbose else "%(message)s"))
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
        logger.propagate = False
    # bitsandbytes' CPU backend warns, whenever diffusers or peft imports it, that it cannot fetch a 4-bit matmul
    # kernel from the Hub: offline that is always so, and the toolkit uses only its 8-bit Adam. The command
    # line's process is the toolkit's own; an application importing the toolkit keeps the warning.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
