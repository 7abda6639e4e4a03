"""`erasure zoo build`: retrain the whole digits world from a seed and write it as shipped.

Weights are stored in float16 safetensors (sharded below 8 MB per file) to keep the repository
small; every loader in this project upcasts them to float32.
"""

from __future__ import annotations

import copy
import functools
import shutil
import time
from pathlib import Path

import torch

from pipelines import load_model
from pipelines.cards import write_model_card
from pipelines.files import normalise_permissions
from pipelines.gan_checkpoints import CONFIG_FILE

from . import gan_recipe, recipe

BUILD_ORDER = ("digits-judge", "digits-clip", "digits-sd", "digits-gan")
SHARD_SIZE = "6MB"  # every shipped file under 8 MB; the weights are fp16 before saving, so the index's sizes hold
DEFAULT_SAMPLING = {"steps": 25, "guidance": 5.0}  # digits-sd's, stored in its card
NEEDS = {"digits-sd": ("digits-clip",), "digits-gan": ("digits-clip", "digits-sd")}  # the models each is built from
NEEDS_FILE = {"digits-clip": "config.json", "digits-sd": "model_index.json"}  # how a finished one is recognised


def _to_half(directory: Path) -> None:
    """Rewrite every safetensors file under `directory` in float16 (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in directory.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, str(path), metadata=metadata)


def _staging(path: Path) -> Path:
    """A fresh folder beside `path` to build its model in (a killed build's is started over)."""
    staging = path.with_name(f".{path.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _install(staging: Path, path: Path) -> None:
    """The model built in `staging` in place of `path`: a zoo folder never holds a half-written model (a killed build
    leaves the previous one), and its files get ordinary modes (safetensors writes them 0600)."""
    normalise_permissions(staging)
    previous = path.with_name(f".{path.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if path.exists():
        path.rename(previous)
    staging.rename(path)
    shutil.rmtree(previous, ignore_errors=True)


def build_zoo(out_root: str | Path, seed: int = 0, scale: float = 1.0, only: tuple[str, ...] = ()) -> dict:
    """Train the digits world into `out_root/<name>/`; returns what was built and how long it took.

    `scale` < 1 shrinks every step count (and the batch) for a smoke run; `only` restricts the
    build to some models (digits-sd needs digits-clip, digits-gan both digits-clip and digits-sd, built
    or already present in `out_root`).
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    from pipelines.tokenizer import clip_tokenizer

    names = only or BUILD_ORDER
    unknown = set(names) - set(BUILD_ORDER)
    if unknown:
        raise ValueError(f"cannot build {sorted(unknown)}; buildable: {', '.join(BUILD_ORDER)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, not {scale}")
    steps = recipe.RecipeSteps().scaled(scale)
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise ValueError(f"{out_root} is a file; --out is the folder the models are written into")
    # What a model is built from must be there before hours of training, not looked up (on the Hub) after them.
    for name in names:
        for need in NEEDS.get(name, ()):
            if need not in names and not (out_root / need / NEEDS_FILE[need]).is_file():
                raise ValueError(f"{name} is built from {need}, which is neither built in this run nor in "
                                 f"{out_root}: add it (--only {need} --only {name})")  # fmt: skip
    out_root.mkdir(parents=True, exist_ok=True)
    report: dict = {"seed": seed, "scale": scale, "steps": steps.__dict__, "seconds": {}}
    common = {"seed": seed, "recipe_scale": scale, "built": time.strftime("%Y-%m-%d")}

    @functools.cache
    def digits_clip():  # read once after it is built; digits-sd takes its text tower, digits-gan its vision tower
        return CLIPModel.from_pretrained(out_root / "digits-clip", dtype=torch.float32)

    if "digits-judge" in names:
        t0 = time.time()
        path = _staging(out_root / "digits-judge")
        recipe.train_judge(path, steps.judge, steps.batch, seed)
        _to_half(path)
        write_model_card(path, {"name": "digits-judge", "kind": "judge", "steps": steps.judge, **common})
        _install(path, out_root / "digits-judge")
        report["seconds"]["digits-judge"] = round(time.time() - t0, 1)

    if "digits-clip" in names:
        t0 = time.time()
        path = _staging(out_root / "digits-clip")
        recipe.train_clip(path, steps.clip, steps.clip_batch, seed)
        _to_half(path)
        write_model_card(path, {"name": "digits-clip", "kind": "clip", "steps": steps.clip, **common})
        _install(path, out_root / "digits-clip")
        report["seconds"]["digits-clip"] = round(time.time() - t0, 1)

    if "digits-sd" in names:
        t0 = time.time()
        path = _staging(out_root / "digits-sd")
        work = out_root / ".digits-sd-parts"
        text_encoder = digits_clip().text_model.eval()
        tokenizer = clip_tokenizer(recipe.CLIP_CONTEXT)
        vae = recipe.train_vae(work / "vae", steps.vae, steps.vae_batch, seed)
        unet = recipe.train_unet(work / "unet", text_encoder, tokenizer, vae, steps.unet, steps.unet_batch, seed)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=recipe.digits_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
        # a half-precision copy: the recipe's float32 modules (the text encoder is digits-clip's) stay as they are
        copy.deepcopy(pipe).to(dtype=torch.float16).save_pretrained(path, safe_serialization=True,
                                                                     max_shard_size=SHARD_SIZE)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
        _to_half(path)
        card = {
            "name": "digits-sd", "kind": "text-to-image", "family": "digits",
            "sampling": DEFAULT_SAMPLING, "judge": "digits-judge", "clip": "digits-clip",
            "steps": {"vae": steps.vae, "unet": steps.unet}, **common,
        }  # fmt: skip
        write_model_card(path, card)
        _install(path, out_root / "digits-sd")
        report["seconds"]["digits-sd"] = round(time.time() - t0, 1)

    if "digits-gan" in names:
        t0 = time.time()
        path = _staging(out_root / "digits-gan")
        work = out_root / ".digits-gan-parts"
        first_stage, sharpened = work / "first-stage", work / "sharpened"
        # A stage's config is written last, so a rerun skips the stages already finished. Each
        # stage starts from the weights of the one before as they would ship (float16).
        if not (first_stage / CONFIG_FILE).is_file():
            gan_recipe.train_gan(first_stage, steps.gan, steps.gan_batch, seed, digits_clip().vision_model)
        _to_half(first_stage)
        if not (sharpened / CONFIG_FILE).is_file():
            gan_recipe.sharpen_gan(first_stage, sharpened, steps.gan_sharpen, steps.gan_batch, seed, digits_clip())
        _to_half(sharpened)
        digits_sd = load_model(out_root / "digits-sd", device="cpu").pipe
        gan_recipe.distil_gan(sharpened, path, steps.gan_distil, steps.gan_batch, seed, digits_clip(), digits_sd)
        shutil.rmtree(work)
        _to_half(path)
        stage_steps = {"gan": steps.gan, "sharpen": steps.gan_sharpen, "distil": steps.gan_distil}
        card = {"name": "digits-gan", "kind": "gan", "family": "digits", "steps": stage_steps, **common}
        write_model_card(path, card)
        _install(path, out_root / "digits-gan")
        report["seconds"]["digits-gan"] = round(time.time() - t0, 1)
    return report
