"""The Dagster UI over the materialized tiny demo home, as `gda ui` serves it: `dagster dev` (webserver and
daemon) on a loopback port. A materialization launched over GraphQL, as the UI's Materialize button does, is
dequeued by the daemon and succeeds; headless Chromium shows every asset of the definitions on the global
lineage graph, and rank_eval's PNG galleries on its asset page. Both screenshots are kept (see conftest.py).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient
from netkit import free_port
from playwright.sync_api import Browser, Locator, Page, expect

from gda.home import Home
from gda_assets.factory import build_defs

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
PAGE_TIMEOUT_MS = 60_000  # for the page's actions and for each expectation on it
# Dagster fits the global lineage to its pane's width and draws whole asset nodes, names uncut, only from
# zoom 0.6 (MINIMAL_SCALE in its asset graph): the window is sized so that the whole graph fits at this zoom.
READABLE_ZOOM = 0.65
HEADER_PX = 120  # room for the page header above the graph's pane
# Cheap and deterministic (the losses are taken from the shard's training_gradients file), and nothing
# downstream of it has an automation condition: the daemon's automation sensor launches nothing after it,
# and the rows and files the e2e tests assert on stay as they were.
ASSET, PARTITION = "baseline_losses", "00000"
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}

# dagster_graphql's client still passes variables to gql 4 the deprecated way.
pytestmark = pytest.mark.filterwarnings("ignore:Using variable_values and operation_name:DeprecationWarning")

WORKSPACE = """{ workspaceOrError { __typename
  ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } } } }
  ... on PythonError { message } } }"""
ASSET_NODES = "{ assetNodes { assetKey { path } } }"
RUN_EVENTS = """query ($runId: ID!) { runOrError(runId: $runId) { ... on Run { eventConnection { events {
  __typename ... on MessageEvent { level message } ... on ErrorEvent { error { message } } } } } } }"""
RUNS_SINCE = """query ($since: Float!) { runsOrError(filter: {createdAfter: $since}) {
  ... on Runs { results { runId status } } } }"""


@dataclass(frozen=True)
class DagsterUI:
    url: str
    started_at: float  # seconds since the epoch, as run records count them
    client: DagsterGraphQLClient
    output: Path  # dagster dev's stdout and stderr

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, f"GraphQL errors: {body['errors']}"
        return body["data"]

    def output_tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def dagster_ui(demo_home: Home, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterUI]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    output = tmp_path_factory.mktemp("dagster_dev") / "output.log"
    ui = DagsterUI(url, time.time(), DagsterGraphQLClient("127.0.0.1", port_number=port), output)
    argv = [
        sys.executable,
        "-m",
        "gda.cli",
        "ui",
        "--home",
        str(demo_home.root),
        "--profile",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    # GDA_SHARDS would put a user's shards in the graph; the offline variables are set here because the
    # autouse _offline fixture is per test, not yet in force while a module fixture starts.
    env = {key: value for key, value in os.environ.items() if key != "GDA_SHARDS"} | {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    # dagster dev maps SIGTERM to whatever handles SIGINT, so a SIGINT ignored by this process (as in a background
    # job of a non-interactive shell) would leave it deaf to both; Python's own handler becomes the default at exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ui.output.open("wb") as log:
            process = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        _wait_until_loaded(ui, process)
        yield ui
    finally:
        _stop(ui, process)


def _wait_until_loaded(ui: DagsterUI, process: subprocess.Popen[bytes]) -> None:
    """Until the webserver answers GraphQL and its code location has loaded (or failed to)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"gda ui exited with {process.returncode} before serving; its output ends:\n{ui.output_tail()}")
        try:
            workspace = ui.graphql(WORKSPACE)["workspaceOrError"]
        except httpx.TransportError:
            workspace = {"locationEntries": []}
        entries = workspace.get("locationEntries", [])
        if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
            errors = [
                entry["locationOrLoadError"]
                for entry in entries
                if entry["locationOrLoadError"]["__typename"] == "PythonError"
            ]
            assert not errors, f"the code location failed to load: {errors}"
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"gda ui did not serve a loaded code location at {ui.url} within {START_TIMEOUT_S:g} s "
                f"(workspace: {workspace}); its output ends:\n{ui.output_tail()}"
            )
        time.sleep(1)


def _stop(ui: DagsterUI, process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as in the terminal `gda ui` runs in: SIGINT to its whole process group."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(
            f"gda ui did not stop within {STOP_TIMEOUT_S:g} s of SIGINT and was killed; its output "
            f"ends:\n{ui.output_tail()}"
        )
    assert process.returncode == 0, (
        f"gda ui exited with {process.returncode} on SIGINT; its output ends:\n{ui.output_tail()}"
    )


def _wait_for_run(ui: DagsterUI, run_id: str) -> DagsterRunStatus:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (status := ui.client.get_run_status(run_id)) not in FINISHED:
        if time.monotonic() > deadline:
            # A run the daemon never dequeues stays QUEUED: the instance's run coordinator queues every run.
            pytest.fail(
                f"run {run_id} still {status.value} after {RUN_TIMEOUT_S:g} s; gda ui's output "
                f"ends:\n{ui.output_tail()}"
            )
        time.sleep(2)
    return status


def _run_errors(ui: DagsterUI, run_id: str) -> str:
    events = ui.graphql(RUN_EVENTS, {"runId": run_id})["runOrError"]["eventConnection"]["events"]
    return "\n".join(
        f"{event['__typename']}: {event.get('message', '')} {(event.get('error') or {}).get('message', '')}"
        for event in events
        if event.get("level") in ("ERROR", "CRITICAL") or event.get("error")
    )


def _show_the_whole_lineage(page: Page, url: str) -> Locator:
    """The global lineage with every group expanded, in a window where all of it fits readably; the graph."""
    page.goto(f"{url}/asset-groups")
    graph = page.locator("svg:has(foreignObject)")
    expect(graph).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    # Groups start collapsed; the graph's settings menu lists this shortcut as "Expand all groups".
    page.keyboard.press("Alt+KeyE")
    expect(graph.get_by_text("rank_eval", exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    width, height = float(graph.get_attribute("width")), float(graph.get_attribute("height"))
    pane_left = page.viewport_size["width"] - graph.bounding_box()["width"]
    page.set_viewport_size(
        {"width": math.ceil(width * READABLE_ZOOM + pane_left), "height": math.ceil(height * READABLE_ZOOM) + HEADER_PX}
    )
    # The graph is fitted on load only; the expanded groups are remembered across it.
    page.reload()
    return graph


def _open_gallery(page: Page, url: str) -> Locator:
    """rank_eval's asset page with the latest materialization's gallery opened, as its [Show Markdown] does."""
    page.goto(f"{url}/assets/rank_eval")
    row = page.locator("tr").filter(has=page.get_by_text("gallery", exact=True))
    expect(row).to_have_count(1, timeout=PAGE_TIMEOUT_MS)
    row.get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    return dialog


def test_the_dagster_ui_runs_a_materialization_and_shows_the_lineage_and_galleries_in_the_browser(
    dagster_ui: DagsterUI, demo_home: Home, browser: Browser, screenshot: Callable[[Page, str], Path]
) -> None:
    # The asset job the UI's Materialize button launches; the client finds its code location in the workspace.
    run_id = dagster_ui.client.submit_job_execution(
        "__ASSET_JOB", asset_selection=[ASSET], tags={"dagster/partition": PARTITION}
    )
    status = _wait_for_run(dagster_ui, run_id)
    assert status == DagsterRunStatus.SUCCESS, (
        f"run {run_id} of {ASSET}[{PARTITION}] ended {status.value}:\n{_run_errors(dagster_ui, run_id)}"
    )

    expected = {key.to_user_string() for key in build_defs(home=demo_home, profile="tiny").resolve_all_asset_keys()}
    served = {"/".join(node["assetKey"]["path"]) for node in dagster_ui.graphql(ASSET_NODES)["assetNodes"]}
    assert served == expected

    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    graph = _show_the_whole_lineage(page, dagster_ui.url)
    for name in sorted(expected):
        expect(graph.get_by_text(name, exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    # Each node's status (latest event, partitions) arrives after its name.
    expect(graph.get_by_text("Loading...", exact=True)).to_have_count(0, timeout=PAGE_TIMEOUT_MS)
    screenshot(page, "dagster_asset_lineage.png")

    page.set_viewport_size({"width": 1600, "height": 1000})
    gallery = _open_gallery(page, dagster_ui.url)
    expect(gallery.get_by_text("gallery", exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(gallery.locator("img[src^='data:image/png']").first).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    page.wait_for_function(
        "[...document.querySelectorAll('[role=dialog] img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    screenshot(page, "dagster_rank_eval_gallery.png")
    page.close()

    # The e2e tests find every recorded run succeeded: the daemon must not have started one of its own meanwhile.
    runs = dagster_ui.graphql(RUNS_SINCE, {"since": dagster_ui.started_at})["runsOrError"]["results"]
    assert runs == [{"runId": run_id, "status": "SUCCESS"}], f"runs started while the UI was up: {runs}"
