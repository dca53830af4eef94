"""Random-init weights for benchmarks give maps that vary with the photo, on every model, and
subject weights give one subject per photo, as real weights do."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.support.weights import (
    normalise,
    photo_batch,
    subject_model,
    subject_photos,
    subject_target,
    varying_model,
)

SIDE = 128


@pytest.mark.parametrize("model_name", ["deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50"])
def test_each_photo_gets_its_own_map_with_pixels_on_both_sides_of_a_half(model_name: str) -> None:
    import torch

    model = varying_model(model_name)
    with torch.no_grad():
        logits = model(photo_batch(SIDE))["out"]
    maps = logits.softmax(dim=1)[:, 1:].sum(dim=1).numpy()
    split = [(m > 0.5).mean() for m in maps]
    assert sum(0.01 < share < 0.99 for share in split) >= len(maps) - 1, split
    for first, second in itertools.pairwise(maps):
        assert np.abs(first - second).mean() > 0.05


def test_a_subject_model_gives_each_sample_photo_one_subject_with_a_real_edge_length() -> None:
    """What the benchmarks rely on: edge work costs what it costs on a photo of one subject
    (the noise of varying_model has 3-6x GrabCut's edge length on three of these photos)."""
    import torch

    model = subject_model("deeplabv3_mobilenet_v3_large")
    for photo in subject_photos(520):
        with torch.no_grad():
            logits = model(normalise(photo[None]))["out"][0]
        inside = (logits.softmax(dim=0)[1:].sum(dim=0) > 0.5).numpy()
        target = subject_target(photo) > 0.5
        overlap = (inside & target).sum() / (inside | target).sum()
        assert 0.05 <= inside.mean() <= 0.6, f"a subject, not the frame: {inside.mean():.2f}"
        assert overlap >= 0.25, f"where GrabCut's subject is: IoU {overlap:.2f}"
        assert _edge_length(inside) <= 2 * _edge_length(target)


def _edge_length(inside: np.ndarray) -> int:
    import cv2

    ring = cv2.morphologyEx(inside.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    return int(np.count_nonzero(ring))
