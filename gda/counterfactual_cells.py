"""The cells of the counterfactual evaluation: one partition per (method, k, group of test queries).

Apart from `gda.counterfactual` because the Dagster definitions build the partitions from these when they load,
and loading them must not import torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

# Stored in eval_counterfactual.method. `concat_raw` is the student's input without the student (as in
# gda.evaluation); `teacher` is AbU+ itself.
METHODS = ("random", "concat_raw", "distilled", "teacher")
_KEY = re.compile(r"^([a-z_]+)-k(\d+)-g(\d+)$")


@dataclass(frozen=True)
class Cell:
    """One partition of the evaluation: a method's top-k removed, for one group of test queries."""

    method: str
    k: int
    group: int

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"counterfactual method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.k < 1 or self.group < 0:
            raise ValueError(f"need k >= 1 and group >= 0, got k={self.k}, group={self.group}")

    @property
    def key(self) -> str:
        return f"{self.method}-k{self.k}-g{self.group}"

    @classmethod
    def parse(cls, key: str) -> Cell:
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{key!r} is not a counterfactual cell key (METHOD-kK-gGROUP, e.g. distilled-k100-g0)")
        return cls(match.group(1), int(match.group(2)), int(match.group(3)))


def cells(methods: Sequence[str], ks: Sequence[int], n_queries: int, group_size: int) -> list[Cell]:
    """Every (method, k, query group) cell; the first `n_queries` test queries fall into groups of `group_size`.

    Group-major order, so cells run in this order complete every method's comparison on one group of queries
    before starting the next."""
    if n_queries < 1 or group_size < 1:
        raise ValueError(f"need n_queries and group_size >= 1, got {n_queries} and {group_size}")
    groups = math.ceil(n_queries / group_size)
    return [Cell(method, k, group) for group in range(groups) for k in ks for method in methods]


def group_queries(test_query_ids: Sequence[int], n_queries: int, group_size: int, group: int) -> list[int]:
    """The test queries of `group`: a slice of the first `n_queries` ids in ascending order."""
    chosen = sorted(test_query_ids)[:n_queries]
    members = chosen[group * group_size : (group + 1) * group_size]
    if not members:
        raise ValueError(f"query group {group} is empty: only {len(chosen)} test queries have teacher rankings")
    return members
