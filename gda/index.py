"""FAISS search over L2-normalised vectors (cosine as inner product): exact up to a configurable size,
IVF above it. Used for the DINO kNN candidates now, and for the attribution index later."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class SearchSettings:
    ivf_above: int = 200_000  # rows beyond which an IVF index replaces the exact flat one
    nlist: int = 1024
    nprobe: int = 32


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit-length float32 rows, as a new array: faiss normalises in place, and callers keep their data."""
    vectors = np.array(vectors, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(vectors)
    return vectors


def build(ids: np.ndarray, vectors: np.ndarray, settings: SearchSettings = SearchSettings()) -> faiss.Index:
    """An inner-product index of the normalised ``vectors``, searchable by training id."""
    data = normalise(vectors)
    dim = data.shape[1]
    if len(data) > settings.ivf_above:
        quantizer = faiss.IndexFlatIP(dim)
        inner = faiss.IndexIVFFlat(quantizer, dim, min(settings.nlist, len(data) // 39), faiss.METRIC_INNER_PRODUCT)
        inner.train(data)
        inner.nprobe = settings.nprobe
    else:
        inner = faiss.IndexFlatIP(dim)
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(data, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cosine similarities), each (n_queries, k'), best first, with k' = min(k, index size)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    similarities, ids = index.search(normalise(queries), min(k, index.ntotal))
    return ids, similarities
