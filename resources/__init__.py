"""Dagster resources: typed configuration plus the handles assets use (compute, storage, models, corpus)."""

from resources.arrays import ArrayIOManager
from resources.artifacts import Artifacts
from resources.compute import Compute
from resources.corpus import CorpusSource, DemoCorpusSource
from resources.diffusion import DiffusionSource, QueryPlan
from resources.duckdb_io import TransactionalDuckDBPolarsIOManager
from resources.encoders import Encoders
from resources.evaluation import EvaluationSettings
from resources.parquet_io import ParquetIOManager
from resources.store import home_store
from resources.student import IndexSettings, StudentSettings, StudySettings
from resources.teacher import TeacherSettings
from resources.warehouse import Warehouse

__all__ = [
    "ArrayIOManager",
    "Artifacts",
    "Compute",
    "CorpusSource",
    "DemoCorpusSource",
    "DiffusionSource",
    "Encoders",
    "EvaluationSettings",
    "IndexSettings",
    "ParquetIOManager",
    "QueryPlan",
    "StudentSettings",
    "StudySettings",
    "TeacherSettings",
    "TransactionalDuckDBPolarsIOManager",
    "Warehouse",
    "home_store",
]
