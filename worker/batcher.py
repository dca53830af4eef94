"""Dynamic batching across jobs: one thread owns the model and serves every job thread.

Job threads call `segment()` and block; the batcher thread takes whatever requests are waiting
(up to `max_batch`, waiting at most `max_wait_ms` for more after the first) and runs them
through the model in one call. With no `max_batch` given, the batch suits the device the
model loaded on (worker/threadplan.py). The model is built lazily inside that thread, so nothing
touches torch (or CUDA) before the worker process is fully started.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from producer import metrics
from worker.threadplan import default_max_batch, torch_device_type

log = logging.getLogger(__name__)


class Segmenter(Protocol):
    """What the batcher needs of a model (worker.segmenter.Segmenter in production)."""

    name: str
    weights_id: str

    def predict(
        self, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]]
    ) -> list[np.ndarray]: ...


@dataclass
class _Request:
    image: np.ndarray
    classes: Sequence[int]
    future: Future[np.ndarray] = field(default_factory=Future)


class Batcher:
    def __init__(
        self,
        load: Callable[[], Segmenter],
        *,
        max_batch: int | None = None,
        max_wait_ms: int = 20,
        lanes: int = 1,
    ) -> None:
        """`lanes`: batches run through the model at once, each by its own thread (on a CPU,
        two 1-thread calls can keep two cores busier than one 2-thread call)."""
        self._load = load
        self._lanes = lanes
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._segmenter: Segmenter | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="backdrop-batcher", daemon=True)
        self._thread.start()

    @property
    def segmenter(self) -> Segmenter:
        """The loaded model (waits for it); re-raises a load failure."""
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        assert self._segmenter is not None
        return self._segmenter

    @property
    def max_batch(self) -> int | None:
        """Photos per model call, once the model has loaded (None if it failed to)."""
        self._ready.wait()
        return self._max_batch

    def segment(self, image: np.ndarray, classes: Sequence[int]) -> np.ndarray:
        request = _Request(image, classes)
        self._requests.put(request)
        return request.future.result()

    def close(self) -> None:
        self._requests.put(None)  # each lane puts it back for the next (see _collect)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self._segmenter = self._load()
            if self._max_batch is None:  # a stand-in model with no device counts as a CPU
                device = torch_device_type(getattr(self._segmenter, "device", "cpu"))
                self._max_batch = default_max_batch(device)
                log.info("max batch %d (the default on %s)", self._max_batch, device)
        except BaseException as exc:  # reported to every caller instead of killing the thread
            self._load_error = exc
        finally:
            self._ready.set()
        lanes = [
            threading.Thread(target=self._serve_lane, name=f"backdrop-batcher-{lane}", daemon=True)
            for lane in range(1, self._lanes)
        ]
        for lane in lanes:
            lane.start()
        self._serve_lane()
        for lane in lanes:
            lane.join()

    def _serve_lane(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            self._serve(batch)

    def _collect(self) -> list[_Request] | None:
        first = self._requests.get()
        if first is None:
            self._requests.put(None)  # for the other lanes
            return None
        batch = [first]
        limit = self._max_batch or 1  # None only when the model failed to load
        deadline = time.monotonic() + self._max_wait
        while len(batch) < limit:
            remaining = deadline - time.monotonic()
            try:
                request = (
                    self._requests.get(timeout=remaining)
                    if remaining > 0
                    else self._requests.get_nowait()
                )
            except queue.Empty:
                break
            if request is None:
                self._requests.put(None)
                break
            batch.append(request)
        return batch

    def _serve(self, batch: list[_Request]) -> None:
        if self._load_error is not None:
            for request in batch:
                request.future.set_exception(self._load_error)
            return
        assert self._segmenter is not None
        metrics.record_batch(len(batch))
        log.info("segmenting a batch of %d", len(batch))
        try:
            masks = self._segmenter.predict([r.image for r in batch], [r.classes for r in batch])
        except Exception as exc:
            if len(batch) == 1:
                log.exception("segmentation failed")
                batch[0].future.set_exception(exc)
                return
            # One bad request must not fail its batch-mates: retry each on its own.
            log.warning("batch of %d failed; retrying its images one by one", len(batch))
            for request in batch:
                self._serve([request])
            return
        for request, mask in zip(batch, masks, strict=True):
            request.future.set_result(mask)
