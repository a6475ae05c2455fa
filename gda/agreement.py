"""How far two teachers agree on the same candidates, and the checks by which the teacher measures itself.

Torch-free: the Dagster definitions declare the checks from the names and thresholds here when they load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# The checks that compare teachers on a few queries of each batch. Non-blocking: they measure the teacher,
# they do not validate stored rows. Thresholds: the first-order regime is the premise of the default mode
# (a prototype measured 0.997-0.999); another query-draw seed should still agree far above chance (0.91).
MODES_AGREE = "modes_agree"
MODES_AGREE_MIN_SPEARMAN = 0.95
RESEEDED_AGREE = "reseeded_agree"
RESEEDED_MIN_SPEARMAN = 0.5
# A seed for the second teacher's query draws that no profile uses for anything else.
RESEED_OFFSET = 1_000_003


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (scores are continuous, so ties are not handled specially)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass(frozen=True)
class Agreement:
    """How two teachers rank the same candidates: per query, Spearman and the overlap of their top ``top``."""

    spearman: dict[int, float]
    top_overlap: dict[int, float]
    top: int

    def summary(self) -> dict[str, float]:
        rho, overlap = list(self.spearman.values()), list(self.top_overlap.values())
        return {
            "queries": len(rho),
            "spearman_mean": float(np.mean(rho)),
            "spearman_min": float(np.min(rho)),
            f"top{self.top}_overlap_mean": float(np.mean(overlap)),
        }


def agreement(reference: Mapping[int, np.ndarray], other: Mapping[int, np.ndarray], top: int = 50) -> Agreement:
    rho, overlap = {}, {}
    for query_id, a in reference.items():
        b = other[query_id]
        n = min(top, len(a))
        best_a, best_b = set(np.argsort(-a)[:n].tolist()), set(np.argsort(-b)[:n].tolist())
        rho[query_id] = spearman(a, b)
        overlap[query_id] = len(best_a & best_b) / n
    return Agreement(rho, overlap, top)


@dataclass(frozen=True)
class AgreementCheck:
    """One check's outcome: which teachers were compared, on how many candidates per query, and how well
    they agreed (``Agreement.summary``)."""

    name: str
    min_spearman: float
    compared: str
    candidates: int
    summary: dict[str, float]

    @property
    def passed(self) -> bool:
        return self.summary["spearman_min"] >= self.min_spearman
