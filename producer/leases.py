"""Keeping running jobs' leases alive, and reaping the ones whose worker died.

Every worker process runs one keeper thread: it renews the leases of the attempts running in
that process and, on the same beat, requeues jobs anywhere whose lease ran out. Reaping is one
guarded UPDATE, so any number of workers can do it at once without double-requeueing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from celery import Celery

from producer import broker, jobs
from producer.db import session_scope
from producer.errors import TransientError
from producer.settings import Settings
from producer.stats import queue_depths

log = logging.getLogger(__name__)

ORPHAN_BATCH = 1000


class LeaseKeeper:
    def __init__(
        self, settings: Settings, celery: Celery, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._celery = celery
        self._clock = clock
        # (job id, attempt) -> when this process started it; overdue: already reported.
        self._owned: dict[tuple[str, int], float] = {}
        self._overdue: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backdrop-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def hold(self, job_id: str, attempt: int) -> None:
        with self._lock:
            self._owned[job_id, attempt] = self._clock()

    def drop(self, job_id: str, attempt: int) -> None:
        with self._lock:
            self._owned.pop((job_id, attempt), None)
            self._overdue.discard((job_id, attempt))

    def beat(self) -> jobs.Reaped:
        """Renew what this process holds (but overrunning attempts), then reap and requeue
        what nobody holds."""
        owned = self._renewable()
        url = self._settings.database_url
        with session_scope(url) as session:
            jobs.renew(session, owned, self._settings.job_lease_s)
        with session_scope(url) as session:
            reaped = jobs.reap(session, self._settings.max_attempts)
            if reaped.requeued:
                log.warning("requeueing %d jobs whose worker died", len(reaped.requeued))
                # Published before the requeue commits: if the broker is down, the
                # transaction rolls back and the jobs stay expired for the next beat to
                # requeue, instead of sitting `queued` with no message (lost). A message
                # that arrives before the commit still starts the job: start() accepts a
                # running job whose lease ran out.
                broker.enqueue(self._celery, reaped.requeued)
        for job_id in reaped.lost:
            log.error("job %s failed with worker_lost: it killed every worker it ran on", job_id)
        self.republish_orphans()
        return reaped

    def _renewable(self) -> list[tuple[str, int]]:
        limit = self._settings.job_timeout_s
        moment = self._clock()
        with self._lock:
            renewable = sorted(key for key, since in self._owned.items() if moment - since < limit)
            overdue = [key for key in self._owned if key not in renewable]
            newly = [key for key in overdue if key not in self._overdue]
            self._overdue.update(newly)
        for job_id, attempt in newly:
            log.error(
                "job %s: attempt %d has run for over %.0fs (BACKDROP_JOB_TIMEOUT_S); its lease "
                "is no longer renewed, so the job will be retried elsewhere",
                job_id,
                attempt,
                limit,
            )
        return renewable

    def republish_orphans(self) -> list[str]:
        """Publish again the queued jobs of a queue the broker holds nothing for.

        A job can sit `queued` with no message: its message was taken just as Redis went
        down, or the process that published it died between commit and publish. Only an
        empty queue is checked, so a long backlog is never duplicated; a stray duplicate is
        harmless because start() lets one attempt own a job.
        """
        depths = queue_depths(self._settings, [])
        if depths is None:
            return []
        older_than = jobs.now() - timedelta(seconds=self._settings.job_lease_s)
        orphans: list[tuple[str, str]] = []
        with session_scope(self._settings.database_url) as session:
            for queue, depth in depths.items():
                if depth == 0:
                    ids = jobs.queued_before(session, queue, older_than, limit=ORPHAN_BATCH)
                    orphans += [(job_id, queue) for job_id in ids]
        if orphans:
            log.warning("re-publishing %d queued jobs that had no message", len(orphans))
            broker.enqueue(self._celery, orphans)
        return [job_id for job_id, _ in orphans]

    def _run(self) -> None:
        interval = self._settings.job_lease_s / 3
        while not self._stop.wait(interval):
            try:
                self.beat()
            except TransientError as exc:
                log.warning("lease beat skipped: %s", exc)
            except Exception:
                log.exception("lease beat failed")
