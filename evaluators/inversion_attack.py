"""The textual-inversion attack (Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image
Generative Models", ICLR 2024): a new word is learnt on the *erased* model.

One input embedding `v*` is optimised with the plain denoising loss on a few images of the concept
(the base model's, or the user's), under the concept's prompts with the concept's words replaced
by `v*` (placed after the start token). Then the erased model draws those prompts with `v*` and the
judge looks. Methods that change only the text encoder's mapping of the concept's words leave the
UNet able to draw it, and a new word can find it again; that is what this attack measures.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from pipelines.images import encode_latents
from pipelines.tokenizer import plain_words

from .attack import (
    Seeds,
    classifier_loss,
    draw_embedded,
    draw_pairs,
    for_each_pair,
    guidance_record,
    loss_ends,
    outcome_shares,
    prompt_pairs,
)


@dataclass
class InversionSettings:
    steps: int = 100  # `erasure eval --attack-steps`' default
    lr: float = 0.05  # in units of the vocabulary's embedding RMS
    batch_size: int = 8
    timesteps: tuple[int, int] = (50, 950)
    seed: int = 0


def remove_concept(prompt: str, words: set[str]) -> str:
    """The prompt without the concept's `words` (lower case; "a red seven" -> "a red"); `v*` goes before it."""
    return " ".join(w for w in prompt.split() if not set(plain_words(w)) & words)


def inversion_attack(
    erased,
    base,
    judge,
    concept: str,
    prompts: list[str],
    seeds: Seeds,
    settings: InversionSettings | None = None,
    images: torch.Tensor | None = None,
    progress: bool = False,
    guidance: Sequence[float | None] | None = None,
) -> dict:
    """Learn `v*` on `images` of the concept (default: the base model's images of `prompts`, seeds 0..3),
    then judge the erased model's images of each (prompt with `v*`, seed); every image at its prompt's
    `guidance` (default: the model's)."""
    settings = settings or InversionSettings()
    if erased.kind == "one-step":
        from pipelines.errors import InputError

        raise InputError("textual inversion learns a word with the denoising loss; a one-step generator has none")
    started = time.time()
    device = erased.device
    guidance = list(guidance) if guidance is not None else [None] * len(prompts)
    # every word the prompts may name the concept by goes ("7": the world's prompts say "seven")
    context = [remove_concept(p, erased.family.concept_words(concept)) for p in prompts]
    if images is None:  # the base model's images: four seeds of each prompt, each under its own context
        images = draw_pairs(base, prompts, [0, 1, 2, 3], guidance)
        contexts = [c for c in context for _ in range(4)]
    else:  # the user's images: every context in turn
        contexts = [context[i % len(context)] for i in range(len(images))]
    # a word learnt on images without the concept has nothing to bring back
    images_showing = float(judge.detects(images, concept).float().mean())
    z_ref = encode_latents(erased, images, chunk=8)
    train_ids = erased.tokenize(contexts)
    family = erased.family
    encoder = family.text_tower(erased)
    encoder.requires_grad_(False)
    erased.unet.requires_grad_(False)
    with torch.no_grad():
        vocab = family.vocabulary(erased, encoder)
        rms = vocab.pow(2).mean().sqrt()
        concept_ids = erased.tokenizer(concept, add_special_tokens=False).input_ids
        # start from the concept's own word (its mean embedding): the erased model maps it elsewhere
        word = vocab[torch.tensor(concept_ids, device=device)].mean(0, keepdim=True)[None]
    word = word.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([word], lr=settings.lr * float(rms))
    g = torch.Generator().manual_seed(settings.seed)
    losses = []
    for _ in tqdm(range(settings.steps), desc=f"textual inversion {concept}", disable=not progress):
        rows = torch.randint(len(z_ref), (min(settings.batch_size, len(z_ref)),), generator=g).to(device)
        cond = family.encode_inserted(erased, encoder, train_ids[rows], word)
        loss = classifier_loss(erased, z_ref[rows], cond, settings.timesteps, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    pairs = prompt_pairs(context, seeds)
    with torch.no_grad():
        embeds = family.encode_inserted(erased, encoder, erased.tokenize([c for c, _ in pairs]), word.detach())
    attacked = draw_embedded(erased, embeds, [s for _, s in pairs], for_each_pair(guidance, prompts, seeds))
    seen = judge.detects(attacked, concept).bool()
    plain = draw_pairs(erased, prompts, seeds, guidance)
    present = judge.detects(plain, concept).bool()
    seconds = time.time() - started
    return {
        **outcome_shares(present, seen),
        "pairs": len(pairs),
        "seconds_per_pair": round(seconds / len(pairs), 3),
        "per_pair": [
            {"prompt": p, "seed": s, "attacked_prompt": f"<v*> {c}", "present_before_attack": bool(b),
             "present_after_attack": bool(a)}
            for (p, s), (c, _), b, a in zip(prompt_pairs(prompts, seeds), pairs, present.tolist(),
                                            seen.tolist())
        ],  # fmt: skip
        "loss": loss_ends(losses),
        "images_showing_concept": images_showing,
        "settings": {
            **asdict(settings), "images": len(images), "judge": judge.describe(), "prompts": prompts, "seeds": seeds,
            **guidance_record(guidance),
            "method": "textual inversion of one word on the erased model (see evaluators/inversion_attack.py)",
        },
    }  # fmt: skip
