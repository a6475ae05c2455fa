"""The guard on a user's data: the distilled embedder must not rank below its own input features.

Raw concatenation and text features alone are what a plain search on the student's inputs gives; a student
below them at any L has learnt nothing useful from the teacher on this data (a new corpus, too few training
queries, a setting that does not suit it), and its fast answers should not be trusted silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

GUARDED_BASELINES = ("concat_raw", "text")  # the student's own inputs: below them, it has learnt nothing useful


def shortfalls(table: pl.DataFrame) -> pl.DataFrame:
    """Every (L, baseline) of ``GUARDED_BASELINES`` where the distilled embedder's mAP is below the baseline's:
    columns L, baseline, distilled, baseline_map, distilled_se, baseline_se. Empty when the student holds."""
    distilled = table.filter(pl.col("method") == "distilled").select("L", distilled="map", distilled_se="se")
    baselines = table.filter(pl.col("method").is_in(GUARDED_BASELINES)).select(
        "L", baseline="method", baseline_map="map", baseline_se="se"
    )
    return (
        distilled.join(baselines, on="L")
        .filter(pl.col("distilled") < pl.col("baseline_map"))
        .select("L", "baseline", "distilled", "baseline_map", "distilled_se", "baseline_se")
        .sort("L", "baseline")
    )


@dataclass(frozen=True)
class StudentGuard:
    """Where the distilled embedder falls below its own input features (`shortfalls`), for a warning check."""

    shortfalls: pl.DataFrame

    @property
    def passed(self) -> bool:
        return self.shortfalls.is_empty()

    def message(self) -> str | None:
        """One line: where the student falls short, and what to do; None when it holds."""
        if self.passed:
            return None
        where = "; ".join(
            f"L={row['L']}: {row['distilled']:.3f} vs {row['baseline']} {row['baseline_map']:.3f}"
            for row in self.shortfalls.iter_rows(named=True)
        )
        return (
            f"the distilled embedder ranks below its own input features ({where}); its answers are worse than "
            "a plain feature search here: compare student settings with student_study_job before serving them"
        )

    def markdown(self) -> str:
        if self.passed:
            return "The distilled embedder is at or above raw concatenation and text features at every L."
        lines = ["| L | baseline | distilled | baseline mAP |", "|---|---|---|---|"]
        lines += [
            f"| {r['L']} | {r['baseline']} | {r['distilled']:.3f} ± {r['distilled_se']:.3f} | "
            f"{r['baseline_map']:.3f} ± {r['baseline_se']:.3f} |"
            for r in self.shortfalls.iter_rows(named=True)
        ]
        return "\n".join(lines)
