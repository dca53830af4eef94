"""The callback delivery loop that runs in every worker process.

One thread claims due deliveries from the database (producer/outbox.py) and hands each to a
small pool of sender threads, never more than the pool has free: a slow or dead receiver
holds a sender thread for at most its deadline, and never a job thread. A job that ends
nudges the loop (low latency); the database alone says what is owed, so deliveries owed by
a worker that died are sent by whichever worker looks next.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from producer import callbacks, outbox
from producer.db import session_scope
from producer.settings import Settings

log = logging.getLogger(__name__)

Send = Callable[[str, dict[str, Any], Settings], callbacks.Outcome]


class Deliveries:
    """`send`, `delay` and `clock` are the real ones unless a test drives them."""

    def __init__(
        self,
        settings: Settings,
        worker: str,
        *,
        send: Send = callbacks.send,
        delay: outbox.Delay = outbox.retry_delay,
        clock: Callable[[], datetime] = outbox.now,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self._send = send
        self._delay = delay
        self._clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._busy = 0
        self._lock = threading.Lock()
        self._senders = ThreadPoolExecutor(
            settings.callback_concurrency, thread_name_prefix="backdrop-callback"
        )
        self._thread = threading.Thread(target=self._run, name="backdrop-deliveries", daemon=True)

    def start(self) -> Deliveries:
        self._thread.start()
        return self

    def nudge(self) -> None:
        """Look for due deliveries now (a job just ended, or a sender came free)."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming; wait for attempts in flight (bounded by their deadline)."""
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        self._senders.shutdown(wait=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                wait = self.run_once()
            except Exception:
                # A database outage, most likely: what is owed stays owed; look again later.
                log.exception("callback deliveries: cannot claim; trying again")
                wait = self.settings.callback_poll_s
            self._wake.wait(wait)

    def run_once(self) -> float:
        """Claim what is due and the senders can take; the seconds until the next look."""
        with self._lock:
            free = self.settings.callback_concurrency - self._busy
        if free > 0:
            with session_scope(self.settings.database_url) as session:
                claims = outbox.claim(session, free, self.settings, self._clock())
            for held in claims:
                with self._lock:
                    self._busy += 1
                self._senders.submit(self._deliver, held)
        with session_scope(self.settings.database_url) as session:
            due = outbox.next_due(session)
        if due is None:
            return self.settings.callback_poll_s
        until = (_aware(due) - self._clock()).total_seconds()
        return min(max(until, 0.0), self.settings.callback_poll_s)

    def _deliver(self, held: outbox.Claim) -> None:
        try:
            outcome = self._send(held.url, held.record, self.settings)
            self._record(held, outcome)
        except Exception:
            # The claim runs out and the delivery is tried again: at least once, not at most.
            log.exception("callback for job %s: attempt not recorded", held.job_id)
        finally:
            with self._lock:
                self._busy -= 1
            self.nudge()

    def _record(self, held: outbox.Claim, outcome: callbacks.Outcome) -> None:
        with session_scope(self.settings.database_url) as session:
            next_at = outbox.record(
                session,
                held,
                outcome,
                self.settings,
                worker=self.worker,
                moment=self._clock(),
                delay=self._delay,
            )
        if outcome.delivered:
            log.info("callback for job %s delivered (HTTP %s)", held.job_id, outcome.status_code)
        elif next_at is not None:
            log.warning(
                "callback for job %s failed (%s); next attempt at %s",
                held.job_id,
                outcome.error,
                next_at.isoformat(),
            )
        else:
            log.warning(
                "callback for job %s failed (%s); no attempt scheduled "
                "(retries spent, or redelivered meanwhile): backdrop callbacks redeliver %s",
                held.job_id,
                outcome.error,
                held.job_id,
            )


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=outbox.now().tzinfo)


_running: Deliveries | None = None


def start(settings: Settings, worker: str) -> Deliveries | None:
    """Start this process's loop, nudged by every finished task; None without a secret to
    sign with (deliveries stay owed in the database for a worker that has one)."""
    global _running
    if settings.callback_secret is None:
        log.warning(
            "BACKDROP_CALLBACK_SECRET is not set: this worker delivers no callbacks "
            "(jobs with a callback_url wait for a worker that has it)"
        )
        return None
    from celery.signals import task_postrun

    _running = Deliveries(settings, worker).start()
    task_postrun.connect(_nudge, weak=False)
    return _running


def _nudge(**_: Any) -> None:
    if _running is not None:
        _running.nudge()
