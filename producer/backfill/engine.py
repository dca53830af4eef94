"""The backfill engine: creates, runs, pauses and cancels backfills.

How it stays correct when killed: a chunk's jobs and the advance of the backfill's cursor and
counters commit in one transaction, guarded by the cursor the chunk started from and by the
backfill still running, so a chunk is either wholly recorded or not at all, and two engines
on one backfill cannot both record it. Messages are published after the commit; a kill
between the two leaves queued jobs without a message, so every run of a backfill first
re-publishes all its still-queued jobs. A duplicate message is harmless: `jobs.start` only
starts a queued job once and drops the message of a running or final one.

Backpressure: before each chunk the engine waits until its in-flight jobs (queued or running)
plus the chunk fit under `max_in_flight`; between chunks it reads its status, so a pause or
cancel from another process takes effect within one chunk.
"""

from __future__ import annotations

import builtins
import contextlib
import csv
import io
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from producer import broker, jobs
from producer.backfill import records
from producer.backfill.planning import (
    Planned,
    by_output_owner,
    fresh,
    job_columns,
    plan,
    template_request,
)
from producer.backfill.records import RESUMABLE
from producer.backfill.source import Chunk, Item, is_manifest, read_ahead, under, walk
from producer.catalog import refuse_classes
from producer.db import session_scope
from producer.errors import (
    BackdropError,
    BackfillUnreachable,
    InputNotFound,
    InvalidRequest,
)
from producer.locations import canonical_prefix
from producer.logs import job_context
from producer.models import Backfill, BackfillStatus, Job, JobStatus
from producer.request import JobRequest, Queue
from producer.services import Services
from producer.storage import Storage, join

log = logging.getLogger(__name__)

REPUBLISH_PAGE = 5000
MAX_POLL_S = 2.0
REPORT_NAME = "failures.csv"
# Codes that say the workers cannot reach the photos at all (their roots or buckets differ
# from this process's, or their model is broken): when the first jobs all end in one of
# these, the backfill stops with one message instead of failing every photo.
UNREACHABLE_CODES = ("access_denied", "weights_unavailable")
FAIL_FAST_JOBS = 10
# A backfill's max_in_flight: far above any useful backlog, far below the database's INTEGER.
MAX_IN_FLIGHT = 1_000_000
# S3 keys are at most 1,024 bytes; a prefix with its scheme and bucket fits in twice that.
MAX_LOCATION_LENGTH = 2048

Progress = Callable[[dict[str, Any]], None]


class _Interrupted(Exception):
    """The backfill stopped running (paused, canceled, taken over) while a chunk was built."""


class BackfillRunner:
    """Creates, runs, pauses and cancels backfills over one database, broker and storage."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings

    @property
    def storage(self) -> Storage:
        return self.services.storage

    # --- records ---

    def create(
        self,
        source: str,
        output_prefix: str,
        options: dict[str, Any],
        max_in_flight: int | None = None,
    ) -> dict[str, Any]:
        if max_in_flight is not None and not 1 <= max_in_flight <= MAX_IN_FLIGHT:
            raise InvalidRequest(f"max_in_flight: expected an integer from 1 to {MAX_IN_FLIGHT}")
        template = self._check(source, output_prefix, options)
        moment = jobs.now()
        backfill = Backfill(
            id=str(uuid.uuid4()),
            status=BackfillStatus.RUNNING.value,
            source=source,
            # Canonical, so its jobs' outputs compare with every other job's (no aliases).
            output_prefix=canonical_prefix(output_prefix),
            options=template.params() | {"effect": template.effect},
            model=self.settings.model,
            max_in_flight=max_in_flight or self.settings.backfill_max_in_flight,
            listed=0,
            skipped=0,
            submitted=0,
            succeeded=0,
            failed=0,
            listing_done=False,
            created_at=moment,
            updated_at=moment,
        )
        with session_scope(self.settings.database_url) as session:
            session.add(backfill)
            session.flush()
            record = backfill.to_record(in_flight=0)
        log.info("backfill %s created over %s", backfill.id, source)
        return record

    def get(self, backfill_id: str) -> dict[str, Any]:
        with session_scope(self.settings.database_url) as session:
            backfill = records.get(session, backfill_id)
            return backfill.to_record(in_flight=records.in_flight(session, backfill_id))

    def list(self, limit: int = 20) -> builtins.list[dict[str, Any]]:
        with session_scope(self.settings.database_url) as session:
            query = select(Backfill).order_by(Backfill.created_at.desc()).limit(limit)
            return [backfill.to_record() for backfill in session.scalars(query)]

    def pause(self, backfill_id: str) -> dict[str, Any]:
        """running → paused: the engine stops submitting after its current chunk and exits;
        jobs already queued still run. `--resume` continues."""
        self._transition(backfill_id, [BackfillStatus.RUNNING], BackfillStatus.PAUSED)
        return self.get(backfill_id)

    def cancel(self, backfill_id: str) -> dict[str, Any]:
        """→ canceled, with every still-queued job of the backfill canceled too."""
        self._transition(backfill_id, RESUMABLE, BackfillStatus.CANCELED, finished_at=jobs.now())
        canceled = self._cancel_queued(backfill_id)
        log.info("backfill %s canceled with %d queued jobs", backfill_id, canceled)
        return self.get(backfill_id)

    def _cancel_queued(self, backfill_id: str) -> int:
        with session_scope(self.settings.database_url) as session:
            return jobs.cancel_queued(session, backfill_id)

    def dry_run(self, source: str, output_prefix: str, options: dict[str, Any]) -> dict[str, int]:
        """Walk and count what a run would do, writing nothing."""
        template = self._check(source, output_prefix, options)
        counts = {"listed": 0, "would_skip": 0, "would_submit": 0}
        chunks = walk(self.storage, source, None, self.settings.backfill_chunk, output_prefix)
        for chunk in chunks:
            planned = [self._plan(template, item, output_prefix) for item in chunk.items]
            with session_scope(self.settings.database_url) as session:
                kept = fresh(session, planned)
            counts["listed"] += len(planned)
            counts["would_submit"] += len(kept)
            counts["would_skip"] += len(planned) - len(kept)
        return counts

    # --- running ---

    def run(self, backfill_id: str, progress: Progress | None = None) -> dict[str, Any]:
        """Run (or resume) a backfill until it completes, is paused or canceled."""
        with job_context(f"backfill:{backfill_id}"):
            try:
                return self._run(backfill_id, progress or (lambda _record: None))
            except KeyboardInterrupt:
                self._stop(backfill_id, BackfillStatus.PAUSED, "interrupted")
                raise
            except BackdropError as exc:
                # Ours carry their own message, recorded on the backfill (which the CLI
                # prints): no traceback, and no second copy on the user's terminal.
                log.info("backfill %s failed: %s", backfill_id, exc)
                self._stop(backfill_id, BackfillStatus.FAILED, str(exc)[:2000])
                raise
            except Exception as exc:
                log.exception("backfill %s failed", backfill_id)
                self._stop(backfill_id, BackfillStatus.FAILED, str(exc)[:2000])
                raise

    def start_in_thread(self, backfill_id: str) -> threading.Thread:
        """Run in a daemon thread (the API): if the process exits, the backfill stays
        `running` in the database and `--resume` (or POST …/resume) continues it."""

        def target() -> None:
            # run() has already logged the failure and recorded it on the backfill.
            with contextlib.suppress(Exception):
                self.run(backfill_id)

        thread = threading.Thread(target=target, name=f"backfill-{backfill_id}", daemon=True)
        thread.start()
        return thread

    def _run(self, backfill_id: str, progress: Progress) -> dict[str, Any]:
        backfill = self._claim(backfill_id)
        if backfill.status not in RESUMABLE:
            return self.get(backfill_id)
        self._republish(backfill_id)
        template = template_request(backfill.options)
        chunk_size = max(1, min(self.settings.backfill_chunk, backfill.max_in_flight // 2 or 1))
        if not backfill.listing_done:
            chunks = walk(
                self.storage, backfill.source, backfill.cursor, chunk_size, backfill.output_prefix
            )
            cursor = backfill.cursor
            with contextlib.closing(read_ahead(chunks)) as ahead:
                for chunk in ahead:
                    if self._wait_for_room(backfill_id, len(chunk.items), progress) != "running":
                        return self.get(backfill_id)
                    planned = [
                        self._plan(template, item, backfill.output_prefix) for item in chunk.items
                    ]
                    try:
                        self._record_chunk(backfill_id, cursor, chunk, planned)
                    except _Interrupted:
                        return self.get(backfill_id)
                    cursor = chunk.position
            self._finish_listing(backfill_id)
        # Everything is submitted: wait for the last jobs (room for all = nothing in flight).
        if self._wait_for_room(backfill_id, backfill.max_in_flight, progress) != "running":
            return self.get(backfill_id)
        return self._complete(backfill_id, progress)

    def _plan(self, template: JobRequest, item: Item, output_prefix: str) -> Planned:
        return plan(template, item, output_prefix, self.settings.model)

    def _claim(self, backfill_id: str) -> Backfill:
        with session_scope(self.settings.database_url) as session:
            return records.claim(session, backfill_id)

    def _republish(self, backfill_id: str) -> None:
        """Jobs committed but perhaps never published (a kill between the two)."""
        after = ""
        while True:
            with session_scope(self.settings.database_url) as session:
                ids = list(
                    session.scalars(
                        select(Job.id)
                        .where(
                            Job.backfill_id == backfill_id,
                            Job.status == JobStatus.QUEUED.value,
                            Job.id > after,
                        )
                        .order_by(Job.id)
                        .limit(REPUBLISH_PAGE)
                    )
                )
            if not ids:
                return
            broker.enqueue(self.services.celery, [(job_id, Queue.BULK.value) for job_id in ids])
            log.info("backfill %s: re-published %d queued jobs", backfill_id, len(ids))
            after = ids[-1]

    def _record_chunk(
        self, backfill_id: str, cursor: str | None, chunk: Chunk, planned: builtins.list[Planned]
    ) -> None:
        with session_scope(self.settings.database_url) as session:
            new, again = by_output_owner(fresh(session, planned))
            created = jobs.create(
                session,
                [p.request for p in new],
                self.settings.output_prefix,
                extras=[job_columns(backfill_id, p) for p in new],
            )
            rerun = jobs.rerun(
                session,
                [job_id for job_id, _ in again],
                [p.request for _, p in again],
                extras=[job_columns(backfill_id, p) for _, p in again],
            )
            queued = [c.job.id for c in created] + [job.id for job in rerun]
            if not records.advance(
                session, backfill_id, cursor, chunk.position, len(planned), len(queued)
            ):
                raise _Interrupted(backfill_id)
        broker.enqueue(self.services.celery, [(job_id, Queue.BULK.value) for job_id in queued])
        log.debug("backfill %s: chunk to %s, %d queued", backfill_id, chunk.position, len(queued))

    def _wait_for_room(self, backfill_id: str, needed: int, progress: Progress) -> str:
        """Poll with backoff until `needed` more jobs fit under max_in_flight; returns the
        backfill's status, which ends the wait early when it is no longer running."""
        delay = 0.05
        while True:
            with session_scope(self.settings.database_url) as session:
                backfill = records.get(session, backfill_id)
                in_flight = records.refresh_counts(session, backfill)
                record = backfill.to_record(in_flight=in_flight)
            progress(record)
            self._check_reachable(backfill_id)
            if backfill.status != BackfillStatus.RUNNING.value:
                log.info("backfill %s is %s: stopping", backfill_id, backfill.status)
                return backfill.status
            if in_flight + needed <= backfill.max_in_flight or in_flight == 0:
                return backfill.status
            time.sleep(delay)
            delay = min(delay * 1.5, MAX_POLL_S)

    def _check_reachable(self, backfill_id: str) -> None:
        """Raise BackfillUnreachable, its queued jobs canceled, when none of its jobs
        succeeded and its first ones (up to FAIL_FAST_JOBS) all failed for want of access:
        the workers' settings differ from this process's, and every photo would fail alike.
        Canceled jobs are submitted again by `--resume` once the workers are fixed."""
        with session_scope(self.settings.database_url) as session:
            backfill = records.get(session, backfill_id)
            if backfill.succeeded or not backfill.failed:
                return
            codes = dict(
                session.execute(
                    select(Job.error_code, func.count())
                    .where(Job.backfill_id == backfill_id, Job.status == JobStatus.FAILED.value)
                    .group_by(Job.error_code)
                ).all()
            )
            needed = min(FAIL_FAST_JOBS, backfill.submitted)
            unreachable = sum(codes.get(code, 0) for code in UNREACHABLE_CODES)
            if unreachable < needed or unreachable != sum(codes.values()):
                return
            example = session.execute(
                select(Job.error_code, Job.error_message)
                .where(Job.backfill_id == backfill_id, Job.status == JobStatus.FAILED.value)
                .limit(1)
            ).one()
        self._cancel_queued(backfill_id)
        raise BackfillUnreachable(
            f"its first {unreachable} jobs all failed {example.error_code} "
            f"({example.error_message}): the workers cannot use these locations. Give the "
            "workers the same BACKDROP_LOCAL_ROOTS / BACKDROP_ALLOWED_BUCKETS (and model) as "
            f"this command, then: backdrop backfill --resume {backfill_id}"
        )

    def _finish_listing(self, backfill_id: str) -> None:
        with session_scope(self.settings.database_url) as session:
            records.finish_listing(session, backfill_id)

    def _complete(self, backfill_id: str, progress: Progress) -> dict[str, Any]:
        report = join(self._report_prefix(backfill_id), REPORT_NAME)
        self.storage.write(report, self._report(backfill_id), content_type="text/csv")
        with session_scope(self.settings.database_url) as session:
            records.complete(session, backfill_id, report)
        record = self.get(backfill_id)
        progress(record)
        log.info(
            "backfill %s %s: %d submitted, %d skipped, %d failed; report %s",
            backfill_id,
            record["status"],
            record["counts"]["submitted"],
            record["counts"]["skipped"],
            record["counts"]["failed"],
            report,
        )
        return record

    def _report_prefix(self, backfill_id: str) -> str:
        """Where a backfill's report goes: under its own output prefix."""
        with session_scope(self.settings.database_url) as session:
            output_prefix = records.get(session, backfill_id).output_prefix
        return join(output_prefix, f"_backfills/{backfill_id}")

    def _report(self, backfill_id: str) -> bytes:
        """CSV of the backfill's failed jobs: input, job id, status, error code and message."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["input", "job_id", "status", "error_code", "error_message"])
        with session_scope(self.settings.database_url) as session:
            rows = session.execute(
                select(Job.input, Job.id, Job.status, Job.error_code, Job.error_message)
                .where(Job.backfill_id == backfill_id, Job.status == JobStatus.FAILED.value)
                .order_by(Job.input)
                .execution_options(yield_per=1000)
            )
            writer.writerows(rows)
        return buffer.getvalue().encode()

    def _stop(self, backfill_id: str, status: BackfillStatus, error: str) -> None:
        try:
            with session_scope(self.settings.database_url) as session:
                records.stop(session, backfill_id, status, error)
        except Exception:  # the database may be what failed; the run's error is what matters
            log.warning("could not record backfill %s as %s", backfill_id, status.value)

    def _transition(
        self,
        backfill_id: str,
        allowed: builtins.list[BackfillStatus],
        to: BackfillStatus,
        **values: Any,
    ) -> None:
        with session_scope(self.settings.database_url) as session:
            records.transition(session, backfill_id, allowed, to, **values)

    def _check(self, source: str, output_prefix: str, options: dict[str, Any]) -> JobRequest:
        """Validate before anything is written; returns the template request."""
        for name, location in (("source", source), ("output_prefix", output_prefix)):
            _check_location(name, location)
        template = template_request(options)
        refuse_classes(template.classes, self.settings.model)
        self.storage.check_allowed(join(output_prefix, "_backfills/check"))
        if template.effect == "replace" and template.background:
            self.storage.check_allowed(template.background)
        if is_manifest(source):
            if "://" in source:
                self.storage.check_allowed(source)
            return template
        if "://" not in source:
            raise InvalidRequest(
                f"backfill source {source!r}: give s3://bucket/prefix, file:///prefix "
                "or a manifest .csv"
            )
        # Resolves the prefix (allow-list and roots); an empty one is a typo, not 0 photos.
        if next(iter(self.storage.list(source, page_size=1)), None) is None:
            raise InputNotFound(f"backfill source {source!r}: no files there")
        if source.rstrip("/") == output_prefix.rstrip("/") or under(source, output_prefix):
            raise InvalidRequest("the source must not lie inside the output prefix")
        return template


def _check_location(name: str, location: str) -> None:
    # A NUL byte or a lone surrogate would reach the database (PostgreSQL refuses both: a
    # 500), any control character the logs and the failure report.
    if len(location) > MAX_LOCATION_LENGTH:
        raise InvalidRequest(f"{name}: longer than {MAX_LOCATION_LENGTH} characters")
    if any(
        ord(char) < 0x20 or ord(char) == 0x7F or 0xD800 <= ord(char) <= 0xDFFF for char in location
    ):
        raise InvalidRequest(f"{name}: control characters are not allowed in a location")
