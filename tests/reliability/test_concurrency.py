"""Concurrency on one home, as a deployment runs it: a code server (`dagster api grpc`) and the Dagster daemon
(`dagster-daemon run`) on the home's instance execute a backfill of four shard partitions and one of two query
batches, submitted with `dagster job backfill`, as concurrent runs whose steps each run in a process of their
own (the multiprocess executor). Meanwhile two `gda serve` processes answer queries on the same home. No run
fails, nothing mentions a DuckDB lock, every partition's rows are stored exactly once, and both readers answer
while the writers run, each answer logged once for audit (in DuckDB, or spooled while it was busy)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import duckdb
import httpx
import pytest
from netkit import free_port

from gda.audit import SPOOL_FILE
from gda.corpus.icons import DemoCorpusSpec, build_demo_corpus
from gda.home import Home
from gda.profiles import profile_values
from gda_assets.factory import build_defs
from gda_assets.partitions import query_batch_partitions
from gda_assets.runner import open_instance, run_shards

REPO = Path(__file__).resolve().parents[2]
LOCATION = "gda_assets.definitions"
# The per-shard job that writes DuckDB, one step per run: shard_job's feature steps would add two processes
# per shard that only read it, and each process spends seconds loading the definitions.
SHARD_JOB = "ingest_job"
NEW_SHARDS = ["00002", "00003"]
SHARDS = ["00000", "00001", *NEW_SHARDS]
N_BATCHES = 2
LOCK_ERRORS = ("Could not set lock", "Conflicting lock")
CLI_TIMEOUT_S = 300.0
CODE_SERVER_START_TIMEOUT_S = 300.0
RUNS_TIMEOUT_S = 900.0
SERVE_START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
PACE_S = 1.0  # between rounds of reader requests: the readers' audit inserts take the lock (and CPU) too
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
MULTIPROCESS = re.compile(r"Executing steps using multiprocess executor: parent process \(pid: (\d+)\)")


@dataclass
class Child:
    """A process started by the test, in a session (process group) of its own, with its output in a file."""

    process: subprocess.Popen[bytes]
    output: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])


def _spawn(argv: list[str], env: dict[str, str], output: Path) -> Child:
    # Dagster maps SIGTERM to whatever handles SIGINT, so a SIGINT ignored by this process (a background job of
    # a non-interactive shell) would leave the daemon deaf to both; Python's own handler is inherited at exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with output.open("wb") as log:
            process = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    return Child(process, output)


def _stop(child: Child) -> None:
    """Ctrl-C to the child's process group, then SIGKILL to whatever of the group is left (a code server's run
    workers outlive it)."""
    if child.process.poll() is None:
        os.killpg(child.process.pid, signal.SIGINT)
        try:
            child.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(child.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.process.wait()


def _cli(argv: list[str], env: dict[str, str], output: Path) -> None:
    child = _spawn(argv, env, output)
    try:
        child.process.wait(timeout=CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop(child)
        pytest.fail(f"{' '.join(argv[:3])} did not finish within {CLI_TIMEOUT_S:g} s; its output ends:\n{child.tail()}")
    assert child.process.returncode == 0, (
        f"{' '.join(argv[:3])} exited with {child.process.returncode}:\n{child.tail()}"
    )


@dataclass
class Reader:
    """One `gda serve` process and what it answered."""

    url: str
    child: Child
    ready: bool = False
    statuses: list[int] = field(default_factory=list)  # of every request after it first answered /health
    during_runs: Counter[str] = field(default_factory=Counter)  # path -> 200s to requests spanned by one executing run
    attributions: int = 0  # 200s to /attribute, each of which must be logged once


@dataclass(frozen=True)
class Outcome:
    home: Home
    runs: dict[str, list[dg.RunRecord]]  # job name -> its backfill's runs
    batches: list[str]
    readers: list[Reader]
    dagster_outputs: list[str]  # the code server's (with its run workers') and the daemon's
    started_at: float  # seconds since the epoch, as run records count them


def _add_shards(home: Home, scratch: Path) -> None:
    """The next two shards of the embedded corpus (same size as the first two) dropped into the home."""
    spec = dict(profile_values("tiny")["demo_corpus_source"])
    spec.update(n_images=spec["n_images"] * len(SHARDS) // spec["n_shards"], n_shards=len(SHARDS))
    build_demo_corpus(scratch / "shards", DemoCorpusSpec(**spec), scratch / "heldout.parquet")
    for shard in NEW_SHARDS:
        for suffix in (".tar", ".parquet"):
            shutil.copy(scratch / "shards" / f"{shard}{suffix}", home.shards)


def _executing(instance: dg.DagsterInstance, run_ids: list[str]) -> set[str]:
    return {
        run.run_id for run in instance.get_runs(dg.RunsFilter(run_ids=run_ids, statuses=[dg.DagsterRunStatus.STARTED]))
    }


def _query(reader: Reader, image: bytes, prompt: str, instance: dg.DagsterInstance, run_ids: list[str]) -> None:
    """/health, then one /attribute, once the reader has started."""
    if not reader.ready:
        try:
            reader.ready = httpx.get(f"{reader.url}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return
    requests = {
        "/health": lambda: httpx.get(f"{reader.url}/health", timeout=60),
        "/attribute": lambda: httpx.post(
            f"{reader.url}/attribute",
            files={"image": ("query.png", image, "image/png")},
            data={"prompt": prompt, "top_k": "3"},
            timeout=60,
        ),
    }
    for path, send in requests.items():
        before = _executing(instance, run_ids)
        status = send().status_code
        reader.statuses.append(status)
        if status == 200:
            reader.during_runs[path] += bool(before & _executing(instance, run_ids))
            reader.attributions += path == "/attribute"


def _wait_for_port(child: Child, port: int) -> None:
    """Until `dagster api grpc` listens, which it does once it has loaded the definitions."""
    deadline = time.monotonic() + CODE_SERVER_START_TIMEOUT_S
    while True:
        if child.process.poll() is not None:
            pytest.fail(f"the code server exited with {child.process.returncode}; its output ends:\n{child.tail()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            pytest.fail(
                f"the code server did not listen within {CODE_SERVER_START_TIMEOUT_S:g} s; its output "
                f"ends:\n{child.tail()}"
            )
        time.sleep(1)


def _backfill(child: Child, job: str, deadline: float) -> str:
    """The id of the backfill that `dagster job backfill` submitted."""
    try:
        child.process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"dagster job backfill -j {job} did not finish within {CLI_TIMEOUT_S:g} s:\n{child.tail()}")
    assert child.process.returncode == 0, (
        f"dagster job backfill -j {job} exited with {child.process.returncode}:\n{child.tail()}"
    )
    found = re.search(r"Launched backfill job `(\w+)`", child.output.read_text(errors="replace"))
    assert found, f"dagster job backfill -j {job} named no backfill:\n{child.tail()}"
    return found.group(1)


@pytest.fixture(scope="module")
def outcome(demo_home: Home, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    scratch = tmp_path_factory.mktemp("concurrency")
    home = Home(scratch / "home")
    shutil.copytree(demo_home.root, home.root)
    _add_shards(home, scratch / "extra")
    instance = open_instance(home)
    batches = sorted(instance.get_dynamic_partitions(query_batch_partitions.name))[:N_BATCHES]
    assert len(batches) == N_BATCHES, f"the tiny demo home has query batches {batches}, fewer than {N_BATCHES}"
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        prompt, image_path = con.execute(
            "SELECT prompt, image_path FROM generated_queries ORDER BY query_id LIMIT 1"
        ).fetchone()
    image = (home.artifacts / image_path).read_bytes()

    # GDA_SHARDS would put a user's shards in the graph; a token would close the readers' API to the test.
    env = {key: value for key, value in os.environ.items() if key not in ("GDA_SHARDS", "GDA_API_TOKEN")} | {
        "DAGSTER_HOME": str(home.dagster_home),
        "GDA_HOME": str(home.root),
        "GDA_PROFILE": "tiny",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    bin_dir = Path(sys.executable).parent
    # One code server for the daemon and the CLI, as a deployment runs it: loading the definitions is the
    # costly part of every Dagster process here, and a server the daemon manages itself shuts down when a busy
    # machine delays the daemon's heartbeats.
    code_port = free_port()
    workspace = scratch / "workspace.yaml"
    workspace.write_text(
        f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {code_port}\n      location_name: gda\n"
    )
    children: list[Child] = []
    try:
        code_server = _spawn(
            [str(bin_dir / "dagster"), "api", "grpc", "-m", LOCATION, "-h", "127.0.0.1", "-p", str(code_port)],
            env,
            scratch / "code_server.log",
        )
        children.append(code_server)
        readers = []
        for number in range(2):
            port = free_port()
            argv = [
                sys.executable,
                "-m",
                "gda.cli",
                "serve",
                "--home",
                str(home.root),
                "--profile",
                "tiny",
                "--port",
                str(port),
            ]
            readers.append(Reader(f"http://127.0.0.1:{port}", _spawn(argv, env, scratch / f"serve{number}.log")))
        children += [reader.child for reader in readers]
        # While those start: the new shards are ingested and featurized first, as `gda ingest` would, because
        # each query batch's DINO candidates read every shard's image features.
        reports = run_shards(instance, build_defs(home=home, profile="tiny"), "shard_job", NEW_SHARDS)
        assert all(report.succeeded for report in reports), f"ingesting the new shards failed: {reports}"
        _wait_for_port(code_server, code_port)
        # Only the submitted runs may write: the automation sensor would launch the new shards' teacher data,
        # embeddings and index as well (the shard sensor finds nothing new and stays on).
        _cli(
            [str(bin_dir / "dagster"), "sensor", "stop", "automation", "-w", str(workspace)],
            env,
            scratch / "sensor_stop.log",
        )

        started_at = time.time()
        daemon = _spawn([str(bin_dir / "dagster-daemon"), "run", "-w", str(workspace)], env, scratch / "daemon.log")
        children.append(daemon)
        submitted = {
            job: _spawn(
                [
                    str(bin_dir / "dagster"),
                    "job",
                    "backfill",
                    "-j",
                    job,
                    "--partitions",
                    ",".join(keys),
                    "--noprompt",
                    "-w",
                    str(workspace),
                ],
                env,
                scratch / f"{job}.log",
            )
            for job, keys in ((SHARD_JOB, SHARDS), ("query_batch_job", batches))
        }
        children += submitted.values()
        deadline = time.monotonic() + CLI_TIMEOUT_S
        run_ids = {
            job: [
                run.run_id
                for run in instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": _backfill(child, job, deadline)}))
            ]
            for job, child in submitted.items()
        }
        every_run = [run_id for ids in run_ids.values() for run_id in ids]

        serve_deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        deadline = time.monotonic() + RUNS_TIMEOUT_S
        while True:
            statuses = {run.run_id: run.status for run in instance.get_runs(dg.RunsFilter(run_ids=every_run))}
            if all(status in FINISHED for status in statuses.values()):
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"backfill runs not finished after {RUNS_TIMEOUT_S:g} s: "
                    f"{ {run_id: status.value for run_id, status in statuses.items()} }; the daemon's output "
                    f"ends:\n{daemon.tail()}"
                )
            for reader in readers:
                if reader.child.process.poll() is not None:
                    pytest.fail(
                        f"gda serve at {reader.url} exited with "
                        f"{reader.child.process.returncode}:\n{reader.child.tail()}"
                    )
                _query(reader, image, prompt, instance, every_run)
            if not all(reader.ready for reader in readers) and time.monotonic() > serve_deadline:
                late = [reader.url for reader in readers if not reader.ready]
                pytest.fail(
                    f"gda serve at {late} not answering /health {SERVE_START_TIMEOUT_S:g} s after the runs were "
                    "submitted"
                )
            time.sleep(PACE_S)
        for child in reversed(children):  # the code server last: the daemon talks to it until it stops
            _stop(child)
        runs = {job: instance.get_run_records(dg.RunsFilter(run_ids=ids)) for job, ids in run_ids.items()}
        outputs = [child.output.read_text(errors="replace") for child in (code_server, daemon)]
        yield Outcome(home, runs, batches, readers, outputs, started_at)
    finally:
        for child in reversed(children):
            _stop(child)


def test_every_backfill_run_ran_its_steps_in_child_processes_and_succeeded(outcome: Outcome) -> None:
    instance = open_instance(outcome.home)
    partitions = {
        job: sorted(record.dagster_run.tags["dagster/partition"] for record in records)
        for job, records in outcome.runs.items()
    }
    assert partitions == {SHARD_JOB: SHARDS, "query_batch_job": outcome.batches}
    for records in outcome.runs.values():
        for record in records:
            run = record.dagster_run
            assert run.status == dg.DagsterRunStatus.SUCCESS, (
                f"{run.job_name} {run.tags['dagster/partition']} ended {run.status.value}"
            )
            entries = [r.event_log_entry for r in instance.get_records_for_run(run.run_id).records]
            parents = [int(m.group(1)) for entry in entries if (m := MULTIPROCESS.search(entry.message or ""))]
            assert len(parents) == 1, f"run {run.run_id} did not use the multiprocess executor"
            step_pids = [
                entry.dagster_event.pid
                for entry in entries
                if entry.dagster_event_type == dg.DagsterEventType.STEP_START
            ]
            assert step_pids and parents[0] not in step_pids, (
                f"run {run.run_id} ran a step in its parent process {parents[0]}"
            )
    # Nothing else ran meanwhile (no sensor launched a run), and the runs did overlap in time.
    every_run = {record.dagster_run.run_id for records in outcome.runs.values() for record in records}
    since = {
        run.run_id
        for run in instance.get_runs(dg.RunsFilter(created_after=datetime.fromtimestamp(outcome.started_at, UTC)))
    }
    assert since == every_run
    spans = [(record.start_time, record.end_time) for records in outcome.runs.values() for record in records]
    assert max(sum(start <= moment < end for start, end in spans) for moment, _ in spans) >= 2, (
        f"the runs never overlapped: {spans}"
    )


def test_no_lock_error_in_any_event_or_in_any_processs_output(outcome: Outcome) -> None:
    instance = open_instance(outcome.home)
    for records in outcome.runs.values():
        for record in records:
            for event in instance.get_records_for_run(record.dagster_run.run_id).records:
                text = dg.serialize_value(event.event_log_entry)
                assert not any(error in text for error in LOCK_ERRORS), (
                    f"lock error in run {record.dagster_run.run_id}: {text[:2000]}"
                )
    for text in (
        *outcome.dagster_outputs,
        *(reader.child.output.read_text(errors="replace") for reader in outcome.readers),
    ):
        assert not any(error in text for error in LOCK_ERRORS), text[-4000:]


def test_every_partitions_rows_are_stored_exactly_once(outcome: Outcome) -> None:
    instance = open_instance(outcome.home)
    written: dict[tuple[str, str], int] = {}
    for records in outcome.runs.values():
        for record in records:
            for event in instance.get_records_for_run(
                record.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
            ).records:
                materialization = event.asset_materialization
                if "dagster/row_count" in materialization.metadata:
                    written[(materialization.asset_key.to_user_string(), materialization.partition)] = (
                        materialization.metadata["dagster/row_count"].value
                    )
    with duckdb.connect(str(outcome.home.duckdb_path), read_only=True) as con:
        for shard in SHARDS:
            rows, ids = con.execute(
                "SELECT count(*), count(DISTINCT id) FROM training_images WHERE shard = ?", [shard]
            ).fetchone()
            assert rows == ids == written[("training_images", shard)] > 0, f"shard {shard}: {rows} rows, {ids} ids"
        rows, ids = con.execute("SELECT count(*), count(DISTINCT id) FROM training_images").fetchone()
        assert rows == ids
        for batch in outcome.batches:
            rows, ids = con.execute(
                "SELECT count(*), count(DISTINCT query_id) FROM generated_queries WHERE batch = ?", [batch]
            ).fetchone()
            prompts = con.execute("SELECT count(*) FROM query_prompts WHERE batch = ?", [batch]).fetchone()[0]
            assert rows == ids == prompts == written[("generated_queries", batch)] > 0, (
                f"batch {batch}: {rows} rows, {ids} ids, {prompts} prompts"
            )


def test_both_readers_answered_during_the_writes_and_logged_each_answer_once(outcome: Outcome) -> None:
    for reader in outcome.readers:
        assert set(reader.statuses) == {200}, f"gda serve at {reader.url} answered {reader.statuses}"
        assert reader.during_runs["/health"] and reader.during_runs["/attribute"], (
            f"gda serve at {reader.url} answered while runs executed only {dict(reader.during_runs)}"
        )
    spool = outcome.home.root / SPOOL_FILE
    spooled = sum(1 for line in spool.read_text().splitlines() if line.strip()) if spool.exists() else 0
    with duckdb.connect(str(outcome.home.duckdb_path), read_only=True) as con:
        logged = con.execute(
            "SELECT count(*) FROM attribution_log WHERE interface = 'http' AND logged_at >= ?",
            [datetime.fromtimestamp(outcome.started_at, UTC).replace(tzinfo=None)],
        ).fetchone()[0]
    assert logged + spooled == sum(reader.attributions for reader in outcome.readers)
