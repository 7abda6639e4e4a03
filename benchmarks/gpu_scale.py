"""Real-size figures on one GPU, as JSON: a random-weight Stable Diffusion 1.x / 2.x / SDXL / FLUX.1 built offline
from the shipped configs, then sampling, a few steps of each method, and a single-file round trip, through the
toolkit.

    python benchmarks/gpu_scale.py --family sdxl [--methods esd,advunlearn] [--steps 4] [--batch 8]
    python benchmarks/gpu_scale.py --family flux --methods esd --steps 4 --batch 2 --sample-steps 28
    python benchmarks/gpu_scale.py --family sd1 --tiny --device cpu     # the same code on toy components (CI)
    python benchmarks/gpu_scale.py --family sd1 --device cpu --methods sfd+lora_rank=8 --steps 2 --skip sample,export

A method may carry settings after `+` (`sfd+lora_rank=8`: SFD's generator and fake score as LoRA adapters);
`optimizer_state`, `frozen_precision` and `mixed_precision` there are the run's options (`sfd+optimizer_state=8bit`).

1. build: every component of `pipelines/configs/<family>` from its config (random weights, seeded, made on the
   device), saved as a diffusers folder (fp16 on a GPU) - no Hub, nothing downloaded;
2. sample: images/s of the toolkit (`load_model(dtype=...)` + `generate`, what `erasure sample` runs) and of the
   plain diffusers pipeline of the family at the same dtype, batch, steps and guidance, each after a warm-up
   batch; their ratio;
3. erase: each method for `--steps` steps through `erasure.api.erase` (`--mixed-precision bf16` on a GPU, the
   papers' settings otherwise: ESD-x with 50 DDIM steps, AdvUnlearn's 30-step PGD without warm-up): seconds per
   step after the first (median and mean), the process's peak GPU memory;
4. export: the first method's run written by `export --single-file`, read back by the family pipeline's
   `from_single_file`: seconds, file size, and whether the UNet comes back bit for bit.

The methods' weights are random, so what is timed is the computation, not a useful erasure. Time it alone.
FLUX: bf16 instead of fp16 (FLUX overflows in fp16), ESD is its family preset (EraseAnything's LoRA) saved as
`--save lora` (a full 12B transformer would not fit the disk twice), no single file, and the T5 tokenizer is a
stand-in of the real length (its SentencePiece vocabulary is not shipped; the shapes are the same).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = {"sd1": "sd-v1", "sd2": "sd-v2", "sdxl": "sdxl-base", "flux": "flux-dev"}
METHOD_SETTINGS = {  # a few steps of each paper's setting
    "esd": [],
    "advunlearn": ["warmup=0"],
    "fewshot": ["images={images}", "stop_below=none"],
    "stereo": ["rounds=1", "search_steps=2", "inversion_steps=2", "inversion_images=4"],
    "sfd": ["override=a dog", "batch_size=1", "forget_batch=1"],
    # the GANs' (benchmarks/gan_scale.py): random images as both sets, so that no detector is needed
    "adapt-unlearn": ["negatives={images}", "positives={images}", "adapt_steps={steps}"],
}
RUN_OPTIONS = ("optimizer_state", "frozen_precision", "mixed_precision")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_pipeline(family: str, device: str, seed: int):
    """The family's diffusers pipeline at real size from the shipped configs, random weights."""
    import diffusers
    import transformers

    from pipelines.diffusion import SHIPPED_CONFIGS, _config_tokenizer
    from pipelines.tokenizer import clip_tokenizer

    root = SHIPPED_CONFIGS / CONFIGS[family]
    index = json.loads((root / "model_index.json").read_text())
    parts = {}
    torch.manual_seed(seed)
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        library, cls = spec
        if name.startswith("tokenizer") and cls.startswith("T5"):
            from tests.conftest import tiny_t5_tokenizer

            tokenizer_config = json.loads((root / name / "tokenizer_config.json").read_text())
            parts[name] = tiny_t5_tokenizer(tokenizer_config["model_max_length"])
        elif name.startswith("tokenizer"):
            parts[name] = _config_tokenizer(root / name) or clip_tokenizer()
        elif name == "scheduler":
            parts[name] = getattr(diffusers, cls).from_config(getattr(diffusers, cls).load_config(root / name))
        elif library == "diffusers":
            model_cls = getattr(diffusers, cls)
            with torch.device(device):  # initialised where it runs: seconds on a GPU for billions of weights
                parts[name] = model_cls.from_config(model_cls.load_config(root / name))
        else:
            model_cls = getattr(transformers, cls)
            with torch.device(device):
                parts[name] = model_cls(model_cls.config_class.from_pretrained(root / name))
    pipeline = getattr(diffusers, index["_class_name"])
    if pipeline is diffusers.StableDiffusionPipeline:  # no safety checker: nothing to check in random weights
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipeline(**parts)


def build_tiny(family: str):
    """The tests' toy components of the family (the same code paths, seconds on a CPU)."""
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from tests.conftest import tiny_components, tiny_flux_components, tiny_sdxl_components

    if family == "flux":
        return FluxPipeline(**tiny_flux_components())
    if family == "sdxl":
        return StableDiffusionXLPipeline(**tiny_sdxl_components(second_width=24, second_layers=10))
    parts = tiny_components()
    if family == "sd2":
        parts["scheduler"] = parts["scheduler"].from_config(parts["scheduler"].config, prediction_type="v_prediction")
    return StableDiffusionPipeline(**parts)


def measure_sampling(folder: Path, device: str, dtype, batch: int, steps: int, batches: int) -> dict:
    from pipelines import load_model

    model = load_model(str(folder), device=device, dtype=dtype)
    guidance = model.sampling["guidance"]
    prompts = [f"a photo of object number {i}" for i in range(batch * batches)]
    model.generate(prompts[:batch], [0], steps=steps, batch_size=batch)  # warm-up
    sync(device)
    started = time.perf_counter()
    model.generate(prompts, [0], steps=steps, batch_size=batch)
    sync(device)
    ours = len(prompts) / (time.perf_counter() - started)
    pipeline_class = model.pipe.__class__
    size = {}  # FLUX: the toolkit draws at the model's resolution and T5 length; the plain pipeline the same
    if pipeline_class.__name__ == "FluxPipeline":
        size = {"height": model.resolution, "width": model.resolution,
                "max_sequence_length": min(512, model.pipe.tokenizer_2.model_max_length)}  # fmt: skip
    del model
    _free(device)

    pipe = pipeline_class.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)

    def draw(chunk, pipe=pipe):
        generators = [torch.Generator("cpu").manual_seed(0) for _ in chunk]
        return pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                    **size).images  # fmt: skip

    draw(prompts[:batch])
    sync(device)
    started = time.perf_counter()
    for start in range(0, len(prompts), batch):
        draw(prompts[start : start + batch])
    sync(device)
    plain = len(prompts) / (time.perf_counter() - started)
    del pipe
    _free(device)
    return {"images": len(prompts), "batch": batch, "steps": steps, "guidance": guidance,
            "toolkit_images_per_s": round(ours, 3), "plain_diffusers_images_per_s": round(plain, 3),
            "ratio": round(ours / plain, 3), "plain_class": pipeline_class.__name__}  # fmt: skip


def measure_method(variant: str, folder: Path, scratch: Path, device: str, steps: int, tiny: bool,
                   save: str = "full", image_size: int | None = None) -> dict:  # fmt: skip
    """`variant`: a method key, with settings after `+` (`sfd+lora_rank=8`); run options among them go to `erase`."""
    from erasure.api import erase
    from erasure.registry import METHODS

    method, *extra = variant.split("+")
    options = {"mixed_precision": "bf16" if device.startswith("cuda") else "no"}
    options.update(item.split("=", 1) for item in extra if item.split("=", 1)[0] in RUN_OPTIONS)
    extra = [item for item in extra if item.split("=", 1)[0] not in RUN_OPTIONS]
    images = scratch / "images"
    if any("{images}" in s for s in METHOD_SETTINGS.get(method, [])) and not images.is_dir():
        _write_images(images, 4, image_size or (16 if tiny else 512))
    sets = [s.format(images=images, steps=steps) for s in METHOD_SETTINGS.get(method, [])] + [f"steps={steps}", *extra]
    if tiny:  # the registry's test settings on toy models (PGD of 30 steps would be the same code, only longer)
        sets = [f"{k}={v}" for k, v in METHODS[method].test_settings.items() if k != "steps"] + sets
    stamps: list[float] = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()

    def after_step(step, total, logs):
        sync(device)
        stamps.append(time.perf_counter())

    out = scratch / f"run-{len(list(scratch.glob('run-*')))}-{method}"
    run = erase(method, ["a cat"], str(folder), out=out, sets=sets, device=device, checkpoint_every=10**6,
                progress=False, after_step=after_step, save=save, **options)  # fmt: skip
    total = time.perf_counter() - started
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    result = {"sets": sets, **options, "steps_timed": len(gaps),
              "first_step_s": round(stamps[0] - started, 2) if stamps else None,
              "s_per_step_median": round(statistics.median(gaps), 3) if gaps else None,
              "s_per_step_mean": round(statistics.mean(gaps), 3) if gaps else None,
              "run_s": round(total, 1), "run": str(run)}  # fmt: skip
    if device.startswith("cuda"):
        result["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:  # the process's peak resident memory so far (building the pipeline counts too: read it with that)
        result["peak_rss_gb"] = round(json.loads((run / "erasure.json").read_text())["peak_rss_mb"] / 1024, 2)
    _free(device)
    return result


def measure_single_file(run: Path, folder: Path, scratch: Path, device: str) -> dict:
    import diffusers

    from pipelines import load_model
    from ui.hub import export_run

    started = time.perf_counter()
    exported = export_run(run, "bench/single-file", local_dir=scratch / "hub", no_eval=True, single_file=True)
    path = exported.folder / "single-file.safetensors"
    written = time.perf_counter() - started
    index = json.loads((folder / "model_index.json").read_text())
    pipeline = getattr(diffusers, index["_class_name"])
    started = time.perf_counter()
    plain = pipeline.from_single_file(str(path), config=str(exported.folder), local_files_only=True)
    read = time.perf_counter() - started
    ours = load_model(str(run), device="cpu").unet.state_dict()
    back = plain.unet.state_dict()
    same = ours.keys() == back.keys() and all(torch.equal(ours[k], back[k].to(ours[k].dtype)) for k in ours)
    return {"write_s": round(written, 1), "from_single_file_s": round(read, 1),
            "size_gb": round(path.stat().st_size / 2**30, 2), "unet_bit_identical": same}  # fmt: skip


def _write_images(folder: Path, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(CONFIGS), default="sdxl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy components (checks the script on a CPU)")
    parser.add_argument("--methods", default="esd,advunlearn", help="comma-separated methods to time")
    parser.add_argument("--steps", type=int, default=4, help="steps of each method (the first is not timed)")
    parser.add_argument("--batch", type=int, default=8, help="images per sampling batch")
    parser.add_argument("--batches", type=int, default=2, help="timed sampling batches")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: sample, erase, export")
    parser.add_argument("--scratch", help="working folder (default: a temporary one, deleted at the end)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    half = torch.float32
    if args.device.startswith("cuda"):
        half = torch.bfloat16 if args.family == "flux" else torch.float16

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(args.scratch or tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        folder = scratch / f"random-{args.family}"
        report: dict = {"family": args.family, "device": args.device, "tiny": args.tiny,
                        "torch": torch.__version__}  # fmt: skip
        if args.device.startswith("cuda"):
            report["gpu"] = torch.cuda.get_device_name()
        started = time.perf_counter()
        pipe = build_tiny(args.family) if args.tiny else build_pipeline(args.family, args.device, seed=0)
        modules = {name: part for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
        report["parameters_m"] = {name: round(sum(p.numel() for p in part.parameters()) / 1e6)
                                  for name, part in modules.items()}  # fmt: skip
        pipe.to(dtype=half).save_pretrained(folder, safe_serialization=True)
        if args.family == "flux" and args.tiny:  # the toy model draws 16-px images (FLUX.1's own: 1024)
            (folder / "erasure_model.json").write_text(json.dumps({"sampling": {"resolution": 16}}))
        del pipe, modules  # `modules` holds the built networks too: left alive, every peak below would count them
        _free(args.device)
        report["build_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps({"built": report}), flush=True)
        if "sample" not in skip:
            report["sample"] = measure_sampling(folder, args.device, half, args.batch, args.sample_steps, args.batches)
            print(json.dumps({"sample": report["sample"]}), flush=True)
        runs = []
        if "erase" not in skip:
            report["erase"] = {}
            for method in filter(None, args.methods.split(",")):
                try:
                    save = "lora" if args.family == "flux" else "full"
                    report["erase"][method] = measure_method(method, folder, scratch, args.device, args.steps,
                                                             args.tiny, save)  # fmt: skip
                    runs.append(Path(report["erase"][method]["run"]))
                except Exception as exc:  # one method's failure is a figure too; the others still run
                    report["erase"][method] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                print(json.dumps({method: report["erase"][method]}), flush=True)
        one_step = [json.loads((r / "model_index.json").read_text())["_class_name"] == "OneStepPipeline" for r in runs]
        usable = [r for r, generator in zip(runs, one_step) if not generator]
        if "export" not in skip and usable and args.family != "flux":
            report["single_file"] = measure_single_file(usable[0], folder, scratch, args.device)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
