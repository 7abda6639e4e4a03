"""Run folders written atomically, and the `erasure.json` manifest that describes them.

While a run trains, its checkpoints live in a hidden work folder next to the output
(`.<name>.work/`); the result is written into a hidden staging folder and renamed to `--out` only
when complete. So `--out` either does not exist or holds a finished run, and an interrupted run
leaves only what `--resume` needs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.errors import InputError
from pipelines.files import normalise_permissions, write_json

from . import DISTRIBUTION

MANIFEST = "erasure.json"
FORMAT = "erasure-run/1"


class RunDirectory:
    def __init__(self, out: str | Path, resume: bool = False):
        self.final = Path(out).expanduser().resolve()
        self.work = self.final.parent / f".{self.final.name}.work"
        self.resume = resume

    @property
    def checkpoint_dir(self) -> Path:
        return self.work / "checkpoint"

    def check(self) -> None:
        """Refuse to overwrite a finished run or to silently restart an interrupted one."""
        if self.final.exists():
            raise InputError(f"{self.final} already exists; choose another --out or remove it")
        if self.resume and not self.work.exists():
            raise InputError(f"nothing to resume for {self.final} (no {self.work.name} folder)")
        if not self.resume and self.work.exists():
            raise InputError(
                f"an interrupted run of {self.final} exists in {self.work}; pass --resume or delete that folder"
            )

    def begin(self) -> None:
        self.check()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(exist_ok=True)

    def commit(self, write: Callable[[Path], None]) -> Path:
        """Write the result through `write(staging_dir)`, then move it into place in one rename."""
        staging = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.staging-", dir=self.final.parent))
        try:
            write(staging)
            normalise_permissions(staging)  # mkdtemp's 0700 (and safetensors' 0600) would keep colleagues out
            os.rename(staging, self.final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(self.work, ignore_errors=True)
        return self.final

    def abandon(self) -> bool:
        """After a failure: drop the work folder unless a checkpoint makes it resumable."""
        if self.checkpoint_dir.exists() and any(self.checkpoint_dir.iterdir()):
            return True
        shutil.rmtree(self.work, ignore_errors=True)
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
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{path} is not valid JSON") from None


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


class InterruptedRun(Exception):
    """A run stopped after a checkpoint: `--resume` continues it."""

    def __init__(self, run_dir: RunDirectory, cause: BaseException):
        why = "interrupted" if isinstance(cause, KeyboardInterrupt) else f"stopped by {type(cause).__name__}: {cause}"
        super().__init__(f"run {why}; its last checkpoint is in {run_dir.work} - rerun with --resume to continue")
        self.run_dir = run_dir
