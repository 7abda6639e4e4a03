"""`torch.load` for untrusted files: tensors only, and refusals that never advise unsafe loading.

torch's own message for a refused pickle says that loading with `weights_only=False` "will likely
succeed": advice that runs the file's code. The reason is kept, the advice is not.

torch.load also inflates whatever a zip entry declares before any of this applies, so zip-format files
are checked first (`zip_refusal`); and a file in its older format may declare storages it never fills, which
torch.load hands back holding whatever memory they were given, so those are checked too (`legacy_refusal`).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InputError

PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")  # weight files that hold pickles (torch.save, pickle)

ZIP_MAGIC = b"PK\x03\x04"  # how torch.load tells its zip format from the older one


def load_tensors(source: str | Path | Any, name: str, allowed_globals: Iterable[type] = ()) -> Any:
    """Load `source` (a path or a file object) with `weights_only=True`; `name` names it in errors."""
    import torch

    check_torch_file(source, name)
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"refused to load {name}: it is not a checkpoint of plain tensors ({refusal_reason(exc)}); "
            "only tensors are read from pickled files - a safetensors copy of the weights loads anywhere"
        ) from None
    except Exception as exc:
        raise InputError(f"cannot read {name}: {refusal_reason(exc)}") from None


def check_torch_file(source: str | Path | BinaryIO, name: str) -> None:
    """Refuse, in one line, a file torch.load must not open (`torch_file_refusal`) or cannot read."""
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as file:
                reason = torch_file_refusal(file)
        else:
            reason = torch_file_refusal(source)
    except (OSError, zipfile.BadZipFile) as exc:  # BadZipFile: a damaged file (a full disk cuts one short)
        raise InputError(f"cannot read {name}: {exc}") from None
    if reason:
        raise InputError(f"refused to load {name}: {reason}")


def torch_file_refusal(file: BinaryIO) -> str | None:
    """Why torch.load must not open this file (in either of its formats), or None."""
    start = file.tell()
    magic = file.read(4)
    file.seek(start)
    return zip_refusal(file) if magic == ZIP_MAGIC else legacy_refusal(file)


def zip_refusal(file: BinaryIO) -> str | None:
    """Why torch.load must not open this zip-format file, or None (also for files in torch's older format);
    zipfile.BadZipFile for one whose zip directory cannot be read (damaged, or not a zip after all).

    torch.save stores its entries uncompressed, while torch's reader inflates compressed ones to the size they
    declare: a file of kilobytes could take gigabytes before anything else is checked. Only the zip directory is
    read here; the file is left at the position it had.
    """
    start = file.tell()
    try:
        if file.read(4) != ZIP_MAGIC:
            return None
        size = file.seek(0, os.SEEK_END) - start
        file.seek(start)
        try:
            with zipfile.ZipFile(file) as archive:
                entries = archive.infolist()
        except (zipfile.BadZipFile, ValueError, EOFError) as exc:  # not opened: torch's reader would fail too
            raise zipfile.BadZipFile(f"not a readable zip archive ({exc})") from None
    finally:
        file.seek(start)
    if any(entry.compress_type != zipfile.ZIP_STORED for entry in entries):
        return "it holds compressed entries, which torch.save never writes"
    if sum(entry.file_size for entry in entries) > size:
        return "its entries declare more bytes than the file holds"
    return None


class _StandIn:
    """What every global of a pickle becomes while `legacy_refusal` walks it: accepts anything, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def add(self, item):
        pass


class _DeclaredStorages(pickle.Unpickler):
    """Reads the pickles of torch's older format, noting the storages they declare; every global is a
    `_StandIn`, so nothing the file names is imported or called."""

    def __init__(self, file: BinaryIO):
        super().__init__(file, encoding="utf-8")  # torch.load's own default
        self.declared: set = set()

    def find_class(self, module: str, name: str):
        return _StandIn

    def persistent_load(self, saved_id):
        if isinstance(saved_id, tuple) and len(saved_id) > 2 and saved_id[0] in ("storage", b"storage"):
            self.declared.add(saved_id[2])
        return _StandIn()


def legacy_refusal(file: BinaryIO) -> str | None:
    """Why torch.load must not open this file in torch's older (non-zip) format, or None.

    That format is four pickles (a magic number, a version, system facts, the object) and then the list of
    storages whose bytes follow. torch.load allocates each storage the object declares, uninitialised, and fills
    only those the list names: a storage left out of it would load holding whatever memory it was given - bytes of
    this process turned into model weights. Only the pickles are read, not the storages' bytes; the file is left
    at the position it had. A file that is not in this format at all is left to torch.load to refuse.
    """
    start = file.tell()
    walker = _DeclaredStorages(file)
    try:
        for _ in range(4):  # magic number, protocol version, system facts, the object
            walker.load()
        listed = walker.load()
    except Exception:  # not this format, or damaged: torch.load says which, in its own words
        return None
    finally:
        file.seek(start)
    if not isinstance(listed, list) or not all(isinstance(key, (str, bytes)) for key in listed):
        return "its list of storages is not a list of names"
    missing = walker.declared - set(listed)
    if missing:
        return f"it declares {len(missing)} storage(s) whose bytes it does not hold (they would load as stray memory)"
    return None


def refusal_reason(exc: BaseException) -> str:
    """The cause in torch's message, without its boilerplate and without its advice (to load with
    `weights_only=False`, or to allowlist the refused global): both would run the file's code."""
    boilerplate = ("weights_only", "safe_globals", "allowlist", "Weights only load failed", "In PyTorch",
                   "Check the documentation", "Please file an issue", "Do it only if",
                   "WeightsUnpickler error")  # fmt: skip
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", str(exc)):
        sentence = sentence.strip()
        if sentence and not any(phrase in sentence for phrase in boilerplate):
            return sentence.rstrip(".")
    return "unsupported content"
