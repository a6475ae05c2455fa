"""How the AbU+ teacher collects attributions: candidate counts, negatives, draws and the step size."""

from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

if TYPE_CHECKING:
    from gda.teacher import TeacherConfig


class TeacherSettings(dg.ConfigurableResource):
    k_candidates: int = Field(default=300, ge=1)  # DINO nearest neighbours scored per query (paper: 10,000)
    n_negatives: int = Field(default=100, ge=0)  # random non-candidates kept per query for the student
    # Not the training seed: scoring draws must not repeat noise the model was trained on.
    seed: int = 1
    modules: str = "kv"  # parameters the unlearning step moves: kv | cross_attention | attention | all
    fisher_draws: int = Field(default=1, ge=1)  # fixed (t, eps) draws per training image for the EK-FAC fit
    damping_factor: float = 0.1  # lambda = damping_factor x mean corrected eigenvalue, per module
    batch_size: int = Field(default=32, ge=1)
    mode: str = "first_order"  # or "finite": a real parameter step and two loss evaluations per candidate
    # Query splits whose queries the first-order teacher ranks against every training image, not only their
    # DINO candidates (about 1.5x the cost per query on the demo): evaluation then has no candidate-recall
    # limit, and the student learns the teacher's true top-K rather than its ranking of image neighbours.
    full_ranking_splits: list[str] = ["train", "val", "test"]
    # Queries per batch on which the checks recompute the other mode and another query-draw seed, over
    # their nearest agreement_candidates DINO candidates (the finite side costs a UNet pass per candidate).
    agreement_queries: int = Field(default=1, ge=1)
    agreement_candidates: int = Field(default=100, ge=2)
    relative_step: float = 1e-3  # ||delta theta|| / ||theta0|| of the unlearning step
    query_draws: int = Field(default=64, ge=1)  # (t, eps) draws averaged into the unlearning gradient of a query
    scoring_timesteps: int = Field(default=20, ge=1)  # fixed draws per training image: t = 0, 50, ..., 950 for 20

    def config(self) -> "TeacherConfig":
        from gda.teacher import TeacherConfig  # imports torch, which loading the definitions must not

        return TeacherConfig(**self.model_dump())
