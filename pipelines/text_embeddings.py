"""Run a CLIP text encoder on token embeddings with extra (e.g. adversarial) vectors inserted.

Both AdvUnlearn's inner attack and the robustness evaluator optimise `k` free embeddings placed
right after the start token: `[<start>, adv_1..adv_k, concept tokens..., <end>, pad...]`. The
sequence keeps the tokenizer's length (the last `k` positions, padding, are dropped), so the
result can replace `text_encoder(input_ids)[0]` anywhere.
"""

from __future__ import annotations

import torch


def _text_model(text_encoder):
    # transformers < 5.6 wraps the transformer in `.text_model`; later versions flattened it.
    return getattr(text_encoder, "text_model", text_encoder)


def token_embeddings(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    """The input word embeddings [B, L, D] of `input_ids` (before position embeddings)."""
    return _text_model(text_encoder).embeddings.token_embedding(input_ids)


def encode_with_inserted(text_encoder, input_ids: torch.Tensor, inserted: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, L, D] for `input_ids` with `inserted` ([B or 1, k, D]) after the start token."""
    model = _text_model(text_encoder)
    words = token_embeddings(text_encoder, input_ids)
    batch, length, _ = words.shape
    k = inserted.shape[1]
    inserted = inserted.to(words.dtype).expand(batch, -1, -1)
    words = torch.cat([words[:, :1], inserted, words[:, 1 : length - k]], dim=1)
    return encode_word_embeddings(text_encoder, words) if k else model(input_ids)[0]


def encode_word_embeddings(text_encoder, words: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, L, D] from word embeddings [B, L, D], with CLIP's causal mask."""
    model = _text_model(text_encoder)
    hidden = model.embeddings(inputs_embeds=words)
    length = hidden.shape[1]
    causal = torch.full((length, length), torch.finfo(hidden.dtype).min, device=hidden.device).triu(1)
    causal = causal[None, None].to(hidden.dtype)
    hidden = model.encoder(inputs_embeds=hidden, attention_mask=causal).last_hidden_state
    return model.final_layer_norm(hidden)
