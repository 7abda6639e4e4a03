"""The digits-gan part of the recipe, in three stages on the shared training loop: StyleGAN2 trained
on renders (`train_gan`), sharpened with a class-aware term from frozen digits-clip (`sharpen_gan`),
then with score distillation from digits-sd added (`distil_gan`). Each stage is long on a CPU, so it
checkpoints its whole state and a rerun resumes it bit-identically. What each choice bought is
measured in benchmarks/RESULTS.md."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from erasure.gan_training import AdversarialSettings, CLIPFeatureDiscriminator, adversarial_networks, adversarial_step
from erasure.training import EMA, RunContext, TrainingLoop
from pipelines.zoo.renders import RenderSampler

from .score_distillation import ScoreDistillation

INSTANCE_NOISE = 0.1
R1_GAMMA, R1_EVERY = 0.1, 16
LEARNING_RATE, BETAS = 2.5e-3, (0.0, 0.99)
DISTILLATION_WEIGHT, DISTILLATION_GUIDANCE = 0.15, 5.0  # the third stage's, see distil_gan
# In a stage's checkpoint fingerprint: checkpoints of the recipe's earlier, own step (an EMA generator
# module, other draws) are refused with the usual message instead of failing to load.
ADVERSARIAL_STEP = "erasure.gan_training"


def digits_gan_config():
    from pipelines.stylegan2 import StyleGAN2Config

    return StyleGAN2Config(size=32, style_dim=128, n_mlp=8, channels={4: 128, 8: 128, 16: 64, 32: 32})


class AdversarialTraining:
    """StyleGAN2 training against its own discriminator and the vision-aided one, with an EMA of the
    generator: the GAN methods' adversarial step (erasure/gan_training.py) on the shared loop, with
    the recipe's settings. Instance noise hides the renders' exactly black background, a cue no
    generator matches."""

    def __init__(self, generator, discriminator, clip_vision, batch: int, sampler: RenderSampler,
                 run: RunContext, desc: str, fingerprint: dict):  # fmt: skip
        self.batch, self.sampler, self.generator = batch, sampler, generator
        self.settings = AdversarialSettings(LEARNING_RATE, BETAS, R1_GAMMA, R1_EVERY, INSTANCE_NOISE)
        # digits-clip normalises with mean = std = 0.5: images in [-1, 1] are its pixel values as they are
        self.critic = CLIPFeatureDiscriminator(clip_vision, CLIPFeatureDiscriminator.new_head(clip_vision))
        self.ema = EMA(generator, 0.5 ** (batch / 10_000))  # a half-life of 10k images, as StyleGAN2-ADA
        networks = adversarial_networks(run, generator, discriminator, self.settings, self.critic)
        self.loop = TrainingLoop(run, networks, desc=desc, state={"ema": self.ema, "renders": sampler},
                                 fingerprint=fingerprint)  # fmt: skip
        self.critic.head = self.loop.modules["clip_head"]

    def step(self, real: torch.Tensor, step: int, generator_term=None) -> dict[str, float]:
        """One critic update and one generator update (see `adversarial_step`), then the EMA's."""
        losses = adversarial_step(self.loop, real, step, self.settings, generator_term, self.critic)
        self.ema.update(self.generator)
        return losses

    def fit(self, steps: int, generator_term=None) -> None:
        self.loop.fit(lambda step: self.step(self.sampler.sample(self.batch).images * 2 - 1, step, generator_term),
                      steps)  # fmt: skip

    def averaged_generator(self):
        """A copy of the generator with the EMA's weights: the model the stage delivers."""
        model = copy.deepcopy(self.generator).requires_grad_(False)
        self.ema.copy_to(model)
        return model


def _stage_run(out_dir: Path, snapshot_every: int) -> RunContext:
    # seed=None: each stage seeds its streams itself, before it initialises its networks. A rerun
    # always resumes from the stage's checkpoint, if one is there.
    return RunContext(seed=None, checkpoint_dir=_checkpoint_dir(out_dir), checkpoint_every=snapshot_every, resume=True)


def _finish(out_dir: Path, training: AdversarialTraining, discriminator):
    from pipelines.gan_checkpoints import save_gan

    ema = training.averaged_generator().eval()
    save_gan(out_dir, ema, discriminator.eval(), ema.mean_latent())
    shutil.rmtree(_checkpoint_dir(out_dir), ignore_errors=True)
    return ema


def train_gan(out_dir: Path, steps: int, batch: int, seed: int, clip_vision, snapshot_every: int = 500):
    """digits-gan, first stage: StyleGAN2 (eight mapping layers, StyleGAN2's unconditional default)
    against its own discriminator plus a vision-aided one on frozen `clip_vision` features."""
    from pipelines.stylegan2 import Discriminator, Generator

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = digits_gan_config()
    generator, discriminator = Generator(config), Discriminator(config)
    settings = {"steps": steps, "batch": batch, "seed": seed, "step": ADVERSARIAL_STEP}
    training = AdversarialTraining(generator, discriminator, clip_vision, batch, RenderSampler("train", seed + 40),
                                   _stage_run(out_dir, snapshot_every), "digits-gan", settings)  # fmt: skip
    training.fit(steps)
    return _finish(out_dir, training, discriminator)


class ZeroShotEntropy:
    """Entropies of frozen digits-clip's zero-shot classifier of one attribute, `head` (prompt
    ensembles of `zero_shot_prompts(head)`, its own logit scale) on a batch of images: the mean
    per-sample entropy, and the entropy of the batch's mean class probabilities."""

    def __init__(self, clip_model, head: str = "digit"):
        from pipelines.tokenizer import clip_tokenizer
        from pipelines.zoo.world import zero_shot_prompts

        self.clip_model = clip_model
        tokenizer = clip_tokenizer(clip_model.config.text_config.max_position_embeddings)
        classes = []
        with torch.no_grad():
            for prompts in zero_shot_prompts(head).values():
                ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
                text = clip_model.get_text_features(input_ids=ids).pooler_output
                classes.append(F.normalize(text, dim=-1).mean(0))
            self.classes = F.normalize(torch.stack(classes), dim=-1)
            self.logit_scale = clip_model.logit_scale.exp()

    def probabilities(self, pooled: torch.Tensor) -> torch.Tensor:
        """p(class | image), one row per image; `pooled`: the vision tower's pooled output for
        images in [-1, 1]."""
        image = F.normalize(self.clip_model.visual_projection(pooled), dim=-1)
        return (self.logit_scale * image @ self.classes.T).softmax(-1)

    def __call__(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probabilities(pooled)
        per_sample = -(p * p.clamp_min(1e-8).log()).sum(-1).mean()
        mean_p = p.mean(0)
        return per_sample, -(mean_p * mean_p.clamp_min(1e-8).log()).sum()

    def generator_loss(self, pooled: torch.Tensor) -> torch.Tensor:
        """CatGAN's generator objective: sure of each sample's class, every class equally often."""
        per_sample, marginal = self(pooled)
        return per_sample - marginal

    def of_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(self._pooled(images))

    def probabilities_of(self, images: torch.Tensor) -> torch.Tensor:
        return self.probabilities(self._pooled(images))

    def _pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip_model.vision_model(pixel_values=images).pooler_output


def sharpen_gan(source_dir: Path, out_dir: Path, steps: int, batch: int, seed: int, clip_model,
                weight: float = 4.0, distillation: ScoreDistillation | None = None, distillation_weight: float = 0.0,
                snapshot_every: int = 500):  # fmt: skip
    """digits-gan, second stage: fine-tune the finished generator (from its EMA weights, with fresh
    optimisers and a fresh vision-aided head) with CatGAN's generator objective (Springenberg, ICLR
    2016) on frozen digits-clip's zero-shot digit classifier: each sample sure of one digit, all
    digits equally often. It targets the between-mode samples the first stage plateaus on and its
    discriminator cannot see. The judge that scores digits-gan never enters the loss.
    `distillation` (score distillation from digits-sd) is what the third stage adds, see `distil_gan`."""
    out_dir = Path(out_dir)
    from pipelines.gan_checkpoints import load_gan_folder

    generator, discriminator, _ = load_gan_folder(Path(source_dir))
    generator, discriminator = generator.float().train(), discriminator.float().train()
    torch.manual_seed(seed)
    clip_model = clip_model.eval().requires_grad_(False)
    settings = {"steps": steps, "batch": batch, "seed": seed, "stage": "sharpen", "weight": weight,
                "step": ADVERSARIAL_STEP}  # fmt: skip
    distil = distillation is not None and distillation_weight > 0
    if distil:
        settings |= {"distillation_weight": distillation_weight, "distillation": distillation.settings}
    training = AdversarialTraining(generator, discriminator, clip_model.vision_model, batch,
                                   RenderSampler("train", seed=seed + 41), _stage_run(out_dir, snapshot_every),
                                   "digits-gan sharpen", settings)  # fmt: skip
    digit = ZeroShotEntropy(clip_model, "digit")
    if distil:
        style, colour = ZeroShotEntropy(clip_model, "style"), ZeroShotEntropy(clip_model, "colour")

    def class_entropy_term(images, pooled):
        term = weight * digit.generator_loss(pooled)
        if distil:  # each sample's caption: what digits-clip reads in it
            with torch.no_grad():
                labels = [head.probabilities(pooled).argmax(-1) for head in (digit, colour, style)]
            term = term + distillation_weight * distillation.loss(images, *labels)
        return term

    training.fit(steps, class_entropy_term)
    return _finish(out_dir, training, discriminator)


def distil_gan(source_dir: Path, out_dir: Path, steps: int, batch: int, seed: int, clip_model, sd_pipe,
               snapshot_every: int = 500):  # fmt: skip
    """digits-gan, third stage: `sharpen_gan` run again from the second stage's result, with score
    distillation from frozen digits-sd added (`ScoreDistillation`, colour-blind, captioned with the
    digit and style digits-clip reads in each sample). Unlike critics on digits-clip's features,
    digits-sd knows what the strokes of a render look like, and its gradient reaches the blobby
    samples those critics pass. Naming the style keeps italic samples (SDS seeks the caption's
    mode, and without a style that is upright); seeing colour-blind keeps the hues."""
    distillation = ScoreDistillation(sd_pipe, guidance=DISTILLATION_GUIDANCE, styled=True, colour_blind=True)
    return sharpen_gan(source_dir, out_dir, steps, batch, seed, clip_model, distillation=distillation,
                       distillation_weight=DISTILLATION_WEIGHT, snapshot_every=snapshot_every)  # fmt: skip


def _checkpoint_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}-checkpoint")
