"""Which device to run on: `auto` picks the GPU when there is one."""

from __future__ import annotations

import logging

from .errors import InputError

AUTO = "auto"
log = logging.getLogger(__name__)


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


DTYPES = ("auto", "fp32", "fp16", "bf16")


def resolve_dtype(dtype: str | None, device: str):
    """The weights' dtype for inference: `auto` is half precision on a GPU (what diffusers users run) and float32 on
    the CPU (where half precision is slower, and where the digits results were measured)."""
    import torch

    name = (dtype or AUTO).strip().lower()
    if name == AUTO:
        return torch.float16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise InputError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    if name == "fp16" and device == "cpu":
        # It runs (diffusers' warning that it will fail predates torch's CPU half kernels), but slowly; bf16 does not
        log.warning("--dtype fp16 on the CPU works but is several times slower than fp32 (digits-sd: 2.3 s against "
                    "0.4 s an image); --dtype auto uses fp32 there")  # fmt: skip
    return table[name]


def model_dtype(dtype: str | None, device: str, kind: str):
    """`resolve_dtype` for a model of `kind`. A GAN's weights stay float32: its images are drawn and recorded as fp32,
    and a half precision asked for is refused rather than recorded for images it did not draw."""
    import torch

    if kind != "gan":
        return resolve_dtype(dtype, device)
    if (dtype or AUTO).strip().lower() not in (AUTO, "fp32"):
        raise InputError(f"--dtype {dtype} does not apply to a GAN: its weights stay fp32")
    return torch.float32


def dtype_name(dtype) -> str:
    """torch.float16 -> "fp16" (as `--dtype` spells it), for the settings a result is saved with."""
    import torch

    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def to_device(tensor, device):
    """A tensor made on the host (token ids), on `device`. On a GPU it goes through pinned memory without waiting:
    a copy from pageable memory first waits for every kernel already queued, which a training loop would pay at
    each prompt it encodes."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
