"""The attacks an evaluation has finished, kept beside its report until the report is written.

At Stable Diffusion size one attack of one concept takes hours (UnlearnDiffAtk on I2P's prompts: a day). An
evaluation stopped partway - Ctrl-C, a preempted job, a lost ssh session - and started again with `--resume` runs only
the attacks it had not finished. Each finished attack is written to `STEM.partial.json` beside the report
(`RUN/eval.partial.json` for `RUN/eval.json`) with the fingerprint of what its result depends on; a resume under
another fingerprint is refused. The scores (CLIP, detectors, FID) are drawn again: they take minutes, not hours.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from pipelines.errors import InputError
from pipelines.files import write_json

from .output import stop_reason

log = logging.getLogger(__name__)

PARTIAL_FORMAT = "erasure-eval-partial/1"


def partial_path(json_path: Path) -> Path:
    return json_path.with_name(f"{json_path.stem}.partial.json")


class FinishedAttacks:
    """`--resume`'s store: (concept, attack) -> the attack's result. `announce`: whether this process logs (the main
    one: every process checks, so that a refusal stops them all before any model loads)."""

    def __init__(self, json_path: Path, fingerprint: dict, resume: bool, announce: bool = True):
        self.path = partial_path(json_path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from the file
        self.results: dict[str, dict[str, dict]] = {}
        saved = self._read()
        if saved is None:
            if resume and announce:
                log.warning("--resume: %s holds no finished attacks; every attack runs", self.path)
            return
        finished = ", ".join(f"{c}: {kind}" for c, kinds in saved["attacks"].items() for kind in kinds) or "none"
        if not resume:
            if announce:
                log.warning("%s holds an interrupted evaluation's finished attacks (%s); they are replaced as this "
                            "one's finish (--resume keeps them)", self.path, finished)  # fmt: skip
            return
        if saved["fingerprint"] != self.fingerprint:
            old, new = saved["fingerprint"], self.fingerprint
            differs = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
            raise InputError(f"--resume: the attacks in {self.path} were made with other values of: "
                             f"{', '.join(differs)}; rerun with those, or without --resume to start over")  # fmt: skip
        self.results = saved["attacks"]
        if announce:
            log.info("--resume: kept from %s: %s", self.path, finished)

    def _read(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("format") == PARTIAL_FORMAT and all(isinstance(saved.get(k), dict)
                                                             for k in ("fingerprint", "attacks")):  # fmt: skip
                return saved
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            pass
        log.warning("%s is not a readable record of finished attacks; it is left out and replaced", self.path)
        return None

    def run(self, concept: str, attack: str, attack_now: Callable[[], dict]) -> dict:
        """The result of `attack` on `concept`: kept from the interrupted evaluation (marked `resumed`: its seconds
        are that evaluation's), or `attack_now()`'s, which is recorded at once."""
        kept = self.results.get(concept, {}).get(attack)
        if kept is not None:
            return {**kept, "resumed": True}
        result = attack_now()
        self.results.setdefault(concept, {})[attack] = result
        write_json(self.path, {"format": PARTIAL_FORMAT, "fingerprint": self.fingerprint, "attacks": self.results},
                   default=float)  # fmt: skip
        return result

    def discard(self) -> None:
        """The report holds them now."""
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> FinishedAttacks:
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        """An evaluation stopped after some attacks finished tells whoever catches the exception where they are (the
        exception keeps its type: a Ctrl-C stays a KeyboardInterrupt)."""
        if exc is not None and not isinstance(exc, InputError) and self.path.is_file():
            exc.kept_attacks = self.path
            if hasattr(exc, "add_note"):  # Python 3.11+: the note shows under the traceback
                exc.add_note(f"The attacks it finished are kept in {self.path}: evaluate again with resume=True "
                             "(--resume) to run only the others.")  # fmt: skip


def kept_attacks_message(exc: BaseException) -> str | None:
    """One line for an evaluation that `exc` stopped after some attacks finished; None for any other exception."""
    path = getattr(exc, "kept_attacks", None)
    if path is None:
        return None
    return (f"evaluation {stop_reason(exc)}; the attacks it finished are kept in {path} - rerun with --resume to run "
            "only the others")
