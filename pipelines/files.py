"""Files that are either complete or absent: everything the toolkit writes goes through here."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place.

    A crash or an exception mid-write leaves `path` as it was (absent, or the previous version).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data, **dump_options) -> Path:
    """`data` as indented JSON with a final newline, written atomically."""
    text = json.dumps(data, indent=2, **dump_options) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of `text` ("A red Seven!" -> "a-red-seven"), at most `limit` characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "concept"
