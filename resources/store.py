"""The gda.store.Store that gda's home-level functions read, built from the resources that configure it."""

from pathlib import Path

from gda.store import Store
from resources.artifacts import Artifacts
from resources.corpus import CorpusSource
from resources.warehouse import Warehouse


def home_store(artifacts: Artifacts, warehouse: Warehouse, corpus: CorpusSource) -> Store:
    return Store(artifacts=Path(artifacts.root), tables=warehouse, shard_path=corpus.shard_path)
