"""``gda bench load``: the HTTP API under concurrent load on loopback, bounded in time: `gda serve`'s app in
uvicorn on a free 127.0.0.1 port, and 8 then 32 client threads each posting the home's generated test queries
(image and prompt) to /attribute for 30 s, one request at a time. Reports, per round, throughput, latency
percentiles as the clients saw them, every error (a non-2xx answer or a failed request), the micro-batch
sizes the answers report, and how many answers are in the audit log exactly once (by their log_id).

The server runs in this process, in a thread, as the browser tests run it; its answers are audited as
`gda serve` audits them, but into a scratch database, so the home's audit log holds only real answers. The
clients use the standard library's http.client (one keep-alive connection each), so the benchmark needs
nothing beyond the package's own dependencies.
"""

from __future__ import annotations

import http.client
import json
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import duckdb
import numpy as np
import uvicorn
from fastapi import FastAPI

from bench import Setting

ROUNDS = (8, 32)  # clients in each round, one round after the other
SECONDS = 30.0
TOP_K = 10
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0  # a request waits for the micro-batches queued before it
BOUNDARY = "gda-load-benchmark-boundary"


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` under uvicorn on a free loopback port, in a background thread; yields its base URL."""
    # A socket bound here, handed to uvicorn, cannot lose its free port to another process in between.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    host, port = listener.getsockname()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start on {host}:{port} within {START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_S)
        listener.close()


@dataclass
class _Client:
    """What one client thread saw."""

    latencies_ms: list[float] = field(default_factory=list)  # of every answered request, 2xx or not
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # requests that got no answer, by exception type
    log_ids: list[str] = field(default_factory=list)  # of every 2xx answer
    batch_sizes: list[int] = field(default_factory=list)


def _form(image: bytes, prompt: str, top_k: int) -> bytes:
    """The multipart/form-data body of an /attribute request (parts separated by BOUNDARY)."""
    head = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="image"; filename="query.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    fields = "".join(
        f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}'
        for name, value in (("prompt", prompt), ("top_k", top_k))
    )
    return head.encode() + image + f"{fields}\r\n--{BOUNDARY}--\r\n".encode()


def _client(base_url: str, bodies: list[bytes], first: int, stop_at: float, seen: _Client) -> None:
    """Posts the request bodies round robin from `first` until `stop_at` (perf_counter), one at a time."""
    address = urlsplit(base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=REQUEST_TIMEOUT_S)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    sent = first
    try:
        while time.perf_counter() < stop_at:
            body = bodies[sent % len(bodies)]
            sent += 1
            started = time.perf_counter()
            try:
                connection.request("POST", "/attribute", body=body, headers=headers)
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as error:
                seen.failures[type(error).__name__] += 1
                connection.close()  # the next request connects afresh
                continue
            seen.latencies_ms.append((time.perf_counter() - started) * 1000)
            seen.statuses[response.status] += 1
            if 200 <= response.status < 300:
                answer = json.loads(body)
                seen.log_ids.append(answer["log_id"])
                seen.batch_sizes.append(answer["batch_size"])
    finally:
        connection.close()


def _round(base_url: str, bodies: list[bytes], clients: int, seconds: float) -> tuple[list[_Client], float]:
    """`clients` threads posting for `seconds`; what each saw, and the elapsed time."""
    seen = [_Client() for _ in range(clients)]
    stop_at = time.perf_counter() + seconds
    threads = [
        threading.Thread(target=_client, args=(base_url, bodies, i, stop_at, seen[i]), name=f"load-client-{i}")
        for i in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seen, time.perf_counter() - started


def _summary(seen: list[_Client], clients: int, seconds: float, elapsed_s: float, logged: Counter[str]) -> dict:
    latencies = [ms for client in seen for ms in client.latencies_ms]
    statuses = sum((client.statuses for client in seen), Counter())
    failures = sum((client.failures for client in seen), Counter())
    errors = sum(n for status, n in statuses.items() if not 200 <= status < 300) + sum(failures.values())
    answered_ids = [log_id for client in seen for log_id in client.log_ids]
    return {
        "clients": clients,
        "seconds": seconds,
        "elapsed_s": elapsed_s,
        "requests": len(latencies) + sum(failures.values()),
        "answered": len(latencies),
        "throughput_per_s": len(latencies) / elapsed_s,
        **{f"p{p}_ms": float(np.percentile(latencies, p)) if latencies else None for p in (50, 95, 99)},
        "errors": errors,
        "statuses": {str(status): n for status, n in sorted(statuses.items())},
        "failures": dict(failures),
        "mean_batch_size": float(np.mean([b for client in seen for b in client.batch_sizes] or [0])),
        # Every 2xx answer's log_id in attribution_log exactly once.
        "answers_logged_once": sum(logged[log_id] == 1 for log_id in answered_ids),
        "answers_not_logged_once": sum(logged[log_id] != 1 for log_id in answered_ids),
    }


def run(setting: Setting, rounds: tuple[int, ...] = ROUNDS, seconds: float = SECONDS) -> dict[str, Any]:
    from gda.api import create_app
    from gda.audit import AuditLog
    from gda.service import open_engine

    home = setting.home
    with tempfile.TemporaryDirectory() as scratch:
        audit = AuditLog(Path(scratch) / "audit.duckdb", Path(scratch) / "spool.jsonl", "http")
        with open_engine(home, setting.profile, audit=audit) as engine:
            if not engine.test_queries:
                raise FileNotFoundError(
                    f"{home.root} has no generated test queries; run `gda demo --home {home.root}` first"
                )
            top_k = min(TOP_K, engine.max_top_k)
            bodies = [_form(engine.query_image(q.query_id), q.prompt, top_k) for q in engine.test_queries.values()]
            with serving(create_app(engine)) as base_url:
                outcomes = [(clients, *_round(base_url, bodies, clients, seconds)) for clients in rounds]
            training_images = engine.index.manifest.count
            batching = engine.batching
        # The engine is closed: its audit mover has moved every row it wrote.
        with duckdb.connect(str(audit.database), read_only=True) as con:
            logged = Counter(log_id for (log_id,) in con.execute("SELECT log_id FROM attribution_log").fetchall())
    by_clients = [_summary(seen, clients, seconds, elapsed, logged) for clients, seen, elapsed in outcomes]
    result: dict[str, Any] = {
        **setting.header("load"),
        "top_k": top_k,
        "training_images": training_images,
        "test_queries": len(bodies),
        "batch_max_size": batching.max_size,
        "batch_max_wait_s": batching.max_wait_s,
        "rounds": by_clients,
    }

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    result["table"] = [
        [
            "setting",
            f"{seconds:g} s per round",
            f"POST /attribute on loopback, top_k {top_k}, {setting.threads} torch thread(s)",
        ]
    ]
    for one in by_clients:
        name = f"{one['clients']} clients"
        result["table"] += [
            [f"{name}: throughput", f"{one['throughput_per_s']:.1f}", f"requests/s ({one['answered']} answered)"],
            [f"{name}: latency p50 / p95", f"{ms(one['p50_ms'])} / {ms(one['p95_ms'])}", "ms"],
            [
                f"{name}: mean batch",
                f"{one['mean_batch_size']:.1f}",
                f"requests per micro-batch (max {batching.max_size})",
            ],
            [f"{name}: errors", str(one["errors"]), "non-2xx answers + requests without an answer"],
            [
                f"{name}: logged once",
                f"{one['answers_logged_once']} of {one['answered']}",
                "answers in attribution_log",
            ],
        ]
    return result
