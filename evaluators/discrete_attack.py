"""UnlearnDiffAtk (Zhang et al., ECCV 2024) with discrete tokens: adversarial prompts a user could type.

For each target (prompt, seed), `k` prefix words are optimised. Each is a distribution `P` over a
vocabulary of whole words (rows on the probability simplex); the forward pass uses the argmax word
(one-hot), the gradient reaches `P` straight through, and each Adam step is followed by a
projection back onto the simplex. The objective is the embedding attack's (evaluators/attack.py):
the erased model, as a diffusion classifier, should denoise the base model's image of the concept
best under `[words; prompt]`. Every `check_every` steps the erased model draws each still-unbroken
pair from its decoded prompt and seed; a pair stops at its first success (the judge sees the
concept). The adversarial prompts are saved as text: whole words re-encode to the same tokens.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipelines.images import to_tensor

from .attack import AttackTarget, Seeds, draw_grouped, guidance_record, outcome_shares

WORD = re.compile(r"^[a-z]{3,}</w>$")


@dataclass
class DiscreteAttackSettings:
    tokens: int = 3  # k prefix words
    steps: int = 100
    lr: float = 0.05  # Adam step on the word distributions
    check_every: int = 10  # draw and judge every this many steps; a pair stops at its first success
    timesteps: tuple[int, int] = (50, 950)
    seed: int = 0


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of `v` onto the probability simplex (Duchi et al., 2008)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    cumulative = u.cumsum(-1) - 1
    index = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - cumulative / index) > 0).to(v.dtype).mul(index).argmax(-1, keepdim=True)
    theta = cumulative.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp(min=0)


@lru_cache(maxsize=4)
def _word_vocabulary(tokenizer) -> tuple[int, ...]:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    candidates = [(i, t[: -len("</w>")]) for i, t in enumerate(tokens) if t and WORD.match(t)]
    encoded = tokenizer([w for _, w in candidates], add_special_tokens=False).input_ids
    return tuple(i for (i, _), ids in zip(candidates, encoded) if ids == [i])


def word_vocabulary(tokenizer) -> torch.Tensor:
    """Ids of whole lower-case words that encode back to themselves alone, so that any sequence of
    them, written with spaces, re-encodes to the same tokens."""
    return torch.tensor(_word_vocabulary(tokenizer), dtype=torch.long)


def decode_words(tokenizer, ids: list[int]) -> str:
    return " ".join(t[: -len("</w>")] for t in tokenizer.convert_ids_to_tokens(ids))


def _draw_texts(model, texts: list[str], seeds: list[int], guidance: list[float | None]) -> torch.Tensor:
    """`model`'s image of each text, text i with `seeds[i]` at `guidance[i]`."""
    return to_tensor(draw_grouped(guidance, lambda rows, g: model.generate_jobs(
        [texts[r] for r in rows], [(j, seeds[r]) for j, r in enumerate(rows)], guidance=g)))


def _broken_pairs(erased, judge, concept: str, target: AttackTarget, words: torch.Tensor,
                  active: torch.Tensor) -> dict[int, str]:  # fmt: skip
    """The pairs among `active` that the erased model draws with the concept once their prompt has their `words`
    (token ids, one row per pair) in front: each one's adversarial prompt."""
    texts = {int(i): f"{decode_words(erased.tokenizer, words[i].tolist())} {target.pairs[i][0]}"
             for i in active.tolist()}  # fmt: skip
    images = _draw_texts(erased, list(texts.values()), [target.pairs[i][1] for i in texts],
                         [target.guidance[i] for i in texts])  # fmt: skip
    seen = judge.detects(images, concept).bool()
    return {i: text for (i, text), hit in zip(texts.items(), seen.tolist()) if hit}


def _pair_records(tokenizer, target: AttackTarget, found: dict[int, tuple[str, int]], ended: torch.Tensor,
                  after: torch.Tensor) -> list[dict]:  # fmt: skip
    """Each pair's record: its outcome and the words it ended with (`ended`: token ids; a pair present before the
    attack was never attacked and has none)."""
    records = []
    for i, (prompt, seed) in enumerate(target.pairs):
        adversarial, step = found.get(i, (None, None))
        tokens = None if target.present[i] else ended[i].tolist()
        if adversarial is None and tokens is not None:  # the attack's last words, which did not succeed
            adversarial = f"{decode_words(tokenizer, tokens)} {prompt}"
        records.append({
            "prompt": prompt, "seed": seed, "present_before_attack": bool(target.present[i]),
            "present_after_attack": bool(after[i]), "adversarial_prompt": adversarial, "adversarial_tokens": tokens,
            "success_step": step, "reference_shows_concept": bool(target.reference_present[i]),
        })  # fmt: skip
    return records


def discrete_attack(
    erased,
    base,
    judge,
    concept: str,
    prompts: list[str],
    seeds: Seeds,
    settings: DiscreteAttackSettings | None = None,
    progress: bool = False,
    guidance: Sequence[float | None] | None = None,
) -> dict:
    settings = settings or DiscreteAttackSettings()
    started = time.time()
    device = erased.device
    target = AttackTarget.of(erased, base, judge, concept, prompts, seeds, guidance)
    pairs, present = target.pairs, target.present
    vocabulary = word_vocabulary(erased.tokenizer).to(device)
    with torch.no_grad():
        table = erased.family.vocabulary(erased, target.tower)[vocabulary]  # [V, D]
    g = torch.Generator().manual_seed(settings.seed)
    start = torch.randint(len(vocabulary), (len(pairs), settings.tokens), generator=g).to(device)
    distribution = F.one_hot(start, len(vocabulary)).float().requires_grad_(True)
    optimizer = torch.optim.Adam([distribution], lr=settings.lr)

    def objective(words: torch.Tensor, draws: int = 8) -> float:
        """The loss of `words` on fixed noise draws: comparable between the start and the end."""
        fixed = torch.Generator().manual_seed(settings.seed + 1)
        with torch.no_grad():
            cond = target.encode(slice(None), table[words])
            return sum(float(target.loss(cond, slice(None), settings.timesteps, fixed)) for _ in range(draws)) / draws

    start_objective = objective(start)
    succeeded = present.clone()  # already present without an attack: nothing to break
    found: dict[int, tuple[str, int]] = {}  # pair -> (adversarial prompt, step)
    words_at: dict[int, torch.Tensor] = {}  # pair -> its adversarial words (indices into `vocabulary`)
    final_words = start.clone()
    losses: list[float] = []
    for step in tqdm(range(1, settings.steps + 1), desc=f"attack {concept} (discrete)", disable=not progress):
        active = (~succeeded).nonzero().flatten().to(device)
        if len(active) == 0:
            break
        words = distribution.argmax(-1)
        one_hot = F.one_hot(words, len(vocabulary)).float()
        chosen = one_hot + distribution - distribution.detach()  # discrete forward, gradient straight through
        cond = target.encode(active, chosen[active] @ table)
        loss = target.loss(cond, active, settings.timesteps, g)
        losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            distribution.copy_(project_simplex(distribution))
        if step % settings.check_every == 0 or step == settings.steps:
            final_words = distribution.argmax(-1).detach()
            for i, text in _broken_pairs(erased, judge, concept, target, vocabulary[final_words], active).items():
                succeeded[i] = True
                found[i] = (text, step)
                words_at[i] = final_words[i].clone()
    # The words each pair ended with: those of its success, else its last check's. (A pair that stopped keeps
    # moving on Adam's momentum; what it moved to was never drawn.)
    ended = final_words.clone()
    for i, words in words_at.items():
        ended[i] = words
    seconds = time.time() - started
    # a pair present before is not attacked: its first success is its unattacked image (attack.outcome_shares)
    after = present | torch.tensor([i in found for i in range(len(pairs))], dtype=torch.bool)
    return {
        **outcome_shares(present, after, target.reference_present),
        "pairs": len(pairs),
        "seconds_per_pair": round(seconds / len(pairs), 3),
        "per_pair": _pair_records(erased.tokenizer, target, found, vocabulary[ended], after),
        "loss": losses,
        "objective": {"start": start_objective, "end": objective(ended)},
        "settings": {
            **asdict(settings), "vocabulary": f"{len(vocabulary)} whole words of the tokenizer",
            "method": "UnlearnDiffAtk with discrete prefix words (see evaluators/discrete_attack.py)",
            "judge": judge.describe(), "prompts": prompts, "seeds": seeds,
            **guidance_record(target.prompt_guidance),
        },
    }  # fmt: skip
