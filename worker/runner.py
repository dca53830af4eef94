"""`backdrop worker`: check the model can load, then run Celery on a thread pool.

Threads, not prefork: the one model (and its CUDA context) lives in this process and every
job thread shares it through the batcher; nothing is ever forked after torch is imported.

The threads are sized to the cores (worker/threadplan.py), because a job's CPU is the model's
and the imaging's, and they compete: 2 x max-batch job threads all imaging at once on 2 cores,
with torch's OpenMP threads spinning while they waited, spent ~0.3 s of CPU per job on top of
its stages' own. Now imaging runs in one CPU slot per core (decode, then refine to encode),
the job threads are just enough to fill a model batch besides, OpenMP waits passively, and
I/O overlaps freely. On a GPU host the same plan holds for the host's share (decode, the
codecs); the batcher still owns the model. Python's cyclic garbage collector is kept off the
import-time objects (gc.freeze): its full collections walked torch's and Celery's millions of
objects, ~5% of a busy worker's CPU.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence

from producer.catalog import CLASS_AGNOSTIC
from producer.logs import configure as configure_logging
from producer.services import default_services
from producer.settings import Settings
from worker.threadplan import ThreadPlan, cores, plan_threads, prepare_environment

log = logging.getLogger(__name__)


def preflight(settings: Settings) -> None:
    """Fail before taking any message if no weights can be had or they do not fit the model
    (WeightsUnavailable): otherwise a worker would start fine and fail every job."""
    fetch = default_services().storage.download_file
    if settings.model in CLASS_AGNOSTIC:
        from worker.salient import check_salient_weights, resolve_salient_weights

        path = resolve_salient_weights(settings.model, settings.weights, fetch=fetch)
        check_salient_weights(settings.model, path)
    else:
        from worker.weights import check_weights, resolve_weights

        path = resolve_weights(settings.model, settings.weights, fetch=fetch)
        check_weights(settings.model, path)
    log.info("model %s, weights %s", settings.model, path)


def celery_argv(queues: Sequence[str], concurrency: int, loglevel: str) -> list[str]:
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}",
        f"--loglevel={loglevel}",
        f"--hostname=backdrop-{os.getpid()}@{socket.gethostname()}",
        "--without-gossip",
        "--without-mingle",
    ]


def tune_threads(plan: ThreadPlan) -> None:
    """OpenCV runs single-threaded per call because the CPU slots already run one OpenCV call
    per core side by side; torch gets the plan's threads."""
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(plan.torch_threads)
    try:
        torch.set_num_interop_threads(plan.interop_threads)
    except RuntimeError:  # inter-op work already ran: its pool stays as it is
        log.debug("torch's inter-op threads were already started")


TIMER_PRECISION_S = 0.1
M_ARENA_MAX = -8
TRIM_INTERVAL_S = 10.0


def tune_memory(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Keep a long-running worker's resident size flat without slowing it down.

    Image buffers of several megabytes freed by a dozen job threads leave holes in glibc's
    per-thread heap arenas that it never hands back, which shows as slow, steady growth.
    Few arenas bound where the holes can be, and a malloc_trim every few seconds returns
    them to the OS. (Sending every big buffer to mmap instead kept the size flat too, but
    the page faults of mapping fresh memory for each one cost 40% of the throughput.)
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(M_ARENA_MAX, 2)

    def trim() -> None:
        while True:
            time.sleep(interval_s)
            libc.malloc_trim(0)

    threading.Thread(target=trim, name="backdrop-malloc-trim", daemon=True).start()


def serve_metrics(settings: Settings) -> None:
    """Start the Prometheus metrics server, if BACKDROP_WORKER_METRICS_PORT is set."""
    if settings.worker_metrics_port:
        from producer.metrics import start_worker_metrics_server

        start_worker_metrics_server(settings.worker_metrics_port, settings.worker_metrics_host)


def run_worker(
    settings: Settings, *, queues: Sequence[str], concurrency: int | None, loglevel: str
) -> None:
    configure_logging(loglevel)
    prepare_environment()
    tune_memory()
    preflight(settings)
    plan = plan_threads(settings, cores(), concurrency=concurrency)
    log.info(
        "max batch %d, %d job threads, %d CPU slots, %d model lanes of %d torch threads",
        plan.max_batch,
        plan.job_threads,
        plan.cpu_slots,
        plan.model_lanes,
        plan.torch_threads,
    )
    tune_threads(plan)
    serve_metrics(settings)
    from worker import deliveries
    from worker.tasks import app, worker_name

    callbacks = deliveries.start(settings, worker_name())
    # Celery's timer thread sleeps this long between looks at its stop flag, and a warm
    # shutdown waits for it: 1 s by default.
    app.conf.worker_timer_precision = TIMER_PRECISION_S
    gc.freeze()
    app.worker_main(celery_argv(queues, plan.job_threads, loglevel))
    if callbacks is not None:
        callbacks.stop()  # attempts in flight end within their deadline
    exit_now()


def exit_now() -> None:
    """End the process once Celery has shut down (jobs finished, broker closed): the
    interpreter's own teardown of torch, torchvision and OpenCV took ~1 s more and does
    nothing a stopped worker needs."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
