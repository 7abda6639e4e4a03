"""`torch.load` for untrusted files: tensors only, and refusals that never advise unsafe loading.

torch's own message for a refused pickle says that loading with `weights_only=False` "will likely
succeed": advice that runs the file's code. The reason is kept, the advice is not.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import InputError


def load_tensors(source: str | Path | Any, name: str, allowed_globals: Iterable[type] = ()) -> Any:
    """Load `source` (a path or a file object) with `weights_only=True`; `name` names it in errors."""
    import torch

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


def refusal_reason(exc: BaseException) -> str:
    """The cause in torch's message, without its advice to load with `weights_only=False`."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].strip()
        return detail or "unsupported content"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first.split(". ")[0] if "weights_only" not in first else "unsupported content"
