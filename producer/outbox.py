"""The callback outbox: which deliveries are due, who holds each, what each attempt did.

The job row is the outbox. A final transition (producer/jobs.py) sets `callback_due_at` in
the same UPDATE that makes the job final, so a delivery is owed the moment the outcome is
committed, whatever happens to the worker next. A sender claims a due delivery by moving
`callback_due_at` to the end of its claim with a conditional UPDATE on the value it read:
two workers can never hold one attempt, and a worker that dies holding it only delays the
delivery until the claim runs out. The attempt is then recorded (a row per attempt) and the
next one scheduled, guarded by that same claim value, so a `redeliver` or a takeover in the
meantime is never overwritten.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from producer.callbacks import Outcome
from producer.db import rowcount
from producer.errors import InvalidRequest, InvalidTransition, JobNotFound
from producer.models import CallbackAttempt, Job, JobStatus
from producer.settings import Settings

FINAL = [status.value for status in JobStatus if status.final]
# A jittered delay is within this share of its nominal value, so that receivers recovering
# from an outage are not hit by every pending delivery at once.
JITTER = 0.2

Delay = Callable[[int, Settings], "float | None"]


def now() -> datetime:
    return datetime.now(UTC)


def on_end(moment: datetime) -> dict[str, Any]:
    """Columns a final transition sets: a job with a callback_url owes a delivery now."""
    return {
        "callback_due_at": case((Job.callback_url.is_not(None), moment), else_=None),
        "callback_tries": 0,
    }


def retry_delay(tries: int, settings: Settings) -> float | None:
    """Seconds from attempt `tries` (1 = the first) to the next, or None: give up. Doubling
    from the base up to the cap, each within ±JITTER; the defaults give 11 retries spread
    over 65-97 minutes."""
    if tries >= settings.callback_max_attempts:
        return None
    doubled: float = settings.callback_retry_base_s * 2.0 ** (tries - 1)
    nominal = min(settings.callback_retry_max_s, doubled)
    return nominal * random.uniform(1 - JITTER, 1 + JITTER)


def claim_seconds(settings: Settings) -> float:
    """How long a claim holds a delivery: well past the longest attempt, which the sender's
    deadline bounds, so only a dead sender's claim ever runs out."""
    return 2 * (settings.callback_connect_timeout_s + settings.callback_timeout_s) + 30


@dataclass(frozen=True)
class Claim:
    job_id: str
    url: str
    until: datetime  # the claim's own callback_due_at value: its fencing token
    tries: int
    record: dict[str, Any]  # the final job record, the body to send


def body_record(job: Job) -> dict[str, Any]:
    """The job record a callback carries: without the delivery attempts, which a receiver
    has no use for and which would be stale as soon as it was sent."""
    record = job.to_record()
    record.pop("callbacks", None)
    return record


def claim(session: Session, limit: int, settings: Settings, moment: datetime) -> list[Claim]:
    """Claim up to `limit` due deliveries of final jobs, oldest first."""
    due = session.execute(
        select(Job.id, Job.callback_due_at)
        .where(Job.callback_due_at <= moment, Job.status.in_(FINAL))
        .order_by(Job.callback_due_at)
        .limit(limit)
    ).all()
    until = moment + timedelta(seconds=claim_seconds(settings))
    claimed = []
    for job_id, seen in due:
        taken = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.callback_due_at == seen, Job.status.in_(FINAL))
            .values(callback_due_at=until)
            .execution_options(synchronize_session=False)
        )
        if rowcount(taken) == 1:
            claimed.append(job_id)
    if not claimed:
        return []
    jobs = session.scalars(select(Job).where(Job.id.in_(claimed))).all()
    return [
        Claim(job.id, job.callback_url or "", until, job.callback_tries, body_record(job))
        for job in jobs
    ]


def record(
    session: Session,
    held: Claim,
    outcome: Outcome,
    settings: Settings,
    *,
    worker: str,
    moment: datetime,
    delay: Delay = retry_delay,
) -> datetime | None:
    """Record one attempt and schedule the next (None: delivered, or given up). When the
    claim was lost meanwhile (redeliver, or a takeover after a stall) the attempt is still
    recorded but the schedule is left to whoever holds the delivery now."""
    tries = held.tries + 1
    seconds = None if outcome.delivered else delay(tries, settings)
    next_at = None if seconds is None else moment + timedelta(seconds=seconds)
    values: dict[str, Any] = {"callback_tries": tries, "callback_due_at": next_at}
    if outcome.delivered:
        values["callback_delivered_at"] = moment
    kept = session.execute(
        update(Job)
        .where(Job.id == held.job_id, Job.callback_due_at == held.until)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    scheduled = next_at if rowcount(kept) == 1 else None
    session.add(
        CallbackAttempt(
            job_id=held.job_id,
            at=moment,
            status_code=outcome.status_code,
            error=outcome.error,
            duration_ms=outcome.duration_ms,
            worker=worker,
            next_at=scheduled,
        )
    )
    return scheduled


def next_due(session: Session) -> datetime | None:
    """When the earliest pending delivery is due (claimed ones: when their claim ends)."""
    return session.scalar(
        select(func.min(Job.callback_due_at)).where(
            Job.callback_due_at.is_not(None), Job.status.in_(FINAL)
        )
    )


def redeliver(session: Session, job_id: str, moment: datetime) -> None:
    """Owe the job's callback again, due now, with a fresh schedule of attempts (after a
    receiver's outage outlasted the retries, or it lost what it received)."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"no job with id {job_id}")
    if job.callback_url is None:
        raise InvalidRequest(f"job {job_id} has no callback_url")
    if not JobStatus(job.status).final:
        raise InvalidTransition(f"job {job_id} is {job.status}; its callback is sent when it ends")
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(FINAL))
        .values(callback_due_at=moment, callback_tries=0)
        .execution_options(synchronize_session=False)
    )
