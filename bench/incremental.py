"""``gda bench incremental``: the wall time to absorb one new shard into a materialized home (the shard sensor,
then the automation ticks: that shard's ingest, features, teacher data and embeddings, and the index adding
it) against a full rebuild of the same assets for every shard and a rebuilt index. Goal: at most 1.5/S of
the rebuild for S shards.

Runs on a copy of the home, so the home itself is never changed; the new shard is the embedded corpus
generator's next shard, the same size as the others.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb

from bench import Setting
from gda.attribution_index import INDEX_FILE
from gda.corpus.icons import DemoCorpusSpec, build_demo_corpus
from gda.corpus.shards import list_shards
from gda.home import Home
from gda_assets.factory import build_defs
from gda_assets.runner import absorb_new_shards, open_instance

PER_SHARD = [
    "training_images",
    "rejected_images",
    "image_features",
    "text_features",
    "training_gradients",
    "baseline_losses",
    "training_embeddings",
]


def _next_shard(values: dict[str, Any], shards: int, into: Path) -> str:
    """Write shard number `shards` of the embedded corpus, the size of the first `shards`, into `into`."""
    spec = dict(values["demo_corpus_source"])
    per_shard = spec["n_images"] // spec["n_shards"]
    spec.update(n_images=per_shard * (shards + 1), n_shards=shards + 1)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        build_demo_corpus(folder / "shards", DemoCorpusSpec(**spec), folder / "heldout.parquet")
        key = f"{shards:05d}"
        for suffix in (".tar", ".parquet"):
            shutil.copy(folder / "shards" / f"{key}{suffix}", into)
    return key


def _settle_copied_runs(home: Home) -> None:
    """Runs in flight in the source home have no process in the copy; their pool slots would block every
    run of the benchmark, so the copy marks them failed and frees the slots."""
    import dagster as dg

    instance = open_instance(home)
    for run in instance.get_runs(
        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING])
    ):
        instance.report_run_failed(run)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


def _rebuild_seconds(home: Home, profile: str, shards: list[str]) -> float:
    """Every per-shard asset for every shard, one run per shard, then the index built from nothing."""
    import dagster as dg

    instance = open_instance(home)
    defs = build_defs(home=home, profile=profile)
    keys = [dg.AssetKey(name) for name in PER_SHARD]
    job = defs.resolve_implicit_job_def_def_for_assets(keys)
    started = time.perf_counter()
    for shard in shards:
        result = job.execute_in_process(
            instance=instance, partition_key=shard, asset_selection=keys, raise_on_error=False
        )
        if not result.success:
            raise RuntimeError(f"rebuilding shard {shard} failed; see the run in the copied home {home.root}")
    (home.artifacts / "attribution_index" / INDEX_FILE).unlink()
    index = defs.resolve_implicit_job_def_def_for_assets([dg.AssetKey("attribution_index")])
    if not index.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("attribution_index")]).success:
        raise RuntimeError("rebuilding the index failed")
    return time.perf_counter() - started


def run(setting: Setting) -> dict[str, Any]:
    source = setting.home
    if not (source.artifacts / "attribution_index" / INDEX_FILE).exists():
        raise FileNotFoundError(f"{source.root} has no attribution index; run `gda demo --home {source.root}` first")
    if "demo_corpus_source" not in setting.values:
        raise ValueError(f"profile {setting.profile} has no embedded corpus to draw a new shard from")
    with tempfile.TemporaryDirectory(prefix="gda-bench-incremental-") as scratch:
        home = Home(Path(scratch) / "home")
        shutil.copytree(source.root, home.root, symlinks=True)
        _settle_copied_runs(home)
        existing = len(list_shards(home.shards))
        key = _next_shard(setting.values, existing, home.shards)

        started = time.perf_counter()
        absorbed = absorb_new_shards(home, setting.profile)
        shard_seconds = time.perf_counter() - started
        if [(run.partition, run.succeeded) for run in absorbed] != [(key, True), (None, True)]:
            raise RuntimeError(f"absorbing shard {key} did not run exactly its partitions and the index: {absorbed}")
        with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
            images = con.execute("SELECT count(*) FROM training_images WHERE shard = ?", [key]).fetchone()[0]

        shards = [path.stem for path in list_shards(home.shards)]
        rebuild_seconds = _rebuild_seconds(home, setting.profile, shards)

    n = len(shards)
    ratio = shard_seconds / rebuild_seconds
    return {
        **setting.header("incremental"),
        "shards": n,
        "images_per_shard": images,
        "absorb_one_shard_s": shard_seconds,
        "rebuild_s": rebuild_seconds,
        "ratio_shard_over_rebuild": ratio,
        "goal_ratio": 1.5 / n,
        "runs_for_new_shard": [{"partition": run.partition, "assets": run.assets} for run in absorbed],
        "table": [
            ["shards after the new one (S)", f"{n}", f"{images} images each"],
            ["absorb one new shard (sensor -> index add)", f"{shard_seconds:.1f}", "s"],
            ["full rebuild (every shard's assets + index)", f"{rebuild_seconds:.1f}", "s"],
            ["ratio", f"{ratio:.3f}", f"(goal <= 1.5/S = {1.5 / n:.3f})"],
        ],
    }
