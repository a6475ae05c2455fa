"""The second stage: it learns an ordering the student's vectors do not hold, and touches only the top M."""

from __future__ import annotations

import numpy as np

from gda.ranking import PairRows
from gda.reranker import PairInputs, RerankerConfig, rerank, train_reranker

N_QUERIES, N_TRAIN, IMAGE_DIM, TEXT_DIM, TOP_M = 40, 60, 6, 4, 20


def _inputs(rng: np.random.Generator) -> PairInputs:
    # The student's vectors are noise; the teacher's order follows the raw image part's cosine.
    def unit(n: int, d: int) -> np.ndarray:
        values = rng.standard_normal((n, d)).astype(np.float32)
        return values / np.linalg.norm(values, axis=1, keepdims=True)

    return PairInputs(
        unit(N_QUERIES, 8),
        unit(N_TRAIN, 8),
        rng.standard_normal((N_QUERIES, IMAGE_DIM + TEXT_DIM)).astype(np.float32),
        rng.standard_normal((N_TRAIN, IMAGE_DIM + TEXT_DIM)).astype(np.float32),
        IMAGE_DIM,
    )


def _image_order(inputs: PairInputs, query_row: int) -> np.ndarray:
    def image(values: np.ndarray) -> np.ndarray:
        part = values[..., :IMAGE_DIM]
        return part / np.linalg.norm(part, axis=-1, keepdims=True)

    return np.argsort(-(image(inputs.train_features) @ image(inputs.query_features[query_row])), kind="stable")


def test_the_reranker_learns_the_teachers_order_within_the_top_m() -> None:
    rng = np.random.default_rng(0)
    inputs = _inputs(rng)
    train_queries = range(30)
    query_rows, train_rows, labels = [], [], []
    for q in train_queries:
        order = _image_order(inputs, q)
        query_rows += [q] * N_TRAIN
        train_rows += order.tolist()
        labels += (np.arange(N_TRAIN) / N_TRAIN).tolist()
    pairs = PairRows(np.array(query_rows), np.array(train_rows), np.array(labels, dtype=np.float32))
    model = train_reranker(RerankerConfig(top_m=TOP_M, epochs=60, batch_size=256), inputs, pairs)

    train_ids = np.arange(100, 100 + N_TRAIN)
    held_out = {1000 + q: q for q in range(30, N_QUERIES)}
    shuffled = {query_id: rng.permutation(train_ids) for query_id in held_out}
    reranked = rerank(model, inputs, shuffled, held_out, train_ids)

    agreement = []
    for query_id, row in held_out.items():
        before, after = shuffled[query_id], reranked[query_id]
        assert sorted(after[:TOP_M]) == sorted(before[:TOP_M])  # a permutation of the head
        assert np.array_equal(after[TOP_M:], before[TOP_M:])  # the tail keeps the cosine order
        rank_in_truth = {int(train_ids[i]): r for r, i in enumerate(_image_order(inputs, row))}
        truth = np.array([rank_in_truth[int(i)] for i in after[:TOP_M]])
        agreement.append(np.corrcoef(truth, np.arange(TOP_M))[0, 1])
    # New queries' heads come out in (close to) the teacher's order: a Pearson of ranks, 0 for the shuffle.
    assert np.mean(agreement) > 0.8
