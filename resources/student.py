"""How the teacher is distilled into the embedder, and how its embeddings are indexed for search."""

from typing import TYPE_CHECKING, Literal

import dagster as dg
from pydantic import Field

if TYPE_CHECKING:  # gda.student imports torch, which loading the definitions must not
    from gda.student import StudentConfig


class StudentSettings(dg.ConfigurableResource):
    # Hidden widths, then the output width (paper: 768, 768, 768, 768 on 1280-d DINO + CLIP features).
    widths: list[int] = [768, 768, 768, 768]
    dropout: float = 0.1
    # L2-normalise the image and text parts before concatenation (the paper concatenates raw, where the
    # larger image part dominated in a prototype).
    normalise_parts: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = Field(default=4096, ge=1)
    epochs: int = Field(default=10, ge=1)
    seed: int = 0
    # Positions of each train query's teacher ranking the student learns from (label rank / top_k); with
    # whole-set rankings (first-order teacher) these are the teacher's top-K over every training image.
    top_k: int = Field(default=300, ge=1)
    p_negative: float = Field(default=0.1, ge=0.0, lt=1.0)  # pairs replaced by a random non-candidate, label 1
    per_query: int | None = Field(default=None, ge=1)  # candidates kept per training query (None: all of them)
    val_fraction_l: float = 0.01  # validation mAP positives: this fraction of the training set
    # bce (the paper's), mse or pairwise (gda.embedder.LOSSES); the student study compares them.
    loss: Literal["bce", "mse", "pairwise"] = "bce"
    keep_best_epoch: bool = False  # keep the epoch with the best validation mAP instead of the last

    def config(self) -> "StudentConfig":
        from gda.student import StudentConfig

        return StudentConfig(**{**self.model_dump(), "widths": tuple(self.widths)})


class StudySettings(dg.ConfigurableResource):
    """The student design study (gda.study_arms): its arms come from the query plan and the student settings."""

    # Students trained per arm, so that every effect shows next to its seed noise.
    seeds: list[int] = Field(default=[0, 1], min_length=2)


class IndexSettings(dg.ConfigurableResource):
    """How the attribution index is built (gda.index.SearchSettings; sizes measured by `gda bench index-scale`)."""

    ivf_above: int = Field(
        default=200_000, ge=0
    )  # training images beyond which an IVF index replaces the exact flat one
    pq_above: int = Field(default=20_000_000, ge=0)  # ... and beyond which its lists hold PQ codes, not raw vectors
    nlist: int = Field(default=1024, ge=1)
    nprobe: int = Field(default=32, ge=1)
    pq_bytes: int = Field(default=64, ge=1)  # bytes per PQ code; must divide the embedding width
    train_rows: int = Field(default=262_144, ge=1)
    # IVF-PQ only: 8-bit (sq8) or float16 copies of the vectors re-rank a shortlist of k x refine_factor
    # PQ hits; the index is then saved in parts the service maps from disk (gda.index_files).
    refine: Literal["none", "sq8", "fp16"] = "sq8"
    refine_factor: int = Field(default=32, ge=1)
    hnsw_lists: int = Field(default=8192, ge=1)  # lists beyond which the coarse quantiser is an HNSW graph

    def search_settings(self):  # -> gda.index.SearchSettings (faiss is imported only where the index is built)
        from gda.index import SearchSettings

        return SearchSettings(**self.model_dump())
