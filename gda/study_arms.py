"""The arms of the student design study: one student setting each, varied along one axis from the profile's
own student, so that every row of ``student_study`` differs from the ``defaults`` row in one choice.

The arms are made from the profile's sizes (its number of train queries, the student's top K, widths and
epochs), so the same axes scale from the tiny profile to a large query plan. Plain data, no torch: the
definitions build one partition per arm when they load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# concat: DINO image + text; image / text: that part alone (the other zeroed); generator: the text part with
# the generator's own UNet activations as the image part (gda.generator_features).
FEATURE_PARTS = ("concat", "image", "text", "generator")
MIN_QUERIES = 30  # fewer train queries say little about the curve (a smaller plan goes down to a quarter)


@dataclass(frozen=True)
class StudyArm:
    name: str  # the partition key
    axis: str  # what it varies: defaults, queries, budget, features, loss, negatives, ..., second stage
    train_queries: int | None = None  # the first n train-split queries by id; None: every one
    features: str = "concat"  # the input parts the student sees (the other part is zeroed): FEATURE_PARTS
    oracle: bool = False  # trained on the test queries' own rankings: what the features can represent at all
    rerank_m: int | None = None  # a second stage re-orders the cosine top M (gda.reranker); None: none
    student: Mapping[str, Any] = field(default_factory=dict)  # StudentConfig fields that differ from the profile

    def __post_init__(self) -> None:
        if self.features not in FEATURE_PARTS:
            raise ValueError(f"{self.name}: features must be one of {', '.join(FEATURE_PARTS)}, got {self.features}")


def _widths(widths: Sequence[int], factor: float, depth: int | None = None) -> tuple[int, ...]:
    hidden = [max(8, round(w * factor)) for w in widths[:-1]]
    if depth is not None:
        hidden = [hidden[0]] * depth
    return (*hidden, max(8, round(widths[-1] * factor)))


def study_arms(n_train: int, top_k: int, widths: Sequence[int], epochs: int) -> list[StudyArm]:
    """Every arm for a home with ``n_train`` train queries and a student of ``top_k``, ``widths``, ``epochs``."""
    quarter, half = max(1, n_train // 4), max(1, n_train // 2)
    counts = sorted({n_train // 2**i for i in range(1, 8)} - {0})
    arms = [StudyArm("defaults", "defaults")]
    smallest = min(MIN_QUERIES, quarter)
    arms += [StudyArm(f"queries-{n}", "queries", train_queries=n) for n in counts if n >= smallest]
    # A fixed budget of pairs (a quarter of the defaults'), spent on many queries or on deep rankings.
    for queries, k in ((n_train, max(1, top_k // 4)), (half, max(1, top_k // 2)), (quarter, top_k)):
        arms.append(StudyArm(f"budget-{queries}x{k}", "budget", train_queries=queries, student={"top_k": k}))
    arms += [StudyArm(f"features-{part}", "features", features=part) for part in ("image", "text", "generator")]
    arms.append(StudyArm("features-raw-parts", "features", student={"normalise_parts": False}))
    arms += [StudyArm(f"loss-{loss}", "loss", student={"loss": loss}) for loss in ("mse", "pairwise")]
    arms += [StudyArm(f"negatives-{p}", "negatives", student={"p_negative": p}) for p in (0.0, 0.3)]
    for fraction in (0.05, 0.1, 0.2):
        m = max(1, round(fraction * top_k))
        arms.append(StudyArm(f"subsample-{m}", "subsampling", student={"per_query": m}))
    for label, shape in (
        ("narrow", _widths(widths, 0.5)),
        ("wide", _widths(widths, 2.0)),
        ("shallow", _widths(widths, 1.0, depth=1)),
        ("deep", _widths(widths, 1.0, depth=2 * (len(widths) - 1))),
    ):
        if shape != tuple(widths):
            arms.append(StudyArm(f"width-{label}", "capacity", student={"widths": shape}))
    arms += [StudyArm(f"epochs-{e}", "epochs", student={"epochs": e}) for e in (max(1, epochs // 2), 3 * epochs)]
    arms.append(
        StudyArm(f"epochs-{4 * epochs}-best", "epochs", student={"epochs": 4 * epochs, "keep_best_epoch": True})
    )
    arms += [StudyArm(f"rerank-{m}", "second stage", rerank_m=m) for m in sorted({max(1, top_k // 3), top_k})]
    arms.append(StudyArm("oracle", "oracle", oracle=True))
    return arms
