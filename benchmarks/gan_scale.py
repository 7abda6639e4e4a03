"""Adapt-then-Unlearn at real StyleGAN2 size, as JSON: a random-weight config-f generator and discriminator built
offline at `--size` (256: the paper's CelebA-HQ; 1024: FFHQ's), saved as a toolkit GAN folder, then a few steps
of each stage through `erasure.api.erase`.

    python benchmarks/gan_scale.py [--size 256] [--methods adapt-unlearn] [--steps 3]
    python benchmarks/gan_scale.py --device cpu --methods adapt-unlearn+optimizer_state=8bit
    python benchmarks/gan_scale.py --tiny --device cpu          # the same code on a 16-px GAN (CI)

Both sets are random images (no detector runs: what is timed is the training, not an erasure) and every step
has the paper's batch of 16 (`+batch_size=N` changes it; settings and run options after `+`, as in
`gpu_scale.py`). Reported per method: seconds per step after the first, the first step (it holds the
Fisher information's per-sample backward passes), and the peak GPU memory or, on the CPU, the process's peak
resident memory. Time it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_gan(folder: Path, size: int, tiny: bool) -> dict:
    """A random StyleGAN2 (config-f channels; toy ones with `tiny`) saved at `folder`; its parameter counts."""
    from pipelines.gan_checkpoints import save_gan
    from pipelines.stylegan2 import Discriminator, Generator, StyleGAN2Config

    config = StyleGAN2Config(size=size)
    if tiny:
        config = StyleGAN2Config(size=size, style_dim=8, n_mlp=2, channels={4: 8, 8: 8, 16: 4, 32: 4})
    torch.manual_seed(0)
    generator, discriminator = Generator(config).eval(), Discriminator(config).eval()
    with torch.no_grad():
        latent_avg = generator.mean_latent()
    save_gan(folder, generator, discriminator, latent_avg)
    count = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6, 3)  # noqa: E731
    return {"generator_m": count(generator), "discriminator_m": count(discriminator)}


def main() -> None:
    from gpu_scale import measure_method

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="resolution (a power of two)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy channels (checks the script on a CPU)")
    parser.add_argument("--methods", default="adapt-unlearn", help="comma-separated method variants to time")
    parser.add_argument("--steps", type=int, default=3, help="steps of each stage (the first is not timed)")
    parser.add_argument("--scratch", help="working folder (default: a temporary one, deleted at the end)")
    args = parser.parse_args()
    size = 16 if args.tiny else args.size

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(args.scratch or tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        report: dict = {"size": size, "device": args.device, "tiny": args.tiny, "torch": torch.__version__,
                        **build_gan(scratch / "random-stylegan2", size, args.tiny)}  # fmt: skip
        if args.device.startswith("cuda"):
            report["gpu"] = torch.cuda.get_device_name()
        report["build_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps({"built": report}), flush=True)
        report["erase"] = {}
        for variant in filter(None, args.methods.split(",")):
            batch = [] if args.tiny or "batch_size=" in variant else ["batch_size=16"]
            variant = "+".join([variant, *batch])
            try:
                report["erase"][variant] = measure_method(variant, scratch / "random-stylegan2", scratch, args.device,
                                                          args.steps, args.tiny, image_size=size)  # fmt: skip
            except Exception as exc:  # one variant's failure is a figure too; the others still run
                report["erase"][variant] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(json.dumps({variant: report["erase"][variant]}), flush=True)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()  # run as a script, this folder is on the path: gpu_scale imports
