"""What compiling the UNet's calls costs and saves (`compile_unet`, AdvUnlearn's attack call), as JSON.

    python benchmarks/compile_speed.py [--model digits] [--choices none,aot_eager,inductor] [--batch 8]
                                       [--calls 20] [--device auto]

For each `compile_unet` choice the script times the call AdvUnlearn's attack repeats step after step: the UNet's
prediction at a batch of x_t for a conditioning that needs a gradient, then that gradient (the UNet frozen).
`first_call_s` is the first call with its tracing and compiling; `per_call_s` the mean of `--calls` more after
two warm-up calls; `max_abs_diff` the largest gap of the prediction and the gradient from the eager call's (which
always runs first). On a GPU, `cudagraph_skips` counts the graphs that fell back to launching kernels one by one.
Each choice compiles afresh. Time it alone: other jobs on the cores distort every number.
"""

from __future__ import annotations

import argparse
import json
import time


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_choice(model, choice: str, batch: int, calls: int, reference) -> tuple[dict, tuple]:
    """`choice`'s timings (and its gap from `reference`, the eager call's outputs), and its first call's outputs."""
    import torch

    from erasure.compiled import StepDenoiser

    unet, family = model.unet, model.family
    device = next(unet.parameters()).device
    denoise = StepDenoiser(family, unet, choice, device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x_t = family.latent_shape(model, batch)
    x_t = torch.randn(x_t, generator=generator).to(device)
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    with torch.no_grad():
        cond = model.encode(["a handwritten seven"] * batch)

    def call():
        denoise.new_step()
        leaf = cond.detach().clone().requires_grad_(True)
        out = denoise(x_t, t, leaf)
        (grad,) = torch.autograd.grad(out.float().square().mean(), leaf)
        return out.detach().clone(), grad.clone()  # a CUDA graph's next replay reuses their memory

    started = time.perf_counter()
    first = call()
    synchronize(device)
    first_call_s = time.perf_counter() - started
    for _ in range(2):
        call()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    entry = {"first_call_s": round(first_call_s, 3), "per_call_s": round((time.perf_counter() - started) / calls, 5)}
    if reference is not None:
        entry["max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(first, reference))
    entry.update({k: v for k, v in denoise.record().items() if k != "choice"})
    denoise.close()
    return entry, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", help="a text-to-image model (UNet families)")
    parser.add_argument(
        "--choices", help="comma-separated (default: none,aot_eager,inductor; on CUDA also cudagraphs,reduce-overhead)"
    )
    parser.add_argument("--batch", type=int, default=8, help="x_t rows per call (the digits preset's batch)")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    import torch

    from pipelines import load_model
    from pipelines.devices import resolve_device

    device = torch.device(resolve_device(args.device))
    model = load_model(args.model, device=str(device))
    model.unet.requires_grad_(False).eval()
    cuda = ",cudagraphs,reduce-overhead" if device.type == "cuda" else ""
    choices = (args.choices or "none,aot_eager,inductor" + cuda).split(",")
    choices = ["none", *(c for c in choices if c != "none")]  # the eager call first: every gap is from it
    result = {"model": args.model, "device": str(device), "batch": args.batch, "calls": args.calls, "choices": {}}
    reference = None
    for choice in choices:
        entry, out = time_choice(model, choice, args.batch, args.calls, reference)
        reference = out if reference is None else reference
        result["choices"][choice] = entry
        print(json.dumps({choice: entry}), flush=True)  # what a cut-off run still shows
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
