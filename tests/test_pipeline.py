"""One job's imaging: which device each stage runs on."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from worker import pipeline
from worker.imageio import DecodedImage
from worker.matting import TorchBackend


@pytest.fixture
def backends(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The backend every refine_mask call was given (the solve itself is tested elsewhere)."""
    seen: list[Any] = []

    def recording_refine(soft: np.ndarray, guide: np.ndarray, *, backend: Any = None) -> Any:
        seen.append(backend)
        return np.zeros(guide.shape[:2], np.uint8)

    monkeypatch.setattr(pipeline, "refine_mask", recording_refine)
    return seen


def _alpha(device: torch.device | None) -> None:
    photo = DecodedImage(rgb=np.zeros((8, 8, 3), np.uint8), icc_profile=None, source_format="PNG")
    pipeline.refined(photo, np.full((4, 4), 0.5, np.float32), pipeline.Timings(), device=device)


def test_a_gpu_worker_solves_the_matte_on_its_device(backends: list[Any]) -> None:
    _alpha(torch.device("cuda", 0))
    assert isinstance(backends[0], TorchBackend)
    assert backends[0].device == "cuda:0"


@pytest.mark.parametrize("device", [None, torch.device("cpu")])
def test_a_cpu_worker_solves_the_matte_with_numpy(
    backends: list[Any], device: torch.device | None
) -> None:
    _alpha(device)
    assert backends == [None]
