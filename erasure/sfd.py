"""Score Forgetting Distillation (Chen, Zhang & Zhou, "Score Forgetting Distillation: A Swift,
Data-Free Method for Machine Unlearning in Diffusion Models", ICLR 2025).

Three UNets of the teacher's architecture: the frozen teacher f_phi, a fake-score network f_psi
and a one-step generator G_theta, both initialised from the teacher. G maps noise to a clean
latent in one evaluation (pipelines/one_step.py). Each iteration:

1. fake-score step: the ordinary denoising loss (eps-MSE; a v-predicting teacher's v error weighted to it) on
   sg(x_g), each sample under the condition it was generated with (remain prompts and the forget prompts);
2. generator step, SiD's loss on freshly diffused x_g (gradients reach G through x_g and x_t;
   neither score network's weights change), with p the teacher's and s the fake network's x0:

       L(x_g) = sum((p - s) * ((p - x_g) - alpha * (p - s))) / w,   w = sg(mean |p - x_g|)

   The forgetting term is the same expression for samples of the forget prompt, with the teacher
   queried under the *override* prompt: G's distribution for the concept is pulled toward the
   teacher's distribution for the override. Generator loss = L(remain) + lambda * L(forget).

No image is used: remain prompts come from the model's own prompt distribution (the family's prompts, or
`remain_prompt_file`: on SD, the 80 COCO-object prompts a family has are a narrow stand-in for captions). The teacher's
classifier-free guidance enters through p, so the generator samples with guidance baked in. The
saved model is the generator's EMA.

Two departures from the reference SD script, both on purpose: the generator starts from the teacher
(the method as published; the script starts from an already distilled SiD-LSG generator), and the
fake score is trained and queried without guidance (SiD-LSG also guides it).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.errors import InputError

from .checkpointing import checkpoint_with_switches
from .common import frozen_copy
from .lora import LoraOptions, adapters_disabled, attach_lora
from .training import EMA, ErasureResult, Network, RunContext, TrainingLoop

SD_TEMPLATES = ["{}", "a photo of {}", "an image of {}", "a picture of {}", "a painting of {}"]


@dataclass
class SFDConfig(LoraOptions):
    # Defaults: the paper's Stable Diffusion setting (Sec. 5 and its SD script).
    steps: int = field(default=2000, metadata={"bounds": "[1, inf)", "help": "fake-score + generator update pairs"})
    lr: float = field(default=1e-6, metadata={"bounds": "(0, inf)", "help": "Adam learning rate of the generator"})
    batch_size: int = field(default=4, metadata={"bounds": "[1, inf)", "help": "remain samples per update"})
    adam_betas: list[float] = field(
        default_factory=lambda: [0.0, 0.999], metadata={"bounds": "[0, 1)", "length": 2, "help": "Adam betas"}
    )
    prompt_templates: list[str] = field(
        default_factory=lambda: list(SD_TEMPLATES),
        metadata={"templates": True,
                  "help": "templates of the forget and override prompts ('{}' = the concept or the override); the "
                  "digits world pairs its own captions instead, unless concept and override are on different heads"},
    )  # fmt: skip
    override: str | None = field(
        default=None,
        metadata={"help": "what the concept becomes (the teacher is queried under it), e.g. 'a person wearing "
                  "clothes'; default: the model family's, where it has one (digits: the next digit, colour or "
                  "style)"},
    )  # fmt: skip
    distill_only: bool = field(
        default=False, metadata={"help": "distil the teacher into a one-step generator without forgetting"}
    )
    alpha: float = field(
        default=1.0, metadata={"bounds": "(0, inf)", "help": "SiD's alpha (1.2 for class-conditional models)"}
    )
    forget_weight: float = field(
        default=1.0, metadata={"bounds": "[0, inf)", "help": "lambda: weight of the forgetting term"}
    )
    t_init: int = field(
        default=625,
        metadata={
            "bounds": "[1, 999]",
            "help": "generator timestep (sigma ~ 2.5: 625 for SD's scaled-linear schedule)",
        },
    )
    t_min: int = field(default=20, metadata={"bounds": "[1, 999]", "help": "smallest timestep of the score losses"})
    t_max: int = field(
        default=980, metadata={"bounds": "[2, 1000]", "help": "largest timestep of the score losses (exclusive)"}
    )
    guidance: float | None = field(
        default=4.5,
        metadata={
            "bounds": "[0, inf)",
            "help": "teacher's classifier-free guidance in the generator loss (none: the model's)",
        },
    )
    forget_batch: int = field(default=4, metadata={"help": "forget samples per update"})
    fake_lr: float = field(
        default=3e-6, metadata={"bounds": "(0, inf)", "help": "Adam learning rate of the fake-score network"}
    )
    ema_decay: float = field(
        default=0.0,
        metadata={"bounds": "[0, 1)", "help": "decay of the generator's EMA, whose weights are saved (0: no EMA)"},
    )
    remain_prompts: int = field(
        default=1000, metadata={"bounds": "[1, inf)", "help": "size of the pool of remain prompts"}
    )
    remain_prompt_file: str | None = field(
        default=None,
        metadata={"help": "prompts to distil over instead of the family's own (one per line, or a CSV with a prompt "
                  "column; the paper's are LAION captions): those that mention a concept are left out, and "
                  "remain_prompts of the rest are drawn", "input": True},
    )  # fmt: skip
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute the three UNets' activations block by block in the backward pass instead of "
                  "keeping them: less memory for more time, the same result"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.t_min >= self.t_max:
            raise ValueError("t_min must be smaller than t_max")
        if self.forget_batch == 0 and not self.distill_only:
            raise ValueError("forget_batch = 0 leaves nothing to forget; use distill_only=true to only distil")
        if self.override is not None and not self.override.strip():
            raise ValueError("override must not be empty")
        if self.remain_prompt_file:  # recorded absolute: `--config RUN/erasure.json` reruns it from any folder
            self.remain_prompt_file = str(Path(self.remain_prompt_file).expanduser().absolute())

    def check(self, family, concepts) -> None:
        if self.remain_prompt_file is not None:
            remain_prompts_from_file(self.remain_prompt_file, concepts, 0, 1)  # refused now, not after loading
        if self.override is not None or self.distill_only:
            return
        for concept in concepts:
            if family.default_override(concept) is None:
                raise InputError(
                    f"sfd needs what {concept!r} becomes: pass --set override=TEXT (e.g. override='a person wearing "
                    f"clothes' for nudity); the {family.name} family has no default for it"
                )

    def overrides(self, family, concepts) -> dict[str, str]:
        """concept -> what it becomes (none when only distilling)."""
        if self.distill_only:
            return {}
        return {c: self.override or family.default_override(c) for c in concepts}


CONFIG = SFDConfig
TEST_SETTINGS = {"steps": 3, "batch_size": 2, "forget_batch": 2, "remain_prompts": 8, "lr": 1e-2, "fake_lr": 1e-2}


def remain_prompts_from_file(path: str, concepts: list[str], seed: int, n: int) -> list[str]:
    """Up to `n` prompts of a prompt file, in the order of `seed`, without those that mention a concept."""
    from evaluators.prompt_files import read_prompt_file
    from pipelines.families.base import mentions

    prompts = [row.text for row in read_prompt_file(path, "remain_prompt_file")]
    kept = [prompt for prompt in dict.fromkeys(prompts) if not mentions(prompt, concepts)]
    if not kept:
        raise InputError(f"remain_prompt_file {path}: every prompt mentions {' or '.join(concepts)}")
    random.Random(seed).shuffle(kept)
    return kept[:n]


# --- the losses ---------------------------------------------------------------------------------


def sid_loss(p: torch.Tensor, s: torch.Tensor, x_g: torch.Tensor, alpha: float) -> torch.Tensor:
    """SiD's generator loss per sample: sum((p - s) * ((p - x_g) - alpha (p - s))) / w, w = sg(mean|p - x_g|)."""
    dims = tuple(range(1, p.dim()))
    w = (p - x_g).abs().mean(dim=dims).detach().clamp_min(1e-8)
    return ((p - s) * ((p - x_g) - alpha * (p - s))).sum(dim=dims) / w


def fake_score_loss(out: torch.Tensor, wanted: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The fake score's denoising loss: eps-MSE, as SiD fits it. A v-predicting network's error is weighted by abar
    (= snr / (snr + 1)): its v error is its eps error over sqrt(abar), which unweighted would let the noisiest
    timesteps (1 / abar up to ~170 on SD's schedule) dominate the fit."""
    if prediction == "v_prediction":
        return (abar * (out - wanted).pow(2)).mean()
    return F.mse_loss(out, wanted)


class GradientsOff:
    """Within the block, `module`'s weights take no gradient (inputs still do)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.module.parameters()]
        self.module.requires_grad_(False)

    def __exit__(self, *exc):
        for param, flag in zip(self.module.parameters(), self.flags):
            param.requires_grad_(flag)


# --- the method ---------------------------------------------------------------------------------


def erase(model, concepts: list[str], config: SFDConfig, run: RunContext):
    """Distil `model` into a one-step generator that no longer generates `concepts`."""
    from pipelines.one_step import x0_from_prediction

    family = model.family
    prediction = model.scheduler.config.prediction_type  # eps, or v (SD 2.x at 768 px): the generator predicts it too
    if prediction not in ("epsilon", "v_prediction"):
        raise InputError(f"sfd distils a teacher that predicts eps or v; this model predicts {prediction}")
    run.check_divisible("batch_size", config.batch_size)
    run.check_divisible("forget_batch", config.forget_batch)
    overrides = config.overrides(family, concepts)
    guidance = model.sampling["guidance"] if config.guidance is None else config.guidance
    device = run.torch_device
    model.to(device)
    for module in (model.unet, family.text_tower(model), model.vae):
        module.requires_grad_(False)
    teacher, generator, fake, teacher_scope = _three_unets(model, config, run)
    trainable = sum(p.numel() for p in generator.parameters() if p.requires_grad)
    alphas = model.scheduler.alphas_cumprod.to(device, torch.float32)
    batch = _Batches(model, overrides, alphas, config, run)

    def optimiser(module, lr):
        return run.adam([p for p in module.parameters() if p.requires_grad], lr, config.adam_betas)

    ema = EMA(generator, config.ema_decay)
    loop = TrainingLoop(
        run,
        # Unclipped, as in the reference code in float32.
        {"fake": Network(fake, optimiser(fake, config.fake_lr), max_grad_norm=None),
         "generator": Network(generator, optimiser(generator, config.lr), max_grad_norm=None)},
        desc="sfd", state={"ema": ema},
    )  # fmt: skip

    def step_fn(step: int) -> dict[str, float]:
        # 1. fake-score step on the generator's current samples
        cond, _ = batch.conditions()
        z = batch.noise()
        with torch.no_grad():
            x_g = family.one_step(generator, alphas, config.t_init, z, cond, prediction)
        x_t, t, wanted, abar = batch.noisy(x_g)
        fake_loss = fake_score_loss(family.denoise(loop.modules["fake"], x_t, t, cond), wanted, abar, prediction)
        loop.update("fake", fake_loss)

        # 2. generator step
        cond, teacher_cond = batch.conditions()
        z = batch.noise()
        x_g = family.one_step(loop.modules["generator"], alphas, config.t_init, z, cond, prediction)
        x_t, t, _, abar = batch.noisy(x_g)
        with GradientsOff(fake):
            s = x0_from_prediction(x_t, family.denoise(fake, x_t, t, cond), abar, prediction)
        guided = torch.cat([batch.uncond.expand(len(x_t), -1, -1), teacher_cond])
        with teacher_scope():
            eps_u, eps_c = family.denoise(teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), guided).chunk(2)
        p = x0_from_prediction(x_t, eps_u + guidance * (eps_c - eps_u), abar, prediction)  # guidance: linear in v too
        per_sample = sid_loss(p, s, x_g, config.alpha)
        local_remain = config.batch_size // run.num_processes
        remain_loss = per_sample[:local_remain].mean()
        forget_loss = per_sample[local_remain:].mean() if batch.n_forget else torch.zeros((), device=device)
        loop.update("generator", remain_loss + config.forget_weight * forget_loss)
        ema.update(generator)
        return {"fake": fake_loss.detach(), "remain": remain_loss.detach(), "forget": forget_loss.detach()}

    logs = loop.fit(step_fn, config.steps)
    ema.copy_to(generator)
    generator.eval().requires_grad_(False)
    outcome = {
        "sfd": {"overrides": overrides, "distilled_guidance": guidance, "t_init": config.t_init,
                "forget_prompts": len(batch.pairs), "remain_prompts": len(batch.remain)},
    }  # fmt: skip
    return ErasureResult(_one_step_model(model, generator, config), ["unet"], trainable, logs, outcome)


def _three_unets(model, config: SFDConfig, run: RunContext):
    """(teacher, generator, fake score, the scope in which the teacher is queried): the generator and the fake
    score start from the teacher."""
    teacher = model.unet.eval()
    fake = frozen_copy(teacher).train().requires_grad_(True)
    teacher_scope = contextlib.nullcontext
    if config.lora_rank:
        # Generator and fake score are the teacher plus adapters of their own (every Linear / Conv2d layer, or
        # lora_targets); the teacher is the generator with its adapters off: two UNets in memory, not three,
        # and optimiser state for the adapters alone.
        generator = teacher.train().requires_grad_(True)
        attach_lora(generator, config, run.seed or 0)
        attach_lora(run.halve_frozen(fake), config, (run.seed or 0) + 1)  # the fake's base is not trained
        teacher_scope = lambda: adapters_disabled(generator)  # noqa: E731
    else:
        generator = frozen_copy(teacher).train().requires_grad_(True)
        run.halve_frozen(teacher)  # after both copies; only called inside the loop, under autocast
    if config.gradient_checkpointing:
        # Every block of the three UNets is recomputed in the backward pass, under the switches it ran with (the
        # teacher is the generator with its adapters off under LoRA; the fake score is queried frozen).
        for unet in {id(u): u for u in (teacher, generator, fake)}.values():
            unet.enable_gradient_checkpointing(checkpoint_with_switches)
    return teacher, generator, fake, teacher_scope


class _Batches:
    """Each step's global batch, [remain rows; forget rows], and this process's share of it: the prompts, the
    generator's noise and the forward process of its samples."""

    def __init__(self, model, overrides: dict[str, str], alphas: torch.Tensor, config: SFDConfig, run: RunContext):
        self.model, self.alphas, self.config, self.run = model, alphas, config, run
        family, seed = model.family, run.seed or 0
        self.prediction = model.scheduler.config.prediction_type
        self.latent_shape = family.latent_shape(model, 1)[1:]
        self.pairs = family.forget_pairs(overrides, config.prompt_templates, seed)
        # Distilling only keeps the whole prompt distribution, concept included: that is the teacher to match.
        if config.remain_prompt_file is not None:
            self.remain = remain_prompts_from_file(config.remain_prompt_file, list(overrides), seed,
                                                   config.remain_prompts)  # fmt: skip
        else:
            self.remain = family.remain_prompts(list(overrides), seed, config.remain_prompts)
        with torch.no_grad():
            self.uncond = model.encode([""])
        self.n_forget = 0 if config.distill_only else config.forget_batch
        self.rows = config.batch_size + self.n_forget

    def local(self, batch):
        """This process's remain rows, then its forget rows, of a global [remain; forget] batch."""
        size, shard = self.config.batch_size, self.run.shard
        remain_rows, forget_rows = shard(batch[:size]), shard(batch[size:])
        return remain_rows + forget_rows if isinstance(batch, list) else torch.cat([remain_rows, forget_rows])

    def conditions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's and the teacher's conditioning: remain prompts, then forget prompts (the teacher's
        under their override)."""
        prompts = random.choices(self.remain, k=self.config.batch_size)
        chosen = random.choices(self.pairs, k=self.n_forget)
        student = prompts + [f for f, _ in chosen]
        teacher = prompts + [o for _, o in chosen]
        with torch.no_grad():
            return self.model.encode(self.local(student)), self.model.encode(self.local(teacher))

    def noise(self) -> torch.Tensor:
        return self.local(torch.randn((self.rows, *self.latent_shape), device=self.run.torch_device))

    def noisy(self, x0: torch.Tensor):
        """x_t, t, what the denoiser should predict there (eps or v), abar. Not `family.noised`: that takes the
        schedule in x0's dtype, and under bf16 autocast the generator's samples are bf16, where SFD's loss weights
        need abar in float32 (abar itself is also returned for them)."""
        t = self.local(torch.randint(self.config.t_min, self.config.t_max, (self.rows,), device=self.run.torch_device))
        noise = self.noise()
        abar = self.alphas[t].view(-1, 1, 1, 1)
        wanted = abar.sqrt() * noise - (1 - abar).sqrt() * x0 if self.prediction == "v_prediction" else noise
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t, wanted, abar


def _one_step_model(model, generator, config: SFDConfig):
    """The saved model: the generator as a one-step pipeline with the teacher's text encoder(s) and VAE."""
    from pipelines.diffusion import one_step_model
    from pipelines.one_step import OneStepPipeline

    second = {}
    if model.family.text_encoders == 2:
        second = {"tokenizer_2": model.tokenizer_2, "text_encoder_2": model.text_encoder_2}
    pipe = OneStepPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=generator,
        scheduler=model.scheduler, t_init=config.t_init, **second,
    )  # fmt: skip
    return one_step_model(pipe, model.source)
