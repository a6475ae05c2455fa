"""How the AbU+ teacher collects attributions: candidate counts, negatives, draws and the step size."""

import dagster as dg


class TeacherSettings(dg.ConfigurableResource):
    k_candidates: int = 300  # DINO nearest neighbours scored per query (paper: 10,000)
    n_negatives: int = 100  # random non-candidates kept per query for the student
    seed: int = 0
