"""The Celery task: one job per message, run on a thread that shares the process's model."""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.signals import worker_process_init, worker_ready

from producer import jobs, metrics
from producer.broker import MAX_RETRY_DELAY_S, TASK_NAME
from producer.db import session_scope
from producer.errors import BackdropError, DatabaseUnavailable, TransientError, WorkerLost
from producer.leases import LeaseKeeper
from producer.logs import job_context
from producer.models import Job
from producer.request import JobRequest, parse_request
from producer.services import default_services
from producer.settings import Settings
from producer.storage import Storage
from worker import budget, messages
from worker.batcher import Batcher
from worker.imageio import image_size
from worker.pipeline import Imaging, Inputs, Timings, named, store
from worker.salient import SalientSegmenter
from worker.segmenter import Segmenter, load_segmenter
from worker.threadplan import CpuSlots, ThreadPlan, cores, plan_threads

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
app = default_services().celery
messages.guard(app)

_batcher: Batcher | None = None
_batcher_lock = threading.Lock()
_leases: LeaseKeeper | None = None
_budget: budget.MemoryBudget | None = None
_cpu_slots: CpuSlots | None = None
_imaging: Imaging | None = None


class Superseded(Exception):
    """This attempt lost the job to a newer one; it must stop without writing anything."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@functools.cache
def _plan() -> ThreadPlan:
    """The process's thread plan, made once (deciding the device may ask torch)."""
    return plan_threads(default_services().settings, cores())


def get_batcher() -> Batcher:
    """The process's one batcher; its thread builds the model on first use."""
    global _batcher
    with _batcher_lock:
        if _batcher is None:
            settings = default_services().settings
            _batcher = Batcher(
                lambda: load_segmenter(settings, fetch=default_services().storage.download_file),
                max_batch=settings.max_batch,
                max_wait_ms=settings.max_wait_ms,
                lanes=_plan().model_lanes,
            )
        return _batcher


def get_budget() -> budget.MemoryBudget:
    """The process's one memory budget, shared by every job thread."""
    global _budget
    with _batcher_lock:
        if _budget is None:
            _budget = budget.MemoryBudget(budget.capacity_bytes(default_services().settings))
            log.info("memory budget for images: %.0f MB", _budget.capacity / budget.MB)
        return _budget


def get_cpu_slots() -> CpuSlots:
    """The process's CPU slots for imaging, shared by every job thread."""
    global _cpu_slots
    with _batcher_lock:
        if _cpu_slots is None:
            _cpu_slots = CpuSlots(_plan().cpu_slots)
        return _cpu_slots


def get_leases() -> LeaseKeeper:
    global _leases
    with _batcher_lock:
        if _leases is None:
            _leases = LeaseKeeper(default_services().settings, app)
            _leases.start()
        return _leases


@worker_process_init.connect
@worker_ready.connect
def _warm_up(**_: Any) -> None:
    # Load the model and start renewing leases as soon as the worker runs, not when the
    # first job arrives.
    get_batcher()
    get_leases()
    get_budget()


# How long a worker keeps trying to record a finished job's outcome while the database is
# unreachable (a PostgreSQL restart takes seconds). Past it the attempt gives up; the job is
# still not lost: its lease runs out and the reaper requeues it.
RECORD_PATIENCE_S = 60.0


def request_of(job: Job) -> JobRequest:
    # parse_request, not JobRequest(...): a row that fails validation (written by hand, or
    # by an older version) fails as invalid_request with the reason, not as internal.
    return parse_request(
        {
            "input": job.input,
            "effect": job.effect,
            "output": job.output,
            "mask_output": job.mask_output,
            "queue": job.queue,
            **job.params,
        }
    )


def get_imaging() -> Imaging:
    """The process's imaging path, on its batched model and CPU slots."""
    global _imaging
    batcher, slots, settings = get_batcher(), get_cpu_slots(), default_services().settings
    with _batcher_lock:
        if _imaging is None:
            _imaging = Imaging(
                batcher.segment,
                device=lambda: _device(batcher),
                max_pixels=settings.max_pixels,
                max_bytes=settings.max_input_bytes,
                cpu=slots.hold,
            )
        return _imaging


def _device(batcher: Batcher) -> torch.device | None:
    segmenter = batcher.segmenter
    return segmenter.device if isinstance(segmenter, Segmenter | SalientSegmenter) else None


def process(job: Job, settings: Settings, storage: Storage, imaging: Imaging) -> dict[str, Any]:
    """Run one job's work; returns what the succeeded record needs."""
    started = time.monotonic()
    request = request_of(job)
    timings = Timings()

    def admit(inputs: Inputs) -> budget.Reservation:
        try:
            return get_budget().reserve(
                memory_need(inputs, settings),
                timeout=settings.job_timeout_s - (time.monotonic() - started),
                what="this photo",
            )
        except budget.Expired as exc:
            # The lease keeper stops renewing the attempt at the same moment: it is retried.
            raise Superseded(f"{exc}, past BACKDROP_JOB_TIMEOUT_S") from None

    rendered = imaging.process(
        request,
        lambda location: storage.read(location, max_bytes=settings.max_input_bytes),
        timings,
        want_mask=request.mask_output is not None,
        admit=admit,
    )
    with session_scope(settings.database_url) as session:
        # Only the attempt that owns the job writes its output: a worker that lost its lease
        # (it stalled, and the job was handed on) must not write over its successor's work.
        # Checked before the overwrite rule, whose view of what the job owns is as old as
        # this attempt: a superseded attempt would otherwise fail as output_exists.
        if not jobs.renew(session, [(job.id, job.attempts)], settings.job_lease_s):
            raise Superseded(f"attempt {job.attempts} no longer owns the job")
        jobs.check_overwrite(job, overwrite=request.overwrite, exists=storage.exists)
        jobs.own_outputs(session, job.id, job.attempts)
    with timings.stage("upload"):
        store(
            rendered,
            lambda location, data, content_type: storage.write(
                location, data, content_type=content_type
            ),
            output=job.output,
            mask_output=request.mask_output,
            fmt=request.format,
        )
    segmenter = None if request.mask else get_batcher().segmenter
    return {
        "model_name": segmenter.name if segmenter else None,
        "model_weights": segmenter.weights_id if segmenter else None,
        "timings_ms": timings.ms,
        "input_size": rendered.input_size,
        "foreground_fraction": rendered.foreground_fraction,
    }


def memory_need(inputs: Inputs, settings: Settings) -> int:
    """What the job's imaging will hold in memory, from its images' headers alone."""
    limits = {"max_pixels": settings.max_pixels, "max_bytes": settings.max_input_bytes}
    photo = image_size(inputs.photo, **limits)
    mask = background = None
    if inputs.mask is not None:
        with named("mask image"):
            mask = image_size(inputs.mask, **limits)
    if inputs.background is not None:
        with named("background image"):
            background = image_size(inputs.background, **limits)
    return budget.need_bytes(photo, mask=mask, background=background)


class RetryLater(Exception):
    """The attempt failed transiently and the job is back in `queued`, held for a retry."""

    def __init__(self, countdown: float) -> None:
        super().__init__(f"retry in {countdown:.1f}s")
        self.countdown = countdown


def execute(job_id: str) -> None:
    """Start the job, run it, record the outcome. A transient failure raises RetryLater
    while the job has attempts left, and is recorded with its code on the last one."""
    with metrics.job_in_flight():
        _execute(job_id, default_services().settings)


def _execute(job_id: str, settings: Settings) -> None:
    with session_scope(settings.database_url) as session:
        job = jobs.start(session, job_id, worker_name(), settings.job_lease_s)
    if job is None:
        log.info("job is final, unknown or owned by a live attempt; dropping its message")
        return
    attempt = job.attempts
    if attempt > settings.max_attempts:
        _record_failure(
            settings,
            job_id,
            attempt,
            WorkerLost(f"job was started {attempt - 1} times without finishing; giving up"),
        )
        return
    log.info("started attempt %d (%s, %s)", attempt, job.effect, job.input)
    leases = get_leases()
    leases.hold(job_id, attempt)
    try:
        result = process(job, settings, default_services().storage, get_imaging())
    except Superseded as exc:
        log.warning("%s; stopping without writing", exc)
        return
    except TransientError as exc:
        if attempt < settings.max_attempts:
            countdown = backoff_seconds(attempt - 1)
            log.warning("transient failure, retrying in %.1fs: %s", countdown, exc)
            # Held for the countdown, so the lease keeper does not take the job (whose retry
            # message sits in this worker until then) for one that lost its message.
            hold_s = countdown + settings.job_lease_s
            with session_scope(settings.database_url) as session:
                jobs.release(session, job_id, attempt, exc.code, exc.message, hold_s=hold_s)
            metrics.record_job("retrying", exc.code, {})
            raise RetryLater(countdown) from exc
        _record_failure(settings, job_id, attempt, exc)
        return
    except BackdropError as exc:
        _record_failure(settings, job_id, attempt, exc)
        return
    except Exception as exc:
        log.exception("unexpected failure")
        _record_failure(settings, job_id, attempt, BackdropError(f"{type(exc).__name__}: {exc}"))
        return
    else:
        # Still holding the lease: a database outage while recording must not hand a finished
        # job to another worker, which would run it and write its output again.
        _record_success(settings, job_id, attempt, result)
    finally:
        leases.drop(job_id, attempt)


def _record_success(settings: Settings, job_id: str, attempt: int, result: dict[str, Any]) -> None:
    recorded = _record(settings, lambda session: jobs.succeed(session, job_id, attempt, **result))
    if recorded:
        metrics.record_job("succeeded", None, result["timings_ms"])
        log.info("succeeded in %.0f ms", sum(result["timings_ms"].values()))
    else:
        log.warning("finished, but a newer attempt owns the job; result not recorded")


def _record_failure(settings: Settings, job_id: str, attempt: int, exc: BackdropError) -> None:
    log.info("failed: %s", exc)
    metrics.record_job("failed", exc.code, {})
    _record(settings, lambda session: jobs.fail(session, job_id, attempt, exc.code, exc.message))


def _record(settings: Settings, write: Callable[[Any], bool]) -> bool:
    """Write a job's outcome, waiting out a database outage for up to RECORD_PATIENCE_S:
    the work is done, and redoing it because PostgreSQL restarted would waste it."""
    deadline = time.monotonic() + RECORD_PATIENCE_S
    delay = 0.25
    while True:
        try:
            with session_scope(settings.database_url) as session:
                return write(session)
        except DatabaseUnavailable as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("cannot record the outcome yet (%s); trying again", exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def backoff_seconds(retries: int) -> float:
    """Exponential backoff with full jitter, capped at MAX_RETRY_DELAY_S."""
    return random.uniform(0, min(MAX_RETRY_DELAY_S, 2.0 ** (retries + 1)))


@app.task(name=TASK_NAME, bind=True, max_retries=None)
def process_job(self: Task[[str], None], job_id: str) -> None:
    settings = default_services().settings
    with job_context(job_id):
        try:
            execute(job_id)
        except RetryLater as later:
            cause = later.__cause__
            retry = cause if isinstance(cause, Exception) else None
            raise self.retry(countdown=later.countdown, exc=retry) from None
        except TransientError as exc:  # before the job could start, e.g. database down
            if self.request.retries + 1 >= settings.max_attempts:
                raise  # the job stays queued; the lease keeper re-publishes it
            raise self.retry(countdown=backoff_seconds(self.request.retries), exc=exc) from None
