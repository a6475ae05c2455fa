"""Frozen features as id-keyed arrays: training images and their first captions, and generated queries
and their prompts, all through the same encoders."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from gda.arrays import IdArray
from gda.encoders import ImageEncoder, TextEncoder


def _metadata(encoder: ImageEncoder | TextEncoder) -> dict[str, str]:
    return {"encoder": encoder.name, "dim": str(encoder.dim), "version": encoder.version}


def image_features(encoder: ImageEncoder, ids: Sequence[int], images: Sequence[Image.Image]) -> IdArray:
    values = encoder.encode(list(images), progress=True)
    return IdArray(ids=np.asarray(ids, dtype=np.int64), values=values, metadata=_metadata(encoder))


def text_features(encoder: TextEncoder, ids: Sequence[int], texts: Sequence[str]) -> IdArray:
    values = encoder.encode(list(texts), progress=True)
    return IdArray(ids=np.asarray(ids, dtype=np.int64), values=values, metadata=_metadata(encoder))
