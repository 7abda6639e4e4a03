"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023) - the baseline.

The model is fine-tuned so that its prediction on the concept follows *negative* guidance away
from it, computed by the frozen original model:

    target = eps*(x_t, t, c0) - eta * (eps*(x_t, t, c) - eps*(x_t, t, c0))
    loss   = || eps_theta(x_t, t, c) - sg(target) ||^2

`x_t` is data-free: the current model samples the concept with the family's sampler (DDIM; FLUX: Euler flow steps)
and stops at a random step.
ESD-x trains the UNet's cross-attention, ESD-u the rest of the UNet but its time embedding and output
layers (as the ESD code); training the text encoder
instead gives the text-encoder variant AdvUnlearn compares with.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from pipelines.bounds import TRAJECTORY_STEPS
from pipelines.errors import InputError

from .common import (
    check_encoder_scope,
    concept_prompts,
    esd_target,
    frozen_copy,
    select_trainable,
    validate_scope,
)
from .lora import LoraOptions, adapters_disabled, attach_lora, check_lora_components
from .training import ErasureResult, Network, RunContext, TrainingLoop


@dataclass
class ESDConfig(LoraOptions):
    # Defaults: ESD paper / code on SD v1.4 (Sec. 4; ESD-x for styles, ESD-u for nudity and objects):
    # MethodConfig's 1000 steps at lr 1e-5 with Adam's betas, the concept as its own prompt.
    batch_size: int = field(
        default=1, metadata={"bounds": "[1, inf)", "help": "x_t samples per step (one trajectory, several seeds)"}
    )
    component: Literal["unet", "text_encoder"] = field(
        default="unet", metadata={"help": "what to fine-tune: the UNet (ESD-x/ESD-u) or the text encoder"}
    )
    scope: str | None = field(
        default=None,
        metadata={
            "follows": "component",  # a preset's scope is for the preset's component
            "help": "UNet: xattn (ESD-x, default) | noxattn (ESD-u) | attn | full (FLUX's transformer: attn | full); "
            "text encoder: full (default) | attn | mlp | layers=i..j, each also after one encoder's name "
            "(SDXL: text_encoder_2:full)"
        },
    )
    negative_guidance: float = field(
        default=1.0, metadata={"bounds": "[0, inf)", "help": "eta: strength of the guidance away from the concept"}
    )
    ddim_steps: int = field(
        default=50, metadata={"bounds": TRAJECTORY_STEPS, "help": "DDIM steps of the trajectory that makes x_t "
                                                           "(FLUX: Euler steps)"}
    )
    sample_guidance: float = field(
        default=3.0, metadata={"bounds": "[0, inf)", "help": "classifier-free guidance while sampling x_t (FLUX: "
                               "the trajectory's embedded guidance; the frozen model's targets use EraseAnything's "
                               "3)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope is None:
            self.scope = "xattn" if self.component == "unet" else "full"
        validate_scope(self.component, self.scope)

    def check(self, family, concepts) -> None:
        if self.component == "text_encoder":
            check_encoder_scope(family, self.scope)
        if self.lora_rank:
            unet = getattr(family, "denoiser", "unet")
            check_lora_components(family, [unet] if self.component == "unet" else family.tower_components(self.scope))
        if getattr(family, "denoiser", "unet") != "unet" and self.scope in ("xattn", "noxattn"):
            raise InputError(f"{family.name}'s transformer has joint attention, no cross-attention: ESD's scope there "
                             "is attn (every attention projection) or full")  # fmt: skip
        # A preset that tunes lr but names no scope tuned it for ESD-x (SDXL's: 2e-4, where the authors drop to
        # 1e-5 for every other scope); run elsewhere, that lr is refused rather than silently reused.
        tuned = family.preset("esd")
        if "lr" in tuned and "scope" not in tuned and self.lr == tuned["lr"] and \
                (self.component, self.scope) != ("unet", "xattn"):  # fmt: skip
            raise InputError(f"the {family.name} ESD preset's lr {tuned['lr']:g} is ESD-x's; for another scope pass "
                             "--set lr=... (ESD's authors use 1e-5)")  # fmt: skip


CONFIG = ESDConfig
TEST_SETTINGS = {"steps": 3, "ddim_steps": 3, "batch_size": 2, "lr": 1e-2}


def erase(model, concepts: list[str], config: ESDConfig, run: RunContext) -> ErasureResult:
    """Fine-tune `model` (a TextToImageModel) so that it no longer generates `concepts`."""
    family = model.family
    prompts = concept_prompts(concepts, config.prompt_templates)
    run.check_divisible("batch_size", config.batch_size)
    device = run.torch_device
    model.to(device)

    tower = family.text_tower(model)  # the text encoder(s), as one network
    trained = model.unet if config.component == "unet" else tower
    # The frozen original: a copy, or - when only adapters train - the same network with its adapters switched
    # off (a second FLUX transformer would not fit beside the first).
    original = trained if config.lora_rank else frozen_copy(trained)
    for module in (model.unet, tower, model.vae):
        module.requires_grad_(False)
    n_trainable = select_trainable(trained, config.component, config.scope)
    if config.lora_rank:
        n_trainable = attach_lora(trained, config, run.seed)
    trained.train()
    unet_orig = original if config.component == "unet" else model.unet
    te_orig = original if config.component == "text_encoder" else tower

    scheduler = family.sampling_scheduler(model, config.ddim_steps, device)
    shape = family.latent_shape(model, config.batch_size)

    def as_original():
        return adapters_disabled(trained) if config.lora_rank else contextlib.nullcontext()

    with torch.no_grad(), as_original():
        uncond_orig = model.encode([""], te_orig)
        # The original's conditioning of each prompt, computed once as the steps would (under the loop's autocast):
        # the frozen text encoders are then idle during training.
        with run.accelerator.autocast():
            conditioning = {prompt: model.encode([prompt], te_orig) for prompt in dict.fromkeys(prompts)}

    # The networks the loop does not train, in the mixed precision's dtype where `frozen_dtype` asks (a GPU
    # under autocast): the original copy, or under LoRA the base weights beneath the adapters, and the other
    # component (idle text encoders, or the UNet a text encoder's loss goes through). Those the run returns come
    # back as their float32 weights. At FLUX size the float32 transformer and T5 alone would fill an 80 GB card.
    frozen = [model.unet if config.component == "text_encoder" else tower]
    if config.lora_rank:
        frozen.append(trained)
    else:
        run.halve_frozen(original)  # a copy the run drops: nothing to restore
    optimizer = run.adam([p for p in trained.parameters() if p.requires_grad], config.lr, config.adam_betas)
    loop = TrainingLoop(
        run, {config.component: Network(trained, optimizer)}, desc="esd",
    )  # fmt: skip
    # The trained forward pass goes through the prepared network (gradients synchronised across
    # processes); the sampling passes, without gradients, use the model as it is.
    unet_train = loop.modules["unet"] if config.component == "unet" else model.unet
    encoder_train = loop.modules["text_encoder"] if config.component == "text_encoder" else te_orig

    def step_fn(step: int) -> dict[str, float]:
        prompt = random.choice(prompts)
        with torch.no_grad():
            cond_orig = conditioning[prompt]
            # x_t comes from the model being erased, as in ESD: the concept is sampled as it is now.
            cond_now = model.encode([prompt]) if config.component == "text_encoder" else cond_orig
            uncond_now = model.encode([""]) if config.component == "text_encoder" else uncond_orig
            stop = random.randrange(config.ddim_steps)
            noise = run.shard(torch.randn(shape, device=device))  # the global batch's noise, this process's rows
            x_t, t_lo, t_hi = family.trajectory(
                model.unet, scheduler, cond_now, uncond_now, stop, config.sample_guidance, noise
            )
            t = run.shard(torch.randint(t_lo, t_hi, (config.batch_size,), device=device))
            with as_original():
                eps_empty = family.denoise(unet_orig, x_t, t, uncond_orig.expand(len(x_t), -1, -1))
                eps_concept = family.denoise(unet_orig, x_t, t, cond_orig.expand(len(x_t), -1, -1))
            target = esd_target(eps_empty, eps_concept, config.negative_guidance)
        cond_train = model.encode([prompt], encoder_train) if config.component == "text_encoder" else cond_orig
        eps = family.denoise(unet_train, x_t, t, cond_train.expand(len(x_t), -1, -1))
        loss = F.mse_loss(eps, target)
        loop.update(config.component, loss)
        return {"loss": loss.detach()}

    with contextlib.ExitStack() as stack:
        for network in frozen:
            stack.enter_context(run.frozen_in_compute_dtype(network))
        logs = loop.fit(step_fn, config.steps)
    trained.eval()
    changed = [family.denoiser] if config.component == "unet" else family.tower_components(config.scope)
    return ErasureResult(model, changed, n_trainable, logs)
