"""Run under `torchrun --nproc_per_node N`: one method on a model, recording after every step a
hash of this process's trainable weights, then the final weights of what the method changed (used by
test_distributed.py).

    python tests/distributed_run.py METHOD MODEL OUT_DIR [key=value ...]
        [--concept TEXT ...] [--checkpoint-dir DIR] [--stop-after STEP] [--term-after STEP] [--resume]

`--stop-after` raises in every process after that step, as an interruption would. `--term-after` sends SIGTERM to
the last process alone, after that step: the processes are to checkpoint and stop together, each writing the
message it stopped with to `stopped-rankR.txt` and exiting with 143.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

from erasure.config import build_config, parse_sets
from erasure.registry import METHODS
from erasure.training import RunContext, Terminated, checkpoint_on_stop
from pipelines import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("model")
    parser.add_argument("out_dir")
    parser.add_argument("sets", nargs="*")
    parser.add_argument("--concept", action="append", help="repeatable (default: a cat)")
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--term-after", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    model = load_model(args.model)
    config = build_config(args.method, model.family, parse_sets(args.sets))
    parts = ["generator", "discriminator"] if model.kind == "gan" else ["unet", *model.family.text_encoder_names]
    hashes: list[str] = []

    def trainable() -> dict[str, torch.Tensor]:
        return {f"{c}.{n}": p.detach().clone() for c in parts for n, p in getattr(model, c).named_parameters()
                if p.requires_grad}  # fmt: skip

    def after_step(step: int, total: int, logs: dict) -> None:
        digest = hashlib.sha256()
        for name, value in sorted(trainable().items()):
            digest.update(name.encode() + value.numpy().tobytes())
        hashes.append(digest.hexdigest())
        if step == args.stop_after:
            raise KeyboardInterrupt
        if step == args.term_after and run.accelerator.process_index == run.num_processes - 1:
            os.kill(os.getpid(), signal.SIGTERM)

    run = RunContext(seed=0, progress=False, after_step=after_step, checkpoint_dir=args.checkpoint_dir,
                     checkpoint_every=2, resume=args.resume)  # fmt: skip
    rank = run.accelerator.process_index
    out = Path(args.out_dir)
    try:
        with checkpoint_on_stop():
            result = METHODS[args.method].entry(model, args.concept or ["a cat"], config, run)
    except Terminated as stopped:
        (out / f"stopped-rank{rank}.txt").write_text(str(stopped))
        sys.exit(128 + stopped.signum)
    record = {"processes": run.num_processes, "hashes": hashes, "logs": result.logs}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    final = {f"{c}.{k}": v.detach().clone() for c in result.changed
             for k, v in getattr(result.model, c).state_dict().items()}  # fmt: skip
    torch.save(final, out / f"weights-rank{rank}.pt")


if __name__ == "__main__":
    main()
