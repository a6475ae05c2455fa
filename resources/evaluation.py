"""How the distilled attribution is evaluated against the teacher."""

from typing import TYPE_CHECKING, Annotated

import dagster as dg
from pydantic import Field

if TYPE_CHECKING:
    from gda.evaluation import EvaluationConfig


class EvaluationSettings(dg.ConfigurableResource):
    # mAP levels L as fractions of the training set: the paper's 500 / 1,000 / 4,000 of MSCOCO's 118k
    # are 0.4%, 0.85% and 3.4%.
    l_fractions: list[float] = [0.0033, 0.01, 0.033]
    seed: int = 0  # of the random baseline's permutations
    gallery_queries: int = 4
    gallery_top_k: int = Field(default=6, ge=1)
    # Counterfactual leave-k-out: one partition per method x k x group of test queries, each retraining the
    # model once per query of its group. These fix the partition keys, so they are read when the
    # definitions load.
    counterfactual_methods: list[str] = ["random", "concat_raw", "distilled", "teacher"]
    counterfactual_k: list[Annotated[int, Field(ge=1)]] = [100]
    counterfactual_queries: int = Field(default=4, ge=1)  # the first n test queries by id
    counterfactual_group_size: int = Field(default=1, ge=1)
    loss_draws: int = Field(default=256, ge=1)  # fixed draws of the query loss before and after removal
    # Not the teacher's seed (1): delta L must not be measured on the draws the teacher unlearned.
    loss_seed: int = 2

    def config(self) -> "EvaluationConfig":
        from gda.evaluation import EvaluationConfig  # imports torch, which loading the definitions must not

        return EvaluationConfig(**self.model_dump())
