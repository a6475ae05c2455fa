"""The demo corpus's colour vocabulary and the detector that reads it back from an image.

Eight named colours serve as both foreground and background, so guessing either colour has a chance level
of exactly 1/8. Each colour has one low-contrast partner it is never paired with; the partners form a
perfect matching, so every colour keeps six allowed partners and both marginals stay uniform.

``detect_colours`` is what scores whether a generated image follows its prompt's colours; it is tested on
rendered icons, where the true colours are known.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Saturated, well separated in RGB (every allowed pair is at least ~110 apart) and nameable at 16×16 px.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 25, 25),
    "orange": (255, 135, 0),
    "yellow": (255, 230, 40),
    "green": (30, 160, 60),
    "blue": (40, 100, 235),
    "purple": (150, 50, 190),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
}
COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)

# The closest pairs in RGB (or, for yellow/white, in luminance): an icon drawn in one on the other is hard
# to see at 16 px and hard to tell apart once antialiased.
_PARTNER_PAIRS = (("red", "orange"), ("yellow", "white"), ("blue", "purple"), ("green", "black"))
LOW_CONTRAST_PARTNER: dict[str, str] = {a: b for a, b in _PARTNER_PAIRS} | {b: a for a, b in _PARTNER_PAIRS}

_RGB = np.array([PALETTE[name] for name in COLOUR_NAMES], dtype=np.float64)

# Pixels less than this fraction of the way from the background to a foreground colour count as
# background: antialiasing fringes and generator noise.
_MIN_FOREGROUND_FRACTION = 0.25


def allowed_backgrounds(fg: str) -> tuple[str, ...]:
    """The six background colours a foreground colour may be drawn on."""
    return tuple(name for name in COLOUR_NAMES if name != fg and name != LOW_CONTRAST_PARTNER[fg])


def nearest_colour_indices(pixels: np.ndarray) -> np.ndarray:
    """Index into ``COLOUR_NAMES`` of the nearest palette colour (RGB distance) for each row of ``(N, 3)``."""
    distances = ((pixels[:, None, :].astype(np.float64) - _RGB[None, :, :]) ** 2).sum(axis=2)
    return distances.argmin(axis=1)


def nearest_colour(rgb: tuple[float, float, float] | np.ndarray) -> str:
    """The name of the palette colour nearest to one RGB triple (0–255)."""
    return COLOUR_NAMES[int(nearest_colour_indices(np.asarray(rgb, dtype=np.float64).reshape(1, 3))[0])]


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] < 3:
        raise ValueError(f"expected an H×W×3 RGB array (0–255), got shape {array.shape}")
    return array[:, :, :3]


def detect_colours(image: Image.Image | np.ndarray) -> tuple[str, str]:
    """``(fg, bg)`` palette names of an icon image: an RGB PIL image or an H×W×3 array with values 0–255.

    The background is the palette colour most border pixels are nearest to. The foreground is the colour
    that accounts for most of the remaining ink: each pixel is explained as a mix of the background and one
    candidate colour (its distance to the segment between them), and counts towards that candidate by how
    far along the segment it lies. Plain nearest-colour voting would miscount antialiased edges, which at
    16 px are most of a thin glyph: red blended into yellow is nearest to orange."""
    array = _as_rgb_array(image)
    border = np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])
    bg_index = int(np.bincount(nearest_colour_indices(border), minlength=len(COLOUR_NAMES)).argmax())
    bg = _RGB[bg_index]

    candidates = np.array([i for i in range(len(COLOUR_NAMES)) if i != bg_index])
    directions = _RGB[candidates] - bg  # (C, 3)
    offsets = array.reshape(-1, 3) - bg  # (N, 3)
    fractions = np.clip(offsets @ directions.T / (directions**2).sum(axis=1), 0.0, 1.0)  # (N, C)
    residuals = ((offsets[:, None, :] - fractions[:, :, None] * directions[None, :, :]) ** 2).sum(axis=2)
    best = residuals.argmin(axis=1)
    best_fraction = fractions[np.arange(len(best)), best]
    ink = best_fraction >= _MIN_FOREGROUND_FRACTION
    scores = np.bincount(best[ink], weights=best_fraction[ink], minlength=len(candidates))
    if scores.sum() == 0:
        # A blank image: name the candidate the farthest-from-background pixel leans towards.
        farthest = int((offsets**2).sum(axis=1).argmax())
        scores[best[farthest]] = 1.0
    fg_index = int(candidates[scores.argmax()])
    return COLOUR_NAMES[fg_index], COLOUR_NAMES[bg_index]
