"""The training loop every method shares, for one network or several.

A method hands the loop its networks by name, each with its own optimiser, and a step function.
The step function computes losses and calls `loop.update(name, loss)` for each network it updates,
as often and in the order its method needs (one update for ESD; a critic step then a generator
step for a GAN). The loop owns everything around that: accelerate preparation (so that several
processes synchronise gradients), mixed precision, gradient clipping, the progress bar with the
method's live losses, `after_step`, periodic checkpoints of every network, optimiser, random
stream and piece of method state, and resuming from the last checkpoint, so that an interrupted
and resumed run ends bit-identical to an uninterrupted one.

A step function returns its losses as detached tensors (floats are accepted too). Reading a value
on the host waits for the device, so on a GPU the loop reads them only every `run.sync_every`
steps, at checkpoints and at the end: once, for all the steps since the last read, together with
the finiteness of the weights. On the CPU it reads every step, which costs nothing there.

Several processes (`accelerate launch` / `torchrun`) run the same code with the same seed, so
every process draws the same random numbers; a method draws its *global* batch and keeps its own
rows with `run.shard(...)`. Gradients are averaged across processes, which makes a run on N
processes the same computation as one process on the whole batch. Only the main process writes
checkpoints and the run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.errors import InputError
from pipelines.files import atomic_write
from pipelines.signals import handling_stop_signals

from .config import FROZEN_PRECISIONS, MIXED_PRECISIONS, OPTIMIZER_STATES
from .output import refuse_other_settings

CHECKPOINT_FILE = "checkpoint.pt"


class StopRequest:
    """The stop signal (SIGTERM, SIGHUP) that arrived while `checkpoint_on_stop` was in force, if any: the training
    loop then checkpoints the step it is at and stops, instead of losing the steps since its last checkpoint."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at = 0.0  # time.monotonic() of the request

    def __bool__(self) -> bool:
        return self.signum is not None


STOP_REQUEST = StopRequest()


@dataclass
class RunContext:
    """How to run (not what to compute): device, precision, seed, checkpoints, progress."""

    seed: int | None = 0  # None: the caller has seeded the random streams (the zoo's recipes)
    device: str = "cpu"
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 50
    resume: bool = False
    progress: bool = True
    # (step, total, logs) after every step, e.g. the UI's progress; step == total on the last step of each `fit`,
    # where a stopping rule ended it too
    after_step: Callable[[int, int, dict], None] | None = None
    fingerprint: dict = field(default_factory=dict)  # what determines the result (erasure.api.run_fingerprint)
    sync_every: int | None = None  # steps between host reads of the losses; None: 1 on CPU, 25 on a GPU
    optimizer_state: str = "fp32"  # "fp32" | "8bit": Adam's moments (8-bit: bitsandbytes, the `adam8bit` extra)
    frozen_precision: str = "auto"  # "auto" | "full" | "half": the frozen networks' weights (see `frozen_dtype`)
    _accelerator: object = field(default=None, repr=False)
    _host_group: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise InputError(f"--mixed-precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but CUDA is not available on this machine")
        if self.mixed_precision == "fp16" and not self.device.startswith("cuda"):
            raise InputError("fp16 mixed precision needs --device cuda; use bf16 or no on CPU")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise InputError(f"--optimizer-state must be {' or '.join(OPTIMIZER_STATES)}, not {self.optimizer_state!r}")
        if self.optimizer_state == "8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise InputError("--optimizer-state 8bit needs bitsandbytes: pip install -e \".[adam8bit]\"")
        if self.frozen_precision not in FROZEN_PRECISIONS:
            raise InputError(
                f"--frozen-precision must be {', '.join(FROZEN_PRECISIONS)}, not {self.frozen_precision!r}"
            )
        if self.frozen_precision == "half" and self.mixed_precision == "no":
            raise InputError("--frozen-precision half computes in the mixed precision: add --mixed-precision bf16 "
                             "(or fp16 on a GPU)")  # fmt: skip

    @property
    def accelerator(self):
        """The accelerate `Accelerator` of this run (created on first use; under `accelerate launch`
        or `torchrun` this joins the process group)."""
        if self._accelerator is None:
            from accelerate import Accelerator
            from accelerate.state import AcceleratorState

            cpu = not self.device.startswith("cuda")
            index = self.device.partition(":")[2]
            if not cpu and index and int(os.environ.get("WORLD_SIZE", "1")) == 1:
                # One process: accelerate trains on the current CUDA device, not the one --device names.
                torch.cuda.set_device(int(index))
            if AcceleratorState._shared_state.get("_mixed_precision", self.mixed_precision) != self.mixed_precision:
                # accelerate keeps one precision per process and refuses another; a process that runs several
                # erasures (the preview, a benchmark) starts this one's afresh. The process group is kept.
                AcceleratorState._reset_state()
            # Autocast's cache would keep a half-precision copy of every trained weight for the whole step: at SD
            # size, with SFD's generator and fake score, 3.4 GB. Casting again at each use costs little (frozen
            # weights are never cached anyway: `frozen_dtype` is what spares them the cast), and the result is the same.
            from accelerate.utils import AutocastKwargs

            self._accelerator = Accelerator(cpu=cpu, mixed_precision=self.mixed_precision,
                                            kwargs_handlers=[AutocastKwargs(cache_enabled=False)])  # fmt: skip
        return self._accelerator

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype of the weights a method computes through but does not train (ESD's original, SFD's teacher,
        the UNet of the text-encoder methods). Half (the mixed precision's dtype) under `half`, and under `auto`
        on a GPU with mixed precision: autocast computes in it anyway, and then neither recasts the weights at
        every call nor keeps them in float32. Float32 otherwise, as every CPU result was measured."""
        half = self.frozen_precision == "half" or (
            self.frozen_precision == "auto" and self.mixed_precision != "no" and self.device.startswith("cuda")
        )
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[self.mixed_precision] if half else torch.float32

    def adam(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
             decoupled: bool = False) -> torch.optim.Optimizer:  # fmt: skip
        """The Adam (AdamW when `decoupled`) of a network's weights: bitsandbytes' blockwise 8-bit moments under
        `optimizer_state = 8bit` (a quarter of the state; tensors under 4096 values keep 32-bit moments), else
        torch's, fused into one kernel on a GPU (the same update, fewer launches)."""
        params, betas = list(params), tuple(betas)
        if self.optimizer_state == "8bit":
            import bitsandbytes as bnb

            kind = bnb.optim.AdamW8bit if decoupled else bnb.optim.Adam8bit
            return kind(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        kind = torch.optim.AdamW if decoupled else torch.optim.Adam
        fused = {"fused": True} if all(p.is_cuda and p.dtype == torch.float32 for p in params) and params else {}
        return kind(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **fused)

    def halve_frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` (frozen, not saved) in `frozen_dtype`; see `frozen_in_compute_dtype` for one that is saved."""
        if self.frozen_dtype != torch.float32:
            from pipelines.logs import quiet_libraries

            with quiet_libraries():  # diffusers' advice to load in that dtype instead: the module is in memory
                module.to(self.frozen_dtype)
        return module

    @contextlib.contextmanager
    def frozen_in_compute_dtype(self, module: torch.nn.Module):
        """`module`'s frozen tensors - all of them, or the base weights under LoRA adapters that train - in
        `frozen_dtype` inside the block, and back to their own float32 values after it (kept on the host
        meanwhile: the run still saves and returns them, a LoRA run merged into them)."""
        if self.frozen_dtype == torch.float32:
            yield module
            return
        named = itertools.chain(module.named_parameters(), module.named_buffers())
        frozen = {name: t for name, t in named if t.is_floating_point() and not t.requires_grad}
        kept = {name: t.detach().to("cpu", copy=True) for name, t in frozen.items()}
        for tensor in frozen.values():
            tensor.data = tensor.data.to(self.frozen_dtype)
        try:
            yield module
        finally:
            for name, tensor in frozen.items():
                tensor.data = kept[name].to(tensor.device)

    @property
    def steps_between_syncs(self) -> int:
        if self.sync_every is not None:
            return max(1, self.sync_every)
        # The UI's progress wants every step; on a CPU a read is free.
        return 1 if self.after_step is not None or self.torch_device.type == "cpu" else 25

    @property
    def torch_device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def host_group(self):
        """A gloo process group over this run's processes: small exchanges between their host threads (the stop
        vote) that do not wait for the GPU, as NCCL's would. Created once, by every process at the same point."""
        if self._host_group is None:
            import torch.distributed as dist

            self._host_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self._host_group

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def stage(self, name: str, seed_offset: int = 0) -> RunContext:
        """This run for one stage of a method of several: its checkpoints in the subfolder `name`, its random streams
        seeded `seed_offset` past the run's, wrapped into the seeds numpy accepts ([0, 2**32), as --seed is): a seed
        near the top would otherwise fail at the stage, after the stages before it had run."""
        folder = self.checkpoint_dir / name if self.checkpoint_dir is not None else None
        seed = None if self.seed is None else (self.seed + seed_offset) % 2**32
        return dataclasses.replace(self, seed=seed, checkpoint_dir=folder)

    def seed_everything(self) -> None:
        """The same seed in every process: they draw the same global batches and shard them."""
        from accelerate.utils import set_seed

        set_seed(self.seed)

    def check_divisible(self, name: str, value: int) -> None:
        if value % self.num_processes:
            raise InputError(f"{name} = {value} must be a multiple of the {self.num_processes} processes")

    def shard(self, batch):
        """This process's rows of a global batch (a tensor or a list); all of it on one process."""
        count, index = self.num_processes, self.accelerator.process_index
        if count == 1:
            return batch
        self.check_divisible("the batch", len(batch))
        size = len(batch) // count
        return batch[index * size : (index + 1) * size]

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The global batch back from every process's shard (the inverse of `shard`)."""
        return shard if self.num_processes == 1 else self.accelerator.gather(shard.contiguous())


@dataclass
class Network:
    """A network the loop trains: its module, its optimiser and how its gradients are clipped."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    max_grad_norm: float | None = 1.0


class EMA:
    """An exponential moving average of a module's parameters, checkpointed with the run as loop state:
    after each update of the module, `update` moves every average a share `1 - decay` towards it."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        # the trained parameters only: a frozen one would average to itself (a LoRA run's base weights)
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name])

    def state_dict(self) -> dict:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # numpy's state as plain values and a tensor, so that weights_only loading accepts it
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        # This process's device only: only the main process writes checkpoints, and every process draws the same
        # stream on its own device (the same global batch), so each restores the main one's onto its own device.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters of `module` that train, by name."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _stateful(value) -> bool:
    return hasattr(value, "state_dict") and hasattr(value, "load_state_dict")


def save_finished_stage(path: Path | None, tensors: dict[str, torch.Tensor], fingerprint: dict, **meta: str) -> None:
    """What a finished stage of a multi-stage method hands on (safetensors, with the fingerprint it was made
    under): a resumed run takes it instead of training the stage again."""
    import json

    from safetensors.torch import save_file

    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"fingerprint": json.dumps(fingerprint), **meta}
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_finished_stage(path: Path | None, fingerprint: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
    """A finished stage saved by `save_finished_stage` under this fingerprint (tensors, metadata), if any."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    if path is None or not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if json.loads(meta.get("fingerprint", "null")) != fingerprint:
        raise InputError(f"{path} was made with other settings; rerun with those, or delete {path.parent} to start "
                         "over")  # fmt: skip
    return load_file(str(path)), meta


def load_checkpoint(path: Path) -> dict:
    # Our own files, but still loaded without executing code: tensors and plain containers only.
    from pipelines.safe_load import load_tensors

    try:
        return load_tensors(path / CHECKPOINT_FILE, f"the checkpoint {path / CHECKPOINT_FILE}")
    except InputError as exc:  # the advice for a model file (a safetensors copy) does not fit a damaged checkpoint
        reason = str(exc).partition(" - ")[0]
        raise InputError(f"{reason}; delete {path.parent} to start the run over") from None


class TrainingDiverged(InputError):
    """A non-finite loss or weight. The same settings and seeds would diverge again from any checkpoint of the run,
    so the run keeps none."""


class Terminated(Exception):
    """A stop signal arrived: the loop checkpointed the step it was at (`--resume` continues from there) and stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# A second stop signal this long after the first ends the process at once. Sooner, it is the same stop delivered
# twice: a scheduler signals every process of a job, and torchrun forwards the signal it got to its workers as well.
SAME_STOP_S = 2.0


@contextlib.contextmanager
def checkpoint_on_stop():
    """While inside, a stop signal (SIGTERM, SIGHUP) asks the training loop to checkpoint and stop at the end of its
    current step (the processes of a multi-process run agree on the step); a second one, more than `SAME_STOP_S`
    later, ends the process at once, as usual."""

    def requested(signum, frame):
        if STOP_REQUEST and time.monotonic() - STOP_REQUEST.at > SAME_STOP_S:  # asked again: stop now
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        elif not STOP_REQUEST:
            STOP_REQUEST.signum, STOP_REQUEST.at = signum, time.monotonic()
            # said at once: a step may take minutes (AdvUnlearn's first draws its bank), and silence reads as ignored
            name = signal.Signals(signum).name
            sys.stderr.write(f"\n{name} received: the run stops at the end of its current step, with a checkpoint "
                             f"that --resume continues from (another {name} ends it at once, without one)\n")

    STOP_REQUEST.signum = None
    try:
        with handling_stop_signals(requested):
            yield
    finally:
        STOP_REQUEST.signum = None


class TrainingLoop:
    """Trains `networks` with a method's step function; see the module docstring.

    `state` is method state that must survive a resume: tensors and plain values (replaced in the
    dict on resume; a step function updates them in place, e.g. AdvUnlearn's warm-started attack)
    and objects with `state_dict()`/`load_state_dict()` (an EMA copy, a data sampler).
    A checkpoint is resumed only under the same `run.fingerprint` (base model, method, config,
    concepts, seed, library versions), plus `fingerprint`: what a stage adds (adapt-unlearn's stages).
    """

    def __init__(
        self,
        run: RunContext,
        networks: dict[str, Network],
        *,
        desc: str,
        state: dict | None = None,
        fingerprint: dict | None = None,
    ):
        self.run, self.desc = run, desc
        self.state = state if state is not None else {}
        self.fingerprint = {**run.fingerprint, **(fingerprint or {})}
        self.networks = networks
        accelerator = run.accelerator
        self.modules: dict[str, torch.nn.Module] = {}  # what the step function calls: the prepared modules
        self._optimizers = {}
        self._stop_reason: str | None = None  # set by a method's stopping rule
        self._accumulating: set[str] = set()
        for name, network in networks.items():
            self.modules[name], self._optimizers[name] = accelerator.prepare(network.module, network.optimizer)

    def accumulate(self, name: str, loss: torch.Tensor) -> None:
        """Backpropagate `loss` into network `name`'s gradients, kept for its next `update`: one micro-batch of a
        step whose whole batch would not fit at once (each micro-batch's graph is freed before the next)."""
        if name not in self._accumulating:
            self._optimizers[name].zero_grad(set_to_none=True)
            self._accumulating.add(name)
        self.run.accelerator.backward(loss)

    def micro_batch(self, name: str, last: bool):
        """The context of one micro-batch's forward and backward passes into network `name`: under several
        processes gradients are exchanged once, after the `last` (accumulated locally before it: averaging is
        linear), not once per micro-batch."""
        return contextlib.nullcontext() if last else self.run.accelerator.no_sync(self.modules[name])

    def update(self, name: str, loss: torch.Tensor | None = None) -> None:
        """One optimiser step of network `name` on `loss` and what `accumulate` gathered since its last step
        (gradients averaged over the processes)."""
        accelerator, optimizer = self.run.accelerator, self._optimizers[name]
        if name not in self._accumulating:
            optimizer.zero_grad(set_to_none=True)
        self._accumulating.discard(name)
        if loss is not None:
            accelerator.backward(loss)
        max_norm = self.networks[name].max_grad_norm
        if max_norm is not None:
            # This optimiser's gradients only: accelerate's own clip_grad_norm_ unscales fp16 gradients through every
            # optimiser it ever prepared, and one over the same weights (STEREO's search rounds) divides them again.
            accelerator.unscale_gradients(optimizer=optimizer)
            torch.nn.utils.clip_grad_norm_(list(trainable_parameters(self.modules[name]).values()), max_norm)
        optimizer.step()
        # Freed now, not at this network's next update: a method that updates several networks in turn (SFD's
        # fake score and generator, a GAN's two) then never holds two sets of gradients at once.
        optimizer.zero_grad(set_to_none=True)

    def stop(self, reason: str) -> None:
        """End `fit` after the current step (a method's stopping rule); the run counts as finished. The progress bar
        ends short of its total, so `reason` is printed under it."""
        self._stop_reason = reason

    def fit(self, step_fn: Callable[[int], dict], steps: int) -> dict[str, float]:
        """Run steps `0..steps-1` of `step_fn(step) -> logs` (resuming where a checkpoint left off);
        returns the logs of the last step as floats, averaged over the processes."""
        from tqdm.auto import tqdm

        run, accelerator = self.run, self.run.accelerator
        if run.seed is not None:
            run.seed_everything()
        start = self._resume() if run.resume else 0
        bar = tqdm(
            initial=start, total=steps, desc=self.desc, unit="step", disable=not (run.progress and run.is_main)
        )  # fmt: skip
        every = run.steps_between_syncs
        pending: list[tuple[int, dict]] = []  # (step, logs) not yet read on the host
        logs: dict[str, float] = {}
        last_finite: dict[str, float] = {}
        try:
            for step in range(start, steps):
                with accelerator.autocast():
                    pending.append((step + 1, step_fn(step)))
                done = step + 1
                bar.update()  # counted when done, so that a stop's message and the bar agree on the step
                last = done == steps or self._stop_reason is not None
                # No checkpoint at the step a stopping rule ended the run: a resume from it would train on past the
                # stop.
                checkpoint = (
                    run.checkpoint_dir is not None and run.checkpoint_every > 0
                    and done % run.checkpoint_every == 0 and not last
                )  # fmt: skip
                if checkpoint or last or done % every == 0:
                    last_finite = self._check(self._read(pending), done, last_finite)
                    logs = last_finite
                    pending = []
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
                if checkpoint and run.is_main:
                    self.save_checkpoint(run.checkpoint_dir, done)
                if run.after_step is not None:
                    # A stopping rule's last step reports itself as the total: the run ends there, finished, and a
                    # callback that stops runs at checkpoints (the preview's cancel) must not discard it.
                    run.after_step(done, steps if self._stop_reason is None else done, logs)
                if self._stop_reason is not None:
                    if not bar.disable:
                        # Closed first: `bar.write` would redraw the bar under the line that explains it
                        bar.close()
                        print(f"{self.desc}: stopped at step {done}/{steps}: {self._stop_reason}", file=sys.stderr)
                    break
                if (signum := self._agreed_stop()) and not last:
                    self._checkpoint_and_stop(done, steps, pending, last_finite, checkpoint, signum)
        finally:
            bar.close()  # on an error too: the error's line then starts a line of its own
        self._release()
        return logs

    def _agreed_stop(self) -> int | None:
        """The stop signal to checkpoint and stop for after this step, if any.

        The processes of a multi-process run vote at every step, and stop together: a process that stopped alone, or
        a step before the others, would leave them waiting for it in a collective for ever. The vote is a gloo
        all-reduce of one integer between the host threads: it never waits for a GPU."""
        if self.run.num_processes == 1:
            return STOP_REQUEST.signum
        import torch.distributed as dist

        vote = torch.tensor([STOP_REQUEST.signum or 0], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.run.host_group)
        return int(vote.item()) or None

    def _checkpoint_and_stop(self, done: int, steps: int, pending: list, last_finite: dict, saved: bool,
                             signum: int) -> None:  # fmt: skip
        """A stop signal: checkpoint step `done` (its losses checked first, as at any checkpoint), raise Terminated."""
        run = self.run
        if run.checkpoint_dir is not None and run.checkpoint_every > 0 and not saved:
            self._check(self._read(pending), done, last_finite)
            if run.is_main:
                self.save_checkpoint(run.checkpoint_dir, done)
            run.accelerator.wait_for_everyone()  # the others report a resumable run only once it is written
        where = f"a checkpoint of step {done}/{steps}" if run.checkpoint_dir is not None else f"step {done}/{steps}"
        raise Terminated(f"{signal.Signals(signum).name}: stopped at {where}", signum)

    def _release(self) -> None:
        """accelerate keeps every network and optimiser it prepared until the process ends; a method with several
        stages (Adapt-then-Unlearn's adapted copies, Text-to-Unlearn's mappers) would hold each finished stage's
        weights and Adam moments through the next. Forgotten here, they are freed once the method drops them."""
        accelerator = self.run.accelerator
        mine = {id(m) for m in self.modules.values()} | {id(o) for o in self._optimizers.values()}
        for held in ("_models", "_optimizers"):
            if isinstance(getattr(accelerator, held, None), list):
                setattr(accelerator, held, [x for x in getattr(accelerator, held) if id(x) not in mine])

    def _read(self, pending: list[tuple[int, dict]]) -> list[tuple[int, dict[str, float]]]:
        """The pending steps' losses as floats, averaged over the processes: one host read for all."""
        if not pending or not any(logs for _, logs in pending):
            return [(step, {}) for step, _ in pending]
        device = self.run.torch_device
        flat = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                for _, logs in pending for v in logs.values()]  # fmt: skip
        values = torch.stack(flat)
        if self.run.num_processes > 1:
            values = self.run.accelerator.reduce(values, "mean")
        values = iter(values.tolist())
        return [(step, {k: next(values) for k in logs}) for step, logs in pending]

    def _check(self, read: list[tuple[int, dict[str, float]]], step: int, last_finite: dict[str, float]) -> dict:
        """Stop at the first non-finite loss or weight, before it reaches a checkpoint or the run folder;
        returns the last step's losses. Weights are checked where they are read, at `step`."""
        bad: list[str] = []
        for synced_step, logs in read:
            bad = [f"{k} = {v}" for k, v in logs.items() if not math.isfinite(v)]
            if bad:
                step = synced_step
                break
            last_finite = logs
        for name, module in self.modules.items():
            weights = list(trainable_parameters(module).values())
            if weights and not torch.stack([torch.isfinite(p).all() for p in weights]).all():
                bad.append(f"weights of the {name} are not finite")
        if bad:
            self._diverged(step, bad, last_finite)
        return last_finite

    @staticmethod
    def _diverged(step: int, bad: list[str], last_finite: dict[str, float]) -> None:
        before = ", ".join(f"{k} = {v:.4g}" for k, v in last_finite.items()) or "none yet"
        raise TrainingDiverged(
            f"training diverged at step {step}: {'; '.join(bad)} (last finite losses: {before}); "
            "lower the learning rate or check the settings"
        )

    def save_checkpoint(self, path: Path, step: int) -> None:
        unwrap = self.run.accelerator.unwrap_model
        payload = {
            "step": step,
            "networks": {
                n: {k: p.detach().cpu() for k, p in trainable_parameters(unwrap(m)).items()}
                for n, m in self.modules.items()
            },  # fmt: skip
            "optimizers": {n: opt.state_dict() for n, opt in self._optimizers.items()},
            "state": {
                k: v.state_dict() if _stateful(v) else v.detach().cpu() if torch.is_tensor(v) else v
                for k, v in self.state.items()
            },  # fmt: skip
            "rng": rng_state(),
            # fp16's loss scale and its growth count: a resume that started them over would skip other steps
            "scaler": None if self.run.accelerator.scaler is None else self.run.accelerator.scaler.state_dict(),
            "fingerprint": self.fingerprint,
        }
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / CHECKPOINT_FILE, lambda tmp: torch.save(payload, tmp), durable=True)  # never half-written

    def _resume(self) -> int:
        path = self.run.checkpoint_dir
        if path is None or not (path / CHECKPOINT_FILE).is_file():
            return 0
        saved = load_checkpoint(path)
        refuse_other_settings(saved["fingerprint"], self.fingerprint, path)
        unwrap = self.run.accelerator.unwrap_model
        with torch.no_grad():
            for name, module in self.modules.items():
                params = trainable_parameters(unwrap(module))
                for key, value in saved["networks"][name].items():
                    params[key].copy_(value)
        for name, optimizer in self._optimizers.items():
            optimizer.load_state_dict(saved["optimizers"][name])
        for key, value in saved["state"].items():
            if _stateful(self.state.get(key)):
                self.state[key].load_state_dict(value)
            elif torch.is_tensor(value):
                # where the method keeps it (AdvUnlearn's bank indices stay on the host, read there every step)
                fresh = self.state.get(key)
                self.state[key] = value.to(fresh.device if torch.is_tensor(fresh) else self.run.torch_device)
            else:
                self.state[key] = value
        if saved.get("scaler") is not None and self.run.accelerator.scaler is not None:
            self.run.accelerator.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        return saved["step"]


@dataclass
class ErasureResult:
    """What a method's `erase()` returns: the patched model and what changed."""

    model: object  # the patched backend (TextToImageModel, GAN backend, ...), ready to save
    changed: list[str]  # component folders that differ from the base model, e.g. ["text_encoder"]
    trainable_parameters: int
    logs: dict[str, float] = field(default_factory=dict)
    outcome: dict = field(default_factory=dict)  # what the run decided, e.g. the epoch a stopping rule ended it at
