"""Backfills: one job per photo under a prefix (or in a manifest), into the `bulk` queue.

How it stays correct when killed: the source is walked in a fixed order (S3 lists keys
sorted; a manifest by line number) in chunks. A chunk's jobs and the advance of the backfill's
cursor and counters commit in one transaction, guarded by the cursor the chunk started from
and by the backfill still running, so a chunk is either wholly recorded or not at all, and
two engines on one backfill cannot both record it. Messages are published after the commit;
a kill between the two leaves queued jobs without a message, so every run of a backfill
first re-publishes all its still-queued jobs. A duplicate message is harmless: `jobs.start`
only starts a queued job once and drops the message of a running or final one.

Output names: `<output prefix>/<key under the source>`, the extension swapped for the
output format's when the photo already has that one (`cat.png` → `cat.png`), else appended
(`cat.jpg` → `cat.jpg.png`): `cat.jpg` and `cat.png` in one folder never map to one output,
whatever chunk or run each lands in, and the name alone says which photo an output came from.

Skipping: a job's fingerprint hashes what determines its output (input location and ETag,
effect, parameters, model, output location). A photo whose fingerprint belongs to a job that
succeeded or is still in flight is skipped, and so is one that failed for a reason in the
photo itself (PHOTO_FAILURES: the same bytes would fail again); other failures (access,
storage, a lost worker) and canceled ones are processed again. A changed photo has a new
ETag, hence a new fingerprint, and is processed.

Backpressure: before each chunk the engine waits until its in-flight jobs (queued or running)
plus the chunk fit under `max_in_flight`; between chunks it reads its status, so a pause or
cancel from another process takes effect within one chunk.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from celery import Celery
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from producer import broker, jobs
from producer.db import session_scope
from producer.errors import (
    BackdropError,
    InputNotFound,
    InvalidRequest,
    InvalidTransition,
    PermanentError,
)
from producer.locations import FILE_SCHEME, canonical_prefix
from producer.logs import job_context
from producer.models import Backfill, BackfillStatus, Job, JobStatus
from producer.request import JobRequest, Queue, parse_request
from producer.settings import Settings
from producer.storage import S3_SCHEME, Storage, join

log = logging.getLogger(__name__)

# Request fields that name one photo's locations: a backfill derives them per photo.
PER_PHOTO_FIELDS = ("input", "output", "mask_output", "mask", "idempotency_key")
# A photo is skipped when a job with its fingerprint is in one of these.
SKIP_STATUSES = (JobStatus.SUCCEEDED.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value)
# Failures the same photo meets every time: a re-run records them done (failed) and skips.
PHOTO_FAILURES = ("invalid_image", "unsupported_format", "input_too_large", "no_subject")
IN_FLIGHT = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
RESUMABLE = (BackfillStatus.RUNNING.value, BackfillStatus.PAUSED.value, BackfillStatus.FAILED.value)
PLACEHOLDER_INPUT = "s3://backfill/placeholder"
HEAD_THREADS = 16
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


class BackfillNotFound(PermanentError):
    code = "backfill_not_found"


class BackfillUnreachable(PermanentError):
    code = "backfill_failed"


class _Interrupted(Exception):
    """The backfill stopped running (paused, canceled, taken over) while a chunk was built."""


@dataclass(frozen=True)
class Item:
    location: str
    etag: str
    relative: str  # the key under the source, which names the output under the output prefix


@dataclass(frozen=True)
class Chunk:
    items: list[Item]
    position: str  # the cursor once this chunk is recorded


@dataclass(frozen=True)
class Planned:
    request: JobRequest
    item: Item
    fingerprint: str


# --- the source ---------------------------------------------------------------------------


def is_manifest(source: str) -> bool:
    return source.lower().endswith(".csv")


def walk(
    storage: Storage, source: str, cursor: str | None, size: int, exclude: str
) -> Generator[Chunk, None, None]:
    """The source's photos after `cursor`, in chunks; locations under `exclude` (the output
    prefix) are left out so a backfill never processes its own outputs."""
    if is_manifest(source):
        yield from _manifest_chunks(storage, source, int(cursor or 0), size)
        return
    yield from _listing_chunks(storage, source, cursor, size, exclude)


def _listing_chunks(
    storage: Storage, source: str, cursor: str | None, size: int, exclude: str
) -> Iterator[Chunk]:
    items: list[Item] = []
    position = cursor
    base = canonical_prefix(source)
    # A resume lists from the cursor on (S3's StartAfter), not from the start again.
    for info in storage.list(source, page_size=1000, start_after=cursor):
        position = info.location
        if not _under(info.location, exclude):
            items.append(Item(info.location, info.etag, _relative(info.location, base)))
        if len(items) >= size:
            yield Chunk(items, position)
            items = []
    if position is not None and position != cursor:
        yield Chunk(items, position)


def _under(location: str, prefix: str) -> bool:
    return location.startswith(prefix.rstrip("/") + "/")


def _relative(location: str, source: str) -> str:
    """The key under the source, as a name: a file location's percent-encoding is undone
    (`join` encodes the output's name again)."""
    rest = location[len(source) :].lstrip("/") if location.startswith(source) else ""
    rest = rest or location.rsplit("/", 1)[-1]
    return unquote(rest) if location.startswith(FILE_SCHEME) else rest


def _manifest_lines(storage: Storage, source: str) -> Iterator[str]:
    if "://" not in source:
        path = Path(source)
        if not path.is_file():
            raise InvalidRequest(f"manifest {source} is not a file")
        with path.open(encoding="utf-8") as manifest:
            yield from manifest
        return
    # Read whole: a manifest of a million keys is tens of MB, and storage has no ranged read.
    yield from storage.read(source).decode("utf-8").splitlines()


def _manifest_chunks(storage: Storage, source: str, done: int, size: int) -> Iterator[Chunk]:
    """`bucket,key[,version]` lines as S3 Batch Operations writes them (keys URL-encoded);
    the cursor counts lines handled. ETags come from HEAD requests, a chunk at a time."""
    rows: list[tuple[str, str]] = []
    line_number = 0
    with ThreadPoolExecutor(HEAD_THREADS, thread_name_prefix="backfill-head") as pool:
        for line_number, row in enumerate(csv.reader(_manifest_lines(storage, source)), 1):
            if line_number <= done:
                continue
            rows.append(_manifest_row(row, line_number))
            if len(rows) >= size:
                yield Chunk(_headed(storage, pool, rows), str(line_number))
                rows = []
        if line_number > done:
            yield Chunk(_headed(storage, pool, rows), str(line_number))


def _manifest_row(row: list[str], line_number: int) -> tuple[str, str]:
    if len(row) < 2 or not row[0].strip() or not row[1]:
        raise InvalidRequest(f"manifest line {line_number}: expected bucket,key")
    return row[0].strip(), unquote(row[1])


def _headed(storage: Storage, pool: ThreadPoolExecutor, rows: list[tuple[str, str]]) -> list[Item]:
    locations = [f"{S3_SCHEME}{bucket}/{key}" for bucket, key in rows]
    etags = pool.map(lambda location: _etag(storage, location), locations)
    return [
        Item(location, etag, key)
        for location, etag, (_, key) in zip(locations, etags, rows, strict=True)
    ]


def _etag(storage: Storage, location: str) -> str:
    try:
        return storage.head(location).etag
    except InputNotFound:
        # Still a job: it fails with input_not_found and lands in the failure report.
        return ""


def read_ahead(chunks: Generator[Chunk, None, None]) -> Generator[Chunk, None, None]:
    """`chunks`, listed one chunk ahead in a thread: the next listing page (or a manifest
    chunk's HEADs) is fetched while this one is recorded, instead of after it. Closing this
    generator stops the reader after at most one more chunk."""
    ready: queue.Queue[Chunk | BaseException | None] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read() -> None:
        try:
            for chunk in chunks:
                ready.put(chunk)
                if stop.is_set():
                    return
            ready.put(None)
        except BaseException as exc:
            ready.put(exc)
        finally:
            chunks.close()

    threading.Thread(target=read, name="backfill-listing", daemon=True).start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Room for the reader's one last put, after which it sees `stop` and ends.
        with contextlib.suppress(queue.Empty):
            ready.get_nowait()


# --- planning one photo -------------------------------------------------------------------


def template_request(options: dict[str, Any]) -> JobRequest:
    """Validate a backfill's job options once, as a request for a placeholder photo."""
    given = sorted(name for name in PER_PHOTO_FIELDS if options.get(name) is not None)
    if given:
        raise InvalidRequest(f"a backfill derives {', '.join(given)} per photo; leave them out")
    if options.get("queue") not in (None, Queue.BULK.value):
        raise InvalidRequest("backfills always use the bulk queue")
    return parse_request({**options, "input": PLACEHOLDER_INPUT, "queue": Queue.BULK.value})


def output_for(output_prefix: str, relative: str, fmt: str) -> str:
    """Deterministic per photo, so a re-run or resume never writes a second output for it;
    distinct per photo, so two photos never share one (see the module's docstring)."""
    extension = f".{jobs.EXTENSIONS[fmt]}"
    name = relative if PurePosixPath(relative).suffix == extension else relative + extension
    return join(output_prefix, name)


def fingerprint(request: JobRequest, etag: str, model: str) -> str:
    material = [request.input, etag, request.effect, request.params(), model, request.output]
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def plan(template: JobRequest, item: Item, output_prefix: str, model: str) -> Planned:
    request = template.model_copy(
        update={
            "input": item.location,
            "output": output_for(output_prefix, item.relative, template.format),
        }
    )
    return Planned(request, item, fingerprint(request, item.etag, model))


def _already_done(session: Session, planned: list[Planned]) -> set[str]:
    prints = [p.fingerprint for p in planned]
    query = select(Job.fingerprint).where(
        jobs.one_of(session, Job.fingerprint, prints),
        or_(
            Job.status.in_(SKIP_STATUSES),
            (Job.status == JobStatus.FAILED.value) & Job.error_code.in_(PHOTO_FAILURES),
        ),
    )
    return set(session.scalars(query))


def _fresh(session: Session, planned: list[Planned]) -> list[Planned]:
    """Those not already processed nor in flight; a photo listed twice (a manifest) once.
    Of two photos naming one output (a manifest's `cat` and `cat.png`) the first is kept
    and the other skipped with a warning: one photo's output is never the other's."""
    done = _already_done(session, planned)
    outputs: set[str | None] = set()
    fresh = []
    for candidate in planned:
        if candidate.fingerprint in done:
            continue
        if candidate.request.output in outputs:
            log.warning(
                "%s: output %s already belongs to another photo of this chunk; skipped",
                candidate.item.location,
                candidate.request.output,
            )
            continue
        done.add(candidate.fingerprint)
        outputs.add(candidate.request.output)
        fresh.append(candidate)
    return fresh


def _job_columns(backfill_id: str, planned: Planned) -> dict[str, Any]:
    return {
        "backfill_id": backfill_id,
        "input_etag": planned.item.etag,
        "fingerprint": planned.fingerprint,
    }


def _by_output_owner(
    session: Session, fresh: list[Planned]
) -> tuple[list[Planned], list[tuple[str, Planned]]]:
    """Split photos to process into new jobs and (job id, photo) for final backfill jobs that
    already own the output: an output has one job, so reprocessing requeues that job. An
    output held by a job in flight, by a job no backfill made, or by another photo's job (two
    names that map to one output in different chunks) is left alone (skipped)."""
    outputs = [p.request.output for p in fresh]
    owners = {
        row.output: row
        for row in session.execute(
            select(Job.id, Job.input, Job.output, Job.status, Job.backfill_id).where(
                jobs.one_of(session, Job.output, outputs)
            )
        )
    }
    new: list[Planned] = []
    adopt: list[tuple[str, Planned]] = []
    for candidate in fresh:
        owner = owners.get(candidate.request.output)
        if owner is None:
            new.append(candidate)
        elif (
            owner.backfill_id is not None
            and JobStatus(owner.status).final
            and owner.input == candidate.request.input
        ):
            adopt.append((owner.id, candidate))
        else:
            log.warning("%s: output held by job %s; skipped", candidate.item.location, owner.id)
    return new, adopt


# --- the engine ---------------------------------------------------------------------------


class Backfills:
    """Creates, runs, pauses and cancels backfills over one database, broker and storage."""

    def __init__(self, settings: Settings, storage: Storage, celery: Celery) -> None:
        self.settings = settings
        self.storage = storage
        self.celery = celery

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
            backfill = _get(session, backfill_id)
            return backfill.to_record(in_flight=_in_flight(session, backfill_id))

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
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
        self._transition(
            backfill_id,
            [BackfillStatus(s) for s in RESUMABLE],
            BackfillStatus.CANCELED,
            finished_at=jobs.now(),
        )
        canceled = self._cancel_queued(backfill_id)
        log.info("backfill %s canceled with %d queued jobs", backfill_id, canceled)
        return self.get(backfill_id)

    def _cancel_queued(self, backfill_id: str) -> int:
        with session_scope(self.settings.database_url) as session:
            return session.execute(
                update(Job)
                .where(Job.backfill_id == backfill_id, Job.status == JobStatus.QUEUED.value)
                .values(status=JobStatus.CANCELED.value, finished_at=jobs.now())
                .execution_options(synchronize_session=False)
            ).rowcount

    def dry_run(self, source: str, output_prefix: str, options: dict[str, Any]) -> dict[str, int]:
        """Walk and count what a run would do, writing nothing."""
        self._check(source, output_prefix, options)
        template = template_request(options)
        counts = {"listed": 0, "would_skip": 0, "would_submit": 0}
        chunks = walk(self.storage, source, None, self.settings.backfill_chunk, output_prefix)
        for chunk in chunks:
            planned = [self._plan(template, item, output_prefix) for item in chunk.items]
            with session_scope(self.settings.database_url) as session:
                fresh = _fresh(session, planned) if planned else []
            counts["listed"] += len(planned)
            counts["would_submit"] += len(fresh)
            counts["would_skip"] += len(planned) - len(fresh)
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
        """A paused or failed backfill becomes running again; a running one (its engine was
        killed) stays so."""
        with session_scope(self.settings.database_url) as session:
            backfill = _get(session, backfill_id)
            if backfill.status in RESUMABLE:
                backfill.status = BackfillStatus.RUNNING.value
                backfill.error = None
                backfill.updated_at = jobs.now()
            return backfill

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
            broker.enqueue(self.celery, [(job_id, Queue.BULK.value) for job_id in ids])
            log.info("backfill %s: re-published %d queued jobs", backfill_id, len(ids))
            after = ids[-1]

    def _record_chunk(
        self, backfill_id: str, cursor: str | None, chunk: Chunk, planned: list[Planned]
    ) -> None:
        with session_scope(self.settings.database_url) as session:
            fresh = _fresh(session, planned) if planned else []
            new, adopt = _by_output_owner(session, fresh)
            created = jobs.create(
                session,
                [p.request for p in new],
                self.settings.output_prefix,
                extras=[_job_columns(backfill_id, p) for p in new],
            )
            queued = [c.job.id for c in created] + [
                job_id
                for job_id, p in adopt
                if jobs.reprocess(session, job_id, p.request, **_job_columns(backfill_id, p))
            ]
            advanced = session.execute(
                update(Backfill)
                .where(
                    Backfill.id == backfill_id,
                    Backfill.status == BackfillStatus.RUNNING.value,
                    Backfill.cursor.is_not_distinct_from(cursor),
                )
                .values(
                    cursor=chunk.position,
                    listed=Backfill.listed + len(planned),
                    skipped=Backfill.skipped + len(planned) - len(queued),
                    submitted=Backfill.submitted + len(queued),
                    updated_at=jobs.now(),
                )
                .execution_options(synchronize_session=False)
            )
            if advanced.rowcount != 1:
                raise _Interrupted(backfill_id)
        broker.enqueue(self.celery, [(job_id, Queue.BULK.value) for job_id in queued])
        log.debug("backfill %s: chunk to %s, %d queued", backfill_id, chunk.position, len(queued))

    def _wait_for_room(self, backfill_id: str, needed: int, progress: Progress) -> str:
        """Poll with backoff until `needed` more jobs fit under max_in_flight; returns the
        backfill's status, which ends the wait early when it is no longer running."""
        delay = 0.05
        while True:
            with session_scope(self.settings.database_url) as session:
                backfill = _get(session, backfill_id)
                in_flight = _refresh_counts(session, backfill)
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
            backfill = _get(session, backfill_id)
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
            session.execute(
                update(Backfill)
                .where(Backfill.id == backfill_id)
                .values(listing_done=True, updated_at=jobs.now())
                .execution_options(synchronize_session=False)
            )

    def _complete(self, backfill_id: str, progress: Progress) -> dict[str, Any]:
        report = join(self._report_prefix(backfill_id), REPORT_NAME)
        self.storage.write(report, self._report(backfill_id), content_type="text/csv")
        with session_scope(self.settings.database_url) as session:
            backfill = _get(session, backfill_id)
            _refresh_counts(session, backfill)
            session.execute(
                update(Backfill)
                .where(Backfill.id == backfill_id, Backfill.status == BackfillStatus.RUNNING.value)
                .values(
                    status=BackfillStatus.COMPLETED.value,
                    report=report,
                    finished_at=jobs.now(),
                    updated_at=jobs.now(),
                )
                .execution_options(synchronize_session=False)
            )
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
            output_prefix = _get(session, backfill_id).output_prefix
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
                session.execute(
                    update(Backfill)
                    .where(
                        Backfill.id == backfill_id,
                        Backfill.status == BackfillStatus.RUNNING.value,
                    )
                    .values(status=status.value, error=error, updated_at=jobs.now())
                    .execution_options(synchronize_session=False)
                )
        except Exception:  # the database may be what failed; the run's error is what matters
            log.warning("could not record backfill %s as %s", backfill_id, status.value)

    def _transition(
        self,
        backfill_id: str,
        allowed: Iterable[BackfillStatus],
        to: BackfillStatus,
        **values: Any,
    ) -> None:
        allowed_values = [status.value for status in allowed]
        with session_scope(self.settings.database_url) as session:
            changed = session.execute(
                update(Backfill)
                .where(Backfill.id == backfill_id, Backfill.status.in_(allowed_values))
                .values(status=to.value, updated_at=jobs.now(), **values)
                .execution_options(synchronize_session=False)
            ).rowcount
            if changed != 1:
                backfill = _get(session, backfill_id)
                raise InvalidTransition(
                    f"backfill {backfill_id} is {backfill.status}; cannot become {to.value}"
                )

    def _check(self, source: str, output_prefix: str, options: dict[str, Any]) -> JobRequest:
        """Validate before anything is written; returns the template request."""
        for name, location in (("source", source), ("output_prefix", output_prefix)):
            _check_location(name, location)
        template = template_request(options)
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
        if source.rstrip("/") == output_prefix.rstrip("/") or _under(source, output_prefix):
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


def _get(session: Session, backfill_id: str) -> Backfill:
    backfill = session.get(Backfill, backfill_id)
    if backfill is None:
        raise BackfillNotFound(f"no backfill with id {backfill_id}")
    return backfill


def _counts(session: Session, backfill_id: str) -> dict[str, int]:
    query = (
        select(Job.status, func.count()).where(Job.backfill_id == backfill_id).group_by(Job.status)
    )
    return {status: count for status, count in session.execute(query)}


def _in_flight(session: Session, backfill_id: str) -> int:
    counts = _counts(session, backfill_id)
    return sum(counts.get(status, 0) for status in IN_FLIGHT)


def _refresh_counts(session: Session, backfill: Backfill) -> int:
    """Copy the job outcomes into the backfill's counters; returns how many are in flight."""
    counts = _counts(session, backfill.id)
    succeeded = counts.get(JobStatus.SUCCEEDED.value, 0)
    failed = counts.get(JobStatus.FAILED.value, 0)
    if (backfill.succeeded, backfill.failed) != (succeeded, failed):
        backfill.succeeded, backfill.failed = succeeded, failed
    return sum(counts.get(status, 0) for status in IN_FLIGHT)


def from_settings(settings: Settings) -> Backfills:
    """The engine over this process's settings (shared storage and Celery app)."""
    from producer.settings import get_settings
    from producer.storage import get_storage

    if settings is get_settings():
        return Backfills(settings, get_storage(), broker.get_celery())
    return Backfills(settings, Storage(settings), broker.make_celery(settings))
