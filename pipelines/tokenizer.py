"""The real CLIP BPE tokenizer, built offline from the vocabulary file open_clip ships.

Stable Diffusion 1.x and OpenAI CLIP use this exact 49,408-token vocabulary (start 49406, end
49407); open_clip carries its BPE merges as `bpe_simple_vocab_16e6.txt.gz`, so a transformers
`CLIPTokenizer` identical to `openai/clip-vit-large-patch14`'s can be built with no network.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407
# The vocabulary file holds more merges than CLIP uses; CLIP keeps the first 48,894.
_N_MERGES = 49152 - 256 - 2


def padded_ids(tokenizer, prompts: Sequence[str], max_length: int | None = None):
    """Token ids [B, L] of `prompts` padded and cut to `max_length` (default: the tokenizer's), as the diffusers
    pipelines tokenize a prompt; on the CPU."""
    length = max_length or tokenizer.model_max_length
    return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=length,
                     return_tensors="pt").input_ids  # fmt: skip


def plain_words(text: str) -> list[str]:
    """The words of `text` in lower case, without the punctuation around them: "A red seven." -> a, red, seven.
    How a concept's words are told apart in the prompts the attacks write (`concept_words`, the inversion attack);
    which training prompts mention a concept is the family's `mentions`."""
    return [w for w in (word.strip(".,;:!?\"'") for word in text.lower().split()) if w]


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    # Order matters: CLIP's vocabulary lists the printable bytes first, then the remapped ones.
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(token -> id, merges) exactly as OpenAI CLIP defines them."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _N_MERGES + 1])
    units = _byte_symbols()
    tokens = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A `transformers.CLIPTokenizer` with the real vocabulary.

    `pad_token="<|endoftext|>"` pads like SD 1.x (and OpenAI CLIP); SD 2.x pads with "!".
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    tokenizer = CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length
    )
    if len(tokenizer) != VOCAB_SIZE:  # transformers has silently ignored vocabulary arguments before
        raise RuntimeError(f"built a CLIP tokenizer with {len(tokenizer)} tokens instead of {VOCAB_SIZE}")
    return tokenizer
