"""How the AbU+ teacher collects attributions: candidate counts, negatives, draws and the step size."""

import dagster as dg


class TeacherSettings(dg.ConfigurableResource):
    k_candidates: int = 300  # DINO nearest neighbours scored per query (paper: 10,000)
    n_negatives: int = 100  # random non-candidates kept per query for the student
    seed: int = 0
    modules: str = "kv"  # parameters the unlearning step moves: kv | cross_attention | attention | all
    fisher_draws: int = 1  # fixed (t, eps) draws per training image for the EK-FAC fit
    damping_factor: float = 0.1  # lambda = damping_factor x mean corrected eigenvalue, per module
    batch_size: int = 32
