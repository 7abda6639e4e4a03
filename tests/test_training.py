"""The shared training loop with two networks: a toy GAN (two critic steps per generator step, an
EMA generator as method state) killed right after a checkpoint resumes to a bit-identical end.

Run as a script, it trains the toy and writes its final weights:
    python tests/test_training.py OUT_DIR [--kill-after STEP] [--resume]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from erasure.training import EMA, Network, RunContext, Terminated, TrainingLoop, checkpoint_on_stop

STEPS, CRITIC_STEPS = 6, 2


def train_toy_gan(out: Path, kill_after: int | None = None, resume: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    generator, critic = torch.nn.Linear(4, 2), torch.nn.Linear(2, 1)
    ema = copy.deepcopy(generator).requires_grad_(False)

    def after_step(step: int, total: int, logs: dict) -> None:
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handler: as a crash would

    run = RunContext(seed=3, checkpoint_dir=out / "checkpoint", checkpoint_every=2, resume=resume,
                     progress=False, after_step=after_step)  # fmt: skip
    loop = TrainingLoop(
        run,
        {"critic": Network(critic, torch.optim.Adam(critic.parameters(), lr=1e-2, betas=(0.0, 0.99)), None),
         "generator": Network(generator, torch.optim.Adam(generator.parameters(), lr=1e-2, betas=(0.0, 0.99)))},
        desc="toy gan", state={"ema": ema, "real_shift": torch.zeros(2)}, fingerprint={"toy": 1},
    )  # fmt: skip
    g, d = loop.modules["generator"], loop.modules["critic"]

    def step_fn(step: int) -> dict[str, float]:
        # every random stream the loop checkpoints takes part: torch, numpy and Python's
        loop.state["real_shift"] += float(np.random.uniform(-0.1, 0.1)) + random.choice([0.0, 0.01])
        for _ in range(CRITIC_STEPS):
            real = torch.randn(8, 2) + loop.state["real_shift"] + 1.0
            fake = g(torch.randn(8, 4)).detach()
            loss_d = F.softplus(d(fake)).mean() + F.softplus(-d(real)).mean()
            loop.update("critic", loss_d)
        d.requires_grad_(False)
        loss_g = F.softplus(-d(g(torch.randn(8, 4)))).mean()
        loop.update("generator", loss_g)
        d.requires_grad_(True)
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), generator.parameters()):
                pe.lerp_(p, 0.1)
        return {"d": loss_d.item(), "g": loss_g.item()}

    loop.fit(step_fn, STEPS)
    weights = {f"generator.{k}": v for k, v in generator.state_dict().items()}
    weights |= {f"critic.{k}": v for k, v in critic.state_dict().items()}
    weights |= {f"ema.{k}": v for k, v in ema.state_dict().items()} | {"real_shift": loop.state["real_shift"]}
    torch.save(weights, out / "final.pt")
    return weights


def _run_script(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.run([sys.executable, __file__, str(out), *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.slow
def test_two_network_training_killed_after_a_checkpoint_resumes_bit_identically(tmp_path):
    straight = _run_script(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _run_script(tmp_path / "killed", "--kill-after", "3")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "killed" / "checkpoint" / "checkpoint.pt").is_file()
    assert not (tmp_path / "killed" / "final.pt").exists()
    resumed = _run_script(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = torch.load(tmp_path / "straight" / "final.pt"), torch.load(tmp_path / "killed" / "final.pt")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)  # the networks did train: the result is not the initialisation
    assert not torch.equal(a["generator.weight"], torch.nn.Linear(4, 2).weight)


def test_each_network_steps_only_when_its_update_is_called(tmp_path):
    torch.manual_seed(0)
    first, second = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    first_before, before = copy.deepcopy(first.state_dict()), copy.deepcopy(second.state_dict())
    loop = TrainingLoop(
        RunContext(progress=False),
        {"first": Network(first, torch.optim.SGD(first.parameters(), lr=0.1)),
         "second": Network(second, torch.optim.SGD(second.parameters(), lr=0.1))},
        desc="two",
    )  # fmt: skip

    def step_fn(step: int) -> dict[str, float]:
        x = torch.randn(4, 2)
        loss = (loop.modules["first"](x) + loop.modules["second"](x)).pow(2).mean()
        loop.update("first", loss)  # the backward reaches both; only `first` steps
        return {"loss": loss.item()}

    logs = loop.fit(step_fn, 3)
    assert set(logs) == {"loss"}
    assert all(torch.equal(before[k], v) for k, v in second.state_dict().items())
    assert not any(torch.equal(first_before[k], v) for k, v in first.state_dict().items())


def test_gradients_are_clipped_per_network(tmp_path):
    # each network's gradient is clipped to its own bound (1 unless given, what the digits presets were tuned with),
    # over its own weights: a loss that also reaches another network's weights does not count their gradient
    big, small, default = (torch.nn.Linear(2, 1, bias=False) for _ in range(3))
    for net in (big, small, default):
        torch.nn.init.zeros_(net.weight)
    networks = {"big": Network(big, torch.optim.SGD(big.parameters(), lr=1.0), 0.5),
                "small": Network(small, torch.optim.SGD(small.parameters(), lr=1.0), 10.0),
                "default": Network(default, torch.optim.SGD(default.parameters(), lr=1.0))}  # fmt: skip
    loop = TrainingLoop(RunContext(progress=False), networks, desc="c")
    x = torch.ones(1, 2)

    def step_fn(step: int) -> dict[str, float]:
        modules = loop.modules
        loop.update("big", 1000.0 * modules["big"](x).sum())
        loop.update("default", 1000.0 * modules["default"](x).sum())
        loop.update("small", (modules["small"](x) + 1000.0 * modules["big"](x)).sum())  # small's gradient: (1, 1)
        return {}

    loop.fit(step_fn, 1)
    assert torch.allclose(big.weight.norm(), torch.tensor(0.5))  # one SGD step of a gradient clipped to 0.5
    assert torch.allclose(default.weight.norm(), torch.tensor(1.0))
    assert torch.equal(small.weight, torch.full((1, 2), -1.0))  # within its bound: not clipped


def _scaled_run(tmp_path, steps: int, resume: bool) -> tuple[torch.nn.Module, torch.amp.GradScaler]:
    """A run whose accelerator scales its losses, as fp16 does on a GPU (a CPU GradScaler here: fp16 needs CUDA),
    with a scale that grows at every step."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    run = RunContext(progress=False, checkpoint_dir=tmp_path / "checkpoint", checkpoint_every=1, resume=resume)
    run._accelerator = Accelerator(cpu=True)
    run._accelerator.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    loop = TrainingLoop(run, {"net": Network(net, torch.optim.SGD(net.parameters(), lr=0.1))}, desc="scaled")

    def step_fn(step: int) -> dict[str, float]:
        loop.update("net", loop.modules["net"](torch.randn(4, 2)).pow(2).mean())
        return {}

    loop.fit(step_fn, steps)
    return net, scaler


def test_the_loss_scale_of_fp16_is_checkpointed_and_resumed(tmp_path):
    straight, straight_scaler = _scaled_run(tmp_path / "straight", 3, resume=False)
    _scaled_run(tmp_path / "killed", 2, resume=False)  # a shorter run: its last checkpoint is its first step's
    resumed, resumed_scaler = _scaled_run(tmp_path / "killed", 3, resume=True)
    assert straight_scaler.get_scale() == resumed_scaler.get_scale() == 2.0**13  # grown at each of 3 steps
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))


def _fp16_on_cpu(monkeypatch, run: RunContext) -> torch.amp.GradScaler:
    """The accelerator of `run` as `--mixed-precision fp16` makes it on a GPU: native AMP with a GradScaler
    (a CPU one: fp16 needs CUDA). accelerate's state is shared by the process: monkeypatch puts it back."""
    from accelerate import Accelerator

    run._accelerator = accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(accelerator, "native_amp", True)
    monkeypatch.setattr(accelerator.state, "_mixed_precision", "fp16")
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return accelerator.scaler


def test_fp16_gradients_are_unscaled_once_when_several_loops_train_one_network(monkeypatch):
    """STEREO's search rounds: a new loop and optimiser per round over the same weights, clipped."""
    run = RunContext(progress=False, seed=0)
    _fp16_on_cpu(monkeypatch, run)
    net = torch.nn.Linear(1, 1, bias=False)
    applied = []
    for _ in range(3):
        loop = TrainingLoop(run, {"net": Network(net, torch.optim.SGD(net.parameters(), lr=1.0), 10.0)}, desc="r")
        before = net.weight.item()

        def step_fn(step: int, loop=loop) -> dict:
            loop.update("net", loop.modules["net"](torch.ones(1, 1)).sum())  # d loss / d weight = 1
            return {}

        loop.fit(step_fn, 1)
        applied.append(before - net.weight.item())
    assert applied == pytest.approx([1.0, 1.0, 1.0])  # the loss scale divided out once, in every round


def _finished_stage(run: RunContext):
    """Weak references to the network and optimiser of a two-step loop that has finished and been dropped."""
    import weakref

    net = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(net.parameters())
    loop = TrainingLoop(run, {"net": Network(net, optimizer)}, desc="stage")

    def step_fn(step: int) -> dict:
        loop.update("net", loop.modules["net"](torch.randn(4, 2)).pow(2).mean())
        return {}

    loop.fit(step_fn, 2)
    return weakref.ref(net), weakref.ref(optimizer)


def test_a_finished_loop_leaves_its_networks_to_be_freed():
    import gc

    run = RunContext(progress=False)
    freed = _finished_stage(run)
    gc.collect()
    assert all(ref() is None for ref in freed)  # the accelerator that prepared them holds neither


def test_a_finished_stage_is_taken_only_under_its_own_settings(tmp_path):
    from erasure.training import load_finished_stage, save_finished_stage
    from pipelines.errors import InputError

    stage = tmp_path / "checkpoint" / "stage.safetensors"
    save_finished_stage(stage, {"w": torch.arange(3.0)}, {"config": {"lr": 1}}, note="kept")
    tensors, meta = load_finished_stage(stage, {"config": {"lr": 1}})
    assert torch.equal(tensors["w"], torch.arange(3.0)) and meta["note"] == "kept"
    assert load_finished_stage(tmp_path / "none.safetensors", {}) is None
    with pytest.raises(InputError, match=f"made with other settings; rerun with those, or delete {stage.parent}"):
        load_finished_stage(stage, {"config": {"lr": 2}})


def test_frozen_weights_cast_for_compute_come_back_in_float32_even_when_the_block_fails():
    run = RunContext(progress=False, mixed_precision="bf16", frozen_precision="half")
    torch.manual_seed(0)
    frozen = torch.nn.Linear(3, 3).requires_grad_(False)  # what the methods hand it (a weight that trains stays)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with run.frozen_in_compute_dtype(frozen) as halved:
            assert halved.weight.dtype == torch.bfloat16
            raise RuntimeError("inside")
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in frozen.state_dict().items())


class _Crash(Exception):
    pass


def _stopping_run(folder, resume: bool, crash_at: int | None = None) -> tuple[torch.nn.Module, list[int]]:
    """Six steps, a checkpoint every two, and a stopping rule that ends the run at its second step (as few-shot's
    `stop_below` does); `crash_at` kills it right after that step's checkpoint would be written."""
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)

    def after_step(step: int, total: int, logs: dict) -> None:
        if step == crash_at:
            raise _Crash

    run = RunContext(seed=1, progress=False, checkpoint_dir=folder / "checkpoint", checkpoint_every=2,
                     resume=resume, after_step=after_step)  # fmt: skip
    loop = TrainingLoop(run, {"net": Network(net, torch.optim.SGD(net.parameters(), lr=0.1))}, desc="stops")
    trained: list[int] = []

    def step_fn(step: int) -> dict[str, float]:
        trained.append(step)
        loop.update("net", loop.modules["net"](torch.randn(4, 2)).pow(2).mean())
        if step == 1:
            loop.stop("the rule was met")
        return {}

    try:
        loop.fit(step_fn, 6)
    except _Crash:
        pass
    return net, trained


def test_a_run_its_stopping_rule_ended_does_not_train_on_when_resumed(tmp_path):
    straight, straight_steps = _stopping_run(tmp_path / "straight", resume=False)
    _stopping_run(tmp_path / "crashed", resume=False, crash_at=2)
    resumed, resumed_steps = _stopping_run(tmp_path / "crashed", resume=True)
    assert straight_steps == [0, 1]
    assert resumed_steps[-1] == 1  # the resume stops where the run did, not at step 5
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))


def test_a_stopping_rule_says_under_the_progress_bar_why_the_run_ended_short(capsys):
    net = torch.nn.Linear(2, 1)
    loop = TrainingLoop(RunContext(seed=1), {"net": Network(net, torch.optim.SGD(net.parameters(), lr=0.1))},
                        desc="stops")  # fmt: skip

    def step_fn(step: int) -> dict[str, float]:
        loop.update("net", loop.modules["net"](torch.randn(4, 2)).pow(2).mean())
        if step == 2:
            loop.stop("the rule was met")
        return {}

    loop.fit(step_fn, 10)
    captured = capsys.readouterr()
    assert "stops: stopped at step 3/10: the rule was met" in captured.err and not captured.out
    # the bar's last drawing comes before the line, which ends the output: the bar is not redrawn beneath it
    assert captured.err.rstrip().endswith("stops: stopped at step 3/10: the rule was met")
    assert captured.err.rindex("3/10 [") < captured.err.index("stopped at step")


def test_a_sighup_checkpoints_the_step_it_arrives_at_and_nohup_keeps_it_ignored(tmp_path):
    """A closed terminal or a dropped ssh session sends SIGHUP: the loop saves the step it is at (its periodic
    checkpoint is every 100 steps) and stops, and the command line exits as a shell reports a process SIGHUP ended.
    The same stop delivered twice within `SAME_STOP_S` counts once.
    A process started under `nohup` ignores SIGHUP, and goes on ignoring it."""
    from ui.cli import _interrupted_exit_code

    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    hang_up_after = 2

    def after_step(step: int, total: int, logs: dict) -> None:
        if step == hang_up_after:  # twice, as a job's stop reaches a torchrun worker: it counts once
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGHUP)

    run = RunContext(progress=False, checkpoint_dir=tmp_path / "checkpoint", checkpoint_every=100,
                     after_step=after_step)  # fmt: skip
    loop = TrainingLoop(run, {"net": Network(net, torch.optim.SGD(net.parameters(), lr=0.1))}, desc="hangs up")

    def step_fn(step: int) -> dict[str, float]:
        loop.update("net", loop.modules["net"](torch.randn(4, 2)).pow(2).mean())
        return {}

    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as a terminal starts a process (CI may run under nohup)
    with pytest.raises(Terminated, match=f"SIGHUP: stopped at a checkpoint of step {hang_up_after}/6") as stopped:
        with checkpoint_on_stop():
            loop.fit(step_fn, 6)
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # the handler is taken down with the loop
    saved = torch.load(tmp_path / "checkpoint" / "checkpoint.pt", weights_only=False)
    assert saved["step"] == hang_up_after
    assert torch.equal(saved["networks"]["net"]["weight"], net.weight.detach())  # the weights it stopped with
    assert _interrupted_exit_code(stopped.value) == 128 + signal.SIGHUP
    assert _interrupted_exit_code(KeyboardInterrupt()) == 130  # Ctrl-C's

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup` starts a process
    try:
        with checkpoint_on_stop():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_callers_own_stop_handler_is_given_back_after_the_work():
    """A Python caller (a job wrapper, a server) may have a SIGTERM handler of its own: the work takes the stop signals
    while it runs, then gives that handler back; Python's default in its place would end the caller on a later stop."""

    def callers(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, callers)
    try:
        with checkpoint_on_stop():
            assert signal.getsignal(signal.SIGTERM) is not callers
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_toy_gan(args.out, args.kill_after, args.resume)


def test_a_stage_of_a_run_seeded_at_the_top_wraps_its_seed_into_what_numpy_accepts(tmp_path):
    # STEREO's and Adapt-then-Unlearn's stages seed past the run's seed; --seed 4294967295 is valid, and its stages
    # must run rather than fail, after the stages before them, in numpy's seeding
    run = RunContext(seed=2**32 - 1, checkpoint_dir=tmp_path)
    stage = run.stage("invert-1", 4)
    assert (stage.seed, stage.checkpoint_dir) == (3, tmp_path / "invert-1")
    stage.seed_everything()
    assert np.random.get_state()[1][0] == np.random.RandomState(3).get_state()[1][0]
    assert run.stage("erase-once").seed == run.seed and RunContext(seed=None).stage("x", 1).seed is None


def test_a_checkpoint_is_written_every_checkpoint_every_steps_and_not_at_the_last(tmp_path):
    # checkpoint_every counts finished steps: a run of 6 with checkpoint_every=3 saves after step 3, and not after its
    # last step, whose result is the run folder itself
    from erasure.training import load_checkpoint

    net = torch.nn.Linear(2, 1)
    saved: list[int | None] = []

    def after_step(step: int, total: int, logs: dict) -> None:
        has = (tmp_path / "checkpoint" / "checkpoint.pt").is_file()
        saved.append(load_checkpoint(tmp_path / "checkpoint")["step"] if has else None)

    run = RunContext(seed=1, progress=False, checkpoint_dir=tmp_path / "checkpoint", checkpoint_every=3,
                     after_step=after_step)  # fmt: skip
    loop = TrainingLoop(run, {"net": Network(net, torch.optim.SGD(net.parameters(), lr=0.1))}, desc="every")

    def step_fn(step: int) -> dict[str, float]:
        loop.update("net", loop.modules["net"](torch.randn(4, 2)).pow(2).mean())
        return {}

    loop.fit(step_fn, 6)
    assert saved == [None, None, 3, 3, 3, 3]  # after steps 3 (not 6: the last)


def test_adam_takes_the_methods_lr_betas_eps_and_weight_decay_in_order():
    # each method hands its config's Adam settings to run.adam; two betas swapped would decay the first moment at the
    # second's rate (0.98 vs 0.9) without any error
    net = torch.nn.Linear(2, 1)
    run = RunContext(progress=False)
    adamw = run.adam(net.parameters(), 3e-4, [0.9, 0.98], eps=1e-6, weight_decay=0.01, decoupled=True)
    group = adamw.param_groups[0]
    assert type(adamw) is torch.optim.AdamW
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.9, 0.98), 1e-6, 0.01)
    adam = run.adam(net.parameters(), 1e-5, (0.5, 0.999))
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["betas"] == (0.5, 0.999)


def test_frozen_weights_stay_float32_on_the_cpu_unless_half_is_asked_for():
    # `auto` halves the frozen networks only on a GPU with mixed precision: every CPU result was measured in float32
    assert RunContext(progress=False, mixed_precision="bf16").frozen_dtype == torch.float32
    assert RunContext(progress=False, mixed_precision="bf16", frozen_precision="full").frozen_dtype == torch.float32
    assert RunContext(progress=False, mixed_precision="bf16", frozen_precision="half").frozen_dtype == torch.bfloat16
    assert RunContext(progress=False).frozen_dtype == torch.float32


def test_an_ema_moves_a_share_of_one_minus_its_decay_towards_the_weights():
    # SFD's and Adapt-then-Unlearn's tests use decay 0.5, where decay and 1 - decay are the same share
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(1.0)
    net.bias.requires_grad_(False)  # a frozen parameter is not averaged
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(3.0)
        net.bias.fill_(5.0)
    ema.update(net)
    assert set(ema.shadow) == {"weight"} and torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.2))  # .9 + .3
    ema.copy_to(net)
    assert torch.allclose(net.weight, torch.full((1, 2), 1.2)) and float(net.bias) == 5.0


def test_a_checkpoints_random_streams_come_back_where_they_were():
    # a resume restores torch's, numpy's and Python's streams (through the checkpoint file) part-way along, where they
    # were: what they draw next is what the uninterrupted run drew
    import io

    from erasure.training import rng_state, set_rng_state

    def draw():
        return torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    draw()  # part-way along each stream: numpy's position in its block of keys is no longer 0
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = draw()
    draw()
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    got = draw()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_a_stop_signal_in_the_last_step_lets_the_run_finish():
    # the run is done at its last step: a stop then must not report it as stopped (no run folder would be written)
    net = torch.nn.Linear(2, 1)
    trained = []

    def after_step(step: int, total: int, logs: dict) -> None:
        if step == total:
            os.kill(os.getpid(), signal.SIGTERM)

    loop = TrainingLoop(RunContext(seed=1, progress=False, after_step=after_step),
                        {"net": Network(net, torch.optim.SGD(net.parameters(), lr=0.1))}, desc="last")  # fmt: skip

    def step_fn(step: int) -> dict[str, float]:
        trained.append(step)
        loop.update("net", loop.modules["net"](torch.randn(4, 2)).pow(2).mean())
        return {}

    with checkpoint_on_stop():
        loop.fit(step_fn, 3)
    assert trained == [0, 1, 2]
