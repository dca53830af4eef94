"""The worker process's setup and end: where its metrics server listens, how soon an idle
worker stops."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest

from producer.settings import Settings
from tests.support.network import free_port
from tests.support.polling import poll_until
from tests.support.services import WorkerProcess
from tests.support.session_redis import redis_url_for_tests
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


# An idle worker used to take 4-6 s to stop: Celery looks at a shutdown request only between
# 2 s broker drains (the embedded broker's folder is polled each second on top), its timer
# thread sleeps 1 s between looks at its stop flag, and the interpreter's teardown of torch
# took another second. Now it takes well under one; no part of the old path fits in this.
IDLE_STOP_S = 3.0


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_an_idle_worker_stops_promptly_on_sigterm(
    broker: str, tmp_path: Path, mobilenet_weights: Path
) -> None:
    env = {
        "BACKDROP_DATABASE_URL": "",
        "BACKDROP_BROKER_URL": redis_url_for_tests() if broker == "redis" else "",
        "BACKDROP_DATA_DIR": str(tmp_path / "data"),
        "BACKDROP_MODEL": "deeplabv3_mobilenet_v3_large",
        "BACKDROP_WEIGHTS": str(mobilenet_weights),
        "BACKDROP_DEVICE": "cpu",
    }
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        try:
            worker.process.wait(timeout=IDLE_STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"an idle worker was still running {IDLE_STOP_S} s after SIGTERM")
        assert worker.process.returncode == 0, worker.log()[-3000:]
        assert "Warm shutdown" in worker.log()
    finally:
        worker.stop()
