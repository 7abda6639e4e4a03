"""Run a CLIP text encoder on token embeddings with extra (e.g. adversarial) vectors inserted.

Both AdvUnlearn's inner attack and the robustness evaluator optimise `k` free embeddings placed
right after the start token: `[<start>, adv_1..adv_k, concept tokens..., <end>, pad...]`. The
sequence keeps the tokenizer's length (the last `k` positions, padding, are dropped), so the
result can replace `text_encoder(input_ids)[0]` anywhere. SDXL's two encoders run as one module
(`SDXLTextTower`), a free word entering each with its part of a [D1 + D2] vector; FLUX's CLIP and T5 likewise
(`FluxTextTower`), the T5 part at the front of T5's sequence, which has no start token.
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
    if not inserted.shape[1]:
        return text_encoder(input_ids)[0]
    return encode_word_embeddings(text_encoder, insert_after_start(token_embeddings(text_encoder, input_ids), inserted))


def encode_word_embeddings(text_encoder, words: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, L, D] from word embeddings [B, L, D], with CLIP's causal mask."""
    model = _text_model(text_encoder)
    hidden = model.embeddings(inputs_embeds=words)
    causal = _causal_mask(hidden)
    hidden = model.encoder(inputs_embeds=hidden, attention_mask=causal).last_hidden_state
    return model.final_layer_norm(hidden)


def _causal_mask(hidden: torch.Tensor) -> torch.Tensor:
    """CLIP's causal attention mask [1, 1, L, L] for hidden states [B, L, D]: each token sees those before it."""
    length = hidden.shape[1]
    causal = torch.full((length, length), torch.finfo(hidden.dtype).min, device=hidden.device).triu(1)
    return causal[None, None].to(hidden.dtype)


def insert_after_start(words: torch.Tensor, inserted: torch.Tensor) -> torch.Tensor:
    """`[<start>, inserted..., words[1 : L - k]]`: the sequence keeps its length L."""
    batch, length, _ = words.shape
    k = inserted.shape[1]
    inserted = inserted.to(words.dtype).expand(batch, -1, -1)
    return torch.cat([words[:, :1], inserted, words[:, 1 : length - k]], dim=1)


def hidden_states_of_words(text_encoder, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate layer's hidden states, last hidden states after the final LayerNorm) [B, L, D] from word
    embeddings: SDXL conditions on the first and pools the second."""
    model = _text_model(text_encoder)
    hidden = model.embeddings(inputs_embeds=words)
    causal = _causal_mask(hidden)
    penultimate = hidden
    for layer in model.encoder.layers:
        penultimate = hidden
        out = layer(hidden, causal)
        hidden = out[0] if isinstance(out, tuple) else out  # older transformers return a tuple
    return penultimate, model.final_layer_norm(hidden)


def end_positions(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    """Where each sequence's end token sits: where CLIP pools (its first end token; the highest id for
    checkpoints whose config predates a correct `eos_token_id`, as transformers does)."""
    eos = text_encoder.config.eos_token_id
    if eos == 2:
        return input_ids.argmax(dim=-1)
    return (input_ids == eos).int().argmax(dim=-1)


def end_token_states(text_encoder, ids: torch.Tensor, hidden: torch.Tensor, k: int) -> torch.Tensor:
    """[B, D]: `hidden` at each sequence's end token, moved `k` places on by inserted words (the last place, for a
    prompt that filled the sequence and lost its end token): where a CLIP encoder pools."""
    ends = (end_positions(text_encoder, ids) + k).clamp(max=ids.shape[1] - 1)
    return hidden[torch.arange(len(hidden), device=hidden.device), ends]


class TwoEncoderTower(torch.nn.Module):
    """A pipeline's two text encoders as one module, so that a text-encoder method trains, copies and synchronises
    them as one network. Takes both tokenizers' ids side by side, the first `first_length` the first's."""

    def __init__(self, text_encoder, text_encoder_2, first_length: int):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.first_length = first_length

    def named_encoders(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}


class SDXLTextTower(TwoEncoderTower):
    """SDXL's two text encoders (`SDXL.tokenize`'s ids); returns (token embeddings [B, L, D1 + D2]: each encoder's
    penultimate layer, pooled [B, P]: the second's projected end token)."""

    def inert_parameters(self) -> list[torch.nn.Parameter]:
        """The first encoder's last block and final LayerNorm: SDXL conditions on that encoder's penultimate layer,
        so they never reach the UNet (trained, they would not move, and processes would wait for their gradients)."""
        model = _text_model(self.text_encoder)
        return [*model.encoder.layers[-1].parameters(), *model.final_layer_norm.parameters()]

    def forward(self, ids: torch.Tensor, inserted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids_1, ids_2 = ids[:, : self.first_length], ids[:, self.first_length :]
        if inserted is None or not inserted.shape[1]:
            first = self.text_encoder(ids_1, output_hidden_states=True).hidden_states[-2]
            second = self.text_encoder_2(ids_2, output_hidden_states=True)
            return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds
        k, width = inserted.shape[1], self.text_encoder.config.hidden_size
        first, _ = hidden_states_of_words(
            self.text_encoder, insert_after_start(token_embeddings(self.text_encoder, ids_1), inserted[..., :width]))
        second_inputs = insert_after_start(token_embeddings(self.text_encoder_2, ids_2), inserted[..., width:])
        second, last = hidden_states_of_words(self.text_encoder_2, second_inputs)
        pooled = self.text_encoder_2.text_projection(end_token_states(self.text_encoder_2, ids_2, last, k))
        return torch.cat([first, second], dim=-1), pooled


class FluxTextTower(TwoEncoderTower):
    """FLUX.1's CLIP and T5 encoders: CLIP's pooled output and T5's last hidden states, as
    `FluxPipeline.encode_prompt` computes them. `ids`: the CLIP ids and the T5 ids side by side."""

    def forward(self, ids: torch.Tensor, inserted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5's tokens [B, L, D2], CLIP's pooled [B, D1]); `inserted` ([B or 1, k, D1 + D2]): free words, each
        entering CLIP after its start token and T5 at the front (T5 has no start token)."""
        ids_1, ids_2 = ids[:, : self.first_length], ids[:, self.first_length :]
        if inserted is None or not inserted.shape[1]:
            pooled = self.text_encoder(ids_1, output_hidden_states=False).pooler_output
            return self.text_encoder_2(ids_2, output_hidden_states=False)[0], pooled
        k, width = inserted.shape[1], self.text_encoder.config.hidden_size
        last = encode_word_embeddings(
            self.text_encoder, insert_after_start(token_embeddings(self.text_encoder, ids_1), inserted[..., :width]))
        pooled = end_token_states(self.text_encoder, ids_1, last, k)  # CLIPTextModel's pooler_output
        words = self.text_encoder_2.get_input_embeddings()(ids_2)
        t5_words = inserted[..., width:].to(words.dtype).expand(len(words), -1, -1)
        words = torch.cat([t5_words, words[:, : words.shape[1] - k]], dim=1)
        return self.text_encoder_2(inputs_embeds=words, output_hidden_states=False)[0], pooled
