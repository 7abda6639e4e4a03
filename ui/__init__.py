"""The Gradio preview behind `erasure preview`: compare a base model with erased runs on the same
seeds, run an erasure with live progress and cancel, see and compute metrics, export a run.

Importing this package is cheap; gradio and torch load in `launch()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def launch(
    model: str | None = None,
    erased: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    runs_dir: str | Path = "runs",
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Check the arguments, then serve the app until interrupted (bound to `host`; public only with `share`)."""
    from erasure.output import read_run
    from pipelines import resolve
    from pipelines.devices import resolve_device, resolve_dtype
    from pipelines.errors import InputError

    from .compare import check_comparable

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if not 0 < port < 65536:
        raise InputError(f"--port must be between 1 and 65535, not {port}")
    for run in erased:
        read_run(run)  # a bad folder fails here, with one line, before gradio starts
    base = resolve(model)
    if model is not None:  # found here, not at each draw in the page; without --model each run has its own base
        check_comparable(erased, base.kind)
    _check_port_free(host, port)

    from .app import Preview
    from .app import launch as serve

    preview = Preview(model=model, erased=[str(r) for r in erased], runs_dir=Path(runs_dir), device=device,
                      dtype=torch_dtype)  # fmt: skip
    serve(preview, host=host, port=port, share=share)


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another server holds now, naming --port (gradio's own message names its Python API)."""
    import errno
    import socket

    from pipelines.errors import InputError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a closing port is free
        try:
            probe.bind((host, port))
        except socket.gaierror as exc:  # the name itself does not resolve: another port would not help
            raise InputError(f"cannot serve on {host}: no such host ({exc.strerror}); pass another --host") from None
        except OSError as exc:
            hint = "pass another --port" if exc.errno == errno.EADDRINUSE else "pass another --host or --port"
            raise InputError(f"cannot serve on {host}:{port} ({exc.strerror}): {hint}") from None
