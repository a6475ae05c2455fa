"""``gda bench index-scale``: the attribution index at 10^7 vectors, as `gda.index` builds it above
``pq_above`` (IVF-PQ), on synthetic vectors with the spectrum of the home's real training embeddings
(run ``gda demo`` first; see bench/synthetic.py).

Measured: bytes per vector of the written index, train and add time, single-query latency (p50/p95) and
recall@10 against exact search on a sample of queries, for several ``nprobe``; then the same index with
its inverted lists moved to a file (``gda.index.lists_on_disk``), searched cold (the file evicted from the
page cache first) and warm. The headline ``p50_ms`` / ``recall_at_10`` are at the profile's ``nprobe``.

The vectors are drawn chunk by chunk from per-chunk seeds and never held all at once: the exact top 10 of
the recall queries is kept while the chunks are added.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench import Setting, synthetic
from gda import arrays, index

N_VECTORS = 10_000_000
CHUNK = 250_000
NLIST = 4096  # about sqrt(n) lists: a few thousand vectors each at 10^7
PQ_BYTES = 64
RECALL_QUERIES = 200
WARMUP = 10
K = 10
NPROBES = (8, 16, 32, 64, 128)


def _latency(faiss_index: faiss.Index, queries: np.ndarray, warmup: int = WARMUP) -> dict[str, float]:
    """Single-query search times, in ms, over every query after ``warmup`` untimed ones."""
    for row in queries[:warmup]:
        faiss_index.search(row[None], K)
    samples = []
    for row in queries[warmup:]:
        started = time.perf_counter()
        faiss_index.search(row[None], K)
        samples.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": float(np.percentile(samples, 50)), "p95_ms": float(np.percentile(samples, 95)), "n": len(samples)}


def _recall(faiss_index: faiss.Index, queries: np.ndarray, exact: np.ndarray) -> float:
    _, found = faiss_index.search(queries, K)
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found.tolist(), exact.tolist(), strict=True)]))


def _evict(path: Path) -> None:
    """Drop ``path`` from the page cache, so the next reads come from the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def measure(
    real: np.ndarray,
    n_vectors: int = N_VECTORS,
    nlist: int = NLIST,
    pq_bytes: int = PQ_BYTES,
    nprobe: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Build an IVF-PQ index over ``n_vectors`` synthetic vectors shaped like ``real`` and measure it."""
    shape = synthetic.spectrum(real)
    settings = index.SearchSettings(
        ivf_above=0, pq_above=0, nlist=nlist, nprobe=nprobe, pq_bytes=pq_bytes, train_rows=64 * nlist
    )
    queries = synthetic.draw(shape, RECALL_QUERIES + WARMUP, seed=(seed, 1))
    recall_queries = queries[WARMUP:]

    started = time.perf_counter()
    built = index.empty(shape.dim, n_vectors, synthetic.draw(shape, settings.train_rows, seed=(seed, 2)), settings)
    train_s = time.perf_counter() - started
    exact = faiss.ResultHeap(len(recall_queries), K, keep_max=True)
    add_s = 0.0
    for number, start in enumerate(range(0, n_vectors, CHUNK)):
        rows = min(CHUNK, n_vectors - start)
        chunk = synthetic.draw(shape, rows, seed=(seed, 3, number))
        ids = np.arange(start, start + rows, dtype=np.int64)
        similarities, positions = faiss.knn(recall_queries, chunk, K, metric=faiss.METRIC_INNER_PRODUCT)
        exact.add_result(similarities, positions + start)
        started = time.perf_counter()
        index.add(built, ids, chunk)
        add_s += time.perf_counter() - started
    exact.finalize()

    ivf = faiss.extract_index_ivf(built)
    sweep = []
    for probes in NPROBES:
        ivf.nprobe = probes
        sweep.append(
            {"nprobe": probes, **_latency(built, queries), "recall_at_10": _recall(built, recall_queries, exact.I)}
        )
    ivf.nprobe = nprobe
    chosen = next(row for row in sweep if row["nprobe"] == nprobe)

    with tempfile.TemporaryDirectory() as scratch:
        index_file = Path(scratch) / "index.faiss"
        faiss.write_index(built, str(index_file))
        bytes_per_vector = index_file.stat().st_size / n_vectors
        lists_file = Path(scratch) / "lists.ivfdata"
        index.lists_on_disk(built, lists_file)
        lists_bytes = lists_file.stat().st_size
        _evict(lists_file)
        cold = _latency(built, queries, warmup=0)
        warm = _latency(built, queries)
        on_disk_recall = _recall(built, recall_queries, exact.I)

    return {
        "n_vectors": n_vectors,
        "dim": shape.dim,
        "index": f"OPQ{pq_bytes},IVF{nlist},PQ{pq_bytes} (inner product)",
        "nlist": nlist,
        "pq_bytes": pq_bytes,
        "nprobe": nprobe,
        "threads": faiss.omp_get_max_threads(),
        "bytes_per_vector": bytes_per_vector,
        "index_bytes": int(bytes_per_vector * n_vectors),
        "train_rows": settings.train_rows,
        "train_s": train_s,
        "add_s": add_s,
        "add_vectors_per_s": n_vectors / add_s,
        "p50_ms": chosen["p50_ms"],
        "p95_ms": chosen["p95_ms"],
        "recall_at_10": chosen["recall_at_10"],
        "recall_queries": len(recall_queries),
        "nprobe_sweep": sweep,
        "on_disk": {
            "lists_bytes": lists_bytes,
            "cold_p50_ms": cold["p50_ms"],
            "cold_p95_ms": cold["p95_ms"],
            "warm_p50_ms": warm["p50_ms"],
            "warm_p95_ms": warm["p95_ms"],
            "recall_at_10": on_disk_recall,
        },
    }


def table(result: dict[str, Any]) -> list[list[str]]:
    rows = [
        ["vectors", f"{result['n_vectors']:,}", f"x {result['dim']} ({result['index']})"],
        [
            "bytes per vector",
            f"{result['bytes_per_vector']:.1f}",
            f"B (index file {result['index_bytes'] / 1e9:.2f} GB)",
        ],
        ["train", f"{result['train_s']:.0f}", f"s ({result['train_rows']:,} rows)"],
        ["add", f"{result['add_s']:.0f}", f"s ({result['add_vectors_per_s']:,.0f} vectors/s)"],
    ]
    for row in result["nprobe_sweep"]:
        mark = " <- profile" if row["nprobe"] == result["nprobe"] else ""
        rows.append(
            [
                f"nprobe {row['nprobe']}",
                f"{row['p50_ms']:.2f}",
                f"ms p50 (p95 {row['p95_ms']:.2f}), recall@10 {row['recall_at_10']:.3f}{mark}",
            ]
        )
    disk = result["on_disk"]
    rows += [
        [
            "lists on disk, cold",
            f"{disk['cold_p50_ms']:.2f}",
            f"ms p50 (p95 {disk['cold_p95_ms']:.2f}; page cache evicted first)",
        ],
        [
            "lists on disk, warm",
            f"{disk['warm_p50_ms']:.2f}",
            f"ms p50 (p95 {disk['warm_p95_ms']:.2f}), recall@10 {disk['recall_at_10']:.3f}",
        ],
    ]
    return rows


def run(setting: Setting) -> dict[str, Any]:
    files = sorted((setting.home.artifacts / "training_embeddings").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{setting.home.root} has no training embeddings; run `gda demo --home {setting.home.root}` first"
        )
    real = np.concatenate([arrays.load(path).values for path in files])
    nprobe = int(setting.values.get("index", {}).get("nprobe", index.SearchSettings().nprobe))
    result = {**setting.header("index-scale"), "real_embeddings": len(real), **measure(real, nprobe=nprobe)}
    result["table"] = table(result)
    return result
