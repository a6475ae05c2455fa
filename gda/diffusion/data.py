"""Training images as tensors: decoded from their shards, resized to the model's resolution."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gda.corpus.shards import load_images


def to_model_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(n, 3, size, size) float32 in [-1, 1]; images of another size are resized with Lanczos."""
    arrays = []
    for image in images:
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
        arrays.append(np.asarray(rgb, dtype=np.float32))
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return stacked / 127.5 - 1.0


def load_shard_images(shard_path: Path, keys: Sequence[str], size: int) -> torch.Tensor:
    return to_model_tensor(load_images(shard_path, keys), size)


def load_corpus_images(rows, shard_path, size: int) -> torch.Tensor:
    """Every image of ``rows`` (a frame with ``shard`` and ``key``), in the rows' order, each shard read
    once; ``shard_path`` maps a shard key to its tar."""
    out = torch.empty(rows.height, 3, size, size)
    for (shard,), group in rows.with_row_index("position").group_by("shard", maintain_order=True):
        out[group["position"].to_list()] = load_shard_images(shard_path(shard), group["key"].to_list(), size)
    return out
