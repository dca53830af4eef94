"""Job creation and every status change.

Each transition is one conditional UPDATE guarded by the statuses it may leave from (and, for
a running job, by the attempt that owns it), so a duplicate or late message can never move a
finished job backwards or let a stale attempt overwrite a newer one.

History: an output location belongs to the job submitted for it; only a re-run (`rerun`, how
a backfill processes a photo again) adds another job for it, once every earlier one is final.
Earlier runs keep their records, so an output's jobs say what produced each version, and at
most one job per output is ever unfinished (a partial unique index, migration 0006).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    ColumnElement,
    Insert,
    TextClause,
    any_,
    bindparam,
    delete,
    exists,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from producer import outbox
from producer.db import rowcount
from producer.errors import InvalidRequest, InvalidTransition, JobNotFound, OutputExists
from producer.formats import OutputFormat
from producer.locations import canonical_prefix
from producer.models import Job, JobStatus
from producer.request import JobRequest

# Rows or ids per statement: well under the bound-parameter limits of SQLite and PostgreSQL.
STATEMENT_CHUNK = 2000
JOBS = Job.metadata.tables["jobs"]
# The columns a new row gets by default (owns_output, callback_tries, …), for the object of a
# job just inserted to read as the row does.
ROW_DEFAULTS = {
    column.name: column.default.arg
    for column in JOBS.c
    if isinstance(column.default, ScalarElementColumnDefault)
}

T = TypeVar("T")


def now() -> datetime:
    return datetime.now(UTC)


def one_of(
    session: Session, column: InstrumentedAttribute[Any], values: Sequence[Any]
) -> ColumnElement[bool]:
    """`column IN values`; on PostgreSQL as `= ANY(one array parameter)`: a bulk body's
    hundreds of values are then one bound value, not hundreds to compile, send and cast."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


def _chunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    """`values` in slices of STATEMENT_CHUNK, one statement's worth each."""
    for start in range(0, len(values), STATEMENT_CHUNK):
        yield values[start : start + STATEMENT_CHUNK]


def default_output(output_prefix: str, job_id: str, fmt: str) -> str:
    return f"{output_prefix.rstrip('/')}/{job_id}.{OutputFormat(fmt).extension}"


def _row(request: JobRequest, output_prefix: str, created_at: datetime) -> dict[str, Any]:
    job_id = str(uuid.uuid4())
    return {
        "id": job_id,
        "status": JobStatus.QUEUED.value,
        "queue": request.queue,
        "input": request.input,
        "output": request.output or default_output(output_prefix, job_id, request.format),
        "mask_output": request.mask_output,
        "effect": request.effect,
        "params": request.params(),
        "idempotency_key": request.idempotency_key,
        "callback_url": request.callback_url,
        "attempts": 0,
        "created_at": created_at,
    }


@dataclass(frozen=True)
class Created:
    job: Job
    new: bool  # False when an idempotency key matched an existing job: nothing to enqueue


def create(
    session: Session,
    requests: Sequence[JobRequest],
    output_prefix: str,
    *,
    extras: Sequence[Mapping[str, Any]] | None = None,
) -> list[Created]:
    """Insert jobs in one statement; an idempotency key already present yields the old job.

    `extras`, one per request, sets further columns (a backfill's id, input ETag, fingerprint).
    """
    if not requests:
        return []
    created_at = now()
    # Canonical, like every location a request holds: default outputs compare as they must.
    output_prefix = canonical_prefix(output_prefix)
    rows = [_row(request, output_prefix, created_at) for request in requests]
    if extras is not None:
        rows = [row | dict(extra) for row, extra in zip(rows, extras, strict=True)]
    fresh = _check_outputs_free(session, rows)
    inserted = _insert(session, fresh)
    # A new job's record is the row just written, as stored (created_at as the database
    # hands it back); only the jobs an idempotency key matched are read.
    wanted_keys = [row["idempotency_key"] for row in rows if row["id"] not in inserted]
    by_key = {}
    if wanted_keys:
        by_key = {
            job.idempotency_key: job
            for job in session.scalars(
                select(Job).where(one_of(session, Job.idempotency_key, wanted_keys))
            )
        }
    results = []
    for row in rows:
        stored_at = inserted.get(row["id"])
        if stored_at is not None:
            job = Job(**(ROW_DEFAULTS | row | {"created_at": stored_at}))
            results.append(Created(job, new=True))
        else:
            results.append(Created(by_key[row["idempotency_key"]], new=False))
    return results


def _insert(
    session: Session,
    rows: list[dict[str, Any]],
    taken: str = "an output location of this request already belongs to another job",
) -> dict[str, datetime]:
    """INSERT the rows in one statement; returns id → created_at (as the database hands it
    back) of those inserted: all but the ones whose idempotency key was taken meanwhile.
    `taken`: the message when a concurrent job took one of their outputs."""
    if not rows:
        return {}
    # The columns any row names (a row that leaves one out gets NULL there).
    names = list(dict.fromkeys(name for row in rows for name in row))
    try:
        dialect = session.get_bind().dialect
        if dialect.name == "postgresql":
            returned = session.execute(_unnest_insert(dialect, names), _column_arrays(names, rows))
        else:
            returned = session.execute(_values_insert(), [dict.fromkeys(names) | r for r in rows])
    except IntegrityError:
        # A concurrent submit or re-run took one of these outputs between the check and the
        # insert (the unique index on unfinished jobs' outputs is the last word).
        raise InvalidRequest(taken) from None
    return {job_id: stored_at for job_id, stored_at in returned}


def _unnest_insert(dialect: Dialect, names: list[str]) -> TextClause:
    """PostgreSQL: INSERT … SELECT FROM unnest(one array per column). A short statement,
    parsed and planned once whatever the row count; the multi-row VALUES form of 1,000 jobs
    (13,000 parameters) cost ~5x the time, most of it parsing the statement."""
    arrays = ", ".join(
        f"CAST(:{name} AS {JOBS.c[name].type.compile(dialect=dialect)}[])" for name in names
    )
    return text(
        f"INSERT INTO jobs ({', '.join(names)}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id, created_at"
    )


def _column_arrays(names: list[str], rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    arrays = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if isinstance(JOBS.c[name].type, JSON):
            values = [json.dumps(value) for value in values]
        arrays[name] = values
    return arrays


def _values_insert() -> Insert:
    """SQLite: an executemany SQLAlchemy sends as multi-row VALUES pages under SQLite's
    parameter limit."""
    return (
        sqlite.insert(JOBS)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(JOBS.c.id, JOBS.c.created_at)
    )


def _check_outputs_free(session: Session, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows to insert: those whose idempotency key is new. Refuses (InvalidRequest) a
    request that would write where another job writes (its output or mask_output), or
    twice to one place, so that no job can ever overwrite another one's result. Locations
    are canonical (the request model made them so): an alias is the same location."""
    keys = [row["idempotency_key"] for row in rows if row["idempotency_key"] is not None]
    known: set[str] = set()
    for chunk in _chunks(keys):
        known.update(
            session.scalars(
                select(Job.idempotency_key).where(one_of(session, Job.idempotency_key, chunk))
            )
        )
    fresh = [row for row in rows if row["idempotency_key"] not in known]
    written = [row[name] for row in fresh for name in ("output", "mask_output") if row[name]]
    seen: set[str] = set()
    for location in written:
        if location in seen:
            raise InvalidRequest(f"output {location} is named twice in this request")
        seen.add(location)
    taken = _first_taken(session, written)
    if taken is not None:
        raise InvalidRequest(
            f"output {taken} already belongs to another job; choose another location "
            "(or resubmit with that job's idempotency key)"
        )
    return fresh


def _first_taken(session: Session, locations: Sequence[str]) -> str | None:
    """One of `locations` that some job writes (as its output or mask), if any."""
    for chunk in _chunks(locations):
        taken = session.scalars(
            select(Job.output)
            .where(one_of(session, Job.output, chunk))
            .union_all(select(Job.mask_output).where(one_of(session, Job.mask_output, chunk)))
            .limit(1)
        ).first()
        if taken is not None:
            return taken
    return None


@dataclass(frozen=True)
class Run:
    """The newest job of an output, as a backfill compares a photo with it."""

    id: str
    input: str
    status: str
    backfill_id: str | None
    fingerprint: str | None
    error_code: str | None


def latest_runs(session: Session, outputs: Sequence[str]) -> dict[str, Run]:
    """Output → its newest job, for those of `outputs` that have one."""
    latest: dict[str, Run] = {}
    for chunk in _chunks(outputs):
        query = (
            select(
                Job.id,
                Job.input,
                Job.output,
                Job.status,
                Job.backfill_id,
                Job.fingerprint,
                Job.error_code,
            )
            .where(one_of(session, Job.output, chunk))
            .order_by(Job.created_at)
        )
        for row in session.execute(query):
            latest[row.output] = Run(
                row.id, row.input, row.status, row.backfill_id, row.fingerprint, row.error_code
            )
    return latest


def rerun(
    session: Session,
    previous_ids: Sequence[str],
    requests: Sequence[JobRequest],
    *,
    extras: Sequence[Mapping[str, Any]],
) -> list[Job]:
    """New jobs that process again what final jobs processed, for the same outputs (a backfill
    re-running photos: changed parameters, or an earlier failure). The earlier jobs' records
    stay as they are. A new job owns what its predecessor owned, so it may replace the
    output an earlier run wrote; a mask at a new location is not its own until it writes
    there. Refused (InvalidRequest) while an unfinished job still writes one of the outputs.
    `extras` as for `create`; a re-run carries no idempotency key (that named the first)."""
    if not requests:
        return []
    before = {job.id: job for job in get_many(session, previous_ids)}
    created_at = now()
    rows = []
    for job_id, request, extra in zip(previous_ids, requests, extras, strict=True):
        earlier = before[job_id]
        if request.output != earlier.output:
            raise InvalidRequest(f"a re-run of job {job_id} writes {earlier.output}")
        same_mask = request.mask_output == earlier.mask_output
        # request.output is set: the prefix for a default output is never used.
        row = _row(request, "", created_at) | dict(extra)
        rows.append(
            row
            | {
                "idempotency_key": None,
                "owns_output": earlier.owns_output,
                "owns_mask": earlier.owns_mask and same_mask,
            }
        )
    moved_masks = [
        row["mask_output"]
        for row, job_id in zip(rows, previous_ids, strict=True)
        if row["mask_output"] and row["mask_output"] != before[job_id].mask_output
    ]
    taken = _first_taken(session, moved_masks)
    if taken is not None:
        raise InvalidRequest(f"mask output {taken} already belongs to another job")
    inserted = _insert(session, rows, "an earlier job of this output is not finished yet")
    return [Job(**(ROW_DEFAULTS | row | {"created_at": inserted[row["id"]]})) for row in rows]


def check_overwrite(job: Job, *, overwrite: bool, exists: Callable[[str], bool]) -> None:
    """Before a job writes: refuse (OutputExists) to replace an object the job does not own,
    i.e. one it did not write on an earlier attempt, retry or re-run, unless the request
    said overwrite. What a job owns is recorded by `own_outputs`."""
    if overwrite:
        return
    for location, owned in ((job.output, job.owns_output), (job.mask_output, job.owns_mask)):
        if location and not owned and exists(location):
            raise OutputExists(
                f"{location} already exists and was not written by this job; retry the job "
                "with overwrite to replace it (backdrop retry JOB_ID --overwrite), or submit "
                "it with another output"
            )


def own_outputs(session: Session, job_id: str, attempt: int) -> bool:
    """Record that the job's output and mask_output are its own (it is about to write them),
    so a later attempt, retry or re-run may write them again; False if the attempt no longer
    owns the job."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, attempt))
        .values(owns_output=True, owns_mask=Job.mask_output.is_not(None))
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def withdraw(session: Session, job_ids: Sequence[str]) -> int:
    """Delete jobs that were created but could not be queued, unless a worker already
    started them (then they run to the end). Returns how many were deleted."""
    deleted = 0
    for chunk in _chunks(job_ids):
        result = session.execute(
            delete(Job)
            .where(Job.id.in_(chunk), Job.status == JobStatus.QUEUED.value, Job.attempts == 0)
            .execution_options(synchronize_session=False)
        )
        deleted += rowcount(result)
    return deleted


def get(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"no job with id {job_id}")
    return job


def get_many(session: Session, job_ids: Sequence[str]) -> list[Job]:
    """The jobs in the order asked, a few queries for any number of them."""
    found: dict[str, Job] = {}
    for chunk in _chunks(job_ids):
        found.update((job.id, job) for job in session.scalars(select(Job).where(Job.id.in_(chunk))))
    missing = [job_id for job_id in job_ids if job_id not in found]
    if missing:
        raise JobNotFound(f"no job with id {missing[0]}")
    return [found[job_id] for job_id in job_ids]


def listing(
    session: Session,
    *,
    status: str | None = None,
    output: str | None = None,
    limit: int = 50,
    before: tuple[datetime, str] | None = None,
) -> list[Job]:
    """Newest first; `before` is a (created_at, id) cursor for stable pagination. `output`:
    only the jobs that wrote there, i.e. the history of one output location."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == JobStatus(status).value)
    if output is not None:
        query = query.where(Job.output == output)
    if before is not None:
        created_at, job_id = before
        query = query.where(
            (Job.created_at < created_at) | ((Job.created_at == created_at) & (Job.id < job_id))
        )
    return list(session.scalars(query))


def _guarded(session: Session, job_id: str, allowed: Sequence[JobStatus], **values: Any) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([s.value for s in allowed]))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def start(session: Session, job_id: str, worker: str, lease_s: float) -> Job | None:
    """queued → running, or a running job whose lease ran out (its worker died) → running
    under a new attempt. Returns None when the job is final, gone, or still owned by a live
    attempt: the worker then drops the message."""
    moment = now()
    startable = (Job.status == JobStatus.QUEUED.value) | (
        (Job.status == JobStatus.RUNNING.value)
        & ((Job.lease_expires_at.is_(None)) | (Job.lease_expires_at < moment))
    )
    started = session.execute(
        update(Job)
        .where(Job.id == job_id, startable)
        .values(
            status=JobStatus.RUNNING.value,
            attempts=Job.attempts + 1,
            started_at=moment,
            worker=worker,
            lease_expires_at=moment + timedelta(seconds=lease_s),
        )
        .execution_options(synchronize_session=False)
    )
    if rowcount(started) != 1:
        return None
    session.expire_all()
    return session.get(Job, job_id)


def renew(session: Session, owned: Sequence[tuple[str, int]], lease_s: float) -> int:
    """Extend the leases of the attempts this worker is running; returns how many it still owns."""
    if not owned:
        return 0
    expires = now() + timedelta(seconds=lease_s)
    renewed = 0
    for job_id, attempt in owned:
        result = session.execute(
            update(Job)
            .where(_owned(job_id, attempt))
            .values(lease_expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        renewed += rowcount(result)
    return renewed


def release(
    session: Session, job_id: str, attempt: int, code: str, message: str, *, hold_s: float = 0
) -> bool:
    """running → queued after a transient failure, keeping the reason until the next try.
    `hold_s`: how long the retry is already scheduled for (no re-publishing meanwhile)."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, attempt))
        .values(
            status=JobStatus.QUEUED.value,
            lease_expires_at=now() + timedelta(seconds=hold_s) if hold_s > 0 else None,
            error_code=code,
            error_message=f"retrying after: {message}"[:2000],
        )
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


@dataclass(frozen=True)
class Reaped:
    requeued: list[tuple[str, str]]  # (job id, queue) to publish again
    lost: list[str]  # jobs that kept killing their workers, now failed with worker_lost


def reap(session: Session, max_attempts: int) -> Reaped:
    """Jobs whose worker stopped renewing the lease: requeue them, or fail them with
    worker_lost once they have used up their attempts (a poison photo)."""
    moment = now()
    expired = (Job.status == JobStatus.RUNNING.value) & (Job.lease_expires_at < moment)
    lost = session.execute(
        update(Job)
        .where(expired, Job.attempts >= max_attempts)
        .values(
            status=JobStatus.FAILED.value,
            finished_at=moment,
            lease_expires_at=None,
            error_code="worker_lost",
            error_message=(
                f"each of {max_attempts} attempts ended without a result: the worker died "
                "or the attempt overran BACKDROP_JOB_TIMEOUT_S"
            ),
            **outbox.on_end(moment),
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    lost_ids = list(lost.scalars())
    requeued = session.execute(
        update(Job)
        .where(expired, Job.attempts < max_attempts)
        .values(status=JobStatus.QUEUED.value, lease_expires_at=None)
        .returning(Job.id, Job.queue)
        .execution_options(synchronize_session=False)
    )
    return Reaped(requeued=[(row.id, row.queue) for row in requeued], lost=lost_ids)


def _owned(job_id: str, attempt: int) -> Any:
    return (Job.id == job_id) & (Job.status == JobStatus.RUNNING.value) & (Job.attempts == attempt)


def succeed(
    session: Session,
    job_id: str,
    attempt: int,
    *,
    model_name: str | None,
    model_weights: str | None,
    timings_ms: dict[str, float],
    input_size: tuple[int, int],
    foreground_fraction: float,
) -> bool:
    """running → succeeded, only for the attempt that owns the job."""
    moment = now()
    result = session.execute(
        update(Job)
        .where(_owned(job_id, attempt))
        .values(
            status=JobStatus.SUCCEEDED.value,
            finished_at=moment,
            **outbox.on_end(moment),
            lease_expires_at=None,
            model_name=model_name,
            model_weights=model_weights,
            timings_ms=timings_ms,
            input_width=input_size[0],
            input_height=input_size[1],
            foreground_fraction=foreground_fraction,
            error_code=None,
            error_message=None,
        )
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def fail(session: Session, job_id: str, attempt: int, code: str, message: str) -> bool:
    """running → failed, only for the attempt that owns the job."""
    moment = now()
    result = session.execute(
        update(Job)
        .where(_owned(job_id, attempt))
        .values(
            status=JobStatus.FAILED.value,
            finished_at=moment,
            lease_expires_at=None,
            error_code=code,
            error_message=message[:2000],
            **outbox.on_end(moment),
        )
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def cancel(session: Session, job_id: str) -> Job:
    """queued → canceled."""
    moment = now()
    if not _guarded(
        session,
        job_id,
        [JobStatus.QUEUED],
        status=JobStatus.CANCELED.value,
        finished_at=moment,
        **outbox.on_end(moment),
    ):
        job = get(session, job_id)
        raise InvalidTransition(f"job {job_id} is {job.status}; only queued jobs can be canceled")
    session.expire_all()
    return get(session, job_id)


def cancel_queued(session: Session, backfill_id: str) -> int:
    """queued → canceled for every still-queued job of a backfill; returns how many."""
    moment = now()
    result = session.execute(
        update(Job)
        .where(Job.backfill_id == backfill_id, Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.CANCELED.value, finished_at=moment, **outbox.on_end(moment))
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


def _superseded() -> ColumnElement[bool]:
    """The job has a later run for its output: what it wrote is no longer the output's."""
    later = aliased(Job)
    return exists().where(later.output == Job.output, later.created_at > Job.created_at)


def retry(session: Session, job_id: str, *, overwrite: bool = False) -> Job:
    """failed → queued, with a fresh attempt budget; with `overwrite`, its outputs may now
    replace objects it did not write (after an output_exists failure). Only the latest run of
    an output can be retried: an earlier one would write over a later run's result."""
    values: dict[str, Any] = {}
    if overwrite:
        values["params"] = {**get(session, job_id).params, "overwrite": True}
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.FAILED.value, ~_superseded())
        .values(
            status=JobStatus.QUEUED.value,
            attempts=0,
            error_code=None,
            error_message=None,
            started_at=None,
            finished_at=None,
            worker=None,
            **values,
        )
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        job = get(session, job_id)
        if job.status == JobStatus.FAILED.value:
            raise InvalidTransition(
                f"job {job_id} was run again since (backdrop jobs --output {job.output}); "
                "retry the latest run"
            )
        raise InvalidTransition(f"job {job_id} is {job.status}; only failed jobs can be retried")
    session.expire_all()
    return get(session, job_id)


def queued_before(session: Session, queue: str, moment: datetime, *, limit: int) -> list[str]:
    """Queued jobs of a queue that have not moved since `moment` (oldest first)."""
    since = func.coalesce(Job.started_at, Job.created_at)
    not_held = Job.lease_expires_at.is_(None) | (Job.lease_expires_at < now())
    query = (
        select(Job.id)
        .where(Job.status == JobStatus.QUEUED.value, Job.queue == queue, since < moment, not_held)
        .order_by(Job.created_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def failed_ids(session: Session, limit: int = 10_000) -> list[str]:
    """Failed jobs that are their output's latest run (those `retry` takes)."""
    query = select(Job.id).where(Job.status == JobStatus.FAILED.value, ~_superseded()).limit(limit)
    return list(session.scalars(query))
