"""The Python API producers use: submit jobs, look them up, retry and cancel them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from celery import Celery
from sqlalchemy import select

from producer import broker, jobs
from producer.catalog import refuse_classes
from producer.db import session_scope
from producer.errors import BackdropError, BrokerUnavailable, InvalidRequest, JobNotFound
from producer.locations import S3_SCHEME, canonical
from producer.models import Job, JobStatus
from producer.request import JobRequest, parse_request
from producer.services import Services, default_services
from producer.storage import Storage

log = logging.getLogger(__name__)

Record = dict[str, Any]
# `Client.list` shadows the builtin inside the class body.
Records = list[Record]
FULL_ID_LENGTH = 36
# Short prefixes are ambiguous soon and a scan of the ids either way: 6 hex digits is 16M.
MIN_ID_PREFIX = 6
HEX_AND_DASH = frozenset("0123456789abcdefABCDEF-")
RequestLike = JobRequest | Mapping[str, Any]


class Client:
    def __init__(self, services: Services | None = None) -> None:
        self.services = services or default_services()
        self.settings = self.services.settings

    @property
    def storage(self) -> Storage:
        return self.services.storage

    @property
    def celery(self) -> Celery:
        return self.services.celery

    def submit(self, request: RequestLike | None = None, **fields: Any) -> Record:
        """Queue one job; `submit(input="s3://…", effect="blur")` or `submit(request)`."""
        return self.submit_many([request if request is not None else fields])[0]

    def submit_many(self, requests: Iterable[RequestLike]) -> Records:
        """Queue many jobs: one database statement and one broker pipeline for the lot."""
        validated = [self.validate(request) for request in requests]
        with session_scope(self.settings.database_url) as session:
            created = jobs.create(session, validated, self.settings.output_prefix)
        new = [(c.job.id, c.job.queue) for c in created if c.new]
        try:
            broker.enqueue(self.celery, new)
        except Exception as exc:
            # Never leave an accepted job without its message (it would stay queued forever):
            # take back the jobs no worker has started and fail the request loudly (503).
            # Resubmitting is safe; jobs a worker already started keep running.
            with session_scope(self.settings.database_url) as session:
                withdrawn = jobs.withdraw(session, [job_id for job_id, _ in new])
            raise BrokerUnavailable(
                f"the broker did not take the jobs ({type(exc).__name__}); "
                f"{withdrawn} of {len(new)} new jobs were withdrawn; submit again"
            ) from None
        return [self._record(c.job) for c in created]

    def validate(self, request: RequestLike) -> JobRequest:
        """The request validated and its locations checked, as submit does, without
        submitting it."""
        if not isinstance(request, JobRequest):
            request = parse_request(dict(request))
        # The workers run the model this deployment names; a request cannot pick another.
        refuse_classes(request.classes, self.settings.model)
        locations = [request.input, request.output, request.mask_output, request.mask]
        if request.effect == "replace":
            locations.append(request.background)
        for location in locations:
            if location is not None:
                self.storage.check_allowed(location)
        return request

    def get(self, job_id: str) -> Record:
        with session_scope(self.settings.database_url) as session:
            return self._record(jobs.get(session, job_id))

    def resolve_id(self, prefix: str) -> str:
        """The job id that starts with `prefix` (as `git` takes a short hash): a full id as
        it is; JobNotFound when none or several jobs match."""
        if len(prefix) >= FULL_ID_LENGTH:
            return prefix
        if len(prefix) < MIN_ID_PREFIX or not set(prefix) <= HEX_AND_DASH:
            raise JobNotFound(
                f"{prefix!r}: give a job id, or its first {MIN_ID_PREFIX}+ characters"
            )
        with session_scope(self.settings.database_url) as session:
            matches = list(
                session.scalars(select(Job.id).where(Job.id.startswith(prefix.lower())).limit(2))
            )
        if len(matches) != 1:
            found = "no job" if not matches else "several jobs"
            raise JobNotFound(f"{found} with an id starting {prefix!r}")
        return matches[0]

    def list(
        self,
        *,
        status: str | None = None,
        output: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[Records, str | None]:
        """A page of jobs, newest first, and the cursor for the next page (None at the end).
        `output`: only the jobs that wrote that location, i.e. every run that produced it."""
        if status is not None and status not in {s.value for s in JobStatus}:
            raise InvalidRequest(f"unknown status {status!r}")
        written = canonical(output) if output is not None else None
        with session_scope(self.settings.database_url) as session:
            page = jobs.listing(
                session, status=status, output=written, limit=limit, before=decode_cursor(cursor)
            )
            records = [self._record(job) for job in page]
            next_cursor = (
                encode_cursor(page[-1].created_at, page[-1].id) if len(page) == limit else None
            )
        return records, next_cursor

    def retry(self, job_id: str, *, overwrite: bool = False) -> Record:
        """failed → queued; `overwrite` lets its outputs replace objects it did not write."""
        with session_scope(self.settings.database_url) as session:
            job = jobs.retry(session, job_id, overwrite=overwrite)
            record = self._record(job)
        broker.enqueue(self.celery, [(record["id"], record["queue"])])
        return record

    def retry_failed(self, limit: int = 10_000) -> Records:
        with session_scope(self.settings.database_url) as session:
            ids = jobs.failed_ids(session, limit)
        return [self.retry(job_id) for job_id in ids]

    def cancel(self, job_id: str) -> Record:
        with session_scope(self.settings.database_url) as session:
            return self._record(jobs.cancel(session, job_id))

    def _record(self, job: Job) -> Record:
        """The job's record as served: a succeeded job's S3 outputs with presigned GET URLs
        (`output_url`, `mask_url`; null otherwise), computed now since stored ones expire."""
        record = job.to_record()
        succeeded = record["status"] == JobStatus.SUCCEEDED
        for field, url in (("output", "output_url"), ("mask_output", "mask_url")):
            location = record[field]
            wanted = succeeded and location is not None and location.startswith(S3_SCHEME)
            record[url] = self._presigned(location) if wanted else None
        return record

    def _presigned(self, location: str) -> str | None:
        # A convenience of the record: without S3 credentials here (a CLI reading the
        # database only) the record is still served, without the URL.
        try:
            return self.storage.presigned_url(location, self.settings.presign_s)
        except BackdropError as exc:
            log.debug("no presigned URL for %s: %s", location, exc)
            return None

    def finished(self, job_id: str) -> Record | None:
        """The job's record once it is final, else None: one indexed read of its status
        while it is not, so polling it often costs the database little."""
        with session_scope(self.settings.database_url) as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            if status is None:
                raise JobNotFound(f"no job with id {job_id}")
            if not JobStatus(status).final:
                return None
            return self._record(jobs.get(session, job_id))

    def wait(self, job_ids: Sequence[str], *, timeout: float = 600.0) -> Records:
        """Poll until every job is final; TimeoutError names the ones still open."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        finished: dict[str, Record] = {}
        open_ids = list(dict.fromkeys(job_ids))
        while True:
            # Only the jobs still open, in a few queries: waiting on thousands of jobs must not
            # take a core away from the workers it waits for.
            with session_scope(self.settings.database_url) as session:
                records = [self._record(job) for job in jobs.get_many(session, open_ids)]
            finished.update((r["id"], r) for r in records if JobStatus(r["status"]).final)
            open_ids = [job_id for job_id in open_ids if job_id not in finished]
            if not open_ids:
                return [finished[job_id] for job_id in job_ids]
            if time.monotonic() > deadline:
                shown = ", ".join(open_ids[:10]) + (" …" if len(open_ids) > 10 else "")
                raise TimeoutError(
                    f"{len(open_ids)} jobs not finished after {timeout:.0f}s: {shown}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)


def encode_cursor(created_at: datetime, job_id: str) -> str:
    return f"{created_at.isoformat()}|{job_id}"


def decode_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    if not cursor:
        return None
    try:
        moment, job_id = cursor.split("|", 1)
        return datetime.fromisoformat(moment), job_id
    except ValueError:
        raise InvalidRequest(f"malformed cursor {cursor!r}") from None
