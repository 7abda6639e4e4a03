"""StyleGAN2 generators of the real world (a `.pt`/`.pkl` checkpoint, or a folder this project saved).

A GAN takes no prompt: what its family gives the methods is the world's side - which prompts name a
concept for CLIP, what judges it - and the GAN methods' presets, none yet beyond the papers'.
"""

from __future__ import annotations

from .base import Family


class StyleGAN2(Family):
    name = "stylegan2"
    summary = "StyleGAN2 generators (rosinality .pt, NVIDIA .pkl, saved folders)"
