"""An erasure started from the page: it runs in its own thread, reports each step, and can be cancelled.

Cancelling must leave something `--resume` can continue. The training loop writes a checkpoint
every `checkpoint_every` steps and then calls `after_step`, so a cancelled job stops right after
its next checkpoint: an exception raised there interrupts `erase()`, which keeps the hidden
`.NAME.work/` folder instead of deleting it (and says so: `erasure.output.resumable_run`). A run
that ends at that step (its last, or the one a stopping rule ended it at, reported as step ==
total) has finished: it is kept as finished, not cancelled.

Some methods train in stages, one training loop each (STEREO: search, invert, ..., erase once):
each loop counts its own steps, so the reports are numbered by stage.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.errors import InputError


class CancelledFromPage(Exception):
    """Raised inside the training loop, right after a checkpoint, when the page asked to stop."""


@dataclass
class Step:
    step: int
    total: int  # of this stage's training loop
    logs: dict[str, float]
    stage: int = 1  # 1, 2, ...: the training loops of a multi-stage method, in order


@dataclass
class EraseJob:
    """One call of `erasure.api.erase` on a thread; `updates` receives a Step after every optimiser step."""

    method: str
    concepts: list[str]
    model: str | None
    out: Path
    sets: dict
    resume: bool = False
    checkpoint_every: int = 10
    device: str = "cpu"
    cancel: threading.Event = field(default_factory=threading.Event)
    updates: queue.Queue = field(default_factory=queue.Queue)
    result: Path | None = None
    error: BaseException | None = None
    _thread: threading.Thread | None = None
    _last: Step | None = None

    def start(self) -> EraseJob:
        if self.checkpoint_every < 1:
            raise InputError("checkpoint every: at least 1 step (cancelling stops at the next checkpoint)")
        self._thread = threading.Thread(target=self._run, name=f"erase-{self.out.name}", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float) -> Step | None:
        """The next progress report, or None when there was none within `timeout` seconds."""
        try:
            return self.updates.get(timeout=timeout)
        except queue.Empty:
            return None

    def _after_step(self, step: int, total: int, logs: dict) -> None:
        last = self._last
        # A loop's last report has step == total, so a report after it belongs to the next stage's loop.
        if last is None:
            stage = 1
        else:
            stage = last.stage + 1 if last.step == last.total else last.stage
        self._last = Step(step, total, dict(logs), stage)
        self.updates.put(self._last)
        # The same condition under which the training loop has just saved a checkpoint: none at a loop's last step,
        # which is the one a stopping rule ended it at too (reported as step == total), so a finished run is kept.
        if self.cancel.is_set() and step % self.checkpoint_every == 0 and step < total:
            raise CancelledFromPage(f"cancelled from the page at step {step}/{total}")

    def _run(self) -> None:
        from erasure.api import erase

        try:
            self.result = erase(
                self.method, self.concepts, self.model, out=self.out, sets=self.sets, resume=self.resume,
                checkpoint_every=self.checkpoint_every, device=self.device, progress=False, after_step=self._after_step,
            )  # fmt: skip
        except BaseException as exc:  # handed to the page's handler, which reports it
            self.error = exc


def parse_concepts(text: str) -> list[str]:
    """Concepts separated by commas or new lines."""
    return [c.strip() for line in (text or "").splitlines() for c in line.split(",") if c.strip()]


def next_checkpoint(step: int, every: int, total: int) -> int | None:
    """The step at which a cancelled job will stop (None: it finishes first)."""
    target = (step // every + 1) * every
    return target if target < total else None


def summarise_logs(logs: dict[str, float]) -> str:
    """The method's losses as the training loop reported them, e.g. `loss 0.0123 · retain 0.04`."""
    return " · ".join(f"{k} {v:.4g}" for k, v in logs.items())
