"""Query planning: disjoint splits of the requested sizes, fixed batches, seeds that depend on the query alone."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pytest

from gda.queries import QueryCounts, heldout_candidates, plan_queries, query_seed


def _candidates(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"prompt": [f"prompt {i}" for i in range(n)], "extra": [json.dumps({"i": i}) for i in range(n)]}
    )


def test_splits_are_disjoint_sized_and_batched() -> None:
    plan = plan_queries(_candidates(100), QueryCounts(n_train=30, n_val=5, n_test=12, batch_size=8, seed=3))
    sizes = dict(plan.group_by("split").len().iter_rows())
    assert sizes == {"train": 30, "val": 5, "test": 12}
    assert plan["prompt"].n_unique() == plan.height == 47
    assert plan["query_id"].to_list() == list(range(47))
    batches = dict(plan.group_by("batch").len().iter_rows())
    assert batches == {
        "test-000": 8,
        "test-001": 4,
        "val-000": 5,
        "train-000": 8,
        "train-001": 8,
        "train-002": 8,
        "train-003": 6,
    }
    assert all(b.startswith(s) for b, s in zip(plan["batch"], plan["split"]))
    assert plan["seed"].to_list() == [query_seed(3, q) for q in range(47)]
    # The same plan twice, and a different one for another seed.
    again = plan_queries(_candidates(100), QueryCounts(30, 5, 12, 8, 3))
    assert again.equals(plan)
    other = plan_queries(_candidates(100), QueryCounts(30, 5, 12, 8, 4))
    assert other["prompt"].to_list() != plan["prompt"].to_list()


def test_duplicate_prompts_are_drawn_once_and_a_shortage_repeats_only_train_prompts() -> None:
    doubled = pl.concat([_candidates(10), _candidates(10)])
    plan = plan_queries(doubled, QueryCounts(n_train=6, n_val=2, n_test=2, batch_size=4, seed=0))
    assert plan["prompt"].n_unique() == 10

    # 15 train queries on the 6 prompts test and val leave: each used 2 or 3 times, each query its own seed.
    short = plan_queries(doubled, QueryCounts(n_train=15, n_val=2, n_test=2, batch_size=4, seed=0))
    split = {name: short.filter(pl.col("split") == name)["prompt"].to_list() for name in ("test", "val", "train")}
    assert len(split["train"]) == 15 and len(set(split["train"])) == 6
    assert sorted(Counter(split["train"]).values()) == [2, 2, 2, 3, 3, 3]
    assert len(set(split["test"] + split["val"])) == 4 and not set(split["test"] + split["val"]) & set(split["train"])
    assert short["seed"].n_unique() == short.height
    # Where there are enough, the draw is the one without repeats.
    assert short.head(4)["prompt"].to_list() == plan.head(4)["prompt"].to_list()
    with pytest.raises(ValueError, match="only 10 distinct prompts are available, and test and val alone need 10"):
        plan_queries(doubled, QueryCounts(n_train=7, n_val=5, n_test=5, batch_size=4, seed=0))


def test_heldout_attributes_travel_as_json() -> None:
    heldout = pl.DataFrame({"prompt_id": [0], "prompt": ["a red cat icon"], "fg": ["red"], "bg": ["blue"]})
    candidates = heldout_candidates(heldout)
    assert json.loads(candidates["extra"][0]) == {"bg": "blue", "fg": "red"}
