"""This test session's own Redis: a redis-server on a free port, started on first use and
stopped when the session ends. Two sessions on one machine (two CI runs on one host) never
see each other's messages, and flushing it can touch nobody else's data."""

from __future__ import annotations

import atexit
import ctypes
import shutil
import signal
import subprocess
import tempfile

import redis

from tests.support.network import free_port
from tests.support.polling import poll_until
from tests.support.required import require_service

_url: str | None = None


def redis_url_for_tests() -> str:
    """The session's Redis, emptied first."""
    url = session_redis_url()
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.flushdb()
        available = True
    except redis.RedisError:
        available = False
    require_service("Redis", available, url)
    return url


def session_redis_url() -> str:
    """The session's Redis, as it is (a child process starts its own)."""
    global _url
    if _url is None:
        _url = _start()
    return _url


def _start() -> str:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    if shutil.which("redis-server") is None:
        return url  # nothing answers there: require_service reports it
    folder = tempfile.mkdtemp(prefix="backdrop-test-redis-")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", folder,
         "--save", "", "--appendonly", "no", "--logfile", f"{folder}/redis.log"],
        preexec_fn=_die_with_parent,
    )  # fmt: skip

    def stop() -> None:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)
    poll_until(
        lambda: server.poll() is not None or _answers(url),
        timeout=20,
        what=f"the session's Redis at {url}",
    )
    return url  # if it exited at start, nothing answers there: require_service reports it


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even killed (atexit
    does not run then), so no server outlives its session."""
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def __getattr__(name: str) -> str:
    # REDIS_TEST_URL resolves on first import of the name, so a session that never needs
    # Redis never starts one.
    if name == "REDIS_TEST_URL":
        return session_redis_url()
    raise AttributeError(name)
