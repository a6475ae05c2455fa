"""gda.diffusion.quality: colour accuracy of icon images against the colours their prompts name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gda.corpus import icons
from gda.corpus.icons import IconImage
from gda.corpus.palette import COLOUR_NAMES, allowed_backgrounds
from gda.diffusion.quality import ColourAccuracy, colour_accuracy


@pytest.fixture(scope="module")
def rendered() -> tuple[list[Image.Image], list[str], list[str]]:
    """Every allowed (fg, bg) pair, drawn as large and small icons from two fonts."""
    rng = np.random.default_rng(0)
    glyphs = icons._choose_icons(rng, 4, icons._layout(16, "small", "centre")[0])
    images, fgs, bgs = [], [], []
    for k, (fg, bg) in enumerate((f, b) for f in COLOUR_NAMES for b in allowed_backgrounds(f)):
        scale = ("large", "small")[k % 2]
        position = "centre" if scale == "large" else icons.POSITIONS[k % len(icons.POSITIONS)]
        look = IconImage(glyphs[k % len(glyphs)], fg, bg, scale, position)
        images.append(Image.fromarray(icons.render(look, 16)))
        fgs.append(fg)
        bgs.append(bg)
    return images, fgs, bgs


def test_rendered_icons_score_one(rendered: tuple[list[Image.Image], list[str], list[str]]) -> None:
    images, fgs, bgs = rendered
    assert len(images) == 48
    assert colour_accuracy(images, fgs, bgs) == ColourAccuracy(fg=1.0, bg=1.0, both=1.0, n=48)


def test_all_input_forms_agree(rendered: tuple[list[Image.Image], list[str], list[str]]) -> None:
    images, fgs, bgs = rendered
    arrays = np.stack([np.asarray(image) for image in images])
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
    expected = colour_accuracy(images, fgs, bgs)
    assert colour_accuracy(arrays, fgs, bgs) == expected
    assert colour_accuracy(tensor, fgs, bgs) == expected


def test_wrong_labels_lower_the_score(rendered: tuple[list[Image.Image], list[str], list[str]]) -> None:
    images, fgs, bgs = rendered
    # Images come in blocks of six sharing a foreground: rotating by a block names the next colour for all,
    # rotating backgrounds by one names a neighbour's background (mostly another colour).
    shifted_fg = fgs[6:] + fgs[:6]
    shifted_bg = bgs[1:] + bgs[:1]
    fg_only = colour_accuracy(images, shifted_fg, bgs)
    assert fg_only == ColourAccuracy(fg=0.0, bg=1.0, both=0.0, n=48)
    bg_only = colour_accuracy(images, fgs, shifted_bg)
    assert bg_only.fg == 1.0 and bg_only.bg < 0.5 and bg_only.both == bg_only.bg
    both = colour_accuracy(images, shifted_fg, shifted_bg)
    assert both.both <= min(both.fg, both.bg) < 0.5
    # Swapping foreground and background is always wrong: the two colours of an image differ.
    swapped = colour_accuracy(images, bgs, fgs)
    assert swapped.fg == swapped.bg == swapped.both == 0.0


def test_blank_and_flat_images() -> None:
    flat = Image.new("RGB", (16, 16), (40, 100, 235))
    result = colour_accuracy([flat], ["red"], ["blue"])
    assert result.bg == 1.0 and result.n == 1


def test_rejects_mismatched_lengths() -> None:
    image = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError):
        colour_accuracy([image, image], ["red"], ["blue", "blue"])
    with pytest.raises(ValueError):
        colour_accuracy([], [], [])
    with pytest.raises(ValueError):
        colour_accuracy(np.zeros((2, 16, 16)), ["red", "red"], ["blue", "blue"])
