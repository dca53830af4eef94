"""How a worker's threads share the cores: job threads, CPU slots for imaging, model threads.

A job is I/O (download, upload, database), one model call made by the batcher thread on
behalf of many jobs, and CPU-heavy imaging (decode, refine, decontaminate, composite,
encode). Only the imaging and the model compete for the cores, so:
  - imaging holds a CPU slot, one per core: more jobs imaging at once would only slice the
    same cores finer, each job holding its full-resolution buffers longer, and would take
    the cores from the model (whose batch then waits);
  - job threads are enough to fill a model batch while every slot is busy and a few jobs
    download or upload: more would only hold decoded photos in memory;
  - torch's intra-op threads take every core, so a lone job's model call is fast; when they
    share the cores with imaging, OpenMP's passive wait (see ENVIRONMENT) makes a thread that
    waits at a barrier sleep instead of spinning on a core the imaging needs;
  - one inter-op thread: the model never runs independent ops in parallel;
  - on a CPU, a model that dominates a job's CPU (the ResNets: seconds per photo against
    well under one of imaging) runs in two lanes, two photos at once on half the threads
    each: one call on every core leaves them partly idle (OpenMP's barriers, serial ops),
    and the imaging is too small to fill that. ResNet-101 ran 1.37x end to end in two lanes
    on 2 cores; MobileNetV3, whose imaging does fill the other core, 0.93x, so it keeps one;
  - the model's batch (max_batch, unless set) follows the device: batching pays on a GPU,
    where one call's kernels cover the whole batch, and loses on a CPU, where a batch only
    makes its first job wait for the last (MobileNetV3 on 2 cores: 11.5 photos/s at batch 1,
    6.3 at batch 8, and the worker's end to end faster at 1 too).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from producer.settings import Settings

log = logging.getLogger(__name__)

# Read by OpenMP when torch loads it, so they must be in the environment before `import
# torch`. libgomp otherwise spins a waiting thread for ~300,000 rounds before it sleeps:
# measured on 2 busy cores, MobileNetV3's CPU per image went from 137-170 ms to 175-266 ms.
ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
# Jobs in download, upload or bookkeeping besides those waiting for the model or imaging.
IO_THREADS_PER_CORE = 1
MAX_BATCH_ON_GPU = 8
MAX_BATCH_ON_CPU = 1
# Models that get model lanes on a CPU by default, and how many at most: each lane holds its
# own activations, and a ResNet's at output stride 8 are large, so a many-core host still
# splits its threads between two calls rather than one per core.
LANED_MODELS = frozenset({"deeplabv3_resnet50", "deeplabv3_resnet101"})
DEFAULT_MODEL_LANES = 2


@dataclass(frozen=True)
class ThreadPlan:
    max_batch: int  # photos per model call
    job_threads: int  # Celery's thread pool
    cpu_slots: int  # jobs decoding, refining, compositing or encoding at once
    torch_threads: int  # torch's intra-op threads (each model call's)
    interop_threads: int = 1
    model_lanes: int = 1  # model calls at once


def cores() -> int:
    """The cores this process may run on (a CPU-limited container's affinity), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def model_device(device: str) -> str:
    """ "cuda" or "cpu": where the model will run for a `device` setting (imports torch)."""
    if device != "auto":
        return torch_device_type(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_device_type(device: object) -> str:
    """A torch.device or its name ("cuda:1") as its type ("cuda")."""
    return str(device).split(":", 1)[0]


def default_max_batch(device_type: str) -> int:
    return MAX_BATCH_ON_GPU if device_type == "cuda" else MAX_BATCH_ON_CPU


def default_model_lanes(model: str, device_type: str, cores: int) -> int:
    """Model calls at once unless set: see the module's docstring."""
    if device_type == "cpu" and model in LANED_MODELS:
        return min(cores, DEFAULT_MODEL_LANES)
    return 1


def resolve_max_batch(settings: Settings, device_type: str | None = None) -> int:
    """Settings' max_batch, or when unset the default for the device (`device_type`, else
    where settings.device puts the model)."""
    if settings.max_batch is not None:
        return settings.max_batch
    return default_max_batch(device_type or model_device(settings.device))


def plan_threads(
    settings: Settings,
    cores: int,
    *,
    concurrency: int | None = None,
    device_type: str | None = None,
) -> ThreadPlan:
    """The plan for a worker on `cores` cores; settings and --concurrency override each part."""
    cores = max(1, cores)
    device_type = device_type or model_device(settings.device)
    max_batch = resolve_max_batch(settings, device_type)
    cpu_slots = settings.cpu_slots or cores
    lanes = settings.model_lanes or default_model_lanes(settings.model, device_type, cores)
    job_threads = concurrency or lanes * max_batch + cpu_slots + IO_THREADS_PER_CORE * cores
    return ThreadPlan(
        max_batch=max_batch,
        job_threads=job_threads,
        cpu_slots=cpu_slots,
        torch_threads=settings.torch_threads or max(1, cores // lanes),
        model_lanes=lanes,
    )


def prepare_environment() -> None:
    """Set ENVIRONMENT's defaults (a value the user set wins); call before torch is imported."""
    late = "torch" in sys.modules
    for name, value in ENVIRONMENT.items():
        if name not in os.environ and late:
            log.warning("%s=%s set after torch was imported: it has no effect", name, value)
        os.environ.setdefault(name, value)


class CpuSlots:
    """A job's imaging holds one slot; jobs beyond the slots wait for one to free."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._semaphore = threading.Semaphore(slots)

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._semaphore:
            yield
