"""digits-judge: a small CNN that reads digit, colour and style off a 32x32 render.

It is the domain classifier of the digits world (the role an ImageNet classifier or NudeNet plays
for real Stable Diffusion) and its penultimate features are the digits world's FID features.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .world import HEADS

FEATURE_DIM = 256


class JudgeNetwork(nn.Module):
    """CNN with one linear head per attribute; input [N, 3, 32, 32] in [0, 1]. The evaluator that
    uses it is `evaluators.judges.DigitsJudge`."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.width = width
        self.body = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),  # 16x16
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
            *block(2 * w, 4 * w), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(4 * w * 16, FEATURE_DIM), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.dropout = nn.Dropout(0.2)
        self.heads = nn.ModuleDict({head: nn.Linear(FEATURE_DIM, len(names)) for head, names in HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, 256] (used for FID/KID in the digits world)."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head: {"digit": [N, 10], "colour": [N, 5], "style": [N, 3]}."""
        h = self.dropout(self.features(images))
        return {head: layer(h) for head, layer in self.heads.items()}

    def save_pretrained(self, directory: str | Path, metadata: dict | None = None) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        # "DigitsJudge": the format name the shipped config.json carries
        config = {"architecture": "DigitsJudge", "width": self.width, "heads": {k: list(v) for k, v in HEADS.items()}}
        config.update(metadata or {})
        (directory / "config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> JudgeNetwork:
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        model = cls(width=config["width"])
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()
