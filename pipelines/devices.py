"""Which device to run on: `auto` picks the GPU when there is one."""

from __future__ import annotations

from .errors import InputError

AUTO = "auto"


def resolve_device(device: str | None = AUTO) -> str:
    """`auto`/None -> "cuda" when CUDA is available, else "cpu"; "cpu", "cuda", "cuda:N" are checked.

    Checked here, before any model loads, so that a typo or a missing GPU fails in a second.
    """
    import torch

    name = (device or AUTO).strip().lower()
    if name == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type != "cuda":
        raise InputError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for but CUDA is not available on this machine; use cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name
