"""Run folders written atomically, and the `erasure.json` manifest that describes them.

While a run trains, its checkpoints live in a hidden work folder next to the output
(`.<name>.work/`); the result is written into a hidden staging folder and renamed to `--out` only
when complete. So `--out` either does not exist or holds a finished run, and an interrupted run
leaves only what `--resume` needs.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipelines.errors import InputError
from pipelines.files import normal_mode, read_json, write_folder_atomically, write_json

from . import DISTRIBUTION

MANIFEST = "erasure.json"
REQUIRED_KEYS = ("method", "concepts", "base_model", "config", "seed")
LOCK_FILE = "lock"
FINGERPRINT_FILE = "fingerprint.json"  # the settings the run began with, for `--resume` to check before loading
FORMAT = "erasure-run/1"


class RunDirectory:
    """`--out` and its hidden work folder, owned by one process at a time.

    The process that trains holds an exclusive `flock` on `.<name>.work/lock` (which also records
    its pid): a second process on the same `--out` is refused at once, naming the first. The kernel
    drops the lock when its holder dies, so the work folder of a killed run is free for `--resume`.
    """

    def __init__(self, out: str | Path, resume: bool = False):
        self.final = Path(out).expanduser().resolve()
        self.work = self.final.parent / f".{self.final.name}.work"
        self.resume = resume
        self._lock: int | None = None  # the file descriptor holding the lock, while this process owns the run
        self._made: list[Path] = []  # the folders above the run that `begin` created, innermost first

    @property
    def checkpoint_dir(self) -> Path:
        return self.work / "checkpoint"

    def check(self) -> None:
        """Refuse to overwrite a finished run, to join a running one, or to silently restart an interrupted one."""
        if self.final.exists():
            raise InputError(f"{self.final} already exists; choose another --out or remove it")
        holder = self._holder()
        if holder is not None:
            raise InputError(
                f"{self.final} is being written by process {holder}; wait for it to finish, or stop it and "
                "rerun with --resume"
            )
        if self.resume and not self.work.exists():
            raise InputError(f"nothing to resume for {self.final} (no {self.work.name} folder)")
        # (a work folder holding only a lock was killed before its first checkpoint: a plain rerun starts afresh)
        if not self.resume and self.saved_progress():
            raise InputError(
                f"an interrupted run of {self.final} exists in {self.work}; pass --resume or delete that folder"
            )

    def check_fingerprint(self, fingerprint: dict) -> None:
        """With --resume: refuse other settings than the run began with now, before the base model loads (minutes at
        SDXL size). Each checkpoint carries the fingerprint too, and is checked again as it loads."""
        path = self.work / FINGERPRINT_FILE
        if self.resume and path.is_file() and self.saved_progress():
            refuse_other_settings(read_json(path), json.loads(json.dumps(fingerprint)), self.checkpoint_dir)

    def begin(self, fingerprint: dict | None = None) -> None:
        """Create the work folder and take its lock (or take over an interrupted run's with --resume), and record the
        run's `fingerprint` there when it starts."""
        self.check()
        self._made = [p for p in (self.final.parent, *self.final.parent.parents) if not p.exists()]
        self.final.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.work.mkdir(exist_ok=self.resume or not self.saved_progress())
        except FileExistsError:  # another process started this run since check()
            self.check()
            raise
        fd = os.open(self.work / LOCK_FILE, os.O_RDWR | os.O_CREAT, normal_mode())
        if not _lock_exclusively(fd):
            os.close(fd)
            raise InputError(f"{self.final} is being written by process {self._holder() or '(another)'}")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd
        if fingerprint is not None:  # (a resumed run's was checked against it: `check_fingerprint`)
            write_json(self.work / FINGERPRINT_FILE, fingerprint)

    def saved_progress(self) -> bool:
        """Whether the work folder holds anything to resume from (a checkpoint, a finished stage), not only a lock."""
        return self.work.is_dir() and any(p.name not in (LOCK_FILE, FINGERPRINT_FILE) for p in self.work.iterdir())

    def _holder(self) -> int | str | None:
        """The pid of the process holding the run's lock, or None when nobody does."""
        try:
            fd = os.open(self.work / LOCK_FILE, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            return int(pid) if pid.isdigit() else "(unknown)"
        finally:
            os.close(fd)
        return None

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def commit(self, write: Callable[[Path], None]) -> Path:
        """Write the result through `write(staging_dir)`, then move it into place in one rename."""
        write_folder_atomically(self.final, write)
        if self._lock is not None:  # the run's own work folder (an export owns none)
            shutil.rmtree(self.work, ignore_errors=True)
        self._release()
        return self.final

    def abandon(self, keep_checkpoint: bool = True) -> bool:
        """After a failure: drop the work folder unless a checkpoint makes it resumable (and is to be kept).

        Only the process that owns the run touches its work folder.
        """
        if self._lock is None:
            return False
        try:
            if keep_checkpoint and self.checkpoint_dir.exists() and any(self.checkpoint_dir.iterdir()):
                return True
            shutil.rmtree(self.work, ignore_errors=True)
            for folder in self._made:  # e.g. the default `runs/`: a refused run leaves nothing behind
                try:
                    folder.rmdir()
                except OSError:  # another run's files are in it now
                    break
            return False
        finally:
            self._release()


def refuse_other_settings(saved: dict, current: dict, checkpoint: Path) -> None:
    """InputError naming the fingerprint's entries (erasure.api.run_fingerprint) in which a run's checkpoint and the
    command resuming it differ, if any."""
    if saved != current:
        differs = sorted(k for k in {*saved, *current} if saved.get(k) != current.get(k))
        raise InputError(
            f"the checkpoint in {checkpoint} was made with other values of: {', '.join(differs)}; rerun with the "
            "settings of that run, or start over (delete that folder, or run without --resume into another --out)"
        )


@contextmanager
def hold_exclusively(folder: Path, doing: str):
    """Hold `folder` for this process (an exclusive `flock` on the folder itself: no lock file is left in it), or
    refuse at once while another process holds it. The kernel drops the lock when its holder dies."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{folder} is being {doing} by another process; wait for it to end") from None
        yield folder
    finally:
        os.close(fd)  # (which releases the lock)


def _lock_exclusively(fd: int, attempts: int = 20) -> bool:
    """Take the run's lock, allowing for another process's momentary shared lock (`_holder`'s probe)."""
    for _ in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.05)
    return False


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in (DISTRIBUTION, "torch", "diffusers", "transformers", "accelerate", "open-clip-torch"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def peak_memory_mb(device: str) -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when on a GPU), in MB."""
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        import torch

        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def write_manifest(directory: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    write_json(directory / MANIFEST, manifest, default=str)


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path)
    problem = manifest_problem(manifest)
    if problem:
        raise InputError(f"{path} is not a complete run manifest ({problem}); rerun the erasure that made it")
    return manifest


def manifest_problem(manifest: Any) -> str | None:
    """What keeps a parsed erasure.json from being read as a run's manifest (a damaged or hand-edited one), or None."""
    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        return f"it lacks {', '.join(missing)}"
    base, concepts, seed = manifest["base_model"], manifest["concepts"], manifest["seed"]
    if not (isinstance(base, dict) and {"spec", "origin", "path"} <= base.keys()):
        return "it lacks base_model.spec/origin/path"
    if not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) for c in concepts):
        return "its concepts are not a list of names"
    if not isinstance(manifest["method"], str) or not isinstance(manifest["config"], dict):
        return "its method is not a name or its config not a mapping"
    if not isinstance(seed, int) or isinstance(seed, bool):
        return "its seed is not a whole number"
    return None


def recorded_base_model(manifest: dict) -> str:
    """The base model of a run as a name `resolve` takes: embedded names and Hub ids as given, else the path."""
    base = manifest["base_model"]
    return base["spec"] if base["origin"] in ("embedded", "hub") else base["path"]


def read_run(path: str | Path) -> dict:
    """The manifest of a finished run folder, or InputError naming what is wrong with `path`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; expected a run folder written by `erasure erase`")
    manifest = read_manifest(folder)
    if manifest is None:
        raise InputError(f"{folder} is not an erased run folder (no {MANIFEST}); make one with `erasure erase`")
    return manifest


def mark_resumable(exc: BaseException, run_dir: RunDirectory) -> None:
    """Tell whoever catches `exc` that the run it stopped kept a checkpoint. The exception keeps its type: a Ctrl-C
    stays a KeyboardInterrupt, and an out-of-memory error stays one, for a caller's `except` clauses."""
    exc.resumable_run = run_dir
    if hasattr(exc, "add_note"):  # Python 3.11+: the note shows under the traceback
        exc.add_note(f"The run's last checkpoint is in {run_dir.work}: erase again with resume=True (--resume) "
                     "to continue.")  # fmt: skip


def resumable_run(exc: BaseException | None) -> RunDirectory | None:
    """The run folder whose checkpoint `--resume` continues, when `exc` stopped a run that kept one."""
    return getattr(exc, "resumable_run", None)


def stop_reason(exc: BaseException) -> str:
    """How `exc` stopped a long job, in a few words: "interrupted" for a Ctrl-C, else the exception."""
    return "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped by {type(exc).__name__}: {exc}"


def interrupted_message(exc: BaseException) -> str:
    """One line for a run that `exc` stopped after a checkpoint (see `mark_resumable`)."""
    checkpoint = resumable_run(exc).work
    return f"run {stop_reason(exc)}; its last checkpoint is in {checkpoint} - rerun with --resume to continue"
