"""``gda bench index-scale``: the attribution index at 10^7 vectors, as `gda.index` builds it above
``pq_above`` (OPQ + IVF-PQ with a refine stage of 8-bit copies), on synthetic vectors with the spectrum of
the home's real training embeddings (run ``gda demo`` first; see bench/synthetic.py), at the home's width
and at 768 dimensions (the ``sd`` student's; the spectrum widened).

Measured for each width: train and add time; recall@10 against exact search on 200 queries and single-query
latency (p50/p95) over a grid of ``nprobe`` x ``refine_factor``, and the PQ codes alone; then the index as
the service reads it, from its saved parts mapped from disk (``gda.index_files``): bytes per vector on disk,
the process's own RAM per vector (anonymous memory, which the kernel cannot drop) and the page cache it
filled, searched cold (the files evicted from the page cache first) and warm. The headline ``p50_ms`` /
``recall_at_10`` are the mapped, warm index at ``NPROBE`` and ``REFINE_FACTOR``.

The vectors are drawn chunk by chunk from per-chunk seeds and never held all at once: the exact top 10 of
the recall queries is kept while the chunks are added.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench import Setting, synthetic
from gda import arrays, index, index_files

N_VECTORS = 10_000_000
WIDE = 768
CHUNK = 250_000
# About 5 sqrt(n) lists, 610 vectors each at 10^7: recall follows the number of lists probed, and with
# 4,096 lists the 128 probes that 768-d vectors need scanned 4x the codes (0.906 at nprobe 64, 6.9 ms).
NLIST = 16_384
TRAIN_ROWS_PER_LIST = 40  # faiss asks for at least 39
PQ_BYTES = 64
RECALL_QUERIES = 200
WARMUP = 10
K = 10
NPROBES = (32, 64, 128, 256)
REFINE_FACTORS = (8, 16, 32, 64)
NPROBE, REFINE_FACTOR = 128, 32  # the headline setting (the `sd` profile's)


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


def _overlap(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found.tolist(), exact.tolist(), strict=True)]))


def _recall(faiss_index: faiss.Index, queries: np.ndarray, exact: np.ndarray) -> float:
    return _overlap(faiss_index.search(queries, K)[1], exact)


def _evict(path: Path) -> None:
    """Drop ``path`` from the page cache, so the next reads come from the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def _resident() -> dict[str, int]:
    """This process's resident memory in bytes: its own (anonymous) and that of mapped files."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[name].split()[0]) * 1024 for key, name in (("anonymous", "RssAnon"), ("files", "RssFile"))}


def _serve_mapped(
    folder: Path, sizes: dict[str, int], refine_factor: int, queries: np.ndarray, exact: np.ndarray
) -> dict[str, Any]:
    """In a fresh process: map the saved parts as the service does, then search cold and warm."""
    before = _resident()
    mapped = index_files.read_parts(folder, "bench", sizes, refine_factor, mapped=True)
    loaded = _resident()
    for part in index_files.PARTS:
        _evict(folder / f"bench.{part}")
    cold = _latency(mapped, queries, warmup=0)
    warm = _latency(mapped, queries)
    recall = _recall(mapped, queries[WARMUP:], exact)
    return {
        "own_bytes": loaded["anonymous"] - before["anonymous"],
        "page_cache_bytes": _resident()["files"] - before["files"],
        "cold": cold,
        "warm": warm,
        "recall_at_10": recall,
    }


def _sweep(built: faiss.Index, queries: np.ndarray, exact: np.ndarray) -> list[dict[str, Any]]:
    ivf, refine = faiss.extract_index_ivf(built), index.refine_stage(built)
    rows = []
    for probes in NPROBES:
        ivf.nprobe = probes
        for factor in REFINE_FACTORS:
            refine.k_factor = factor
            rows.append(
                {
                    "nprobe": probes,
                    "refine_factor": factor,
                    **_latency(built, queries),
                    "recall_at_10": _recall(built, queries[WARMUP:], exact),
                }
            )
    return rows


def _codes_alone(built: faiss.Index, queries: np.ndarray, exact: np.ndarray) -> float:
    """recall@10 of the PQ codes without the refine stage, as the index had it before."""
    positions = index.refine_stage(built).base_index.search(queries, K)[1]
    ids = faiss.vector_to_array(faiss.downcast_index(built).id_map)
    return _overlap(np.where(positions >= 0, ids[positions], -1), exact)


def measure(
    real: np.ndarray,
    n_vectors: int = N_VECTORS,
    dim: int | None = None,
    nlist: int = NLIST,
    pq_bytes: int = PQ_BYTES,
    nprobe: int = NPROBE,
    refine_factor: int = REFINE_FACTOR,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the refined IVF-PQ index over ``n_vectors`` synthetic vectors shaped like ``real`` (widened to
    ``dim`` if given), measure it in RAM, then saved and mapped as the service reads it."""
    shape = synthetic.spectrum(real)
    if dim is not None and dim != shape.dim:
        shape = synthetic.widened(shape, dim, seed=seed)
    settings = index.SearchSettings(
        ivf_above=0,
        pq_above=0,
        nlist=nlist,
        nprobe=nprobe,
        pq_bytes=pq_bytes,
        train_rows=TRAIN_ROWS_PER_LIST * nlist,
        refine="sq8",
        refine_factor=refine_factor,
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

    codes_alone = _codes_alone(built, recall_queries, exact.I)
    sweep = _sweep(built, queries, exact.I)
    faiss.extract_index_ivf(built).nprobe = nprobe
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        sizes = index_files.write_parts(built, folder, "bench")
        del built
        # A fresh process: its memory before and after mapping the parts is what a server's would be.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            served = pool.apply(_serve_mapped, (folder, sizes, refine_factor, queries, exact.I))

    chosen = next(row for row in sweep if (row["nprobe"], row["refine_factor"]) == (nprobe, refine_factor))
    disk = sum(sizes.values())
    return {
        "n_vectors": n_vectors,
        "dim": shape.dim,
        "index": index.factory_string("ivfpq", nlist, settings) + " (inner product)",
        "nlist": nlist,
        "pq_bytes": pq_bytes,
        "nprobe": nprobe,
        "refine_factor": refine_factor,
        "threads": faiss.omp_get_max_threads(),
        "train_rows": settings.train_rows,
        "train_s": train_s,
        "add_s": add_s,
        "add_vectors_per_s": n_vectors / add_s,
        "recall_at_10_codes_alone": codes_alone,
        "sweep": sweep,
        "in_ram": {key: chosen[key] for key in ("p50_ms", "p95_ms", "recall_at_10")},
        "disk_bytes": disk,
        "disk_bytes_per_vector": disk / n_vectors,
        "part_bytes": sizes,
        "ram_bytes_per_vector": served["own_bytes"] / n_vectors,
        "page_cache_bytes_after_queries": served["page_cache_bytes"],
        "cold_p50_ms": served["cold"]["p50_ms"],
        "cold_p95_ms": served["cold"]["p95_ms"],
        "p50_ms": served["warm"]["p50_ms"],
        "p95_ms": served["warm"]["p95_ms"],
        "recall_at_10": served["recall_at_10"],
        "recall_queries": len(recall_queries),
    }


def table(result: dict[str, Any]) -> list[list[str]]:
    head = f"{result['n_vectors']:,} x {result['dim']}"
    rows = [
        [head, "index", result["index"]],
        [head, "train / add", f"{result['train_s']:.0f} s / {result['add_s']:.0f} s ({result['train_rows']:,} rows)"],
        [
            head,
            "disk / RAM per vector",
            f"{result['disk_bytes_per_vector']:.0f} B ({result['disk_bytes'] / 1e9:.2f} GB) / "
            f"{result['ram_bytes_per_vector']:.1f} B own memory",
        ],
        [head, "recall@10, PQ codes alone", f"{result['recall_at_10_codes_alone']:.3f}"],
    ]
    for row in result["sweep"]:
        mark = (
            " <- headline"
            if (row["nprobe"], row["refine_factor"]) == (result["nprobe"], result["refine_factor"])
            else ""
        )
        rows.append(
            [
                head,
                f"nprobe {row['nprobe']}, refine x{row['refine_factor']}",
                f"recall@10 {row['recall_at_10']:.3f}, p50 {row['p50_ms']:.2f} ms (p95 {row['p95_ms']:.2f}){mark}",
            ]
        )
    rows += [
        [
            head,
            "mapped, cold",
            f"p50 {result['cold_p50_ms']:.2f} ms (p95 {result['cold_p95_ms']:.2f}; page cache evicted)",
        ],
        [
            head,
            "mapped, warm",
            f"p50 {result['p50_ms']:.2f} ms (p95 {result['p95_ms']:.2f}), recall@10 {result['recall_at_10']:.3f}",
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
    # The wide run's size is bounded by this benchmark's time on 2 cores, not by memory: GDA_BENCH_WIDE_VECTORS.
    wide_vectors = int(os.environ.get("GDA_BENCH_WIDE_VECTORS", N_VECTORS))
    widths = [measure(real), measure(real, n_vectors=wide_vectors, dim=WIDE)]
    result = {**setting.header("index-scale"), "real_embeddings": len(real), "widths": widths}
    result["table"] = [row for width in widths for row in table(width)]
    return result
