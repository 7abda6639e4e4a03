"""How long AdvUnlearn's trajectory bank takes to draw at each `bank_batch`, as JSON.

    python benchmarks/bank_speed.py [--model digits] [--batches 1,4,32] [--device auto] [--profile] [--set K=V ...]

Each setting erases "seven" with the family's AdvUnlearn preset for one step: the bank is drawn first, then
the step runs; `seconds` is the bank's own section (`erasure.json` -> `advunlearn.seconds.bank`). With
`--profile` a second run of each setting counts the operator calls (`aten::*`, the kernels a GPU launches
one by one from Python) and the convolutions of the whole one-step run under `torch.profiler`. 0 is the
default rule (one entry at a time on the CPU). Time it alone: other jobs on the cores distort every number.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path


def erase_once(model: str, bank_batch: int, device: str, out: Path, sets: list[str]) -> dict:
    from erasure.api import erase

    run = erase("advunlearn", ["seven"], model, out=out, device=device, progress=False,
                sets=[*sets, "steps=1", f"bank_batch={bank_batch}"])  # fmt: skip
    return json.loads((run / "erasure.json").read_text())


def operator_calls(model: str, bank_batch: int, device: str, out: Path, sets: list[str]) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        erase_once(model, bank_batch, device, out, sets)
    events = prof.key_averages()
    return {
        "aten_calls": sum(e.count for e in events if e.key.startswith("aten::")),
        "convolutions": sum(e.count for e in events if e.key == "aten::convolution"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", help="a text-to-image model with an AdvUnlearn preset")
    parser.add_argument("--batches", default="1,4,32", help="bank_batch values, comma-separated (0: the default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", action="store_true", help="count operator calls in a second run of each")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="over the preset")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bank-speed-"))
    result = {"model": args.model, "settings": {}}
    try:
        for bank_batch in (int(b) for b in args.batches.split(",")):
            manifest = erase_once(args.model, bank_batch, args.device, workdir / f"b{bank_batch}", args.set)
            drawn = manifest["advunlearn"]
            entry = {"seconds": drawn["seconds"]["bank"], "entries_per_call": drawn["bank_entries_per_call"],
                     "device": manifest["device"]}  # fmt: skip
            if args.profile:
                entry.update(operator_calls(args.model, bank_batch, args.device, workdir / f"p{bank_batch}", args.set))
            result["settings"][str(bank_batch)] = entry
            print(json.dumps({str(bank_batch): entry}), flush=True)  # what a cut-off run still shows
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["config"] = {k: v for k, v in manifest["config"].items() if k != "bank_batch"}  # each setting: its own
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
