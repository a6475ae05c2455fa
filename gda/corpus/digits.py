"""A second corpus of real captioned images: scikit-learn's copy of the UCI handwritten digits (1,797 scans
of digits written by 43 people, 8x8 pixels of 17 grey levels, CC BY 4.0), written as img2dataset shards.

The icons are drawn by gda itself; these are scans of people's handwriting, so the student defaults are
checked on data gda did not make (``gda bench second-corpus``). Captions name the digit and what can be read
off the scan (how bold the stroke is, where the ink sits), in several phrasings per image, as web captions
vary; they do not say who wrote it, which the scans do not record.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from gda.corpus.shards import ShardSample, write_shard

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LICENSE = "CC BY 4.0 (UCI ML handwritten digits, via scikit-learn)"


def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ValueError("the digits corpus comes from scikit-learn: pip install 'scikit-learn>=1.4,<2'") from error
    digits = load_digits()
    return digits.images, digits.target


def _png(scan: np.ndarray, resolution: int) -> bytes:
    grey = Image.fromarray((255 - scan * (255 / 16)).round().astype(np.uint8), mode="L")  # dark ink on paper
    buffer = io.BytesIO()
    grey.resize((resolution, resolution), Image.Resampling.BILINEAR).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _captions(scan: np.ndarray, digit: int, bold_above: float, rng: np.random.Generator) -> list[str]:
    name = NAMES[digit]
    stroke = "bold" if scan.sum() > bold_above else "thin"
    columns = scan.sum(axis=0)
    centre = float((columns * np.arange(8)).sum() / columns.sum())
    lean = "left" if centre < 3.2 else "right" if centre > 3.8 else "middle"
    captions = [
        f"a handwritten {name}",
        f"the digit {digit} written by hand in a {stroke} stroke",
        f"a {stroke} handwritten {name} set to the {lean}" if lean != "middle" else f"a {stroke} handwritten {name}",
        f"scan of a handwritten number {digit}",
    ]
    first = int(rng.integers(len(captions)))
    return captions[first:] + captions[:first]


def build_digits_corpus(out_dir: Path, n_images: int, n_shards: int, resolution: int, seed: int = 0) -> list[Path]:
    """Write ``n_images`` digit scans (a seeded sample of the 1,797) as ``n_shards`` img2dataset shards in
    ``out_dir``; the same arguments write the same bytes."""
    scans, targets = _load()
    if not 1 <= n_images <= len(scans) or not 1 <= n_shards <= n_images:
        raise ValueError(f"need 1 <= n_shards <= n_images <= {len(scans)}, got {n_shards} shards of {n_images}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(scans))[:n_images])
    bold_above = float(np.median(scans.reshape(len(scans), -1).sum(axis=1)))
    bounds = np.linspace(0, n_images, n_shards + 1).round().astype(int)
    shards = []
    for shard in range(n_shards):
        samples = []
        for index, row in enumerate(chosen[bounds[shard] : bounds[shard + 1]]):
            meta = {
                "url": f"https://archive.ics.uci.edu/dataset/80#{int(row)}",
                "license": LICENSE,
                "width": resolution,
                "height": resolution,
                "digit": int(targets[row]),
            }
            captions = _captions(scans[row], int(targets[row]), bold_above, rng)
            samples.append(ShardSample(f"{shard:05d}{index:04d}", _png(scans[row], resolution), "png", captions, meta))
        shards.append(write_shard(Path(out_dir), shard, samples))
    return shards
