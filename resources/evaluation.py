"""How the distilled attribution is evaluated against the teacher."""

import dagster as dg


class EvaluationSettings(dg.ConfigurableResource):
    # mAP levels L as fractions of the training set: the paper's 500 / 1,000 / 4,000 of MSCOCO's 118k
    # are 0.4%, 0.85% and 3.4%.
    l_fractions: list[float] = [0.0033, 0.01, 0.033]
    seed: int = 0  # of the random baseline's permutations
    gallery_queries: int = 4
    gallery_top_k: int = 6
