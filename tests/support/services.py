"""Real servers the reliability tests own: started on their own ports and data folders,
stopped and restarted by their process ids (never the shared servers at :5432 and :6379).

- RedisServer: redis-server with its append-only file on and fsynced every second, as the
  compose file runs it; stopped cleanly (SIGTERM) or crashed (SIGKILL, and the writes of the
  last second dropped, as a host crash would).
- PostgresServer: a PostgreSQL 15 cluster of its own with fsync on, run as the `postgres`
  user; stopped cleanly (fast shutdown) or crashed (SIGKILL to the postmaster: crash recovery
  at the next start).
- MotoServer: moto's S3 server as a real HTTP endpoint on loopback (dummy credentials).
- WorkerProcess: a real `backdrop worker` (Celery) subprocess, the one way tests and bench
  scripts start a worker: stopped warm (SIGTERM) or crashed (SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.support.network import answers_http, free_port
from tests.support.polling import poll_until

# Dummy credentials: moto accepts any, and a real profile on the machine must never be used.
S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _wait_for_exit(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class RedisServer:
    """A dedicated redis-server with `appendonly yes` and `appendfsync everysec`, as deployed:
    a clean restart keeps every queued message, a crash may lose the last second of writes.
    `persistent=False`: no append-only file (a scratch broker for a test session)."""

    def __init__(
        self, folder: Path, *, password: str | None = None, persistent: bool = True
    ) -> None:
        self.folder = folder
        self.port = free_port()
        self.password = password
        self.persistent = persistent
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
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", "everysec",
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

    def append_only_size(self) -> int:
        """Bytes in the append-only file's live increment (what a crash may cut back to)."""
        return self._increment().stat().st_size

    def crash(self, *, keep_bytes: int | None = None) -> None:
        """SIGKILL by pid, then cut the append-only increment back to `keep_bytes`.

        A killed process leaves its writes in the page cache, where they survive; a host
        crash loses what was not yet fsynced, up to a second with `everysec`. Cutting the
        file back to a size it had a moment before the kill plays that loss: messages
        published and taken in that moment are gone, or come back."""
        assert self.process is not None and self.process.poll() is None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None
        if keep_bytes is not None:
            with self._increment().open("r+b") as increment:
                increment.truncate(keep_bytes)

    def _increment(self) -> Path:
        folder = self.folder / "appendonlydir"
        manifest = (folder / "appendonly.aof.manifest").read_text().splitlines()
        increments = [line.split()[1] for line in manifest if line.split()[-1] == "i"]
        return folder / increments[-1]


class PostgresServer:
    """A PostgreSQL cluster of its own (initdb, postgres) run as the `postgres` user, with
    fsync on (the default): a crash must be recovered from the write-ahead log."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: its parents are private to root, and postgres must
        # own (and reach) its data folder.
        self.folder = Path(tempfile.mkdtemp(prefix="backdrop-pg-"))
        shutil.chown(self.folder, "postgres", "postgres")
        self.data = self.folder / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder / "postgres.log"
        self._started_at_byte = 0
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
            "-c", "max_connections=200",
        ]  # fmt: skip
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._started_at_byte = os.fstat(log).st_size
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

    def crash(self) -> None:
        """SIGKILL to the postmaster by pid: no shutdown checkpoint, so the next start runs
        crash recovery. Its backends notice their postmaster is gone and exit by themselves;
        a new postmaster may start only once they have (they still hold shared memory)."""
        assert self.process is not None and self.process.poll() is None
        children = _children(self.process.pid)
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None
        poll_until(
            lambda: not any(map(_running, children)),
            timeout=60,
            what="the killed postmaster's backends to exit",
        )

    def recovered_from_crash(self) -> bool:
        """Whether the last start replayed the write-ahead log after a crash."""
        with self.log_path.open("rb") as log:
            log.seek(self._started_at_byte)
            return b"automatic recovery in progress" in log.read()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class MotoServer:
    """moto's S3 server on a free loopback port; its log in `log_path` (or discarded)."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> MotoServer:
        log = self.log_path.open("wb") if self.log_path else subprocess.DEVNULL
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        try:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        finally:
            if not isinstance(log, int):
                log.close()
        process = self.process
        poll_until(
            lambda: process.poll() is not None or answers_http(self.endpoint),
            timeout=30,
            what=f"moto S3 server at {self.endpoint}",
        )
        if process.poll() is not None:
            log_text = self.log_path.read_text()[-2000:] if self.log_path else ""
            raise RuntimeError(f"moto server exited at start:\n{log_text}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            _wait_for_exit(self.process, timeout=10)
        self.process = None

    def __enter__(self) -> MotoServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class WorkerProcess:
    """A real `backdrop worker` subprocess; its Celery process id is also its job owner id.

    `env`: BACKDROP_* (and more) over this process's environment; `queues`: the worker's
    --queues (default: its own); `module`: what runs `backdrop worker`
    (tests.support.model_gate runs it with a gate in front of the model). Its output goes
    to `log_path`, which `log()` reads. As a context manager: started and ready inside,
    stopped warm on the way out."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        concurrency: int | None = 4,
        queues: Sequence[str] = (),
        module: str = "producer.cli",
    ) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.concurrency = concurrency
        self.queues = tuple(queues)
        self.module = module
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def name(self) -> str:
        """What jobs.start records in `worker` (worker.tasks.worker_name)."""
        return f"{socket.gethostname()}:{self.pid}"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", self.module, "worker"]
        if self.concurrency is not None:
            argv += ["--concurrency", str(self.concurrency)]
        if self.queues:
            argv += ["--queues", ",".join(self.queues)]
        return argv

    def start(self) -> WorkerProcess:
        with self.log_path.open("a") as log_file:
            self.process = subprocess.Popen(
                self.argv(), stdout=log_file, stderr=subprocess.STDOUT, env=self.env
            )
        return self

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        poll_until(
            lambda: (
                self.process is None or self.process.poll() is not None or " ready." in self.log()
            ),
            timeout=timeout,
            what="the worker to start",
        )
        assert self.alive, f"worker exited at start:\n{self.log()[-3000:]}"
        return self

    def __enter__(self) -> WorkerProcess:
        try:
            return self.start().wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

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

    def terminate(self) -> None:
        """SIGTERM, without waiting: Celery's warm shutdown begins."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), waited for; SIGKILL if it takes over a minute."""
        if self.alive:
            self.terminate()
            assert self.process is not None
            _wait_for_exit(self.process, timeout=60)


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, parent, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(entry.name)
        if fields is not None and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")
