"""`torch.load` for untrusted files: tensors only, and refusals that never advise unsafe loading.

torch's own message for a refused pickle says that loading with `weights_only=False` "will likely
succeed": advice that runs the file's code. The reason is kept, the advice is not.
"""

from __future__ import annotations

import pickle
import re
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
