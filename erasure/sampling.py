"""`erasure sample`: images from any model, as a labelled grid or one file per (prompt, seed)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from pipelines.errors import InputError
from pipelines.files import atomic_write, check_writable, write_folder_atomically, write_json

from .output import library_versions

GAN_ROW = 8  # images per grid row for unconditional models

# an --out with one of these suffixes is one grid image in that format; any other is a folder of PNGs
GRID_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
SAMPLE_RECORD = "sample.json"  # in a folder of samples: the model, prompts and settings that drew them


def _check_request(source, prompts: list[str], out: Path, steps, guidance, truncation) -> bool:
    """Refuse what the model has no use for, missing or empty prompts, and an `out` that cannot take the images;
    returns whether `out` is one grid image (else a folder)."""
    # An option the model has no use for is refused rather than ignored: the user would believe it applied.
    unused = [("--truncation", truncation)] if source.kind != "gan" else []
    if source.kind in ("gan", "one-step"):
        unused += [("--steps", steps), ("--guidance", guidance)]
    given = [name for name, value in unused if value is not None]
    if given:
        kind = {"gan": "a GAN", "one-step": "a one-step generator"}.get(source.kind, "a diffusion model")
        raise InputError(f"{source.spec} is {kind}: {given[0]} does not apply to it")
    if source.kind == "gan":
        if prompts:
            raise InputError(f"{source.spec} is an unconditional GAN: it takes no --prompt")
    elif not prompts:
        raise InputError("give at least one --prompt")
    elif any(not p.strip() for p in prompts):
        raise InputError("empty --prompt")
    as_grid = out.suffix.lower() in GRID_FORMATS
    if not as_grid and _is_image_name(out):  # `--out grid.gif` would otherwise become a folder of PNGs named so
        raise InputError(f"--out {out}: a grid is written as {', '.join(GRID_FORMATS)}; for a folder of PNGs give a "
                         f"name without an image suffix")  # fmt: skip
    if as_grid and out.is_dir():
        raise InputError(f"{out} is a folder; a grid is one image file (give a new name, or a folder without .png)")
    if not as_grid and out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    if not as_grid and out.is_dir() and any(out.iterdir()):
        # images of another model or prompt would sit beside these under the same names, with nothing to tell them apart
        raise InputError(f"--out {out} already holds files; give a new folder (it is written whole, with "
                         f"{SAMPLE_RECORD} saying what drew each image)")  # fmt: skip
    return as_grid


def _is_image_name(path: Path) -> bool:
    from PIL import Image

    return path.suffix.lower() in Image.registered_extensions()


def sample(
    model: str | None,
    prompts: Sequence[str],
    *,
    n: int,
    seed: int,
    out: str | Path,
    steps: int | None = None,
    guidance: float | None = None,
    truncation: float | None = None,
    device: str = "auto",
    model_config: str | Path | None = None,
    dtype: str = "auto",
    lora_strength: float | None = None,
) -> Path:
    """Generate `n` images per prompt with seeds seed..seed+n-1 and write them to `out`. `lora_strength`: a run
    trained as LoRA drawn with its erasure at that weight (0: off)."""
    from pipelines import load_model, resolve
    from pipelines.bounds import COUNT, GUIDANCE, LORA_STRENGTH, SEED_BOUNDS, STEPS, TRUNCATION, check_number
    from pipelines.devices import dtype_name, model_dtype, resolve_device
    from pipelines.images import GridLayout, grid_cell, labelled_grid
    from pipelines.loading import check_model_config

    check_number("--n", n, COUNT, integer=True)
    check_number("--seed", seed, SEED_BOUNDS, integer=True)
    check_number("--seed + --n", seed + n - 1, SEED_BOUNDS)
    optional = (
        ("--steps", steps, STEPS, True),
        ("--guidance", guidance, GUIDANCE, False),
        ("--truncation", truncation, TRUNCATION, False),
        ("--lora-strength", lora_strength, LORA_STRENGTH, False),
    )
    for name, value, bounds, integer in optional:
        if value is not None:
            check_number(name, value, bounds, integer)
    device = resolve_device(device)
    out = check_writable(out)
    source = resolve(model)
    torch_dtype = model_dtype(dtype, device, source.kind)
    check_model_config(model_config, source)
    prompts = list(prompts)
    as_grid = _check_request(source, prompts, out, steps, guidance, truncation)

    if lora_strength is not None:
        from .lora import load_at_strength

        backend = load_at_strength(source.path, lora_strength, device=device, dtype=torch_dtype)
    else:
        backend = load_model(source, device=device, single_file_config=model_config, dtype=torch_dtype)
    seeds = list(range(seed, seed + n))
    if source.kind == "gan":
        labels = [f"seeds {seeds[i]}-{seeds[min(i + GAN_ROW, n) - 1]}" for i in range(0, n, GAN_ROW)]
        columns = [f"+{j}" for j in range(min(n, GAN_ROW))]
    else:
        labels, columns = prompts, [f"seed {s}" for s in seeds]
    if as_grid:  # before drawing: a grid too large for its format would fail only once every image was drawn
        side = backend.resolution
        layout = GridLayout.of(len(labels), len(columns), grid_cell(side), labels, columns)
        layout.check_format(GRID_FORMATS[out.suffix.lower()], f"{len(labels)} row(s) of {len(columns)} image(s) "
                            f"at {side} px")  # fmt: skip
    if source.kind == "gan":
        images = backend.generate(seeds, truncation=1.0 if truncation is None else truncation)
        rows = [images[i : i + GAN_ROW] for i in range(0, n, GAN_ROW)]
    else:
        rows = backend.generate(prompts, seeds, steps=steps, guidance=guidance, progress=True)

    if as_grid:
        grid = labelled_grid(rows, labels, columns)
        return atomic_write(out, lambda tmp: grid.save(tmp, format=GRID_FORMATS[out.suffix.lower()]))
    defaults = getattr(backend, "sampling", {})  # the model's own steps and guidance, where not given
    settings = {
        "model": source.spec, "prompts": prompts, "seeds": seeds,
        "steps": defaults.get("steps") if steps is None else steps,
        "guidance": defaults.get("guidance") if guidance is None else guidance,
        "truncation": truncation, "lora_strength": lora_strength, "dtype": dtype_name(torch_dtype), "device": device,
    }  # fmt: skip
    return _write_samples(out, rows, seeds, prompts if source.kind != "gan" else None, settings)


def _write_samples(out: Path, rows: list[list], seeds: list[int], prompts: list[str] | None, settings: dict) -> Path:
    """One PNG per (prompt, seed), or per seed for a GAN (`prompts` None), with the record of what drew each; the
    folder appears whole, or not at all."""
    if prompts is None:
        named = [(f"s{s}.png", image, None, s) for s, image in zip(seeds, [i for row in rows for i in row])]
    else:
        named = [(f"p{i}_s{s}.png", image, i, s) for i, row in enumerate(rows) for s, image in zip(seeds, row)]
    record = {
        **settings, "images": {name: {"prompt": i, "seed": s} for name, _, i, s in named},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": library_versions(),
    }  # fmt: skip

    def write(folder: Path) -> None:
        for name, image, _, _ in named:
            image.save(folder / name, format="PNG")
        write_json(folder / SAMPLE_RECORD, record)

    return write_folder_atomically(out, write)
