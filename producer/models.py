"""The job and backfill tables and their status enums."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Text, false, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Plain strings rather than a native enum: adding a status is then a code change, not DDL.
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    queue: Mapped[str] = mapped_column(String(32), nullable=False)
    input: Mapped[str] = mapped_column(Text, nullable=False)
    output: Mapped[str] = mapped_column(Text, nullable=False)
    mask_output: Mapped[str | None] = mapped_column(Text)
    effect: Mapped[str] = mapped_column(String(16), nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_weights: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(255))
    timings_ms: Mapped[dict[str, float] | None] = mapped_column(JSON)
    input_width: Mapped[int | None] = mapped_column(Integer)
    input_height: Mapped[int | None] = mapped_column(Integer)
    foreground_fraction: Mapped[float | None] = mapped_column(Float)
    # A running job belongs to its attempt only while the worker keeps renewing this lease.
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set for jobs a backfill created: which one, the input version it saw, and the hash a
    # later backfill compares to skip photos already processed the same way.
    backfill_id: Mapped[str | None] = mapped_column(String(36))
    input_etag: Mapped[str | None] = mapped_column(String(200))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    # Whether the object at output (mask_output) is this job's own: it wrote it, on this or an
    # earlier attempt, retry or re-run. Only then may it replace it without `overwrite`.
    owns_output: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false()
    )
    owns_mask: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false()
    )

    # Completion callback, with the job as its outbox: a final transition sets
    # callback_due_at (producer/outbox.py), a delivery claims it, success clears it.
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    callback_tries: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0"
    )
    callback_delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    callbacks: Mapped[list[CallbackAttempt]] = relationship(
        primaryjoin="Job.id == foreign(CallbackAttempt.job_id)",
        order_by="CallbackAttempt.id",
        lazy="selectin",
        viewonly=True,
    )

    __table_args__ = (
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_created_at", "created_at"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_backfill_status", "backfill_id", "status"),
        # An output keeps every job that ran for it (its history), but is written by at most
        # one unfinished job at a time.
        Index("ix_jobs_output", "output"),
        Index(
            "ux_jobs_output_unfinished",
            "output",
            unique=True,
            postgresql_where=text("status IN ('queued', 'running')"),
            sqlite_where=text("status IN ('queued', 'running')"),
        ),
        Index("ix_jobs_mask_output", "mask_output"),
        Index("ix_jobs_callback_due_at", "callback_due_at"),
    )

    def to_record(self) -> dict[str, Any]:
        """The SPEC's job record."""
        return {
            "id": self.id,
            "status": self.status,
            "queue": self.queue,
            "input": self.input,
            "output": self.output,
            "mask_output": self.mask_output,
            "effect": self.effect,
            "params": self.params,
            "idempotency_key": self.idempotency_key,
            "model": {"name": self.model_name, "weights": self.model_weights},
            "attempts": self.attempts,
            "error": (
                {"code": self.error_code, "message": self.error_message}
                if self.error_code
                else None
            ),
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "worker": self.worker,
            "timings_ms": self.timings_ms,
            "input_size": (
                [self.input_width, self.input_height] if self.input_width is not None else None
            ),
            "foreground_fraction": self.foreground_fraction,
            "backfill_id": self.backfill_id,
            "callback_url": self.callback_url,
            "callbacks": [attempt.to_record() for attempt in self.callbacks],
        }


class CallbackAttempt(Base):
    """One delivery attempt of a job's callback (no foreign key: jobs may be truncated)."""

    __tablename__ = "callback_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), nullable=False, index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float, nullable=False)
    worker: Mapped[str | None] = mapped_column(String(255))
    # When the next attempt was scheduled for; null once delivered or given up.
    next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    def to_record(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "status_code": self.status_code,
            "error": self.error,
            "duration_ms": self.duration_ms,
            "worker": self.worker,
            "next_at": iso(self.next_at),
        }


class BackfillStatus(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    CANCELED = "canceled"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def resumable(self) -> bool:
        """A run (`--resume`, POST …/resume) continues it: paused, failed, or running (its
        engine may have been killed)."""
        return self in (BackfillStatus.RUNNING, BackfillStatus.PAUSED, BackfillStatus.FAILED)


class Backfill(Base):
    __tablename__ = "backfills"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    output_prefix: Mapped[str] = mapped_column(Text, nullable=False)
    # The job options every photo gets (request fields without input/output).
    options: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    model: Mapped[str] = mapped_column(String(64), nullable=False)
    max_in_flight: Mapped[int] = mapped_column(Integer, nullable=False)
    listed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    skipped: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    submitted: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    failed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # Last location handled in listing order (a manifest: lines handled); a resume starts after.
    cursor: Mapped[str | None] = mapped_column(Text)
    listing_done: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    report: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_backfills_created_at", "created_at"),)

    def to_record(self, in_flight: int | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "source": self.source,
            "output_prefix": self.output_prefix,
            "options": self.options,
            "model": self.model,
            "max_in_flight": self.max_in_flight,
            "counts": {
                "listed": self.listed,
                "skipped": self.skipped,
                "submitted": self.submitted,
                "succeeded": self.succeeded,
                "failed": self.failed,
                "in_flight": in_flight,
            },
            "cursor": self.cursor,
            "listing_done": self.listing_done,
            "report": self.report,
            "error": self.error,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "finished_at": iso(self.finished_at),
        }


def utc(moment: datetime) -> datetime:
    """A stored moment as an aware UTC datetime: everything is stored in UTC, and SQLite
    hands back naive datetimes."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def iso(moment: datetime | str | None) -> str | None:
    """A stored moment for a record (ISO 8601, UTC); None stays None."""
    if moment is None:
        return None
    if isinstance(moment, str):  # SQLite may hand back an aggregate's datetime as text
        moment = datetime.fromisoformat(moment)
    return utc(moment).isoformat()
