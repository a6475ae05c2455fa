"""Decoded images of any mode as the 8-bit RGB every model reads: the one place a mode is converted.

Training images (``gda.corpus.shards.load_images``) and query images (the encoders) both pass through
``to_rgb``, so an image gets the same pixels, hence the same features, whichever way it comes in.
Pillow's own ``convert("RGB")`` is right for most modes (RGB, L, 1, CMYK, YCbCr, P without transparency) but
wrong for two kinds that web corpora hold:

- Transparency (RGBA, LA, PA, or P / L / RGB with a tRNS entry): ``convert`` drops the alpha and shows
  whatever colour the transparent pixels happen to store, often black, so two identical-looking logos get
  different features. We composite on white instead, as img2dataset does when it resizes an image with
  alpha and as a web page shows a transparent logo.
- 16-bit greyscale (``I;16*``, and ``I`` as older Pillow opens 16-bit PNGs): ``convert`` clips every value
  above 255 to white instead of scaling, so nearly every 16-bit image turns white.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA")


def _eight_bit(image: Image.Image) -> Image.Image:
    # 65535 / 257 = 255: full scale maps to full scale.
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray((values // 257).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: alpha composited on white, 16-bit samples scaled to 8 bits."""
    if image.mode in _SIXTEEN_BIT:
        image = _eight_bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
