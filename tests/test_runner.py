"""The worker process's setup: where its metrics server listens."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from producer.settings import Settings
from tests.conftest import free_port, poll_until
from worker.runner import serve_metrics

LISTEN = "0A"  # the TCP state in /proc/net/tcp


def listening_address(port: int) -> str | None:
    """The local IPv4 address a socket listening on `port` is bound to, from /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == LISTEN and int(hex_port, 16) == port:
            return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    return None


@pytest.mark.parametrize(
    ("configured", "bound"), [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")], ids=["default", "all"]
)
def test_worker_metrics_listen_on_loopback_unless_a_host_is_set(
    configured: str | None, bound: str
) -> None:
    port = free_port()
    host = {"worker_metrics_host": configured} if configured else {}
    serve_metrics(Settings(worker_metrics_port=port, **host))
    poll_until(lambda: listening_address(port), timeout=10, what="the metrics server")
    assert listening_address(port) == bound
