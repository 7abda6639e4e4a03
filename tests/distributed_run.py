"""Run under `torchrun --nproc_per_node N`: one method on a model, recording after every step a
hash of this process's trainable weights, then the final weights (used by test_distributed.py).

    python tests/distributed_run.py METHOD MODEL_DIR OUT_DIR [key=value ...]
        [--checkpoint-dir DIR] [--stop-after STEP] [--resume]

`--stop-after` raises in every process after that step, as an interruption would.
"""

import argparse
import hashlib
import json
from pathlib import Path

import torch

from erasure.config import build_config, parse_sets
from erasure.registry import METHODS
from erasure.training import RunContext
from pipelines import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("sets", nargs="*")
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    method, model_dir, out_dir, sets = args.method, args.model_dir, args.out_dir, args.sets
    config_cls, entry = METHODS[method].load()
    config = build_config(config_cls, "sd", parse_sets(sets))
    model = load_model(model_dir)
    hashes: list[str] = []

    def trainable() -> dict[str, torch.Tensor]:
        parts = {"unet": model.unet, "text_encoder": model.text_encoder}
        return {f"{c}.{n}": p.detach().clone() for c, m in parts.items() for n, p in m.named_parameters()
                if p.requires_grad}  # fmt: skip

    def after_step(step: int, total: int, logs: dict) -> None:
        digest = hashlib.sha256()
        for name, value in sorted(trainable().items()):
            digest.update(name.encode() + value.numpy().tobytes())
        hashes.append(digest.hexdigest())
        if step == args.stop_after:
            raise KeyboardInterrupt

    run = RunContext(seed=0, progress=False, after_step=after_step, checkpoint_dir=args.checkpoint_dir,
                     checkpoint_every=2, resume=args.resume)  # fmt: skip
    entry(model, ["a cat"], config, run)
    rank = run.accelerator.process_index
    out = Path(out_dir)
    (out / f"rank{rank}.json").write_text(json.dumps({"processes": run.num_processes, "hashes": hashes}))
    torch.save(trainable(), out / f"weights-rank{rank}.pt")


if __name__ == "__main__":
    main()
