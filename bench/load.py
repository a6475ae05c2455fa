"""``gda bench load``: the HTTP API under concurrent load on loopback, bounded in time: `gda serve`'s app in
uvicorn on a free 127.0.0.1 port, and 8 client threads each posting the home's generated test queries (image
and prompt) to /attribute for 30 s, one request at a time. Reports throughput, latency percentiles as the
clients saw them, and every error (a non-2xx answer or a failed request).

The server runs in this process, in a thread, as the browser tests run it; its answers are audited as
`gda serve` audits them, but into a scratch database, so the home's audit log holds only real answers. The
clients use the standard library's http.client (one keep-alive connection each), so the benchmark needs
nothing beyond the package's own dependencies.
"""

from __future__ import annotations

import http.client
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

import numpy as np
import uvicorn
from fastapi import FastAPI

from bench import Setting

CLIENTS = 8
SECONDS = 30.0
TOP_K = 10
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0  # a request waits for every one queued before it on the engine's compute lock
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
                response.read()
            except (OSError, http.client.HTTPException) as error:
                seen.failures[type(error).__name__] += 1
                connection.close()  # the next request connects afresh
                continue
            seen.latencies_ms.append((time.perf_counter() - started) * 1000)
            seen.statuses[response.status] += 1
    finally:
        connection.close()


def run(setting: Setting, clients: int = CLIENTS, seconds: float = SECONDS) -> dict[str, Any]:
    from gda.api import create_app
    from gda.audit import AuditLog
    from gda.service import open_engine

    home = setting.home
    with open_engine(home, setting.profile) as engine, tempfile.TemporaryDirectory() as scratch:
        engine.audit = AuditLog(Path(scratch) / "audit.duckdb", Path(scratch) / "spool.jsonl", "http")
        if not engine.test_queries:
            raise FileNotFoundError(
                f"{home.root} has no generated test queries; run `gda demo --home {home.root}` first"
            )
        top_k = min(TOP_K, engine.max_top_k)
        bodies = [_form(engine.query_image(q.query_id), q.prompt, top_k) for q in engine.test_queries.values()]
        seen = [_Client() for _ in range(clients)]
        with serving(create_app(engine)) as base_url:
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
            elapsed_s = time.perf_counter() - started
        training_images = engine.index.manifest.count

    latencies = [ms for client in seen for ms in client.latencies_ms]
    statuses = sum((client.statuses for client in seen), Counter())
    failures = sum((client.failures for client in seen), Counter())
    errors = sum(n for status, n in statuses.items() if not 200 <= status < 300) + sum(failures.values())
    percentiles = {f"p{p}_ms": float(np.percentile(latencies, p)) if latencies else None for p in (50, 95, 99)}
    result: dict[str, Any] = {
        **setting.header("load"),
        "clients": clients,
        "seconds": seconds,
        "elapsed_s": elapsed_s,
        "top_k": top_k,
        "training_images": training_images,
        "test_queries": len(bodies),
        "requests": len(latencies) + sum(failures.values()),
        "answered": len(latencies),
        "throughput_per_s": len(latencies) / elapsed_s,
        **percentiles,
        "errors": errors,
        "statuses": {str(status): n for status, n in sorted(statuses.items())},
        "failures": dict(failures),
    }

    def ms(key: str) -> str:
        return "-" if result[key] is None else f"{result[key]:.1f}"

    result["table"] = [
        [
            "clients x seconds",
            f"{clients} x {seconds:g}",
            f"POST /attribute on loopback, top_k {top_k}, {setting.threads} torch thread(s)",
        ],
        ["requests", str(result["requests"]), f"({result['answered']} answered)"],
        ["throughput", f"{result['throughput_per_s']:.2f}", "requests/s"],
        ["latency p50", ms("p50_ms"), "ms"],
        ["latency p95", ms("p95_ms"), "ms"],
        ["latency p99", ms("p99_ms"), "ms"],
        ["errors", str(errors), "non-2xx answers + requests without an answer"],
    ]
    return result
