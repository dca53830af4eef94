"""Real servers the reliability tests own: started on their own ports and data folders,
stopped and restarted by their process ids (never the shared servers at :5432 and :6379).

- RedisServer: redis-server with its append-only file on, as the compose file runs it.
- PostgresServer: a PostgreSQL 15 cluster of its own, run as the `postgres` user.
- WorkerProcess: a real `backdrop worker` (Celery) subprocess that can be SIGKILLed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tests.conftest import free_port, poll_until

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _wait_for_exit(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class RedisServer:
    """A dedicated redis-server with `appendonly yes`: a restart keeps every queued message."""

    def __init__(self, folder: Path, *, password: str | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "redis.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--appendonly", "yes",
            # Every write on disk before the reply: a restart may not lose an acknowledged one.
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(argv)
        poll_until(lambda: self._pings(), timeout=20, what=f"redis-server on :{self.port}")

    def _pings(self) -> bool:
        import redis

        assert self.process is not None and self.process.poll() is None, "redis-server exited"
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """SIGTERM by pid: Redis flushes its append-only file and exits."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            _wait_for_exit(self.process)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class PostgresServer:
    """A PostgreSQL cluster of its own (initdb, postgres) run as the `postgres` user."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: its parents are private to root, and postgres must
        # own (and reach) its data folder.
        self.folder = Path(tempfile.mkdtemp(prefix="backdrop-pg-"))
        shutil.chown(self.folder, "postgres", "postgres")
        self.data = self.folder / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder / "postgres.log"
        self._as_postgres(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"]
        )

    def _as_postgres(self, argv: list[str]) -> None:
        subprocess.run(
            argv, user="postgres", group="postgres", check=True, capture_output=True, cwd="/"
        )

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        auth = f"postgres:{password}" if password else "postgres"
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        argv = [
            str(PG_BIN / "postgres"),
            "-D", str(self.data),
            "-p", str(self.port),
            "-k", str(self.folder),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "fsync=off",
            "-c", "max_connections=200",
        ]  # fmt: skip
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.process = subprocess.Popen(
                argv, user="postgres", group="postgres", stdout=log, stderr=log, cwd="/"
            )
        finally:
            os.close(log)
        poll_until(self._ready, timeout=30, what=f"PostgreSQL on :{self.port}")

    def _ready(self) -> bool:
        import psycopg

        assert self.process is not None and self.process.poll() is None, self.log_path.read_text()
        try:
            psycopg.connect(
                f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", connect_timeout=1
            ).close()
        except psycopg.OperationalError:
            return False
        return True

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """SIGINT to the postmaster by pid: PostgreSQL's fast shutdown (drops clients)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)
            _wait_for_exit(self.process)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class WorkerProcess:
    """A real `backdrop worker` subprocess; its Celery process id is also its job owner id."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, concurrency: int = 4) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.concurrency = concurrency
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def name(self) -> str:
        """What jobs.start records in `worker` (worker.tasks.worker_name)."""
        return f"{socket.gethostname()}:{self.pid}"

    def start(self) -> WorkerProcess:
        with self.log_path.open("a") as log_file:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "producer.cli",
                    "worker",
                    "--concurrency",
                    str(self.concurrency),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        poll_until(
            lambda: (
                self.process is None or self.process.poll() is not None or " ready." in self.log()
            ),
            timeout=timeout,
            what="the worker to start",
        )
        assert self.alive, f"worker exited at start:\n{self.log()[-3000:]}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no cleanup, no acks, no lease release — a crash."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.alive:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGTERM)
            _wait_for_exit(self.process, timeout=60)


def accepts_connections(port: int) -> bool:
    return _accepts(port)
