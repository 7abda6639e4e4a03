"""AdvUnlearn: robust concept erasure by adversarial training of the text encoder
(Zhang et al., "Defensive Unlearning with Adversarial Training for Robust Concept Erasure in
Diffusion Models", NeurIPS 2024).

Each iteration is a min-max step on the text encoder E_theta (UNet and VAE frozen):

1. x_t: the original model samples the concept with DDIM and stops at a random step (as ESD).
2. attack (inner max): `k` free word embeddings `adv`, inserted after the start token, are
   optimised so that the model being unlearned regenerates the concept,
       min_adv || eps(x_t, t, E_theta([adv; c])) - eps*(x_t, t, E*(c)) ||^2
   (PGD: `attack_steps` Adam steps; fast-AT: one sign-gradient step), warm-started from the
   previous iteration's `adv` (or from random tokens, `attack_init=random`); with a batch of x_t
   samples each has its own `adv` by default (the paper trains with batch 1); no attack during
   the first `warmup` iterations.
3. unlearn (outer min): ESD's loss with the adversarial prompt and the clean target,
       || eps(x_t, t, E_theta([adv; c])) - sg(eps*(c0) - eta (eps*(c) - eps*(c0))) ||^2
4. utility: + gamma * || eps(x_t', t', E_theta(r)) - eps*(x_t', t', E*(r)) ||^2 over retain prompts r.

The result is a plug-and-play text encoder: it drops into any pipeline that uses the same one.
Unlike the reference code, the attack takes gradients w.r.t. `adv` only (no gradient build-up in
the encoder across attack steps) and the UNet is frozen.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from pipelines.bounds import TRAJECTORY_STEPS
from pipelines.errors import InputError

from .common import (
    attack_embeddings,
    check_encoder_scope,
    concept_prompts,
    esd_target,
    fast_at_start,
    frozen_copy,
    select_trainable,
    validate_scope,
)
from .compiled import COMPILE_CHOICES, StepDenoiser
from .lora import LoraOptions, attach_lora
from .training import ErasureResult, Network, RunContext, TrainingLoop


@dataclass
class AdvUnlearnConfig(LoraOptions):
    # Defaults: the paper and its code on SD v1.4 (Sec. 5 and the repository's README).
    steps: int = field(default=1000, metadata={"bounds": "[1, inf)", "help": "outer (unlearning) steps"})
    lr: float = field(default=1e-5, metadata={"bounds": "(0, inf)", "help": "Adam learning rate of the text encoder"})
    batch_size: int = field(
        default=1, metadata={"bounds": "[1, inf)", "help": "x_t samples of the concept per iteration"}
    )
    scope: str = field(
        default="full",
        metadata={"help": "text-encoder parameters to train: full | attn | mlp | layers=i..j; on SDXL both encoders, "
                  "or one named before the scope (text_encoder:full, text_encoder_2:attn)"},
    )
    attack: Literal["pgd", "fast-at"] = field(
        default="pgd",
        metadata={"help": "inner attack: pgd (attack_steps Adam steps) or fast-at (one sign step of attack_lr from a "
                  "random point within attack_lr / 1.25 of the start: Wong et al.'s fast AT)"},
    )  # fmt: skip
    attack_tokens: int = field(
        default=1, metadata={"bounds": "[1, 75]", "help": "k: adversarial embeddings inserted after the start token"}
    )
    attack_steps: int = field(
        default=30, metadata={"bounds": "[1, inf)", "help": "optimiser steps of the pgd attack per iteration"}
    )
    attack_lr: float = field(
        default=1e-3, metadata={"bounds": "(0, inf)", "help": "pgd: Adam lr of the attack; fast-at: sign-step size"}
    )
    attack_init: Literal["latest", "random"] = field(
        default="latest",
        metadata={"help": "start of each attack: latest (warm start from the previous one) | random (fresh tokens)"},
    )
    attack_samples: Literal["redrawn", "iteration"] = field(
        default="redrawn",
        metadata={"help": "what each attack step fits: redrawn (an x_t, t and prompt of its own, as the paper's "
                  "attack: words that attack the prompt) | iteration (the iteration's own batch, which the unlearning "
                  "step then uses: a best response to each x_t sample)"},
    )  # fmt: skip
    attack_batch: Literal["per-sample", "shared"] = field(
        default="per-sample",
        metadata={"help": "adversarial embeddings: per-sample (one set per x_t sample) | shared (one for the batch)"},
    )
    warmup: int = field(default=200, metadata={"help": "first iterations without attack (ESD on the encoder, with the "
                                                      "retain term)"})
    retain_weight: float = field(
        default=0.3,
        metadata={"bounds": "[0, inf)", "help": "gamma of the utility-retaining term (0.3 nudity, code 1.0)"},
    )
    retain_batch: int = field(default=5, metadata={"bounds": "[1, inf)", "help": "retain prompts per iteration"})
    negative_guidance: float = field(default=1.0, metadata={"bounds": "[0, inf)", "help": "eta of the ESD target"})
    bank_size: int = field(
        default=0,
        metadata={"help": "iterations' worth of x_t (concept and retain) drawn once with the frozen UNet and original "
                  "encoder, with their targets, and reused; 0: fresh trajectories every iteration (the paper)"},
    )  # fmt: skip
    bank_refresh: int = field(default=0, metadata={"help": "iterations between redrawing the bank (0: never)"})
    bank_batch: int = field(
        default=0,
        metadata={"bounds": "[0, inf)",
                  "help": "bank entries whose trajectories and targets share each UNet call; 0: one at a time on the "
                  "CPU (bit for bit the draw of earlier versions), on a GPU as many as make about 16 SD 1.x images "
                  "(64x64 latents) a call"},
    )  # fmt: skip
    shared_forward: bool | None = field(
        default=None,
        metadata={"help": "the unlearning and retain terms' UNet passes in one call (default: on a GPU, where a "
                  "call is a kernel launch per layer; on the CPU two calls, bit for bit earlier versions' rounding)"},
    )  # fmt: skip
    compile_unet: Literal[COMPILE_CHOICES] = field(
        default="none",
        metadata={"help": "torch.compile of the UNet's calls in each step (the attack's and the two terms'; drawing "
                  "x_t and its targets, from the bank or fresh, stays eager): cudagraphs (CUDA) replays each call's "
                  "kernels as one CUDA graph, seconds to trace, for a small model whose step is bound by kernel "
                  "launches (each graph holds a copy of the weights); reduce-overhead (CUDA) fuses kernels into CUDA "
                  "graphs, minutes to compile; inductor fuses kernels; aot_eager only traces"},
    )  # fmt: skip
    ddim_steps: int = field(
        default=50, metadata={"bounds": TRAJECTORY_STEPS, "help": "DDIM steps of the trajectory that makes x_t"}
    )
    sample_guidance: float = field(
        default=3.0, metadata={"bounds": "[0, inf)", "help": "classifier-free guidance while sampling x_t"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_scope("text_encoder", self.scope)
        if not self.bank_size and (self.bank_refresh or self.bank_batch):
            raise ValueError("bank_refresh and bank_batch need bank_size > 0 (a bank to refresh or draw)")

    def check(self, family, concepts) -> None:
        check_encoder_scope(family, self.scope)


CONFIG = AdvUnlearnConfig
TEST_SETTINGS = {"steps": 3, "warmup": 1, "ddim_steps": 3, "batch_size": 2, "retain_batch": 2, "bank_size": 2,
                 "lr": 1e-2}  # fmt: skip
# The bank's tensors in the loop's state: the concept batches, then the retain batches.
BANK_KEYS = ("bank_prompt", "bank_x", "bank_t", "bank_eps_empty", "bank_eps_concept",
             "bank_kept", "bank_x_r", "bank_t_r", "bank_eps_r")  # fmt: skip


class SectionTimer:
    """Seconds spent in each named section: `with timer("attack"): ...`. Sections nest (the paper's attack draws
    trajectories of its own): an inner section's time counts in the outer one as well."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


# Latent pixels per UNet call of a bank drawn on a GPU: 16 SD 1.x images (64 x 64 latents), classifier-free
# guidance doubling it - the sampling batch of `erasure sample`.
BANK_LATENT_PIXELS = 16 * 64 * 64


def bank_entries_per_call(config: AdvUnlearnConfig, family, model, device: torch.device) -> int:
    """How many bank entries draw their trajectories together (`bank_batch`, 0 resolved for `device`)."""
    if config.bank_batch or device.type == "cpu":
        return config.bank_batch or 1
    _, _, height, width = family.latent_shape(model, 1)
    rows = max(config.batch_size, config.retain_batch)
    return max(1, BANK_LATENT_PIXELS // (rows * height * width))


class BankProgress:
    """A progress bar over the bank's trajectories (concept and retain entries): drawn before the first step, they
    take minutes at SD size, during which the training bar would sit at 0."""

    def __init__(self, run: RunContext, bank_size: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=2 * bank_size, desc="advunlearn: drawing the bank's trajectories", unit="x_t",
                        leave=False, disable=not (run.progress and run.is_main))  # fmt: skip

    def counted(self, entries: list) -> list:
        self.bar.update(len(entries))
        return entries

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


class TrajectoryBank:
    """Each iteration's concept and retain batches: x_t sampled partway by the frozen UNet under the original encoder,
    t, and the frozen model's predictions there (the targets).

    UNet and original encoder are frozen, so x_t and its targets do not depend on the encoder being trained:
    `bank_size` iterations' worth is drawn once (global rows, so that every process can shard any entry) and kept in
    the checkpointed `state`; each iteration picks from it. Without a bank every iteration draws its own.
    """

    def __init__(self, model, encoder_orig, scheduler, uncond_orig: torch.Tensor, prompts: list[str],
                 retain: list[str], n_retain: int, config: AdvUnlearnConfig, run: RunContext, state: dict,
                 timer: SectionTimer):  # fmt: skip
        self.model, self.family, self.unet, self.encoder_orig = model, model.family, model.unet, encoder_orig
        self.scheduler, self.uncond_orig, self.prompts, self.retain, self.n_retain = (
            scheduler, uncond_orig, prompts, retain, n_retain)  # fmt: skip
        self.config, self.run, self.state, self.timer = config, run, state, timer
        self.per_call = bank_entries_per_call(config, self.family, model, run.torch_device)

    def _draws(self, n: int, rows) -> tuple[int, torch.Tensor, torch.Tensor]:
        """A batch's random draws (`rows(...)` of a global batch of `n`): the DDIM stop, the noise, then t in the
        stop's window, in the order that drawing batch after batch always took them."""
        device = self.run.torch_device
        stop = random.randrange(self.config.ddim_steps)
        noise = rows(torch.randn(self.family.latent_shape(self.model, n), device=device))
        return stop, noise, rows(torch.randint(*self.family.timestep_window(self.scheduler, stop), (n,), device=device))

    def _x_t(self, conds: list[torch.Tensor], drawn: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_t, t and the prompt rows of several batches (`drawn`: their `_draws`; `conds`: each one's prompt, or
        one per row), their trajectories side by side."""
        rows_cond = torch.cat([c.expand(len(noise), -1, -1) for c, (_, noise, _) in zip(conds, drawn)])
        stops = [stop for stop, noise, _ in drawn for _ in range(len(noise))]
        noise = torch.cat([noise for _, noise, _ in drawn])
        x_t = self.family.trajectories(self.unet, self.scheduler, rows_cond, self.uncond_orig, stops,
                                       self.config.sample_guidance, noise)  # fmt: skip
        return x_t, torch.cat([t for *_, t in drawn]), rows_cond

    @torch.no_grad()
    def draw_concepts(self, count: int, rows) -> list[tuple]:
        """`count` iterations' concept batches: each one's prompt index, x_t, t and the frozen model's two
        predictions."""
        prompts, family, unet = self.prompts, self.family, self.unet
        picks = [(random.randrange(len(prompts)), self._draws(self.config.batch_size, rows)) for _ in range(count)]
        conds = self.model.encode([prompts[index] for index, _ in picks], self.encoder_orig)
        x_t, t, rows_cond = self._x_t(list(conds.split(1)), [drawn for _, drawn in picks])
        eps_empty = family.denoise(unet, x_t, t, self.uncond_orig.expand(len(x_t), -1, -1))
        eps_concept = family.denoise(unet, x_t, t, rows_cond)
        sizes = [len(noise) for _, (_, noise, _) in picks]
        parts = [tensor.split(sizes) for tensor in (x_t, t, eps_empty, eps_concept)]
        # the prompt index stays on the host: reading it needs no device sync
        return [(torch.tensor(index), *part) for (index, _), *part in zip(picks, *parts)]

    @torch.no_grad()
    def draw_retains(self, count: int, rows) -> list[tuple]:
        """`count` iterations' retain batches: each one's prompt indices, x_t, t and the frozen model's
        prediction."""
        picks = []
        for _ in range(count):
            kept = rows(torch.tensor(random.sample(range(len(self.retain)), self.n_retain)))
            picks.append((kept, self._draws(self.n_retain, rows)))
        conds = self.model.encode([self.retain[i] for kept, _ in picks for i in kept.tolist()], self.encoder_orig)
        sizes = [len(kept) for kept, _ in picks]
        x_r, t_r, rows_cond = self._x_t(list(conds.split(sizes)), [drawn for _, drawn in picks])
        predicted = self.family.denoise(self.unet, x_r, t_r, rows_cond)
        parts = [tensor.split(sizes) for tensor in (x_r, t_r, predicted)]
        return [(kept, *part) for (kept, _), *part in zip(picks, *parts)]

    def concept_sample(self) -> list:
        """One iteration's concept batch (prompt index, x_t, t, the frozen model's predictions): from the bank, or
        drawn now."""
        if not self.config.bank_size:
            with self.timer("trajectories"):
                return self.draw_concepts(1, self.run.shard)[0]
        i = random.randrange(self.config.bank_size)
        return [self.state[k][i] if k == "bank_prompt" else self.run.shard(self.state[k][i]) for k in BANK_KEYS[:5]]

    def batches(self, step: int) -> tuple[list, list]:
        """Iteration `step`'s concept and retain batches (this process's rows); the bank is drawn first when it is
        due (the first iteration, and every `bank_refresh` iterations)."""
        config, state, run = self.config, self.state, self.run
        if not config.bank_size:
            concept = self.concept_sample()
            with self.timer("trajectories"):
                return concept, self.draw_retains(1, run.shard)[0]
        if "bank_x" not in state or (config.bank_refresh and step and step % config.bank_refresh == 0):
            with self.timer("bank"), BankProgress(run, config.bank_size) as bar:
                whole = lambda batch: batch  # noqa: E731
                size, per_call = config.bank_size, self.per_call
                counts = [min(per_call, size - i) for i in range(0, size, per_call)]
                concept = [entry for count in counts for entry in bar.counted(self.draw_concepts(count, whole))]
                kept = [entry for count in counts for entry in bar.counted(self.draw_retains(count, whole))]
                for key, parts in zip(BANK_KEYS, [*zip(*concept), *zip(*kept)]):
                    state[key] = torch.stack(parts)
        concept = self.concept_sample()
        j = random.randrange(config.bank_size)
        return concept, [run.shard(state[k][j]) for k in BANK_KEYS[5:]]


class Adversary:
    """The inner max: `attack_tokens` free word embeddings inserted after the start token, fitted each iteration so
    that the encoder being unlearned regenerates the concept again.

    One set serves the whole batch, or each x_t sample has its own (`attack_batch=per-sample`: more attack directions
    per step for the same UNet work; the same thing at the paper's batch size 1). The checkpointed `state["adv"]`
    holds every process's sets; each process attacks with its own rows, warm-started from the last iteration's
    (`attack_init=latest`), or from random vocabulary tokens.
    """

    def __init__(self, model, encoder, vocab: torch.Tensor, bank: TrajectoryBank, denoise: StepDenoiser,
                 prompts: list[str], config: AdvUnlearnConfig, run: RunContext, state: dict):  # fmt: skip
        self.model, self.encoder, self.vocab, self.bank, self.denoise = model, encoder, vocab, bank, denoise
        self.prompts, self.config, self.run, self.state = prompts, config, run, state
        self.rows = config.batch_size if config.attack_batch == "per-sample" else 1
        state["adv"] = self.random_tokens(torch.Generator().manual_seed(run.seed))  # the first attack's start

    def random_tokens(self, generator: torch.Generator | None = None) -> torch.Tensor:
        ids = torch.randint(len(self.vocab), (self.rows, self.config.attack_tokens), generator=generator)
        return self.vocab[ids.to(self.run.torch_device)].clone()

    def attack(self, ids: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
               eps_concept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """This iteration's adversarial embeddings against the concept batch (prompt `ids`, `x_t`, `t` and the
        frozen model's prediction `eps_concept`), and the prompt ids they go into."""
        config, run, model, denoise = self.config, self.run, self.model, self.denoise
        adv_ids = ids.expand(len(x_t) if self.rows > 1 else 1, -1)

        def attack_loss(adv: torch.Tensor) -> torch.Tensor:
            denoise.new_step()  # the attack's last call is spent: its gradient has been read
            if config.attack_samples == "redrawn":
                drawn, attack_x, attack_t, _, target = self.bank.concept_sample()
                words = model.tokenize([self.prompts[int(drawn)]]).expand(len(adv_ids), -1)
            else:
                words, attack_x, attack_t, target = adv_ids, x_t, t, eps_concept
            cond = model.family.encode_inserted(model, self.encoder, words, adv)
            return F.mse_loss(denoise(attack_x, attack_t, cond.expand(len(attack_x), -1, -1)), target)

        start = self.random_tokens() if config.attack_init == "random" else self.state["adv"]
        if config.attack == "fast-at":  # drawn for the global batch: N processes = one process
            start = fast_at_start(start, config.attack_lr)
        start = run.shard(start) if self.rows > 1 else start
        adv = attack_embeddings(attack_loss, start, config.attack, config.attack_steps, config.attack_lr)
        self.state["adv"] = run.gather(adv) if self.rows > 1 else adv
        return adv_ids, adv


def erase(model, concepts: list[str], config: AdvUnlearnConfig, run: RunContext) -> ErasureResult:
    """Adversarially unlearn `concepts` from the text encoder of `model` (a TextToImageModel)."""
    family = model.family
    prompts = concept_prompts(concepts, config.prompt_templates)
    run.check_divisible("batch_size", config.batch_size)
    if config.attack_batch == "shared" and run.num_processes > 1:
        raise InputError("attack_batch=shared runs on one process only; use per-sample with several")
    device = run.torch_device
    model.to(device)
    retain = family.retain_prompts(concepts, random.Random(run.seed))
    n_retain = min(config.retain_batch, len(retain))
    run.check_divisible("retain_batch", n_retain)

    encoder = family.text_tower(model)  # the text encoder(s) as one network (SDXL: both; its pooled embedding too)
    encoder_orig = frozen_copy(encoder)
    for module in (model.unet, model.vae, encoder):
        module.requires_grad_(False)
    n_trainable = select_trainable(encoder, "text_encoder", config.scope)
    if config.lora_rank:
        n_trainable = attach_lora(encoder, config, run.seed)
    encoder.train()
    unet = model.unet.eval()

    scheduler = family.sampling_scheduler(model, config.ddim_steps, device)
    with torch.no_grad():
        uncond_orig = model.encode([""], encoder_orig)
        vocab = family.vocabulary(model, encoder_orig)
    state = {}
    optimizer = run.adam([p for p in encoder.parameters() if p.requires_grad], config.lr, config.adam_betas)
    run.halve_frozen(encoder_orig)  # from here on only called inside the loop, under autocast
    loop = TrainingLoop(run, {"text_encoder": Network(encoder, optimizer)}, desc="advunlearn", state=state)  # fmt: skip
    # The prepared encoder runs the retain term's forward pass, which (under several processes)
    # makes the backward pass synchronise the encoder's gradients; the adversarial forward pass
    # reaches the encoder's layers directly, through `family.encode_inserted`.
    encoder_train = loop.modules["text_encoder"]
    timer = SectionTimer()

    bank = TrajectoryBank(model, encoder_orig, scheduler, uncond_orig, prompts, retain, n_retain, config, run, state,
                          timer)  # fmt: skip

    shared_forward = config.shared_forward if config.shared_forward is not None else device.type != "cpu"
    denoise = StepDenoiser(family, unet, config.compile_unet, device)
    adversary = Adversary(model, encoder, vocab, bank, denoise, prompts, config, run, state)

    def step_fn(step: int) -> dict[str, float]:
        (index, x_t, t, eps_empty, eps_concept), (kept, x_r, t_r, eps_retain_orig) = bank.batches(step)
        ids = model.tokenize([prompts[int(index)]])
        target = esd_target(eps_empty, eps_concept, config.negative_guidance)
        if step >= config.warmup:
            with timer("attack"):
                adv_ids, adv = adversary.attack(ids, x_t, t, eps_concept)
        retain_prompts = [retain[i] for i in kept.tolist()]
        denoise.new_step()  # the attack's calls are spent
        with timer("unlearn and retain forward" if shared_forward else "unlearn forward"):
            if step >= config.warmup:
                cond_train = family.encode_inserted(model, encoder, adv_ids, adv)
            else:
                cond_train = model.encode([prompts[int(index)]], encoder_train)
            cond_train = cond_train.expand(len(x_t), -1, -1)
            if shared_forward:
                cond_retain = model.encode(retain_prompts, encoder_train)
                both = denoise(torch.cat([x_t, x_r]), torch.cat([t, t_r]), torch.cat([cond_train, cond_retain]))
                eps_unlearn, eps_retain = both.split([len(x_t), len(x_r)])
            else:
                eps_unlearn = denoise(x_t, t, cond_train)
            unlearn = F.mse_loss(eps_unlearn, target)
        if not shared_forward:
            with timer("retain forward"):
                eps_retain = denoise(x_r, t_r, model.encode(retain_prompts, encoder_train))
        utility = F.mse_loss(eps_retain, eps_retain_orig)
        with timer("backward and update"):
            loop.update("text_encoder", unlearn + config.retain_weight * utility)
        return {"unlearn": unlearn.detach(), "retain": utility.detach()}

    try:
        with run.frozen_in_compute_dtype(model.unet):
            logs = loop.fit(step_fn, config.steps)
    finally:
        denoise.close()
    encoder.eval()
    # Where the time went (this process, this session; a resumed run counts its second part only).
    outcome = {"advunlearn": {"seconds": {k: round(v, 2) for k, v in timer.seconds.items()}}}
    outcome["advunlearn"]["shared_forward"] = shared_forward
    outcome["advunlearn"]["compile_unet"] = denoise.record()
    if config.bank_size:
        outcome["advunlearn"]["bank_entries_per_call"] = bank.per_call
    return ErasureResult(model, family.tower_components(config.scope), n_trainable, logs, outcome)
