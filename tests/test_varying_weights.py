"""Random-init weights for benchmarks give maps that vary with the photo, on every model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.support.weights import photo_batch, varying_model

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
