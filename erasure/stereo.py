"""STEREO (Srivatsan, Shamshad, Naseer, Patel, Nandakumar, "STEREO: A Two-Stage Framework for Adversarially
Robust Concept Erasing from Text-to-Image Diffusion Models", CVPR 2025): erase in the UNet, then search the
erased model for words that still draw the concept, and erase once more against all of them.

Stage 1, search thoroughly enough: `rounds` times, (a) erase - ESD on a copy of the UNet, continued from
the previous round, on the concept (round 0) or the word the previous round found, with the round's starting
UNet as teacher:  target = eps*(c0) - eta (eps*(c) - eps*(c0));  (b) invert - textual inversion of a new
word v_r on the erased copy, from images the *original* model draws of the concept: v_r is inserted after
the start token of the concept's prompts with the concept's words removed, and learns to be denoised into
the concept where the erased copy no longer is. Only the words are kept.

Stage 2, robustly erase once: the original UNet is erased with compositional guidance (Liu et al. 2022)
away from the concept and every found word and towards anchor prompts (the concept in context), all
computed by the frozen original UNet eps0:

    target = eps0(c0) + (s - 1) (eps0(a) - eps0(c0)) - (s + 1) mean_{e in E} (eps0(e) - eps0(c0))
    loss   = || eps_theta(x_t, t, e_s) - sg(target) ||^2,   E = {concept} + {found words}, e_s each of E in turn

`x_t` comes, as in ESD, from the model being trained: DDIM from noise on `e_s`, stopped at a random step.
"""

from __future__ import annotations

import copy
import random
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipelines.bounds import TRAJECTORY_STEPS
from pipelines.images import encode_latents, to_tensor

from .common import (
    attack_embeddings,
    concept_prompts,
    denoising_loss,
    esd_target,
    fast_at_start,
    frozen_copy,
    select_trainable,
    validate_scope,
)
from .lora import LoraOptions, attach_lora
from .training import (
    ErasureResult,
    Network,
    RunContext,
    TrainingLoop,
    load_finished_stage,
    save_finished_stage,
)  # fmt: skip

# The original model's images of the concept that words are inverted from use seeds far from the
# evaluation's (0, 1, ...) and its attacks' (1000, ...).
IMAGE_SEED_OFFSET = 2_000_000


@dataclass
class STEREOConfig(LoraOptions):
    # Defaults: the authors' code on SD 1.4 (its README's nudity run: ESD-u scope, 2 rounds).
    steps: int = field(default=200, metadata={"bounds": "[1, inf)", "help": "stage 2 (erase once) steps"})
    lr: float = field(default=2e-5, metadata={"bounds": "(0, inf)", "help": "stage 2's Adam learning rate"})
    scope: str = field(
        default="noxattn", metadata={"help": "UNet parameters both stages train: noxattn (ESD-u) | xattn | attn | full "
                                   "(with lora_rank, stage 2 trains adapters on them, stage 1 their full weights)"}
    )
    rounds: int = field(default=2, metadata={"bounds": "[1, inf)", "help": "stage 1 rounds of erasing, then inverting"})
    search_steps: int = field(default=200, metadata={"bounds": "[1, inf)", "help": "stage 1 erasing steps per round"})
    search_lr: float = field(default=5e-6, metadata={"bounds": "(0, inf)", "help": "stage 1's Adam learning rate"})
    search_guidance: float = field(
        default=0.0,
        metadata={"bounds": "[0, inf)", "help": "eta of stage 1's ESD target (the code's negative_guidance 2 makes "
                  "it 0: the unconditional prediction)"},
    )  # fmt: skip
    inversion_steps: int = field(default=3000, metadata={"bounds": "[1, inf)", "help": "textual inversion steps"})
    inversion_lr: float = field(
        default=5e-3, metadata={"bounds": "(0, inf)", "help": "textual inversion's AdamW learning rate"}
    )
    inversion_batch: int = field(default=1, metadata={"bounds": "[1, inf)", "help": "images per inversion step"})
    inversion_init: str = field(
        default="",
        metadata={"help": "the word each inverted word starts from ('': the mean of the concept's own token "
                  "embeddings; the authors' code starts from a generic word: person, object or art)"},
    )  # fmt: skip
    inversion_weight_decay: float = field(
        default=0.0,
        metadata={"bounds": "[0, inf)", "help": "AdamW's decoupled weight decay on the inverted word (0: Adam; the "
                  "authors' code: 0.01)"},
    )  # fmt: skip
    inversion_images: int = field(
        default=500,
        metadata={"bounds": "[1, inf)", "help": "images of the concept the original model draws, split between the "
                  "rounds (seeds 2,000,000 + i; the remainder of the split is not used)"},
    )  # fmt: skip
    guidance_scale: float = field(
        default=2.0,
        metadata={"bounds": "[1, inf)", "help": "s of stage 2: the anchors weigh s - 1, the erased words s + 1"},
    )
    anchor_prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "anchors of stage 2, the concept in context (default: the model family's)"},
    )
    attack_tokens: int = field(
        default=0,
        metadata={"bounds": "[0, 75]", "help": "what the paper lacks: k adversarial embeddings before the concept's "
                  "prompts, moved each stage-2 step by one fast-AT step to make the model being erased draw the "
                  "concept again (AdvUnlearn's inner attack, one per x_t sample), and erased too (0: the paper's)"},
    )  # fmt: skip
    attack_lr: float = field(
        default=0.002, metadata={"bounds": "(0, inf)", "help": "the fast-AT step of the adversarial embeddings"}
    )
    retain_weight: float = field(
        default=0.0,
        metadata={"bounds": "[0, inf)", "help": "weight of a term the paper lacks: stage 2 keeps the UNet's "
                  "predictions on the original model's own images of the family's retain prompts (0: the paper's)"},
    )  # fmt: skip
    retain_batch: int = field(default=8, metadata={"bounds": "[1, inf)", "help": "retain images per step"})
    retain_images: int = field(
        default=64, metadata={"bounds": "[1, inf)", "help": "retain images the original model draws, once"}
    )
    ddim_steps: int = field(
        default=50, metadata={"bounds": TRAJECTORY_STEPS, "help": "DDIM steps of the trajectory that makes x_t"}
    )
    sample_guidance: float = field(
        default=3.0, metadata={"bounds": "[0, inf)", "help": "classifier-free guidance while sampling x_t"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_scope("unet", self.scope)
        if self.inversion_init and not self.inversion_init.strip():
            raise ValueError("inversion_init must be a word, or empty for the concept's own words")
        if self.inversion_images < self.rounds:
            raise ValueError(f"inversion_images ({self.inversion_images}) must give each of the {self.rounds} rounds "
                             "at least one image")  # fmt: skip


CONFIG = STEREOConfig
TEST_SETTINGS = {"steps": 3, "rounds": 1, "search_steps": 3, "inversion_steps": 3, "inversion_images": 4,
                 "inversion_batch": 2, "retain_images": 4, "retain_batch": 2, "ddim_steps": 3, "batch_size": 2,
                 "lr": 1e-2, "search_lr": 1e-2}  # fmt: skip


class Word(torch.nn.Module):
    """One free input word embedding, [1, 1, D]: what textual inversion learns."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.vector = torch.nn.Parameter(init.detach().clone().view(1, 1, -1))

    def forward(self) -> torch.Tensor:
        return self.vector


def compositional_target(eps_empty: torch.Tensor, eps_anchor: torch.Tensor, eps_erased: list[torch.Tensor],
                         scale: float) -> torch.Tensor:  # fmt: skip
    """eps0(c0) + (s - 1)(eps0(a) - eps0(c0)) - (s + 1) mean_e (eps0(e) - eps0(c0))."""
    away = torch.stack([e - eps_empty for e in eps_erased]).mean(0)
    return eps_empty + (scale - 1) * (eps_anchor - eps_empty) - (scale + 1) * away


class _Draws:
    """What both stages condition on and start from: one of the concept's prompts, a found word in one of the
    prompts' contexts, and ESD's data-free x_t."""

    def __init__(self, model, encoder, concepts: list[str], config: STEREOConfig, run: RunContext):
        self.model, self.encoder, self.config, self.run = model, encoder, config, run
        self.scheduler = model.family.sampling_scheduler(model, config.ddim_steps, run.torch_device)
        self.latent_shape = model.family.latent_shape(model, 1)[1:]
        self.templates = list(config.prompt_templates)
        self.prompts = concept_prompts(concepts, self.templates)
        # The prompts a found word stands in: each template without the concept, the word after the start token.
        self.contexts = [" ".join(t.format("").split()) for t in self.templates]
        with torch.no_grad():
            self.uncond = model.encode([""], encoder)

    def concept(self) -> torch.Tensor:
        return self.model.encode([random.choice(self.prompts)], self.encoder)

    def word(self, word: torch.Tensor) -> torch.Tensor:
        ids = self.model.tokenize([random.choice(self.contexts)])
        return self.model.family.encode_inserted(self.model, self.encoder, ids, word)

    def erased(self, word: torch.Tensor | None) -> torch.Tensor:
        """The conditioning of one member of the erased set: the concept's prompts (None) or a found word."""
        return self.concept() if word is None else self.word(word)

    def x_t(self, unet, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ESD's data-free x_t: `unet` (the model being trained) samples `cond` and stops at a random DDIM step;
        returns it with timesteps drawn in that step's window."""
        batch, device = self.config.batch_size, self.run.torch_device
        stop = random.randrange(self.config.ddim_steps)
        noise = self.run.shard(torch.randn((batch, *self.latent_shape), device=device))
        x_t, t_lo, t_hi = self.model.family.trajectory(unet, self.scheduler, cond, self.uncond, stop,
                                                       self.config.sample_guidance, noise)  # fmt: skip
        return x_t, self.run.shard(torch.randint(t_lo, t_hi, (batch,), device=device))

    def denoise(self, unet, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model.family.denoise(unet, x_t, t, cond.expand(len(x_t), -1, -1))


def erase(model, concepts: list[str], config: STEREOConfig, run: RunContext) -> ErasureResult:
    """Erase `concepts` from the UNet of `model`, robustly to the words stage 1 finds."""
    family = model.family
    run.check_divisible("batch_size", config.batch_size)
    run.check_divisible("inversion_batch", config.inversion_batch)
    run.check_divisible("retain_batch", config.retain_batch)
    model.to(run.torch_device)
    encoder = family.text_tower(model)  # frozen: STEREO erases in the UNet
    for module in (model.unet, encoder, model.vae):
        module.requires_grad_(False)
    original = frozen_copy(model.unet)
    draws = _Draws(model, encoder, concepts, config, run)
    anchors = config.anchor_prompts or [p for c in concepts for p in family.anchor_prompts(c, random.Random(run.seed))]
    with torch.no_grad():
        vocab = family.vocabulary(model, encoder)
        init_word = initial_word(model, vocab, concepts, config.inversion_init)
    retain = _RetainTerm(model, original, draws, concepts, config, run) if config.retain_weight else None
    words = _found_words(model, draws, init_word, config, run)
    trainable, logs = _erase_once(model, original, draws, words, anchors, vocab, retain, config, run)
    outcome = {"stereo": {"rounds": config.rounds, "words": len(words), "images": config.inversion_images,
                          "anchors": anchors[:8], "anchor_count": len(anchors)}}  # fmt: skip
    return ErasureResult(model, ["unet"], trainable, logs, outcome)


# --- stage 1: search thoroughly enough ------------------------------------------------------------------


def _found_words(model, draws: _Draws, init_word: torch.Tensor, config: STEREOConfig,
                 run: RunContext) -> list[torch.Tensor]:  # fmt: skip
    """Stage 1's words. Only they leave it: saved once it is over, they stand in for it when a run resumes, and
    its checkpoints (a UNet and its Adam state per stage, gigabytes at SD size) are deleted."""
    words_file = run.checkpoint_dir / "stereo-words.safetensors" if run.checkpoint_dir is not None else None
    searched = {**run.fingerprint, "stage": "search"}
    found = load_finished_stage(words_file, searched) if run.resume else None
    if found is not None:
        return [found[0][f"word-{r}"].to(run.torch_device) for r in range(config.rounds)]
    words = _search(model, draws, init_word, config, run)
    if run.is_main and words_file is not None:
        save_finished_stage(words_file, {f"word-{r}": w for r, w in enumerate(words)}, searched)
        for r in range(config.rounds):
            for stage in (f"search-{r}", f"invert-{r}"):
                shutil.rmtree(run.checkpoint_dir / stage, ignore_errors=True)
    return words


def _search(model, draws: _Draws, init_word: torch.Tensor, config: STEREOConfig,
            run: RunContext) -> list[torch.Tensor]:  # fmt: skip
    """Rounds of erasing a copy of the UNet, each followed by inverting a word that still draws the concept on
    it; returns the words."""
    # The original model's images of the concept, as latents: what every round's word is inverted from.
    prompts = draws.prompts
    image_seeds = range(IMAGE_SEED_OFFSET, IMAGE_SEED_OFFSET + config.inversion_images)
    jobs = [(i % len(prompts), s) for i, s in enumerate(image_seeds)]
    with torch.no_grad():
        images = to_tensor(model.generate_jobs(prompts, jobs, batch_size=16))
        latents = encode_latents(model, images, torch.Generator().manual_seed(run.seed))
    image_contexts = [draws.contexts[(i % len(prompts)) % len(draws.templates)] for i in range(len(jobs))]
    per_round = max(1, len(latents) // config.rounds)
    searcher = copy.deepcopy(model.unet)
    select_trainable(searcher, "unet", config.scope)
    searcher.train()
    words: list[torch.Tensor] = []
    for r in range(config.rounds):
        _erase_round(searcher, draws, words[-1] if words else None, r, config, run)
        searcher.eval()
        trained = [p for p in searcher.parameters() if p.requires_grad]
        searcher.requires_grad_(False)  # the word alone learns; no UNet gradient is built
        mine = slice(r * per_round, (r + 1) * per_round)
        stage = run.stage(f"invert-{r}", 2 + 2 * r)
        words.append(invert(model, searcher, latents[mine], image_contexts[mine], init_word, config, stage,
                            f"stereo: invert {r + 1}/{config.rounds}"))  # fmt: skip
        for p in trained:
            p.requires_grad_(True)
        searcher.train()
    return words


def _erase_round(searcher, draws: _Draws, previous: torch.Tensor | None, r: int, config: STEREOConfig,
                 run: RunContext) -> None:  # fmt: skip
    """ESD on `searcher`, continued from the previous round, away from the concept (round 0) or the word the
    previous round found, with the round's starting UNet as teacher."""
    teacher = frozen_copy(searcher)
    optimizer = run.adam([p for p in searcher.parameters() if p.requires_grad], config.search_lr, config.adam_betas)
    loop = TrainingLoop(run.stage(f"search-{r}", 1 + 2 * r), {"unet": Network(searcher, optimizer)},
                        desc=f"stereo: erase {r + 1}/{config.rounds}",
                        fingerprint={"stage": f"search-{r}"})  # fmt: skip
    student = loop.modules["unet"]

    def step_fn(step: int) -> dict[str, float]:
        with torch.no_grad():
            cond = draws.erased(previous)
            x_t, t = draws.x_t(searcher, cond)
            eps_empty = draws.denoise(teacher, x_t, t, draws.uncond)
            eps_concept = draws.denoise(teacher, x_t, t, cond)
            target = esd_target(eps_empty, eps_concept, config.search_guidance)
        loss = F.mse_loss(draws.denoise(student, x_t, t, cond), target)
        loop.update("unet", loss)
        return {"erase": loss.detach()}

    loop.fit(step_fn, config.search_steps)


# --- stage 2: robustly erase once, from the original UNet ----------------------------------------------------


def _erase_once(model, original, draws: _Draws, words: list[torch.Tensor], anchors: list[str], vocab: torch.Tensor,
                retain: _RetainTerm | None, config: STEREOConfig, run: RunContext) -> tuple[int, dict]:  # fmt: skip
    """Compositional guidance away from the concept and every found word, towards the anchors; returns (the
    number of trained parameters, the last step's logs)."""
    unet = model.unet
    trainable = select_trainable(unet, "unet", config.scope)
    if config.lora_rank:  # stage 2's UNet only: stage 1 erases copies that are thrown away
        trainable = attach_lora(unet, config, run.seed)
    unet.train()
    optimizer = run.adam([p for p in unet.parameters() if p.requires_grad], config.lr, config.adam_betas)
    state = {}
    if config.attack_tokens:  # one set of adversarial embeddings per x_t sample, from random words
        g = torch.Generator().manual_seed(run.seed)
        state["adv"] = vocab[torch.randint(len(vocab), (config.batch_size, config.attack_tokens), generator=g)]
    loop = TrainingLoop(run.stage("erase-once"), {"unet": Network(unet, optimizer)},
                        desc="stereo: erase once", state=state, fingerprint={"stage": "erase-once"})  # fmt: skip
    student = loop.modules["unet"]
    erased_set = [None, *words]  # None: the concept's own prompts

    def adversarial_condition(x_t, t) -> torch.Tensor:
        """[adv; a concept prompt], adv moved one fast-AT step to make the model draw the concept again:
        its prediction under it should match the original's under the plain prompt."""
        prompt = random.choice(draws.prompts)
        ids = model.tokenize([prompt]).expand(len(x_t), -1)
        with torch.no_grad():
            wanted = draws.denoise(original, x_t, t, model.encode([prompt], draws.encoder))

        def attack_loss(adv: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(draws.denoise(unet, x_t, t, model.family.encode_inserted(model, draws.encoder, ids, adv)),
                              wanted)  # fmt: skip

        start = run.shard(fast_at_start(state["adv"], config.attack_lr))  # drawn for the global batch
        adv = attack_embeddings(attack_loss, start, "fast-at", 1, config.attack_lr)
        state["adv"] = run.gather(adv)
        with torch.no_grad():
            return model.family.encode_inserted(model, draws.encoder, ids, adv)

    def step_fn(step: int) -> dict[str, float]:
        with torch.no_grad():
            conds = [draws.erased(w) for w in erased_set]
            cond = conds[step % len(conds)]  # the erased set in turn
            anchor = model.encode([random.choice(anchors)], draws.encoder)
            x_t, t = draws.x_t(unet, cond)
            eps_empty = draws.denoise(original, x_t, t, draws.uncond)
            eps_anchor = draws.denoise(original, x_t, t, anchor)
            eps_erased = [draws.denoise(original, x_t, t, c) for c in conds]
            target = compositional_target(eps_empty, eps_anchor, eps_erased, config.guidance_scale)
        loss = F.mse_loss(draws.denoise(student, x_t, t, cond), target)
        logs = {"erase": loss.detach()}
        if config.attack_tokens:
            adversarial = F.mse_loss(draws.denoise(student, x_t, t, adversarial_condition(x_t, t)), target)
            loss = loss + adversarial
            logs["adversarial"] = adversarial.detach()
        if retain is not None:
            drift = retain.drift(student)
            loss = loss + config.retain_weight * drift
            logs["retain"] = drift.detach()
        loop.update("unet", loss)
        return logs

    logs = loop.fit(step_fn, config.steps)
    unet.eval()
    return trainable, logs


class _RetainTerm:
    """What the paper lacks (retain_weight > 0): stage 2 keeps the original UNet's predictions on the original
    model's own images of the family's retain prompts, drawn once, as latents."""

    def __init__(self, model, original, draws: _Draws, concepts: list[str], config: STEREOConfig, run: RunContext):
        self.model, self.original, self.draws, self.config, self.run = model, original, draws, config, run
        prompts = model.family.retain_prompts(concepts, random.Random(run.seed))
        jobs = [(i % len(prompts), IMAGE_SEED_OFFSET + i) for i in range(config.retain_images)]
        with torch.no_grad():
            self.latents = encode_latents(model, to_tensor(model.generate_jobs(prompts, jobs, batch_size=16)),
                                         torch.Generator().manual_seed(run.seed))  # fmt: skip
            self.conds = model.encode([prompts[i] for i, _ in jobs], draws.encoder)

    def drift(self, student) -> torch.Tensor:
        """The student's distance to the original on a batch of the images, noised at random timesteps."""
        run, batch, device = self.run, self.config.retain_batch, self.run.torch_device
        scheduler = self.draws.scheduler
        rows = run.shard(torch.randint(len(self.latents), (batch,), device=device))
        noise = run.shard(torch.randn((batch, *self.draws.latent_shape), device=device))
        t = run.shard(torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device))
        x_t = scheduler.add_noise(self.latents[rows], noise, t)
        with torch.no_grad():
            kept = self.model.family.denoise(self.original, x_t, t, self.conds[rows])
        return F.mse_loss(self.model.family.denoise(student, x_t, t, self.conds[rows]), kept)


def initial_word(model, vocab: torch.Tensor, concepts: list[str], init: str) -> torch.Tensor:
    """Where inverted words start: the mean token embedding of `init`, or (init "") of each concept's words,
    averaged over the concepts."""
    texts = [init] if init else concepts
    ids = [model.tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    return torch.stack([vocab[torch.tensor(i, device=vocab.device)].mean(0) for i in ids]).mean(0)


def invert(model, unet, latents: torch.Tensor, contexts: list[str], init: torch.Tensor, config: STEREOConfig,
           run: RunContext, desc: str) -> torch.Tensor:  # fmt: skip
    """Textual inversion of one new word on `unet` (frozen): v inserted after the start token of each image's
    context, trained with the plain denoising loss to bring the images back. Returns v, [1, 1, D]."""
    word = Word(init)
    optimizer = torch.optim.AdamW(word.parameters(), lr=config.inversion_lr, weight_decay=config.inversion_weight_decay)
    loop = TrainingLoop(run, {"word": Network(word, optimizer, None)}, desc=desc,
                        fingerprint={"stage": desc})  # fmt: skip
    encoder = model.family.text_tower(model)
    ids = model.tokenize(contexts)
    device = latents.device
    num_train = model.scheduler.config.num_train_timesteps

    def step_fn(step: int) -> dict[str, float]:
        rows = torch.randint(len(latents), (config.inversion_batch,), device=device)
        noise = torch.randn((config.inversion_batch, *latents.shape[1:]), device=device)
        t = torch.randint(0, num_train, (config.inversion_batch,), device=device)
        rows, noise, t = run.shard(rows), run.shard(noise), run.shard(t)
        cond = model.family.encode_inserted(model, encoder, ids[rows], loop.modules["word"]())
        loss = denoising_loss(model, latents[rows], cond, noise, t, unet)
        loop.update("word", loss)
        return {"denoising": loss.detach()}

    loop.fit(step_fn, config.inversion_steps)
    return word.vector.detach().clone()
