"""Frozen features of training images: the image of each accepted sample and its first caption."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from gda.arrays import IdArray
from gda.corpus.shards import iter_image_bytes
from gda.encoders import ImageEncoder, TextEncoder


def _metadata(encoder: ImageEncoder | TextEncoder) -> dict[str, str]:
    return {"encoder": encoder.name, "dim": str(encoder.dim), "version": encoder.version}


def shard_image_features(encoder: ImageEncoder, shard_path: Path, ids: Sequence[int], keys: Sequence[str]) -> IdArray:
    """Encode the images of ``keys`` (accepted samples, in tar order) read from the shard."""
    found = dict(iter_image_bytes(shard_path, keys))
    missing = [key for key in keys if key not in found]
    if missing:
        raise FileNotFoundError(
            f"{shard_path.name} no longer holds {len(missing)} ingested samples (first: {missing[0]}); "
            "the shard changed since ingest: re-materialize training_images for it"
        )
    images = [Image.open(io.BytesIO(found[key])) for key in keys]
    values = encoder.encode(images, progress=True)
    return IdArray(ids=np.asarray(ids, dtype=np.int64), values=values, metadata=_metadata(encoder))


def caption_features(encoder: TextEncoder, ids: Sequence[int], captions: Sequence[str]) -> IdArray:
    values = encoder.encode(list(captions), progress=True)
    return IdArray(ids=np.asarray(ids, dtype=np.int64), values=values, metadata=_metadata(encoder))
