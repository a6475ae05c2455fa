"""Prompt following of generated demo icons: do the images have the colours their prompts name?

`colour_accuracy` reads each image's (foreground, background) colours back with
`gda.corpus.palette.detect_colours` (exact on rendered corpus icons) and compares them with the colours the
prompts asked for. Each is one of eight palette colours, so chance is 1/8 for either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from gda.corpus.palette import detect_colours


@dataclass(frozen=True)
class ColourAccuracy:
    """Fractions of `n` images whose detected foreground, background, and both, match the prompt's."""

    fg: float
    bg: float
    both: float
    n: int


def _as_rgb_list(images: Sequence[Image.Image] | np.ndarray | torch.Tensor) -> list[Image.Image | np.ndarray]:
    if isinstance(images, torch.Tensor):
        # What `sample()` returns: (n, 3, H, W) RGB in [0, 1].
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected an (n, 3, H, W) tensor in [0, 1], got shape {tuple(images.shape)}")
        array = (images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round()
        return list(array)
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[3] < 3:
            raise ValueError(f"expected an (n, H, W, 3) array with values 0–255, got shape {images.shape}")
        return list(images)
    return list(images)


def colour_accuracy(
    images: Sequence[Image.Image] | np.ndarray | torch.Tensor, fg: Sequence[str], bg: Sequence[str]
) -> ColourAccuracy:
    """How often the images' detected colours equal the requested `fg` and `bg` colour names.

    `images`: RGB PIL images, an (n, H, W, 3) array with values 0–255, or an (n, 3, H, W) tensor in [0, 1]
    (`SampleResult.images`). All three sequences must have the same length, at least one.
    """
    return score_colours([detect_colours(image) for image in _as_rgb_list(images)], fg, bg)


def score_colours(detected: Sequence[tuple[str, str]], fg: Sequence[str], bg: Sequence[str]) -> ColourAccuracy:
    """Accuracy of already detected (foreground, background) pairs against the requested colours."""
    if not len(detected) == len(fg) == len(bg):
        raise ValueError(f"{len(detected)} images but {len(fg)} foreground and {len(bg)} background colours")
    if not detected:
        raise ValueError("need at least one image")
    fg_ok = np.array([found[0] == want for found, want in zip(detected, fg, strict=True)])
    bg_ok = np.array([found[1] == want for found, want in zip(detected, bg, strict=True)])
    return ColourAccuracy(
        fg=float(fg_ok.mean()), bg=float(bg_ok.mean()), both=float((fg_ok & bg_ok).mean()), n=len(detected)
    )
