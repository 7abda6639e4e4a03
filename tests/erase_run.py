"""`erase` in a process of its own that can be killed mid-run, as a crash would (used by test_methods.py).

    python tests/erase_run.py METHOD MODEL CONCEPT OUT [key=value ...] [--kill-after N] [--term-after N]
        [--checkpoint-every N]

With `--kill-after N` the process sends itself SIGKILL after the N-th training step (counted over all
of a method's stages): no cleanup, no exception handler runs. With `--term-after N` it sends itself
SIGTERM there instead, as a scheduler preempting the job would. Checkpoints are written every step
unless `--checkpoint-every` says otherwise.
"""

import argparse
import os
import signal

import torch

from erasure.api import erase

# The threads of the pytest process (conftest.py), whatever OMP_NUM_THREADS says: a sum over another number of
# threads rounds differently, and the tests compare this process's weights with the parent's bit for bit
torch.set_num_threads(int(os.environ.get("ERASURE_TEST_THREADS", "2")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("model")
    parser.add_argument("concept")
    parser.add_argument("out")
    parser.add_argument("sets", nargs="*")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--term-after", type=int)
    parser.add_argument("--checkpoint-every", type=int, default=1)
    args = parser.parse_intermixed_args()
    steps = []

    def after_step(step: int, total: int, logs: dict) -> None:
        steps.append(step)
        if len(steps) == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if len(steps) == args.term_after:
            os.kill(os.getpid(), signal.SIGTERM)

    erase(args.method, [args.concept], args.model, out=args.out, sets=args.sets, checkpoint_every=args.checkpoint_every,
          progress=False, after_step=after_step)  # fmt: skip


if __name__ == "__main__":
    main()
