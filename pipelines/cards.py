"""`erasure_model.json`: the small card a model folder of this project carries beside its weights
(model family, sampling defaults, what was erased). Foreign checkpoints have none."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .files import read_json, write_json

MODEL_CARD_FILE = "erasure_model.json"


def read_model_card(folder: str | Path) -> dict:
    """The card of a model folder ({} when there is none: a foreign checkpoint)."""
    path = Path(folder) / MODEL_CARD_FILE
    if not path.is_file():
        return {}
    card = read_json(path)
    if not isinstance(card, dict):
        raise InputError(f"{path} is not a model card (a JSON object with the model's family)")
    return card


def write_model_card(folder: str | Path, card: dict) -> None:
    """Write `card` into `folder` (nothing when it is empty)."""
    if card:
        write_json(Path(folder) / MODEL_CARD_FILE, card)
