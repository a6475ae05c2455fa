"""DINO kNN candidates: FAISS top-K equals a brute-force cosine ranking; negatives lie outside it."""

from __future__ import annotations

import numpy as np

from gda.candidates import candidates
from gda.index import SearchSettings


def _data(n: int = 500, q: int = 6, dim: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(n, dim)).astype(np.float32) * rng.uniform(0.5, 3, size=(n, 1)).astype(np.float32)
    ids = (np.arange(n, dtype=np.int64) + 7) << 32  # ids as shards make them: far from row numbers
    return ids, train, np.arange(100, 100 + q, dtype=np.int64), rng.normal(size=(q, dim)).astype(np.float32)


def _brute_force(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    return np.argsort(-cos, axis=1, kind="stable")[:, :k], np.sort(cos, axis=1)[:, ::-1][:, :k]


def test_candidates_are_the_exact_cosine_top_k() -> None:
    ids, train, query_ids, queries = _data()
    frame = candidates(ids, train, query_ids, queries, k=40, n_negatives=25, seed=3)
    rows, cos = _brute_force(train, queries, 40)
    for position, query_id in enumerate(query_ids):
        mine = frame.filter((frame["query_id"] == query_id) & (frame["kind"] == "candidate")).sort("rank")
        assert mine["train_id"].to_list() == ids[rows[position]].tolist()
        np.testing.assert_allclose(mine["similarity"].to_numpy(), cos[position], atol=1e-5)
        negatives = frame.filter((frame["query_id"] == query_id) & (frame["kind"] == "negative"))
        assert negatives.height == 25 and negatives["similarity"].null_count() == 25
        assert not set(negatives["train_id"]) & set(mine["train_id"])
        assert set(negatives["train_id"]) <= set(ids.tolist())
    # A query's candidates and negatives depend on that query alone, not on the others searched with it.
    key = ["query_id", "kind", "rank", "train_id"]
    again = candidates(ids, train, query_ids[::-1], queries[::-1], k=40, n_negatives=25, seed=3)
    assert again.sort(key).select(key).equals(frame.sort(key).select(key))


def test_ivf_index_finds_nearly_the_same_neighbours_and_k_is_capped() -> None:
    ids, train, query_ids, queries = _data(n=2000)
    exact = candidates(ids, train, query_ids, queries, k=10, n_negatives=0, seed=0)
    ivf = candidates(
        ids,
        train,
        query_ids,
        queries,
        k=10,
        n_negatives=0,
        seed=0,
        settings=SearchSettings(ivf_above=100, nlist=16, nprobe=16),
    )
    overlap = len(set(zip(exact["query_id"], exact["train_id"])) & set(zip(ivf["query_id"], ivf["train_id"])))
    assert overlap == exact.height  # nprobe = nlist searches every list: exact
    small = candidates(ids[:5], train[:5], query_ids, queries, k=10, n_negatives=3, seed=0)
    assert small.filter(small["kind"] == "candidate").height == 5 * len(query_ids)
    assert small.filter(small["kind"] == "negative").height == 0
