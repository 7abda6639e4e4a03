"""Files that are either complete or absent: everything the toolkit writes goes through here."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import InputError


def atomic_write(path: str | Path, write: Callable[[Path], None], durable: bool = False) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place.

    A crash or an exception mid-write leaves `path` as it was (absent, or the previous version). Missing parent
    folders are created, as `erase --out` creates its own. `durable`: the bytes reach the disk before the rename
    (a checkpoint: after a power cut the rename could otherwise survive and the data not, an empty file in place
    of the last good one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    remove_abandoned(path.parent, prefix)  # a killed writer's file: a checkpoint's is gigabytes at SD size
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, normal_mode())  # mkstemp makes it private (0600); the result is an ordinary file
        write(Path(tmp))
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)
    return path


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder_atomically(folder: str | Path, build: Callable[[Path], None]) -> Path:
    """`build` a staging folder beside `folder`, then rename it into place: `folder` exists only complete.

    The staging folder is `.NAME.staging-PID-XXXX`, named for the process that writes it: a later write of `folder`
    removes the staging folders of writers that were killed (gigabytes at SD size) and leaves alone those of live ones.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{folder.name}.staging-"
    remove_abandoned(folder.parent, prefix)
    staging = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=folder.parent))
    try:
        build(staging)
        normalise_permissions(staging)  # mkdtemp's 0700 (and safetensors' 0600) would keep colleagues out
        os.rename(staging, folder)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):  # made meanwhile, by another process
            raise InputError(f"{folder} was created by another process while this one wrote it; it is left as it "
                             "is: write to another folder") from None  # fmt: skip
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove the folders and files `parent/PREFIX<pid>-XXXX` whose writer process is gone (killed before it could
    clean up).

    Only that exact shape is matched: `.run.staging-x.staging-123-ab`, the staging folder of a run named
    `run.staging-x`, is not one of `run`'s."""
    for found in parent.glob(f"{glob.escape(prefix)}*"):
        pid = re.fullmatch(r"([1-9]\d{0,6})-[^.]+", found.name.removeprefix(prefix))
        if not pid or found.is_symlink() or _alive(int(pid.group(1))):
            continue
        if found.is_dir():
            shutil.rmtree(found, ignore_errors=True)
        elif found.is_file():
            found.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to someone else
        return True
    return True


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would, for an instant, in every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_mode(folder: bool = False) -> int:
    """The mode `open` / `mkdir` would give: 0666 / 0777 less the umask (tempfile's are private, 0600 / 0700)."""
    return (0o777 if folder else 0o666) & ~current_umask()


def normalise_permissions(folder: Path) -> None:
    """Give `folder` and what it holds the modes of ordinary files and folders.

    Writers such as safetensors' create files 0600. Files with other hard links (a base model's
    weights linked into a run) keep their mode: it belongs to the base.
    """
    folder.chmod(normal_mode(folder=True))
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(normal_mode(folder=True))
        elif path.stat().st_nlink == 1:
            path.chmod(normal_mode())


def check_writable(path: str | Path, what: str = "--out") -> Path:
    """`path` if it can be created: refuses an empty path, a path inside a file, and a folder this
    process cannot write to (tried with a probe file, which is removed). Nothing is left behind."""
    if not str(path).strip():
        raise InputError(f"{what} is empty")
    path = Path(path).expanduser()
    try:
        path.resolve()
    except (RuntimeError, OSError) as exc:  # a symbolic link that leads back to itself
        raise InputError(f"{what} {path} cannot be created: {exc}") from None
    ancestor = path.absolute().parent
    while not _exists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{what} {path} cannot be created: {ancestor} is a file, not a folder")
    _check_name_lengths(path, ancestor, what)
    try:
        fd, probe = tempfile.mkstemp(prefix=".erasure-probe-", dir=ancestor)
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be created: {ancestor} is not writable ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path


# The longest name written beside an output, as its own name plus this: `.NAME.staging-PID-XXXXXXXX` (a folder
# written atomically), `.NAME.tmp-PID-XXXXXXXX` (a file written atomically), `.NAME.work` (a run's checkpoints).
NAME_OVERHEAD = 32


def _check_name_lengths(path: Path, ancestor: Path, what: str) -> None:
    """Refuse a name the file system would refuse, now rather than when the result is saved after all the work."""
    try:
        limit = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    created = path.absolute().relative_to(ancestor.absolute()).parts
    for part in created:
        extra = NAME_OVERHEAD if part == created[-1] else 0
        if len(os.fsencode(part)) + extra > limit:
            raise InputError(f"{what}: the name {part[:24]}... is {len(os.fsencode(part))} bytes long, and this file "
                             f"system takes at most {limit - extra} for it; choose a shorter one")  # fmt: skip


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to look up (ENAMETOOLONG) does not exist either
        return False


def check_outside(path: str | Path, folder: str | Path, what: str, folder_what: str) -> None:
    """Refuse to write `path` inside `folder`, a model that is read: a model is identified by the digest of every
    weight file under it, so weights written into it would make it (and the runs tied to it) another model."""
    path, folder = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    if folder.is_dir() and (path == folder or folder in path.parents):
        raise InputError(f"{what} {path} is inside {folder_what} {folder}; write it somewhere else")


# What marks a model folder: a diffusers pipeline, an erased run, a GAN folder of this project.
MODEL_FOLDER_MARKERS = ("model_index.json", "erasure.json", "generator_config.json")


def check_outside_models(path: str | Path, what: str) -> None:
    """Refuse to write `path` inside a model folder: a model's digest covers every weight file under it, so a run or
    an export written there would make it another model (and orphan the runs and reports tied to it)."""
    path = Path(path).expanduser().resolve()
    for folder in path.parents:
        if any((folder / marker).is_file() for marker in MODEL_FOLDER_MARKERS):
            raise InputError(f"{what} {path} is inside the model folder {folder}; write it somewhere else")


def files_sha256(named_files: Iterable[tuple[str | None, Path]], separator: bytes = b"") -> str:
    """sha256 over files in the order given, each one's contents after its name (and `separator`) when it has one."""
    digest = hashlib.sha256()
    for name, path in named_files:
        if name is not None:
            digest.update(name.encode() + separator)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | Path):
    """The JSON value in `path`, or InputError naming the file when it is none (not UTF-8, not JSON, or nested
    deeper than the parser goes: a crafted file)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, huge numbers
        reason = "nested too deep" if isinstance(exc, RecursionError) else str(exc)
        raise InputError(f"{path} is not valid JSON ({reason})") from None


def write_json(path: str | Path, data, **dump_options) -> Path:
    """`data` as indented JSON with a final newline, written atomically."""
    text = json.dumps(data, indent=2, **dump_options) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of `text` ("A red Seven!" -> "a-red-seven"), at most `limit` characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "concept"
