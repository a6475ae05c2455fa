"""FAISS search over L2-normalised vectors (cosine as inner product), sized to the data:

- ``flat``: exact, up to ``ivf_above`` rows;
- ``ivf``: inverted lists of raw vectors (4 bytes a dimension), up to ``pq_above`` rows;
- ``ivfpq``: inverted lists of product-quantised codes (``pq_bytes`` a vector), for 10^8 rows and more, where
  raw vectors no longer fit in RAM. An OPQ rotation comes first: embeddings put most of their variance in a
  few directions, and PQ codes of unrotated vectors lose it (recall@10 0.62 without, 0.80 with, on 300k
  vectors of the demo's spectrum). The codes alone still cap recall@10 near 0.64 at 10^7 vectors, so the
  ``refine`` stage (FAISS's ``IndexRefine``) re-ranks a shortlist of ``k x refine_factor`` PQ hits with
  8-bit scalar-quantised (or float16) copies of the vectors. Saved, the lists and those copies are files the
  OS pages in (``gda.index_files``), so RAM holds little more than the ids.

Above ``hnsw_lists`` lists, the coarse quantiser is an HNSW graph over the centroids instead of a flat
scan, in training as in use: assigning 10^7 768-d vectors to 16,384 centroids by a flat scan is 2.5 x 10^14
flops (about 40 min on 2 cores), and each k-means iteration over a million training rows another 2.5 x 10^13.

An index is made empty and trained on a sample (``empty``), then filled in chunks (``add``), so no caller
ever needs all the vectors in memory at once; ``build`` does both for data that does fit.
Used for the DINO kNN candidates and for the attribution index.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

Kind = Literal["flat", "ivf", "ivfpq"]
Refine = Literal["none", "sq8", "fp16"]
_REFINE_FACTORY = {"sq8": "SQ8", "fp16": "SQfp16"}
_HNSW_LINKS = 32


@dataclass(frozen=True)
class SearchSettings:
    ivf_above: int = 200_000  # rows beyond which an IVF index replaces the exact flat one
    # Rows beyond which the lists hold PQ codes: 10^8 raw 768-d vectors are 307 GB, their 64-byte codes 6.4 GB.
    pq_above: int = 20_000_000
    nlist: int = 1024
    nprobe: int = 32
    pq_bytes: int = 64  # PQ code size: pq_bytes sub-quantisers of 8 bits each; must divide the width
    # Rows the coarse quantiser and PQ are trained on: faiss's k-means uses at most 256 per list anyway.
    train_rows: int = 262_144
    # IVF-PQ only: the stored copies that re-rank its shortlist (none, 1 or 2 bytes a dimension), and the
    # shortlist's size as a multiple of k (values measured by `gda bench index-scale`).
    refine: Refine = "sq8"
    refine_factor: int = 32
    hnsw_lists: int = 8192  # lists above which the coarse quantiser is an HNSW graph (32 links a centroid)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit-length float32 rows, as a new array: faiss normalises in place, and callers keep their data."""
    vectors = np.array(vectors, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(vectors)
    return vectors


def kind_for(rows: int, settings: SearchSettings) -> Kind:
    """The index kind ``settings`` call for at ``rows`` rows."""
    if rows > settings.pq_above:
        return "ivfpq"
    return "ivf" if rows > settings.ivf_above else "flat"


def layers(index: faiss.Index) -> Iterator[faiss.Index]:
    """``index`` and the indexes it wraps (id map, refine stage, OPQ rotation), outermost first, downcast."""
    inner = faiss.downcast_index(index)
    while True:
        yield inner
        if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
            inner = faiss.downcast_index(inner.index)
        elif isinstance(inner, faiss.IndexRefine):
            inner = faiss.downcast_index(inner.base_index)
        else:
            return


def kind_of(index: faiss.Index) -> Kind:
    innermost = list(layers(index))[-1]
    if isinstance(innermost, faiss.IndexIVFPQ):
        return "ivfpq"
    return "ivf" if isinstance(innermost, faiss.IndexIVF) else "flat"


def refine_stage(index: faiss.Index) -> faiss.IndexRefine | None:
    """The refine stage inside ``index``, if it has one."""
    return next((layer for layer in layers(index) if isinstance(layer, faiss.IndexRefine)), None)


def training_sample(vectors: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """At most ``rows`` of ``vectors``, drawn without replacement, in their original order."""
    if len(vectors) <= rows:
        return vectors
    chosen = np.sort(np.random.default_rng(seed).choice(len(vectors), rows, replace=False))
    return vectors[chosen]


def empty(dim: int, rows: int, sample: np.ndarray, settings: SearchSettings = SearchSettings()) -> faiss.Index:
    """An empty index of the kind ``settings`` call for at ``rows`` rows, trained on ``sample`` (vectors
    drawn from the data; normalised here). Add rows with ``add``."""
    kind = kind_for(rows, settings)
    if kind == "flat":
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    if kind == "ivfpq" and dim % settings.pq_bytes:
        raise ValueError(f"pq_bytes {settings.pq_bytes} must divide the vector width {dim}")
    if kind == "ivfpq" and len(sample) < 256:
        raise ValueError(f"PQ needs at least 256 training rows (one per 8-bit code), got {len(sample)}")
    data = normalise(sample)
    # faiss wants at least 39 training rows a list; fewer lists rather than a poorly trained quantiser.
    nlist = max(1, min(settings.nlist, len(data) // 39))
    made = faiss.index_factory(dim, factory_string(kind, nlist, settings), faiss.METRIC_INNER_PRODUCT)
    if nlist > settings.hnsw_lists:
        # k-means assigns its rows through this graph, rebuilt over the centroids every iteration.
        faiss.extract_index_ivf(made).clustering_index = faiss.IndexHNSWFlat(dim, _HNSW_LINKS)
    made.train(data)
    faiss.extract_index_ivf(made).nprobe = settings.nprobe
    refine = refine_stage(made)
    if refine is not None:
        refine.k_factor = settings.refine_factor
    return made


def factory_string(kind: Kind, nlist: int, settings: SearchSettings) -> str:
    """FAISS's description of the index. IVF lists store the ids themselves; a refine stage addresses its
    copies by position, so that index needs an id map outside it."""
    ivf = f"IVF{nlist}_HNSW{_HNSW_LINKS}" if nlist > settings.hnsw_lists else f"IVF{nlist}"
    if kind == "ivf":
        return f"{ivf},Flat"
    m = settings.pq_bytes
    if settings.refine == "none":
        return f"OPQ{m},{ivf},PQ{m}"
    return f"IDMap,OPQ{m},{ivf},PQ{m},Refine({_REFINE_FACTORY[settings.refine]})"


def add(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Add ``vectors`` (normalised here, the caller's array untouched) under training ids ``ids``."""
    index.add_with_ids(normalise(vectors), np.ascontiguousarray(ids, dtype=np.int64))


def build(ids: np.ndarray, vectors: np.ndarray, settings: SearchSettings = SearchSettings()) -> faiss.Index:
    """An inner-product index of the normalised ``vectors``, searchable by training id."""
    index = empty(vectors.shape[1], len(vectors), training_sample(vectors, settings.train_rows), settings)
    add(index, ids, vectors)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cosine similarities), each (n_queries, k'), best first, with k' = min(k, index size)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    similarities, ids = index.search(normalise(queries), min(k, index.ntotal))
    return ids, similarities
