"""The batcher: requests from many job threads meet in one model call, failures stay alone."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from worker.batcher import Batcher


class RecordingSegmenter:
    """Stands in for the model: the mask is the image's mean, and it records batch sizes."""

    name = "fake"
    weights_id = "fake@sha256:0"

    def __init__(self, release: threading.Event | None = None) -> None:
        self.calls: list[int] = []
        self.release = release

    def predict(
        self, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        if self.release is not None:
            self.release.wait(timeout=10)
        self.calls.append(len(images))
        if any(image.shape[0] == 0 for image in images):
            raise ValueError("empty image")
        return [
            np.full((2, 2), image.mean() + sum(c), np.float32)
            for image, c in zip(images, classes, strict=True)
        ]


def _image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


def test_requests_waiting_together_are_served_in_one_model_call() -> None:
    release = threading.Event()
    fake = RecordingSegmenter(release)
    batcher = Batcher(lambda: fake, max_batch=8, max_wait_ms=200)
    with ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(batcher.segment, _image(0), [1])
        # The first call holds the model while six more queue up behind it.
        futures = [pool.submit(batcher.segment, _image(v), [1]) for v in range(1, 7)]
        release.set()
        blocker.result(timeout=10)
        results = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert [r[0, 0] for r in results] == [v + 1 for v in range(1, 7)]
    assert max(fake.calls) > 1
    assert sum(fake.calls) == 7


@pytest.mark.parametrize(("device", "expected"), [("cpu", 1), ("cuda:0", 8), (None, 1)])
def test_with_no_max_batch_the_batch_suits_the_device_the_model_loaded_on(
    device: str | None, expected: int
) -> None:
    fake = RecordingSegmenter()
    if device is not None:
        fake.device = device  # type: ignore[attr-defined]
    batcher = Batcher(lambda: fake, max_wait_ms=1)
    assert batcher.max_batch == expected
    batcher.close()


def test_a_max_batch_that_was_given_is_kept_whatever_the_device() -> None:
    fake = RecordingSegmenter()
    fake.device = "cpu"  # type: ignore[attr-defined]
    batcher = Batcher(lambda: fake, max_batch=4, max_wait_ms=1)
    assert batcher.max_batch == 4
    batcher.close()


def test_a_batch_never_exceeds_max_batch() -> None:
    release = threading.Event()
    fake = RecordingSegmenter(release)
    batcher = Batcher(lambda: fake, max_batch=3, max_wait_ms=200)
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(batcher.segment, _image(v), [0]) for v in range(10)]
        release.set()
        for f in futures:
            f.result(timeout=10)
    batcher.close()
    assert max(fake.calls) <= 3 and sum(fake.calls) == 10


def test_a_bad_image_fails_alone_and_its_batch_mates_succeed() -> None:
    release = threading.Event()
    fake = RecordingSegmenter(release)
    batcher = Batcher(lambda: fake, max_batch=8, max_wait_ms=200)
    with ThreadPoolExecutor(4) as pool:
        good = [pool.submit(batcher.segment, _image(v), [0]) for v in (10, 20)]
        bad = pool.submit(batcher.segment, np.zeros((0, 4, 3), np.uint8), [0])
        release.set()
        assert [g.result(timeout=10)[0, 0] for g in good] == [10, 20]
        with pytest.raises(ValueError, match="empty image"):
            bad.result(timeout=10)
    batcher.close()


def test_a_model_that_cannot_load_fails_every_request_with_its_error() -> None:
    def broken() -> RecordingSegmenter:
        raise RuntimeError("weights missing")

    batcher = Batcher(broken, max_batch=4, max_wait_ms=1)
    with pytest.raises(RuntimeError, match="weights missing"):
        batcher.segment(_image(1), [1])
    with pytest.raises(RuntimeError, match="weights missing"):
        _ = batcher.segmenter
    batcher.close()


class MeetingSegmenter(RecordingSegmenter):
    """Each call waits until `lanes` calls are inside the model at once (or times out)."""

    def __init__(self, lanes: int) -> None:
        super().__init__()
        self.meeting = threading.Barrier(lanes, timeout=10)
        self.met = 0

    def predict(
        self, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        self.meeting.wait()
        self.met += 1
        return super().predict(images, classes)


def test_with_two_lanes_two_batches_run_through_the_model_at_once() -> None:
    fake = MeetingSegmenter(lanes=2)
    batcher = Batcher(lambda: fake, max_batch=1, max_wait_ms=0, lanes=2)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batcher.segment, _image(v), [1]) for v in range(4)]
        results = [f.result(timeout=20) for f in futures]
    assert [r[0, 0] for r in results] == [v + 1 for v in range(4)]
    assert fake.met == 4  # with one lane the first call would wait at the barrier alone
    batcher.close()
    lanes = [t for t in threading.enumerate() if t.name.startswith("backdrop-batcher")]
    assert not lanes  # close() stopped every lane
