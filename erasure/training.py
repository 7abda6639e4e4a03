"""The training-loop skeleton every method shares: accelerate, seeds, progress, checkpoint/resume.

A method supplies `step_fn(step) -> (loss, logs)`; the loop owns zero_grad/backward/step, the
progress bar, periodic checkpoints (trainable parameters, optimiser, RNG states and the method's
extra tensors, e.g. AdvUnlearn's warm-started attack) and resuming from the last one, so that an
interrupted and resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.errors import InputError

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class RunContext:
    """How to run (not what to compute): device, precision, seed, checkpoints, progress."""

    seed: int = 0
    device: str = "cpu"
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 50
    resume: bool = False
    progress: bool = True
    after_step: Callable[[int, int, dict], None] | None = None  # (step, total, logs), e.g. the UI's progress
    accelerator: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise InputError(f"--mixed-precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but CUDA is not available on this machine")
        if self.mixed_precision == "fp16" and not self.device.startswith("cuda"):
            raise InputError("fp16 mixed precision needs --device cuda; use bf16 or no on CPU")

    def prepare(self):
        """Create the accelerator (once) and seed every generator."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if self.accelerator is None:
            self.accelerator = Accelerator(cpu=not self.device.startswith("cuda"), mixed_precision=self.mixed_precision)
        set_seed(self.seed)
        return self.accelerator

    @property
    def torch_device(self) -> torch.device:
        return self.prepare().device


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # numpy's state as plain values and a tensor, so that weights_only loading accepts it
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, step: int, module, optimizer, extra: dict, fingerprint: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "params": {n: p.detach().cpu() for n, p in _trainable(module).items()},
        "optimizer": optimizer.state_dict(),
        "extra": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in extra.items()},
        "rng": _rng_state(),
        "fingerprint": fingerprint,
    }
    tmp = path / (CHECKPOINT_FILE + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path / CHECKPOINT_FILE)  # never leave a half-written checkpoint


def load_checkpoint(path: Path) -> dict:
    # Our own files, but still loaded without executing code: tensors and plain containers only.
    return torch.load(path / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def train(
    step_fn: Callable[[int], tuple[torch.Tensor, dict[str, float]]],
    *,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    run: RunContext,
    desc: str,
    extra: dict | None = None,
    fingerprint: dict | None = None,
    max_grad_norm: float | None = 1.0,
) -> dict[str, float]:
    """Run `steps` optimiser steps of `step_fn` on the trainable parameters of `module`.

    `extra` holds method state that must survive a resume (tensors or plain values; updated in
    place by `step_fn`). `fingerprint` (the resolved config, concepts, seed) must match on resume.
    Returns the logs of the last step.
    """
    from tqdm.auto import tqdm

    accelerator = run.prepare()
    extra = extra if extra is not None else {}
    fingerprint = fingerprint or {}
    start = 0
    if run.resume and run.checkpoint_dir is not None and (run.checkpoint_dir / CHECKPOINT_FILE).is_file():
        state = load_checkpoint(run.checkpoint_dir)
        if state["fingerprint"] != fingerprint:
            raise InputError("the checkpoint to resume was made with other settings; rerun without --resume")
        params = _trainable(module)
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        for key, value in state["extra"].items():
            extra[key] = value.to(run.torch_device) if torch.is_tensor(value) else value
        _set_rng_state(state["rng"])
        start = state["step"]
    module, optimizer = accelerator.prepare(module, optimizer)
    params = list(_trainable(module).values())
    logs: dict[str, float] = {}
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, unit="step", disable=not run.progress)
    for step in bar:
        with accelerator.autocast():
            loss, logs = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
        done = step + 1
        if (
            run.checkpoint_dir is not None
            and run.checkpoint_every > 0
            and done % run.checkpoint_every == 0
            and done < steps
        ):
            save_checkpoint(run.checkpoint_dir, done, accelerator.unwrap_model(module), optimizer, extra, fingerprint)
        if run.after_step is not None:
            run.after_step(done, steps, logs)
    bar.close()
    return logs


@dataclass
class ErasureResult:
    """What a method's `erase()` returns: the patched model and what changed."""

    model: object  # the patched backend (TextToImageModel, GAN backend, ...), ready to save
    changed: list[str]  # component folders that differ from the base model, e.g. ["text_encoder"]
    trainable_parameters: int
    logs: dict[str, float] = field(default_factory=dict)
