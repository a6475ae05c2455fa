"""Every answer `gda serve` returned is in attribution_log exactly once, also after the server is killed with
SIGKILL while clients keep posting: the answer's row was written ahead and fsynced before the response, and
the next process to move the write-ahead file stores it (here the restarted server, then a last move)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import duckdb
from netkit import free_port
from servicekit import ServedHome

from gda.audit import AuditLog
from gda.home import Home

REPO = Path(__file__).resolve().parents[2]
CLIENTS = 6
START_TIMEOUT_S = 120.0
BOUNDARY = "gda-kill-test"


def _body(image: bytes, prompt: str) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + (
            f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n{prompt}'
            f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3\r\n--{BOUNDARY}--\r\n'
        ).encode()
    )


def _serve(home: Home, port: int, output: Path) -> subprocess.Popen[bytes]:
    gda = Path(sys.executable).with_name("gda")
    argv = [str(gda), "serve", "--home", str(home.root), "--profile", "tiny", "--port", str(port)]
    with output.open("ab") as log:
        server = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert server.poll() is None, f"gda serve exited: {output.read_text()[-2000:]}"
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            pass
        assert time.monotonic() < deadline, f"gda serve did not answer within {START_TIMEOUT_S:g} s"
        time.sleep(0.2)


def _post_until_refused(port: int, bodies: list[bytes], first: int, answered: list[str]) -> None:
    """Post one request after another until the server is gone; the log_id of every 200 answer."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    for n in range(first, first + 10_000):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("POST", "/attribute", body=bodies[n % len(bodies)], headers=headers)
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            return  # killed: this request got no answer
        assert response.status == 200, body
        answered.append(json.loads(body)["log_id"])


def _killed_under_load(home: Home, bodies: list[bytes], output: Path, after_s: float) -> list[str]:
    port = free_port()
    server = _serve(home, port, output)
    answered: list[list[str]] = [[] for _ in range(CLIENTS)]
    clients = [
        threading.Thread(target=_post_until_refused, args=(port, bodies, i, answered[i])) for i in range(CLIENTS)
    ]
    for client in clients:
        client.start()
    time.sleep(after_s)
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=30)
    for client in clients:
        client.join(timeout=60)
    return [log_id for ids in answered for log_id in ids]


def _stored(home: Home) -> Counter[str]:
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        return Counter(log_id for (log_id,) in con.execute("SELECT log_id FROM attribution_log").fetchall())


def test_a_server_killed_under_load_has_logged_every_answer_it_returned_once(
    served_home: ServedHome, tmp_path: Path
) -> None:
    home = Home(tmp_path / "home")
    shutil.copytree(served_home.home.root, home.root, symlinks=True)
    bodies = [_body(served_home.images[i], served_home.captions[i]) for i in served_home.ids]
    output = tmp_path / "serve.log"
    AuditLog.for_home(home, "http").move()
    before = _stored(home)

    # Killed twice, at different moments of its mover's one-second cycle; the second server starts on the rows
    # the first one left in the write-ahead file.
    answered = _killed_under_load(home, bodies, output, after_s=2.5)
    answered += _killed_under_load(home, bodies, output, after_s=1.7)
    assert len(answered) > 20, "too few answers before the kill to test anything"
    AuditLog.for_home(home, "http").move()

    stored = _stored(home) - before
    assert {log_id: stored[log_id] for log_id in answered if stored[log_id] != 1} == {}
    # A row can exist for an answer the kill stopped between its fsync and its response, never more than that.
    assert sum(stored.values()) - len(answered) <= 2 * CLIENTS
