"""Materialize assets from the command line, against the home's persistent Dagster instance.

Each step is a real run recorded in ``HOME/dagster``, so what ``gda demo`` or ``gda ingest`` did shows up
in the UI afterwards (runs, partitions, metadata, check results) exactly as if it had been launched there.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from gda import layout
from gda.corpus.shards import list_shards
from gda.home import Home
from gda.profiles import resolve_profile
from gda_assets.factory import build_defs, build_resources
from gda_assets.partitions import query_batch_partitions, shard_partitions
from resources import DiffusionSource


@dataclass(frozen=True)
class ShardReport:
    shard: str
    accepted: int
    rejected: int
    succeeded: bool


def open_instance(home: Home) -> dg.DagsterInstance:
    """The home's persistent instance (``HOME/dagster``), the same one ``gda ui`` serves, with the runs of
    processes that died mid-run settled."""
    home.ensure()
    instance = dg.DagsterInstance.from_config(str(home.dagster_home))
    settle_dead_runs(instance)
    return instance


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def settle_dead_runs(instance: dg.DagsterInstance) -> None:
    """Mark failed, and free the pool slots of, every run still STARTED whose process is gone (a run in a
    process killed mid-run): otherwise it shows as running forever and holds its ``gpu``/``duckdb`` slot,
    so every later step in that pool waits for it. The process is the one that logged the run's start, on
    this machine (a home is local); a pid taken since by another process leaves the run as it is."""
    for run in instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_START)
        pid = starts[0].dagster_event.pid if starts and starts[0].dagster_event else None
        if pid is None or _alive(pid):
            continue
        instance.report_run_failed(run, message=f"the process running it (pid {pid}) died; settled by gda")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        print(
            f"settled run {run.run_id} ({run.job_name}): its process {pid} died mid-run; marked failed, pool "
            "slots freed",
            file=sys.stderr,
        )


def _row_count(result: dg.ExecuteInProcessResult, asset: str) -> int:
    for event in result.get_asset_materialization_events():
        if event.asset_key == dg.AssetKey(asset):
            return int(event.materialization.metadata["dagster/row_count"].value)
    return 0


def run_shards(
    instance: dg.DagsterInstance, defs: dg.Definitions, job_name: str, shards: list[str]
) -> list[ShardReport]:
    """Register ``shards`` as partitions and run ``job_name`` once per shard; a failed shard does not stop
    the others."""
    instance.add_dynamic_partitions(shard_partitions.name, shards)
    job = defs.resolve_job_def(job_name)
    reports = []
    for shard in shards:
        result = job.execute_in_process(instance=instance, partition_key=shard, raise_on_error=False)
        reports.append(
            ShardReport(
                shard,
                _row_count(result, layout.TRAINING_IMAGES),
                _row_count(result, layout.REJECTED_IMAGES),
                result.success,
            )
        )
    return reports


def ingest(home: Home, shards_dir: Path, profile: str | None = None) -> list[ShardReport]:
    shards_dir = shards_dir.resolve()
    paths = list_shards(shards_dir)
    if not paths:
        raise FileNotFoundError(f"no NNNNN.tar shards in {shards_dir}; point --shards at an img2dataset output folder")
    instance = open_instance(home)
    defs = build_defs(home=home, profile=resolve_profile(profile), shards=shards_dir)
    return run_shards(instance, defs, "ingest_job", [p.stem for p in paths])


def _run(instance: dg.DagsterInstance, defs: dg.Definitions, job_name: str) -> None:
    result = defs.resolve_job_def(job_name).execute_in_process(instance=instance, raise_on_error=False)
    if not result.success:
        raise RuntimeError(f"{job_name} failed; open its run in the UI (gda ui) for the cause")


@dataclass(frozen=True)
class DemoReport:
    shards: list[ShardReport]
    query_batches: dict[str, bool]  # batch -> generated, encoded and its candidates found
    scored_batches: dict[str, bool]  # batch -> AbU+ scores written


def demo(
    home: Home,
    profile: str | None = None,
    shards_dir: Path | None = None,
    retrain: bool = False,
    overrides: dict[str, Any] | None = None,
) -> DemoReport:
    """The whole chain on the embedded default (or a user's shards): corpus, ingest, features, the model,
    the queries, the teacher, the student, the index and its evaluation. ``overrides`` replace resources
    by name (``build_defs``)."""
    profile = resolve_profile(profile)
    instance = open_instance(home)
    shards = shards_dir.resolve() if shards_dir else None
    overrides = dict(overrides or {})
    if retrain:
        diffusion = build_resources(home, profile, shards)["diffusion"]
        overrides["diffusion"] = DiffusionSource(**{**diffusion.model_dump(), "retrain": True})
    defs = build_defs(home=home, profile=profile, shards=shards, overrides=overrides)
    if shards is None:
        _run(instance, defs, "demo_corpus_job")
    paths = list_shards(shards or home.shards)
    if not paths:
        raise FileNotFoundError(f"no NNNNN.tar shards in {shards or home.shards}")
    shard_reports = run_shards(instance, defs, "shard_job", [p.stem for p in paths])
    _run(instance, defs, "model_job")
    batch_keys = sorted(instance.get_dynamic_partitions(query_batch_partitions.name))
    batches = _run_partitions(instance, defs, "query_batch_job", batch_keys)
    teacher_shards = _run_partitions(instance, defs, "teacher_shard_job", [p.stem for p in paths])
    # Baselines come from the training-side pass just made, so they cost a file read per shard.
    baselines = _run_partitions(instance, defs, "baseline_job", [p.stem for p in paths])
    for label, outcome in (("teacher data", teacher_shards), ("baseline losses", baselines)):
        if not all(outcome.values()):
            failed = [k for k, ok in outcome.items() if not ok]
            raise RuntimeError(f"{label} failed for shards {failed}; open their runs in the UI (gda ui)")
    scored = _run_partitions(instance, defs, "teacher_job", [k for k, ok in batches.items() if ok])
    _run(instance, defs, "student_job")
    embedded = _run_partitions(instance, defs, "embedding_job", [p.stem for p in paths])
    if not all(embedded.values()):
        failed = [k for k, ok in embedded.items() if not ok]
        raise RuntimeError(f"training embeddings failed for shards {failed}; open their runs in the UI (gda ui)")
    _run(instance, defs, "index_job")
    _run(instance, defs, "evaluation_job")
    return DemoReport(shards=shard_reports, query_batches=batches, scored_batches=scored)


def counterfactual(
    home: Home, profile: str | None = None, shards_dir: Path | None = None, every_cell: bool = False
) -> dict[str, bool]:
    """The opt-in counterfactual evaluation on a materialized home: every cell (partition) of
    ``counterfactual_eval`` not yet materialized, or all with ``every_cell``; an interrupted run resumes."""
    return _resume(home, profile, shards_dir, "counterfactual_job", layout.COUNTERFACTUAL_EVAL, every_cell, None)


def student_study(
    home: Home,
    profile: str | None = None,
    shards_dir: Path | None = None,
    every_arm: bool = False,
    arms: list[str] | None = None,
) -> dict[str, bool]:
    """The student design study on a materialized home: every arm (partition) of ``student_study`` not yet
    materialized, all of them with ``every_arm``, or only ``arms``; an interrupted study resumes."""
    return _resume(home, profile, shards_dir, "student_study_job", layout.STUDENT_STUDY, every_arm, arms)


def _resume(
    home: Home,
    profile: str | None,
    shards_dir: Path | None,
    job_name: str,
    asset: str,
    every: bool,
    only: list[str] | None,
) -> dict[str, bool]:
    """Run ``job_name`` for each partition of ``asset`` not yet materialized (every one with ``every``),
    limited to ``only`` when given; unknown names in ``only`` are a ValueError listing the valid ones."""
    instance = open_instance(home)
    defs = build_defs(home=home, profile=resolve_profile(profile), shards=shards_dir.resolve() if shards_dir else None)
    keys = defs.resolve_job_def(job_name).partitions_def.get_partition_keys()
    unknown = sorted(set(only or []) - set(keys))
    if unknown:
        raise ValueError(f"no partitions {', '.join(unknown)} of {asset}; they are: {', '.join(keys)}")
    wanted = [key for key in keys if only is None or key in only]
    done = set() if every or only else instance.get_materialized_partitions(dg.AssetKey(asset))
    return _run_partitions(instance, defs, job_name, [key for key in wanted if key not in done])


@dataclass(frozen=True)
class AbsorbedRun:
    partition: str | None  # the shard, or None for an asset over every shard (the index)
    assets: list[str]
    succeeded: bool


def absorb_new_shards(
    home: Home, profile: str | None = None, shards_dir: Path | None = None, max_ticks: int = 10
) -> list[AbsorbedRun]:
    """What the daemon behind ``gda ui`` does when shards arrive, in this process: one tick of the shard
    sensor, then ticks of the assets' automation conditions, running what each tick requests (per shard
    first, then what spans every shard), until a tick requests nothing."""
    instance = open_instance(home)
    defs = build_defs(home=home, profile=resolve_profile(profile), shards=shards_dir.resolve() if shards_dir else None)
    # The conditions react to changes between ticks, so the first tick, before the sensor, is the baseline.
    cursor = dg.evaluate_automation_conditions(defs=defs, instance=instance).cursor
    sensor = defs.resolve_sensor_def("shard_sensor")
    with dg.build_sensor_context(instance=instance, resources={"corpus": defs.resources["corpus"]}) as context:
        for request in sensor(context).dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    runs: list[AbsorbedRun] = []
    for _ in range(max_ticks):
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        cursor = tick.cursor
        if not tick.total_requested:
            return runs
        by_partition: dict[str | None, list[dg.AssetKey]] = {}
        for key in defs.resolve_asset_graph().toposorted_asset_keys:
            for partition in tick.get_requested_partitions(key):
                by_partition.setdefault(partition, []).append(key)
        for partition in sorted(by_partition, key=lambda p: (p is None, p or "")):
            keys = by_partition[partition]
            job = defs.resolve_implicit_job_def_def_for_assets(keys)
            result = job.execute_in_process(
                instance=instance, partition_key=partition, asset_selection=keys, raise_on_error=False
            )
            runs.append(AbsorbedRun(partition, [k.to_user_string() for k in keys], result.success))
            if not result.success:
                return runs
    raise RuntimeError(f"automation still requested runs after {max_ticks} ticks; open the runs in the UI (gda ui)")


def _run_partitions(
    instance: dg.DagsterInstance, defs: dg.Definitions, job_name: str, keys: list[str]
) -> dict[str, bool]:
    job = defs.resolve_job_def(job_name)
    return {
        key: job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False).success for key in keys
    }
