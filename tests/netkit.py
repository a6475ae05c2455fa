"""Loopback ports for servers the tests start as subprocesses (`dagster dev`, `dagster api grpc`, `gda serve`)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port free when probed: these servers take a port number, not a bound socket, so another
    process could take it in between; on a test machine that has not happened."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
