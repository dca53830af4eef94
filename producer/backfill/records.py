"""A backfill's row: reading it, its jobs' counts, and its guarded status changes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from producer import jobs
from producer.db import rowcount
from producer.errors import BackfillNotFound, InvalidTransition
from producer.models import Backfill, BackfillStatus, Job, JobStatus

RESUMABLE = [status for status in BackfillStatus if status.resumable]
IN_FLIGHT = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def get(session: Session, backfill_id: str) -> Backfill:
    backfill = session.get(Backfill, backfill_id)
    if backfill is None:
        raise BackfillNotFound(f"no backfill with id {backfill_id}")
    return backfill


def _counts(session: Session, backfill_id: str) -> dict[str, int]:
    query = (
        select(Job.status, func.count()).where(Job.backfill_id == backfill_id).group_by(Job.status)
    )
    return {status: count for status, count in session.execute(query)}


def in_flight(session: Session, backfill_id: str) -> int:
    counts = _counts(session, backfill_id)
    return sum(counts.get(status, 0) for status in IN_FLIGHT)


def refresh_counts(session: Session, backfill: Backfill) -> int:
    """Copy the job outcomes into the backfill's counters; returns how many are in flight."""
    counts = _counts(session, backfill.id)
    succeeded = counts.get(JobStatus.SUCCEEDED.value, 0)
    failed = counts.get(JobStatus.FAILED.value, 0)
    if (backfill.succeeded, backfill.failed) != (succeeded, failed):
        backfill.succeeded, backfill.failed = succeeded, failed
    return sum(counts.get(status, 0) for status in IN_FLIGHT)


def transition(
    session: Session,
    backfill_id: str,
    allowed: list[BackfillStatus],
    to: BackfillStatus,
    **values: Any,
) -> None:
    """allowed → `to`, or InvalidTransition naming the status it is in."""
    changed = session.execute(
        update(Backfill)
        .where(Backfill.id == backfill_id, Backfill.status.in_([s.value for s in allowed]))
        .values(status=to.value, updated_at=jobs.now(), **values)
        .execution_options(synchronize_session=False)
    )
    if rowcount(changed) != 1:
        backfill = get(session, backfill_id)
        raise InvalidTransition(
            f"backfill {backfill_id} is {backfill.status}; cannot become {to.value}"
        )


def claim(session: Session, backfill_id: str) -> Backfill:
    """A paused or failed backfill becomes running again; a running one (its engine was
    killed) stays so."""
    backfill = get(session, backfill_id)
    if backfill.status in RESUMABLE:
        backfill.status = BackfillStatus.RUNNING.value
        backfill.error = None
        backfill.updated_at = jobs.now()
    return backfill


def advance(
    session: Session, backfill_id: str, cursor: str | None, position: str, listed: int, queued: int
) -> bool:
    """Move the cursor from `cursor` to `position` and count a chunk of `listed` photos of
    which `queued` became jobs; False (nothing changed) when the backfill stopped running or
    another engine recorded the chunk first."""
    result = session.execute(
        update(Backfill)
        .where(
            Backfill.id == backfill_id,
            Backfill.status == BackfillStatus.RUNNING.value,
            Backfill.cursor.is_not_distinct_from(cursor),
        )
        .values(
            cursor=position,
            listed=Backfill.listed + listed,
            skipped=Backfill.skipped + listed - queued,
            submitted=Backfill.submitted + queued,
            updated_at=jobs.now(),
        )
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def finish_listing(session: Session, backfill_id: str) -> None:
    session.execute(
        update(Backfill)
        .where(Backfill.id == backfill_id)
        .values(listing_done=True, updated_at=jobs.now())
        .execution_options(synchronize_session=False)
    )


def complete(session: Session, backfill_id: str, report: str) -> None:
    """running → completed with its final counts and the location of its failure report."""
    refresh_counts(session, get(session, backfill_id))
    moment = jobs.now()
    session.execute(
        update(Backfill)
        .where(Backfill.id == backfill_id, Backfill.status == BackfillStatus.RUNNING.value)
        .values(
            status=BackfillStatus.COMPLETED.value,
            report=report,
            finished_at=moment,
            updated_at=moment,
        )
        .execution_options(synchronize_session=False)
    )


def stop(session: Session, backfill_id: str, status: BackfillStatus, error: str) -> None:
    """running → `status` (paused, failed) with the reason."""
    session.execute(
        update(Backfill)
        .where(Backfill.id == backfill_id, Backfill.status == BackfillStatus.RUNNING.value)
        .values(status=status.value, error=error, updated_at=jobs.now())
        .execution_options(synchronize_session=False)
    )
