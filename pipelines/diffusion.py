"""Text-to-image backend: a thin layer over the family's real diffusers pipeline (SD 1.x / 2.x, SDXL, FLUX) and the
one-step pipeline of SFD's generators.

It loads every supported source the same way, exposes the parts methods patch (tokenizer,
text encoder, UNet, VAE, scheduler), generates deterministically per (prompt, seed), swaps a
patched component in, and saves. No training code lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .bounds import COUNT, GUIDANCE, STEPS, check_number
from .cards import write_model_card
from .components import loadable_folder, save_pipeline
from .errors import InputError
from .images import decode_latents, to_pil
from .loading import ModelSource, check_weight_files
from .logs import quiet_libraries
from .safe_load import check_torch_file

SHIPPED_CONFIGS = Path(__file__).parent / "configs"
# Sampling defaults for checkpoints that carry no erasure_model.json (real Stable Diffusion).
SD_SAMPLING = {"steps": 30, "guidance": 7.5}
FLUX_SAMPLING = {"steps": 28, "guidance": 3.5}  # FluxPipeline's own defaults


class TextToImageModel:
    """A loaded Stable-Diffusion-style model and the source it came from."""

    kind = "text-to-image"

    def __init__(self, pipe, source: ModelSource):
        self.pipe = pipe
        self.source = source
        pipe.set_progress_bar_config(disable=True)

    # The parts a method may patch.
    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def family(self):
        """The model's family (pipelines/families): how it is conditioned and sampled, its prompts and presets."""
        return self.source.family

    @property
    def resolution(self) -> int:
        """The side of the images it draws: its pipeline's default, the UNet's sample size in pixels."""
        size = self.unet.config.sample_size
        return int(max(size) if isinstance(size, (list, tuple)) else size) * self.pipe.vae_scale_factor

    @property
    def sampling(self) -> dict:
        """Default steps and guidance for this model (the digits world's are tuned and stored with it)."""
        return {**SD_SAMPLING, **self.source.card.get("sampling", {})}

    def to(self, device: str | torch.device) -> TextToImageModel:
        self.pipe.to(device, silence_dtype_warnings=True)  # resolve_dtype says what half precision costs on the CPU
        return self

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids of `prompts`, as the family's pipeline makes them."""
        return self.family.tokenize(self, prompts)

    def encode(self, prompts: Sequence[str], text_encoder=None) -> torch.Tensor:
        """The denoiser's conditioning for `prompts`, from `text_encoder` (default: the model's own)."""
        return self.family.encode(self, prompts, text_encoder)

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        batch_size: int = 16,
        prompt_embeds: torch.Tensor | None = None,
        progress: bool = False,
        desc: str = "generating",
    ) -> list[list[Image.Image]]:
        """Images for every (prompt, seed): `result[i][j]` is prompt i with seed j.

        Each image depends only on its prompt and seed (one CPU generator per image), not on the
        batch it was drawn in. `prompt_embeds` ([len(prompts), L, D]) replaces the text encoder,
        e.g. for adversarial embeddings; `prompts` then only label the rows.
        """
        prompts = [prompts] if isinstance(prompts, str) else prompts  # one prompt, not one per character
        jobs = [(i, s) for i in range(len(prompts)) for s in seeds]
        images = self._run(jobs, prompts, prompt_embeds, steps, guidance, batch_size, progress, desc)
        return [[images[(i, s)] for s in seeds] for i in range(len(prompts))]

    @torch.no_grad()
    def generate_jobs(
        self,
        prompts: Sequence[str],
        jobs: Sequence[tuple[int, int]],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        batch_size: int = 16,
        progress: bool = False,
        desc: str = "generating",
    ) -> list[Image.Image]:
        """One image per (prompt index, seed) job, in order: prompt files give each prompt its own seed."""
        images = self._run(list(jobs), prompts, None, steps, guidance, batch_size, progress, desc)
        return [images[tuple(job)] for job in jobs]

    @torch.no_grad()
    def generate_each(
        self,
        prompt_embeds: torch.Tensor,
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[Image.Image]:
        """One image per row of `prompt_embeds` ([N, L, D]), row i drawn with `seeds[i]`."""
        jobs = list(zip(range(len(seeds)), seeds))
        images = self._run(jobs, None, prompt_embeds, steps, guidance, batch_size, progress)
        return [images[job] for job in jobs]

    def _run(self, jobs, prompts, prompt_embeds, steps, guidance, batch_size, progress, desc="generating") -> dict:
        from tqdm.auto import tqdm

        steps = self.sampling["steps"] if steps is None else steps
        guidance = self.sampling["guidance"] if guidance is None else guidance
        # what `erasure sample` checks, for callers from Python: steps=0 would divide by zero in the scheduler
        check_number("steps", steps, STEPS, integer=True)
        check_number("guidance", guidance, GUIDANCE)
        check_number("batch_size", batch_size, COUNT, integer=True)
        negative = self.encode([""])
        images: dict[tuple[int, int], Image.Image] = {}
        # closed on an error too, so that the error's line starts a line of its own
        with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start : start + batch_size]
                generators = [torch.Generator("cpu").manual_seed(int(s)) for _, s in batch]
                if prompt_embeds is not None:
                    embeds = prompt_embeds[[i for i, _ in batch]].to(self.device, self.unet.dtype)
                else:
                    embeds = self.encode([prompts[i] for i, _ in batch])
                images.update(zip(batch, self._sample(embeds, negative, generators, steps, guidance)))
                bar.update(len(batch))
        return images

    def _sample(self, embeds, negative, generators, steps, guidance) -> list[Image.Image]:
        latents = self.pipe(
            **self._pipeline_conditioning(embeds, negative.expand(len(embeds), -1, -1)),
            num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="latent",
        ).images  # fmt: skip
        return decode_latents(self.vae, latents, upcast=self.upcast_vae)

    upcast_vae = False  # decode a float16 VAE in float32 where its config asks (SDXL's pipeline does)

    def _pipeline_conditioning(self, embeds: torch.Tensor, negative: torch.Tensor) -> dict[str, torch.Tensor]:
        """The family's conditionings as the pipeline's keyword arguments."""
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    replaceable = ("text_encoder", "unet", "vae")

    def replace(self, name: str, module: torch.nn.Module) -> None:
        """Swap a component (e.g. a patched text encoder) into the pipeline."""
        if name not in self.replaceable:
            raise ValueError(f"cannot replace {name!r}; replaceable: {', '.join(self.replaceable)}")
        module.to(self.device, getattr(self.pipe, name).dtype)
        setattr(self.pipe, name, module)
        self.pipe.register_modules(**{name: module})

    def load_component(self, name: str, folder: str | Path) -> None:
        """Swap in a component saved on its own (plug-and-play), e.g. an erased `text_encoder/`."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise InputError(f"{folder} is not a saved {name} (no config.json)")
        check_weight_files(folder)
        cls = type(getattr(self.pipe, name))
        self.replace(name, cls.from_pretrained(folder, dtype=getattr(self.pipe, name).dtype))

    def save(
        self, directory: str | Path, card: dict | None = None, *, changed: list[str] | None = None, mode: str = "full"
    ) -> dict[str, str]:
        """Save the pipeline (diffusers layout, safetensors) and its erasure_model.json.

        With `changed` (the components that differ from the base), the others are the base's own files:
        linked into a complete folder (`mode="full"`), or referenced (`mode="changed"`, see
        pipelines/components.py). Without it, every component is serialised. Returns how each was stored.
        """
        directory = Path(directory)
        with quiet_libraries():  # transformers' "Writing model shards" bar, for each text encoder
            if changed is None:
                self.pipe.save_pretrained(directory, safe_serialization=True)
                stored = {}
            else:
                stored = save_pipeline(self.pipe, directory, changed=changed, source=self.source, mode=mode)
        write_model_card(directory, {**self.source.card, "family": self.family.name, **(card or {})})
        return stored


class XLModel(TextToImageModel):
    """An SDXL model: a second tokenizer and text encoder; its conditionings are the sdxl family's packed
    tensors (pipelines/families/sdxl.py), unpacked here into what `StableDiffusionXLPipeline` takes."""

    replaceable = ("text_encoder", "text_encoder_2", "unet", "vae")
    upcast_vae = True

    @property
    def tokenizer_2(self):
        return self.pipe.tokenizer_2

    @property
    def text_encoder_2(self):
        return self.pipe.text_encoder_2

    def _pipeline_conditioning(self, embeds: torch.Tensor, negative: torch.Tensor) -> dict[str, torch.Tensor]:
        from .families.sdxl import pooled_width, unpack

        width = pooled_width(self.unet)
        tokens, pooled, _ = unpack(embeds, width)  # the time ids are the pipeline's own defaults
        negative_tokens, negative_pooled, _ = unpack(negative, width)
        return {"prompt_embeds": tokens, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative_tokens,
                "negative_pooled_prompt_embeds": negative_pooled}  # fmt: skip


class FluxModel(TextToImageModel):
    """A FLUX.1 model: the transformer is the denoiser (`unet` to the methods, `transformer` to the pipeline); its
    conditionings are the flux family's packed tensors (pipelines/families/flux.py). FLUX.1 [dev] is
    guidance-distilled: `guidance` is the transformer's embedded guidance, and no negative prompt is drawn."""

    replaceable = ("text_encoder", "text_encoder_2", "transformer", "vae")
    upcast_vae = False

    @property
    def unet(self):
        return self.pipe.transformer

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def text_encoder_2(self):
        return self.pipe.text_encoder_2

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def resolution(self) -> int:
        """The side of the images it draws by default (a model's card may set it; FLUX.1's is 1024)."""
        from .families.flux import NATIVE_RESOLUTION

        return int(self.sampling.get("resolution", NATIVE_RESOLUTION))

    @property
    def sampling(self) -> dict:
        return {**FLUX_SAMPLING, **self.source.card.get("sampling", {})}

    def replace(self, name: str, module: torch.nn.Module) -> None:
        super().replace("transformer" if name == "unet" else name, module)

    def _sample(self, embeds, negative, generators, steps, guidance) -> list[Image.Image]:
        from .families.flux import pooled_width, unpack

        tokens, pooled = unpack(embeds, pooled_width(self.pipe.transformer))
        images = self.pipe(
            prompt_embeds=tokens, pooled_prompt_embeds=pooled, num_inference_steps=steps, guidance_scale=guidance,
            height=self.resolution, width=self.resolution, generator=generators, output_type="pt",
        ).images  # fmt: skip
        return to_pil(images)  # which refuses NaN images, as the other families' decoding does


class OneStepModel(TextToImageModel):
    """A one-step generator (pipelines/one_step.py): the same interface, one UNet evaluation per image.

    Guidance was distilled into its weights, so `steps` and `guidance` of `generate` are ignored.
    """

    kind = "one-step"

    @property
    def sampling(self) -> dict:
        return {"steps": 1, "guidance": 0.0}

    @property
    def t_init(self) -> int:
        return self.pipe.config.t_init

    def _sample(self, embeds, negative, generators, steps, guidance) -> list[Image.Image]:
        conditioning = self._pipeline_conditioning(embeds, negative.expand(len(embeds), -1, -1))
        positive = {k: v for k, v in conditioning.items() if not k.startswith("negative")}  # no guidance to apply
        return self.pipe(**positive, generator=generators, output_type="pil").images

    def save(self, directory: str | Path, card: dict | None = None, **how) -> dict[str, str]:
        # The teacher's card carries its own sampling defaults; this model's are one step, no guidance.
        return super().save(directory, {**(card or {}), "sampling": self.sampling}, **how)


class OneStepXLModel(OneStepModel, XLModel):
    """SDXL's one-step generator: the one-step interface, SDXL's second encoder and packed conditionings."""


def one_step_model(pipe, source: ModelSource) -> OneStepModel:
    """The model wrapper of a one-step pipeline, as its family's conditioning needs."""
    return (OneStepXLModel if source.family.text_encoders == 2 else OneStepModel)(pipe, source)


def load_one_step(source: ModelSource, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a one-step generator folder written by SFD."""
    from .one_step import OneStepPipeline

    check_weight_files(source.path)
    try:
        with quiet_libraries(), loadable_folder(source.path) as folder:
            pipe = OneStepPipeline.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot load a one-step pipeline from {source.path}: {exc}") from None
    if source.card.get("lora_adapters"):  # `sfd --save lora`: the teacher's UNet and the generator's adapters
        import diffusers

        from .lora_files import apply_lora_files

        # the family's pipeline over the same modules lends its LoRA loader: the adapters merge into `pipe`'s UNet
        family_pipeline = getattr(diffusers, source.family.pipeline_class)
        modules = {name: module for name, module in pipe.components.items() if module is not None}
        apply_lora_files(family_pipeline(**modules, **_NO_SAFETY_CHECKER.get(family_pipeline.__name__, {})),
                         [source.path])  # fmt: skip
    return one_step_model(pipe, source).to(device)


# SD 1.x/2.x's pipeline takes a safety checker, switched off (SDXL's and FLUX's have none).
_NO_SAFETY_CHECKER = {
    "StableDiffusionPipeline": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
}


def load_text_to_image(
    source: ModelSource,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    single_file_config: str | Path | None = None,
) -> TextToImageModel:
    """Load the family's diffusers pipeline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
    `FluxPipeline`) from a resolved source (folder, Hub snapshot or single file)."""
    import diffusers

    pipeline = getattr(diffusers, source.family.pipeline_class)
    extra = _NO_SAFETY_CHECKER.get(pipeline.__name__, {})
    if source.origin == "single-file":
        pipe = _load_single_file(pipeline, source.path, single_file_config, dtype, extra)
    else:
        check_weight_files(source.path)
        try:
            with quiet_libraries(), loadable_folder(source.path) as folder:
                pipe = pipeline.from_pretrained(folder, dtype=dtype, **extra)
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"cannot load a {pipeline.__name__} from {source.path}: {exc}") from None
    if source.card.get("lora_adapters"):  # an `erase --save lora` run: the base's weights and the run's adapters
        from .lora_files import apply_lora_files

        apply_lora_files(pipe, [source.path])
    wrapper = {"FluxPipeline": FluxModel, "StableDiffusionXLPipeline": XLModel}.get(pipeline.__name__,
                                                                                      TextToImageModel)  # fmt: skip
    model = wrapper(pipe, source).to(device)
    if torch.device(device).type == "cuda":
        _enable_xformers(pipe)
    return model


def _enable_xformers(pipe) -> None:
    """Use xformers attention when it is installed; diffusers already uses PyTorch SDPA otherwise."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception:  # a build mismatch must not stop generation: SDPA remains in place
        pass


def _load_single_file(pipeline, path: Path, config: str | Path | None, dtype: torch.dtype, extra: dict):
    """A single-file (original LDM layout) checkpoint, with component configs from a local folder.

    Offline, diffusers cannot fetch the configs it would infer, so they come from `config` or, for SD 1.x,
    SD 2.x (768-px v-prediction) and SDXL base checkpoints, from the copies shipped in pipelines/configs/.
    """
    from .tokenizer import clip_tokenizer

    if path.suffix == ".safetensors":
        check_weight_files(path)
    else:  # torch.load (diffusers', then ours) would inflate compressed entries before reading anything
        check_torch_file(path, str(path))
    if config is None:
        config = _shipped_config_for(path)
    config = Path(config)
    if not (config / "model_index.json").is_file():
        raise InputError(f"{config} is not a diffusers config folder (no model_index.json)")
    try:
        tokenizers = {"tokenizer": _config_tokenizer(config / "tokenizer") or clip_tokenizer()}
        if (config / "tokenizer_2").is_dir():  # SDXL's second tokenizer pads with "!"
            tokenizers["tokenizer_2"] = _config_tokenizer(config / "tokenizer_2")
        with quiet_libraries():
            return pipeline.from_single_file(
                str(path), config=str(config), local_files_only=True, dtype=dtype, **tokenizers, **extra
            )
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot load single-file checkpoint {path}: {exc}") from None


def _config_tokenizer(folder: Path):
    """A config folder's tokenizer: its own files, or - shipped configs carry no vocabulary - the real CLIP
    vocabulary with the length and padding its tokenizer_config.json names."""
    from .tokenizer import clip_tokenizer

    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(folder)
    settings = folder / "tokenizer_config.json"
    if settings.is_file():
        import json

        spec = json.loads(settings.read_text())
        return clip_tokenizer(spec.get("model_max_length", 77), spec.get("pad_token", "<|endoftext|>"))
    return None


def _shipped_config_for(path: Path) -> Path:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
        model_type = infer_diffusers_model_type(checkpoint)
    except Exception as exc:
        raise InputError(f"cannot read single-file checkpoint {path}: {exc}") from None
    # SD 2.x files are taken as 768-px v-prediction (2.0-v, 2.1); a 512-px epsilon one (2.x-base) needs
    # --model-config.
    shipped = {"v1": "sd-v1", "v2": "sd-v2", "xl_base": "sdxl-base"}
    if model_type not in shipped:
        raise InputError(
            f"{path} looks like a {model_type!r} checkpoint; pass --model-config with a diffusers folder "
            f"of its configs (shipped: {', '.join(shipped)})"
        )
    return SHIPPED_CONFIGS / shipped[model_type]


__all__ = [
    "FluxModel", "OneStepModel", "OneStepXLModel", "TextToImageModel", "XLModel", "load_one_step",
    "load_text_to_image", "one_step_model",
]  # fmt: skip
