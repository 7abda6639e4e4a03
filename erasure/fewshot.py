"""Few-shot erasing (Fuchi & Takagi, "Erasing Concepts from Text-to-Image Diffusion Models with
Few-shot Unlearning", BMVC 2024): gradient *ascent* on the ordinary denoising loss of a handful of
real images of the concept, captioned with the concept, on the text encoder alone:

    loss = - || eps(x_t, t, E_theta(caption)) - noise ||^2,   x_t = noised VAE latent of an image

The paper has no retain term and no anchor: the text encoder stops mapping the concept's words to
what the UNet draws for it, and the concept falls back to related ones the model already knows.
The images are encoded by the VAE once; each epoch visits them in a new order, images // batch_size
batches of them (a remainder waits for a later epoch's order); a run is a few epochs
(about ten updates). `retain_weight` adds a term the paper lacks, on by default only in the digits
preset: the mean squared change of the encoder's output on prompts without the concept (cheaper
than AdvUnlearn's utility term, which compares the UNet's predictions under those prompts), which
keeps the other concepts where the ascent would drag them.

The paper leaves the choice of epoch to the user. Here a stopping rule picks it: after each epoch,
a few quick samples of the concept are judged (the domain judge where the model family has one,
else CLIP zero-shot), and the run ends once the concept's presence falls below `stop_below`
(at `stop_patience` checks in a row).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from pipelines.bounds import STEPS
from pipelines.errors import InputError
from pipelines.images import encode_latents, image_folder_files, load_square_images

from .common import check_encoder_scope, denoising_loss, select_trainable, validate_scope
from .lora import LoraOptions, attach_lora, check_lora_components
from .training import ErasureResult, Network, RunContext, TrainingLoop

BUILTIN = "builtin"
BUILTIN_COUNT = 4  # the paper's default number of images
TOKENS = "tokens"

# Captions of the kind textual inversion trains with (the paper fills such templates with the concept).
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]  # fmt: skip
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",  # twice, as in textual inversion
    "a rendition in the style of {}",
    "a nice painting in the style of {}", "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}", "an artwork in the style of {}",
]  # fmt: skip


@dataclass
class FewShotConfig(LoraOptions):
    # Defaults: the paper and its code on SD v1.4 (Sec. 4).
    steps: int = field(
        default=10,
        metadata={"bounds": "[1, inf)", "help": "updates, at most (see stop_below); an epoch is one pass over the "
                  "images, images // batch_size updates (the paper: 4 images, batch 2, 5 epochs = 10 updates)"},
    )  # fmt: skip
    batch_size: int = field(default=2, metadata={"bounds": "[1, inf)", "help": "images per update"})
    adam_betas: list[float] = field(
        default_factory=lambda: [0.9, 0.98], metadata={"bounds": "[0, 1)", "length": 2, "help": "Adam betas"}
    )
    prompt_templates: list[str] = field(
        default_factory=list,
        metadata={"templates": True, "help": "own caption templates ('{}' = the concept); replace `captions`"},
    )
    images: str | None = field(
        default=None,
        metadata={"help": "folder of a few images of the concept (any format and size), or 'builtin' where the "
                  "model family ships images of its concepts (digits: held-out renders of the concept)", "input": True},
    )  # fmt: skip
    num_images: int = field(
        default=0, metadata={"help": "images to use, in name order (0: all of the folder; builtin: 4 of each "
                                 "concept)"}
    )
    captions: Literal["object", "style"] = field(
        default="object", metadata={"help": "caption templates: object (27, 'a photo of a {}') or style (19)"}
    )
    scope: str = field(
        default="mlp+last-attn",
        metadata={"help": "text-encoder parameters to train: mlp+last-attn (the paper's) | full | attn | mlp | "
                  "layers=i..j | tokens (only the input embeddings of the concept's own words: a word filter "
                  "that synonyms and attacks bypass, see benchmarks/RESULTS.md)"},
    )  # fmt: skip
    retain_weight: float = field(
        default=0.0,
        metadata={"bounds": "[0, inf)", "help": "weight of a term the paper lacks: keep the encoder's output on "
                  "the family's retain prompts (COCO objects; the rest of the digits world) where it was (0: pure "
                  "ascent, the paper's)"},
    )  # fmt: skip
    retain_batch: int = field(default=8, metadata={"bounds": "[1, inf)", "help": "retain prompts per update"})
    adam_eps: float = field(default=1e-6, metadata={"bounds": "(0, inf)", "help": "Adam epsilon"})
    weight_decay: float = field(default=1e-8, metadata={"bounds": "[0, inf)", "help": "AdamW weight decay (none with "
                                                                       "scope=tokens)"})
    stop_below: float | None = field(
        default=0.1,
        metadata={"bounds": "(0, 1]", "help": "stop once the epochs' quick samples show each concept less often "
                  "than this (stop_patience epochs in a row; none: run every step)"},
    )  # fmt: skip
    stop_patience: int = field(
        default=1,
        metadata={"bounds": "[1, inf)", "help": "checks in a row that must fall below stop_below before the run stops "
                  "(1: the first; with a retain term, the epochs after the concept first disappears are the ones "
                  "where the rest comes back)"},
    )  # fmt: skip
    stop_samples: int = field(
        default=16,
        metadata={"bounds": "[1, inf)", "help": "quick samples per check, round the concept's target prompts of the "
                  "evaluation protocol (sample i: prompt i mod P, seed i)"},
    )  # fmt: skip
    stop_steps: int = field(default=10, metadata={"bounds": STEPS, "help": "sampling steps of the quick samples"})
    stop_clip: str | None = field(
        default=None,
        metadata={"help": "CLIP of the check where the family has no judge (default: the family's, digits-clip for "
                  "digits, openai/clip-vit-large-patch14 otherwise; or open_clip:NAME:WEIGHTS)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope == TOKENS and self.lora_rank:
            raise ValueError("scope=tokens trains input-embedding rows, which take no LoRA; choose another scope")
        if self.scope != TOKENS:
            validate_scope("text_encoder", self.scope)
        if self.images is not None and not self.images.strip():
            raise ValueError("images is empty: give a folder of images of the concept, or builtin")
        if self.images is not None and self.images != BUILTIN:
            image_folder_files(self.images, self.num_images)  # every file readable, enough of them
            self.images = str(Path(self.images).expanduser().absolute())  # `--config RUN/erasure.json` from anywhere

    def check(self, family, concepts) -> None:
        if self.scope != TOKENS:
            check_encoder_scope(family, self.scope)
            if self.lora_rank:
                check_lora_components(family, family.tower_components(self.scope))
        if self.images is None:
            raise InputError("fewshot needs a few images of the concept: pass --images DIR (or --set images=DIR)")
        if self.images == BUILTIN and not family.has_builtin_images:
            raise InputError(f"the {family.name} family has no builtin images of concepts; pass --images DIR")
        from evaluators.clip_models import check_clip_available
        from evaluators.detect import clip_needed

        if self.stop_below is not None and clip_needed(concepts, family):  # the stopping rule's quick samples
            check_clip_available(self.stop_clip or family.default_clip)

    def templates(self) -> list[str]:
        if self.prompt_templates:
            return self.prompt_templates
        return STYLE_TEMPLATES if self.captions == "style" else OBJECT_TEMPLATES


CONFIG = FewShotConfig
TEST_SETTINGS = {"steps": 4, "num_images": 4, "stop_samples": 4, "stop_steps": 2, "stop_below": 0.01}


def train_concept_tokens(tower, tokenizers: dict, concepts: list[str]) -> int:
    """Freeze the text tower `tower` except the input-embedding rows of the concepts' tokens (in each of its
    encoders); returns their size.

    The embedding matrix trains as one parameter whose gradient is masked to those rows, so every
    other word keeps its embedding bit for bit, and a prompt without the concept's tokens encodes
    exactly as before. (Adam leaves a row with zero gradient where it is; weight decay would not,
    so the optimiser gets none for this parameter.)
    """
    tower.requires_grad_(False)
    encoders = tower.named_encoders() if hasattr(tower, "named_encoders") else {"text_encoder": tower}
    size = 0
    for name, encoder in encoders.items():  # each encoder's rows of the concepts' tokens in its own tokenizer
        ids = sorted({i for c in concepts for i in tokenizers[name](c, add_special_tokens=False).input_ids})
        weight = encoder.get_input_embeddings().weight
        weight.requires_grad_(True)
        mask = torch.zeros(len(weight), 1, dtype=weight.dtype, device=weight.device)
        mask[ids] = 1
        weight.register_hook(lambda grad, mask=mask: grad * mask)
        size += len(ids) * weight.shape[1]
    return size


def _image_latents(model, concepts: list[str], config: FewShotConfig, seed: int) -> tuple[torch.Tensor, list | None]:
    """The erased images' VAE latents, and each one's caption: the built-in renders are captioned with their own
    concept; a folder's images with every concept (None)."""
    if config.images == BUILTIN:
        count = config.num_images or BUILTIN_COUNT
        images = torch.cat([model.family.builtin_images(c, count, seed) for c in concepts])
        captions = [c for c in concepts for _ in range(count)]
    else:
        files = image_folder_files(Path(config.images), config.num_images)
        images, captions = load_square_images(files, model.family.image_resolution(model)), None
    return encode_latents(model, images, torch.Generator().manual_seed(seed)), captions


def _make_trainable(model, encoder, concepts: list[str], config: FewShotConfig, seed: int) -> int:
    """Unfreezes what the ascent trains in the (frozen) text tower - the concepts' token embeddings, or the scope's
    weights or LoRA adapters on them - and returns how many values that is."""
    if config.scope == TOKENS:
        tokenizers = {"text_encoder": model.tokenizer, "text_encoder_2": getattr(model.pipe, "tokenizer_2", None)}
        return train_concept_tokens(encoder, tokenizers, concepts)
    n_trainable = select_trainable(encoder, "text_encoder", config.scope)
    return attach_lora(encoder, config, seed) if config.lora_rank else n_trainable


def _outcome(state: dict, config: FewShotConfig, n_images: int, per_epoch: int) -> dict:
    """What the run did, for `erasure.json`: the epochs and updates run, and where the stopping rule left it."""
    epochs_run = state["stopped_at_epoch"] or math.ceil(config.steps / per_epoch)
    updates = state["stopped_at_epoch"] * per_epoch or config.steps
    return {"fewshot": {"images": n_images, "epochs_run": epochs_run, "updates": updates,
                        "stopped_early": bool(state["stopped_at_epoch"]),
                        "last_presence": None if state["presence"] < 0 else state["presence"]}}  # fmt: skip


def erase(model, concepts: list[str], config: FewShotConfig, run: RunContext) -> ErasureResult:
    """Erase `concepts` from the text encoder of `model` by gradient ascent on a few images of them."""
    from evaluators.detect import PresenceCheck

    run.check_divisible("batch_size", config.batch_size)
    device = run.torch_device
    model.to(device)
    presence_check = None
    if config.stop_below is not None:
        presence_check = PresenceCheck(model.family, concepts, str(device), clip=config.stop_clip)
    latents, captions = _image_latents(model, concepts, config, run.seed)
    latents = latents.to(device)
    n = len(latents)
    batch = min(config.batch_size, n)
    run.check_divisible("the batch of images", batch)
    per_epoch = max(1, n // batch)
    templates = config.templates()

    encoder = model.family.text_tower(model)  # the text encoder(s) as one network (SDXL: both)
    retain, retain_targets = [], None
    if config.retain_weight:
        retain = model.family.retain_prompts(concepts, random.Random(run.seed))
        run.check_divisible("retain_batch", min(config.retain_batch, len(retain)))
        with torch.no_grad():
            retain_targets = model.encode(retain)
    for module in (model.unet, model.vae, encoder):
        module.requires_grad_(False)
    n_trainable = _make_trainable(model, encoder, concepts, config, run.seed)
    encoder.train()
    model.unet.eval()
    scheduler = model.scheduler
    optimizer = run.adam(
        [p for p in encoder.parameters() if p.requires_grad], config.lr, config.adam_betas, eps=config.adam_eps,
        weight_decay=0.0 if config.scope == TOKENS else config.weight_decay, decoupled=True,
    )  # fmt: skip
    state = {"order": torch.arange(n), "stopped_at_epoch": 0, "presence": -1.0, "checks_below": 0}
    loop = TrainingLoop(run, {"text_encoder": Network(encoder, optimizer)}, desc="fewshot", state=state)  # fmt: skip
    encoder_train = loop.modules["text_encoder"]

    def step_fn(step: int) -> dict[str, float]:
        epoch, index = divmod(step, per_epoch)
        if index == 0:  # each epoch visits the images in a fresh order
            state["order"] = torch.randperm(n)
        # The global batch's images, captions, noise and timesteps; this process keeps its rows of each.
        rows = state["order"][index * batch : (index + 1) * batch]
        prompts = run.shard([random.choice(templates).format(captions[i] if captions else random.choice(concepts))
                             for i in rows.tolist()])  # fmt: skip
        x0 = latents[rows.to(device)]
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), device=device)
        x0, noise, t = run.shard(x0), run.shard(noise), run.shard(t)
        mse = denoising_loss(model, x0, model.encode(prompts, encoder_train), noise, t)
        logs = {"denoising_mse": mse.detach()}
        loss = -mse  # gradient ascent
        if retain:
            kept = run.shard(torch.tensor(random.sample(range(len(retain)), min(config.retain_batch, len(retain)))))
            drift = F.mse_loss(model.encode([retain[i] for i in kept.tolist()], encoder_train), retain_targets[kept])
            loss = loss + config.retain_weight * drift
            logs["retain_drift"] = drift.detach()
        loop.update("text_encoder", loss)
        if index == per_epoch - 1 and config.stop_below is not None:
            presence = presence_check(model, config.stop_samples, steps=config.stop_steps)
            state["presence"], logs["presence"] = presence, presence
            state["checks_below"] = state["checks_below"] + 1 if presence < config.stop_below else 0
            if state["checks_below"] >= config.stop_patience:
                state["stopped_at_epoch"] = epoch + 1
                loop.stop(f"each concept showed in under {100 * config.stop_below:.3g}% of the quick samples, "
                          f"{config.stop_patience} epoch(s) in a row (stop_below, stop_patience)")
        return logs

    with run.frozen_in_compute_dtype(model.unet):
        logs = loop.fit(step_fn, config.steps)
    encoder.eval()
    changed = model.family.tower_components("" if config.scope == TOKENS else config.scope)
    return ErasureResult(model, changed, n_trainable, logs, _outcome(state, config, n, per_epoch))
