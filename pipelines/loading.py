"""Resolve what the user named as a model and load it.

A model can be named by: an embedded name (`digits`, `digits-sd`, `digits-gan`), a local diffusers
folder (also an erased run folder, which is one), a single-file Stable Diffusion checkpoint
(`.safetensors`/`.ckpt`), a StyleGAN2 checkpoint (`.pt`/`.pkl`, or a folder this project saved),
or a Hugging Face Hub id. Everything is checked before heavy work starts, so bad input fails in
a second with one readable message.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .cards import MODEL_CARD_FILE, read_model_card
from .errors import InputError
from .files import files_sha256, read_json
from .safe_load import PICKLED_SUFFIXES
from .zoo import models as zoo

Kind = Literal["text-to-image", "one-step", "gan"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
GAN_FILE_SUFFIXES = (".pt", ".pkl")
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")  # what diffusers and transformers torch.load from a folder
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "text-to-image", "StableDiffusionXLPipeline": "text-to-image",
    "FluxPipeline": "text-to-image",
    "OneStepPipeline": "one-step",
}  # fmt: skip
GAN_CONFIG_FILE = "generator_config.json"
PROMPTED_KINDS = ("text-to-image", "one-step")  # prompt-conditioned: generated and judged alike


def comparable_kinds(a: str, b: str) -> bool:
    """Whether models of kinds `a` and `b` can be compared (e.g. an SFD one-step run with its teacher)."""
    return a == b or (a in PROMPTED_KINDS and b in PROMPTED_KINDS)


@dataclass
class ModelSource:
    """Where a model comes from, resolved; enough to load it and to record it in a manifest."""

    spec: str  # what the user typed
    kind: Kind
    path: Path  # local folder or file
    origin: str  # "embedded", "local", "single-file", "hub", "gan-file"
    revision: str | None = None  # Hub commit, when from the Hub
    card: dict = field(default_factory=dict)  # erasure_model.json of the folder, if any

    @functools.cached_property
    def family(self):
        """The model's family (pipelines/families): what its card declares, else what its files say."""
        from .families import detect

        return detect(self.kind, Path(self.path), self.card.get("family"))

    def describe(self) -> dict:
        return {
            "spec": self.spec, "kind": self.kind, "origin": self.origin, "path": str(Path(self.path).resolve()),
            "revision": self.revision, "family": self.family.name, "sha256": weights_digest(self.path),
        }  # fmt: skip


def weights_digest(path: Path) -> str:
    """sha256 over the weight files of a model (names and contents), to pin what was erased."""
    if path.is_file():
        return files_sha256([(path.name, path)])
    weights = (".safetensors", *PICKLED_SUFFIXES)
    return files_sha256((str(p.relative_to(path)), p) for p in sorted(path.rglob("*")) if p.suffix in weights
                        and p.is_file())  # fmt: skip


def check_weight_files(path: Path) -> None:
    """Open each safetensors header, catching truncated or corrupt files before any loading; and check each pickled
    weight file (`.bin`, a folder without safetensors) as this project's own torch.load does, since diffusers and
    transformers would load it with torch.load themselves."""
    from safetensors import safe_open

    from .safe_load import check_torch_file

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                 if p.suffix in (".safetensors", *PICKLED_WEIGHTS) and p.is_file())
    for f in files:
        if f.suffix != ".safetensors":
            check_torch_file(f, str(f))
            continue
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise InputError(f"corrupt safetensors file {f}: {exc}") from None


def _folder_kind(path: Path) -> Kind:
    index = path / "model_index.json"
    if index.is_file():
        index_json = read_json(index)
        if not isinstance(index_json, dict):
            raise InputError(f"{index} is not a pipeline index (a JSON object with _class_name)")
        class_name = index_json.get("_class_name", "")
        if class_name not in PIPELINE_CLASSES:
            raise InputError(
                f"{path} holds a {class_name or 'unknown'} pipeline; supported: {', '.join(PIPELINE_CLASSES)}"
            )
        return PIPELINE_CLASSES[class_name]  # type: ignore[return-value]
    if (path / GAN_CONFIG_FILE).is_file() or (path / "generator" / GAN_CONFIG_FILE).is_file():
        return "gan"
    raise InputError(
        f"{path} is not a model folder (no model_index.json for a diffusers pipeline, no {GAN_CONFIG_FILE} for a GAN)"
    )


def check_model_config(model_config, *sources: ModelSource) -> None:
    """`--model-config` names the component configs of a single-file checkpoint: given for anything else (or
    missing), it is refused rather than silently ignored."""
    if model_config is None:
        return
    if not any(Path(s.path).is_file() for s in sources):
        raise InputError(f"--model-config applies to single-file checkpoints; {sources[0].spec} is not one")
    if not Path(model_config).expanduser().exists():
        raise InputError(f"--model-config {model_config}: no such file or folder")


def resolve(spec: str | os.PathLike | None) -> ModelSource:
    """Turn a model name, path or Hub id into a ModelSource, or raise InputError."""
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        # A loaded model carries no record of what it was loaded from, which a run's manifest needs (and its hash)
        raise InputError(f"a model is given by its name, folder, file or Hub id, not as a loaded {type(spec).__name__}:"
                         " pass what it was loaded from")  # fmt: skip
    spec = str(spec) if spec is not None else zoo.DEFAULT_MODEL
    if not spec.strip():
        raise InputError("empty model name")
    name = zoo.canonical_name(spec)
    if name is not None:
        kind, _ = zoo.EMBEDDED[name]
        if kind not in ("text-to-image", "gan"):
            raise InputError(f"{name} is an evaluator model ({kind}), not a generator")
        try:
            path = zoo.embedded_path(name)
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from None
        return ModelSource(spec, _folder_kind(path), path, "embedded", card=read_model_card(path))

    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            kind = _folder_kind(path)
            return ModelSource(spec, kind, path, "local", card=read_model_card(path))
        if path.suffix in SINGLE_FILE_SUFFIXES:
            return ModelSource(spec, "text-to-image", path, "single-file")
        if path.suffix in GAN_FILE_SUFFIXES:
            return ModelSource(spec, "gan", path, "gan-file")
        raise InputError(
            f"{path} is not a model: expected a folder, a {'/'.join(SINGLE_FILE_SUFFIXES)} Stable Diffusion "
            f"checkpoint or a {'/'.join(GAN_FILE_SUFFIXES)} StyleGAN2 checkpoint"
        )
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        if path.parent.is_dir():  # `runs/esd-sevn` beside a runs/ folder is a mistyped path, not a Hub id
            raise InputError(_missing_in_folder(path))
        local, revision = hub_snapshot(spec)
        return ModelSource(spec, _folder_kind(local), local, "hub", revision=revision, card=read_model_card(local))
    if spec.startswith((".", "/", "~")) or os.sep in spec or path.suffix:
        raise InputError(f"no such path: {spec}")
    raise InputError(
        f"no such model: {spec!r} is neither an embedded model ({', '.join(sorted(zoo.EMBEDDED))}), "
        f"an existing path, nor a Hub id (org/name)"
    )


def _missing_in_folder(path: Path) -> str:
    import difflib

    # hidden entries (a run's `.NAME.work` staging folder while it trains) are no model to point to
    names = [p.name for p in path.parent.iterdir() if path.name.startswith(".") or not p.name.startswith(".")]
    near = difflib.get_close_matches(path.name, names, n=3)
    hint = f"; did you mean {' or '.join(str(path.parent / n) for n in near)}?" if near else ""
    return (f"no such path: {path} (the folder {path.parent}/ is here, so it is not looked up on the Hub; "
            f"for the Hub model {path}, run from another folder){hint}")  # fmt: skip


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if the Hub's host (HF_ENDPOINT's, when set) accepts a TCP connection within `timeout`
    seconds (DNS included)."""
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def hub_snapshot(repo_id: str) -> tuple[Path, str | None]:
    """Local folder of a Hub model: from the cache if there, downloaded if online, else a clear error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # A pipeline's component folders only, safetensors only: no root single-file copies, no pickles.
    files = {
        "allow_patterns": ["model_index.json", MODEL_CARD_FILE, "*/*.json", "*/*.txt", "*/*.safetensors"],
        "ignore_patterns": ["*fp16*", "*non_ema*", "*ema_only*"],
    }
    try:
        local = Path(snapshot_download(repo_id, local_files_only=True, **files))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        local = None
    except Exception as exc:  # invalid repo id format and similar
        raise InputError(f"cannot look up {repo_id!r} on the Hugging Face Hub: {exc}") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if local is None:
        if offline or not hub_reachable():
            why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached (no network?)"
            raise InputError(
                f"cannot download {repo_id!r}: {why} and it is not in the local cache; download it on a "
                f"connected machine (`hf download {repo_id}`) and pass the folder, or use an embedded model"
            )
        try:
            local = Path(snapshot_download(repo_id, **files))
        except Exception as exc:
            raise InputError(f"cannot download {repo_id!r} from the Hugging Face Hub: {exc}") from None
    return local, local.name  # snapshot folders are named after the commit hash
