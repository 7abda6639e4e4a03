"""Pipeline folders whose unchanged components are the base model's own files.

An erased model differs from its base in one or two components (AdvUnlearn: the text encoder;
SFD: the UNet). Re-serialising the others would turn the base's fp16 weights into fp32 and take
minutes and gigabytes per run on SD 1.x, so a run folder takes them from the base instead:

- `full` (the default): a complete diffusers folder; each unchanged component is hard-linked from
  the base, or copied byte for byte when a link is not possible (another filesystem).
- `changed`: the changed components only, plus `erasure_base.json`, which names the base (Hub id,
  embedded name or absolute path) and the sha256 of every component it lends. Loading resolves the
  base and checks those digests, so a text encoder is never paired with another UNet unnoticed.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError
from .files import files_sha256, read_json, write_json
from .safe_load import PICKLED_SUFFIXES

BASE_FILE = "erasure_base.json"
SAVE_MODES = ("full", "changed")
RUN_SAVE_MODES = (*SAVE_MODES, "lora")  # erase --save: a LoRA run can also be kept as its adapters alone

log = logging.getLogger(__name__)


def pipeline_components(folder: Path) -> list[str]:
    """The component names model_index.json lists (absent optional parts such as the safety checker excluded)."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and None not in v]


def read_base_ref(folder: Path) -> dict | None:
    path = Path(folder) / BASE_FILE
    if not path.is_file():
        return None
    ref = read_json(path)
    if not isinstance(ref, dict) or not isinstance(ref.get("spec"), str) or not isinstance(ref.get("components"), dict):
        raise InputError(f"{path} does not name a base model and its components")
    return ref


def component_folders(folder: str | Path) -> dict[str, Path]:
    """Where each component of a pipeline folder lives: its own subfolder, or its base's (checked) when lent."""
    folder = Path(folder)
    names = pipeline_components(folder)
    own = {name: folder / name for name in names if (folder / name).is_dir()}
    missing = [name for name in names if name not in own]
    if not missing:
        return own
    ref = read_base_ref(folder)
    if ref is None:
        raise InputError(f"{folder} is missing the {missing[0]}/ folder that model_index.json lists")
    base = _base_folder(ref, folder)
    lent = component_folders(base)
    for name in missing:
        if name not in lent or name not in ref["components"]:
            raise InputError(f"{folder} takes {name}/ from its base {ref['spec']}, which has no such component")
        if files_digest(lent[name]) != ref["components"][name]:
            raise InputError(
                f"the base model of {folder} has changed since the run was saved: its {name}/ ({lent[name]}) is not "
                f"the one the run was made from; restore {ref['spec']} or rerun the erasure"
            )
    return {**own, **{name: lent[name] for name in missing}}


def _base_folder(ref: dict, folder: Path) -> Path:
    from .loading import resolve

    try:
        source = resolve(ref["spec"])
    except InputError as exc:
        raise InputError(f"the base model of {folder} ({ref['spec']}) is no longer there: {exc}") from None
    if not source.path.is_dir() or not (source.path / "model_index.json").is_file():
        raise InputError(f"the base model of {folder} ({ref['spec']}) is not a diffusers pipeline folder")
    pinned = ref.get("revision")
    if source.origin == "hub" and pinned and source.revision != pinned:
        # The Hub repository moved on since the run; the snapshot the run was made from may still be cached.
        cached = source.path.parent / pinned
        if (cached / "model_index.json").is_file():
            return cached
    return source.path


def files_digest(folder: Path) -> str:
    """sha256 over every file of a component folder (names and contents, symlinks followed); of a file, its
    contents."""
    if folder.is_file():
        return files_sha256([(None, folder)])
    return files_sha256(((str(p.relative_to(folder)), p) for p in sorted(folder.rglob("*")) if p.is_file()), b"\0")


def _lendable(folder: Path) -> bool:
    """A component folder can be taken as it is when its weights are safetensors (or it has none)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    pickled = any(p.suffix in PICKLED_SUFFIXES for p in files)
    return not pickled or any(p.suffix == ".safetensors" for p in files)


def link_folder(source: Path, target: Path) -> None:
    """`target` becomes a copy of `source` made of hard links (byte-for-byte copies where linking fails).

    Pickled weights beside safetensors ones are left out: loading never reads them.
    """
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if path.suffix in PICKLED_SUFFIXES:
            continue
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path.resolve(), dest)
        except OSError as exc:  # another filesystem, or hard links to others' files forbidden
            log.info("copying %s (cannot link: %s)", path, exc.strerror)
            shutil.copyfile(path, dest)


def base_spec(source) -> str:
    """How a run refers to its base: the embedded name or Hub id, else the absolute path."""
    return source.spec if source.origin in ("embedded", "hub") else str(Path(source.path).resolve())


def save_pipeline(pipe, directory: Path, *, changed: list[str], source, mode: str = "full") -> dict[str, str]:
    """Save `pipe` into `directory`: changed components serialised (safetensors), the others taken from
    the base `source` (a ModelSource) as `mode` says. Returns {component: how it was stored}."""
    if mode not in SAVE_MODES:
        raise InputError(f"unknown save mode {mode!r}; choose one of: {', '.join(SAVE_MODES)}")
    base = component_folders(source.path) if Path(source.path).is_dir() else {}
    directory.mkdir(parents=True, exist_ok=True)
    stored, lent = {}, {}
    for name in _components_of(pipe):
        folder = base.get(name)
        if name in changed or folder is None or not _lendable(folder):
            save_component(getattr(pipe, name), directory / name)
            stored[name] = "saved"
        elif mode == "full":
            link_folder(folder, directory / name)
            stored[name] = "linked"
        else:
            lent[name] = files_digest(folder)
            stored[name] = "base"
    pipe.save_config(directory)
    if lent:
        write_json(directory / BASE_FILE, {"spec": base_spec(source), "revision": source.revision, "components": lent})
    return stored


def _components_of(pipe) -> list[str]:
    return [
        k for k, v in pipe.config.items() if not k.startswith("_") and isinstance(v, (list, tuple)) and None not in v
    ]


def save_component(module, folder: Path) -> None:
    from .logs import quiet_libraries

    save = module.save_pretrained
    kwargs = {"safe_serialization": True} if "safe_serialization" in inspect.signature(save).parameters else {}
    with quiet_libraries():  # transformers draws a bar per shard written
        save(folder, **kwargs)


@contextmanager
def loadable_folder(folder: Path) -> Iterator[Path]:
    """A folder diffusers can load: `folder` itself, or, for a `changed` run, a temporary view of it in which
    the lent components are links to the base's folders."""
    folder = Path(folder)
    if read_base_ref(folder) is None:
        component_folders(folder)  # names a missing component; diffusers' own error blames the folder's weights
        yield folder
        return
    from .loading import check_weight_files

    parts = component_folders(folder)
    for part in parts.values():
        check_weight_files(part)
    with tempfile.TemporaryDirectory(prefix="erasure-view-") as tmp:
        view = Path(tmp)
        for path in folder.iterdir():
            if path.is_file():
                os.symlink(path.resolve(), view / path.name)
        for name, part in parts.items():
            os.symlink(part.resolve(), view / name, target_is_directory=True)
        yield view
