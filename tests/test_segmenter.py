"""Segmenter: batched inference, grouped by canvas shape, into soft foreground maps."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.models.segmentation import (
    deeplabv3_mobilenet_v3_large,
    deeplabv3_resnet50,
    deeplabv3_resnet101,
)
from torchvision.transforms.functional import normalize

from producer.request import VOC_CLASSES
from tests.support.weights import calibrate_on_noise
from worker.segmenter import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Segmenter,
    _shrink,
    chosen_probability,
    fold_batchnorm,
)

SIDE = 128
PERSON = VOC_CLASSES.index("person")
CAR = VOC_CLASSES.index("car")
ALL_CLASSES = list(range(1, len(VOC_CLASSES)))


def varying_model(builder=deeplabv3_mobilenet_v3_large) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    """A random-init model whose output varies with the image (see tests/support/weights.py)."""
    torch.manual_seed(0)
    model = calibrate_on_noise(builder(weights=None, weights_backbone=None), SIDE)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(5)  # more contrast between classes and pixels
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return varying_model()


@pytest.fixture(scope="module")
def segmenter(model: torch.nn.Module) -> Segmenter:
    return Segmenter(model, name="mobilenet", weights_id="test", device="cpu", input_size=SIDE)


@pytest.fixture(scope="module")
def person_only() -> Segmenter:
    """A model rigged to say "person" everywhere: zero weights, a bias that picks the class."""
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    final = model.classifier[4]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.fill_(-10.0)
        final.bias[PERSON] = 10.0
    return Segmenter(model, name="rigged", weights_id="test", device="cpu", input_size=SIDE)


def photo(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((300, 400), (96, 128)),  # landscape
        ((400, 300), (128, 96)),  # portrait
        ((3, 200), (2, 128)),  # a thin strip keeps at least one row
        ((200, 3), (128, 2)),
        ((50, 40), (128, 102)),  # small photos are enlarged to the model's size
        ((128, 128), (128, 128)),
    ],
)
def test_each_map_covers_the_image_content_at_model_resolution(
    segmenter: Segmenter, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    images = [photo(*size, seed=1), photo(64, 64, seed=2)]
    maps = segmenter.predict(images, [[PERSON], ALL_CLASSES])
    assert len(maps) == 2
    assert maps[0].shape == expected
    assert maps[1].shape == (SIDE, SIDE)
    for mask in maps:
        assert mask.dtype == np.float32
        assert mask.min() >= 0.0 and mask.max() <= 1.0


def test_a_twelve_megapixel_photo_gives_a_map_of_the_evaluation_size(
    model: torch.nn.Module,
) -> None:
    segmenter = Segmenter(model, name="mobilenet", weights_id="test", device="cpu", input_size=520)
    image = np.zeros((3000, 4000, 3), dtype=np.uint8)
    (mask,) = segmenter.predict([image], [[PERSON]])
    assert mask.shape == (390, 520)


def test_an_images_map_does_not_depend_on_the_rest_of_its_batch(segmenter: Segmenter) -> None:
    image = photo(90, 120, seed=3)
    (alone,) = segmenter.predict([image], [[PERSON]])
    others = [photo(128, 40, seed=4), photo(30, 30, seed=5), photo(200, 100, seed=6)]
    batched = segmenter.predict([others[0], image, *others[1:]], [ALL_CLASSES, [PERSON], [1], [2]])
    assert np.abs(batched[1] - alone).max() < 1e-4
    # The maps do differ between images, so the comparison above could fail.
    assert np.abs(batched[0][:64, :40] - batched[1][:64, :40]).max() > 1e-2


def test_all_twenty_classes_sum_to_one_minus_the_background_probability(
    segmenter: Segmenter, model: torch.nn.Module
) -> None:
    # A square image at the input size is neither resized nor padded, so the reference is the
    # model's plain output. The tolerance allows for normalising in another float order, which
    # this deliberately high-contrast model amplifies to ~1e-4 on a few pixels.
    image = photo(SIDE, SIDE, seed=7)
    (mask,) = segmenter.predict([image], [ALL_CLASSES])
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        logits = model(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD))["out"]
    background = logits.softmax(dim=1)[0, 0].numpy()
    np.testing.assert_allclose(mask, 1 - background, atol=1e-3)
    assert mask.std() > 1e-3  # a real map, not a constant


def test_selected_class_probabilities_add_up(segmenter: Segmenter) -> None:
    image = photo(100, 128, seed=8)
    person, car, both, every = segmenter.predict(
        [image] * 4, [[PERSON], [CAR], [CAR, PERSON], ALL_CLASSES]
    )
    np.testing.assert_allclose(both, person + car, atol=1e-5)
    assert (both <= every + 1e-6).all()
    assert (both < every).any()


def test_a_model_that_sees_only_people_keeps_people_and_drops_cars(person_only: Segmenter) -> None:
    image = photo(80, 100, seed=9)
    person, car = person_only.predict([image, image], [[PERSON], [CAR]])
    assert person.min() > 0.999
    assert car.max() < 0.001


def test_an_empty_batch_gives_no_maps(segmenter: Segmenter) -> None:
    assert segmenter.predict([], []) == []


@pytest.mark.parametrize(
    ("image", "classes", "complaint"),
    [
        (np.zeros((8, 8, 3), dtype=np.float32), [PERSON], "uint8"),
        (np.zeros((8, 8), dtype=np.uint8), [PERSON], "RGB image"),
        (np.zeros((8, 8, 4), dtype=np.uint8), [PERSON], "RGB image"),
        (np.zeros((0, 8, 3), dtype=np.uint8), [PERSON], "empty"),
        (np.zeros((8, 8, 3), dtype=np.uint8), [0], "not a VOC class"),
        (np.zeros((8, 8, 3), dtype=np.uint8), [21], "not a VOC class"),
    ],
)
def test_bad_inputs_are_refused(
    segmenter: Segmenter, image: np.ndarray, classes: list[int], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        segmenter.predict([image], [classes])


def test_every_image_needs_its_class_list(segmenter: Segmenter) -> None:
    with pytest.raises(ValueError, match="2 images but 1 class lists"):
        segmenter.predict([photo(8, 8, 0), photo(8, 8, 1)], [[PERSON]])


def test_load_builds_the_model_from_a_configured_file(mobilenet_weights: Path) -> None:
    loaded = Segmenter.load(
        "deeplabv3_mobilenet_v3_large", weights=str(mobilenet_weights), device="cpu", input_size=64
    )
    assert loaded.name == "deeplabv3_mobilenet_v3_large"
    assert loaded.weights_id.startswith(f"{mobilenet_weights.name}@sha256:")
    assert loaded.device == torch.device("cpu")
    (mask,) = loaded.predict([photo(48, 64, seed=10)], [[PERSON]])
    assert mask.shape == (48, 64)


def test_auto_picks_the_cpu_without_a_gpu(model: torch.nn.Module) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert Segmenter(model, name="m", weights_id="w").device == torch.device("cpu")


class CountingForwards:
    """Counts the backbone's forward passes and the batch size of each."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.batches: list[int] = []
        backbone = segmenter._model.backbone
        self._hook = backbone.register_forward_hook(
            lambda _module, args, _out: self.batches.append(args[0].shape[0])
        )

    def close(self) -> None:
        self._hook.remove()


def test_photos_of_one_aspect_ratio_share_one_forward_pass_whatever_their_resolution(
    segmenter: Segmenter,
) -> None:
    counter = CountingForwards(segmenter)
    try:
        segmenter.predict(
            [photo(300, 400, 1), photo(600, 800, 2), photo(1200, 1600, 3)], [[PERSON]] * 3
        )
    finally:
        counter.close()
    assert counter.batches == [3]


def test_other_aspect_ratios_run_as_one_forward_pass_each_and_keep_their_order(
    segmenter: Segmenter,
) -> None:
    images = [photo(300, 400, 1), photo(400, 300, 2), photo(600, 800, 3), photo(800, 600, 4)]
    counter = CountingForwards(segmenter)
    try:
        maps = segmenter.predict(images, [[PERSON]] * 4)
    finally:
        counter.close()
    assert sorted(counter.batches) == [2, 2]
    assert [m.shape for m in maps] == [(96, 128), (128, 96), (96, 128), (128, 96)]
    for image, batched in zip(images, maps, strict=True):
        (alone,) = segmenter.predict([image], [[PERSON]])
        assert np.abs(batched - alone).max() < 1e-4


@pytest.mark.parametrize(
    "builder", [deeplabv3_mobilenet_v3_large, deeplabv3_resnet50, deeplabv3_resnet101]
)
def test_folding_batchnorm_into_convolutions_keeps_every_models_output(builder) -> None:  # type: ignore[no-untyped-def]
    model = varying_model(builder)
    image = torch.randn(1, 3, 72, 96)
    with torch.no_grad():
        before = model(image)["out"]
        folded = fold_batchnorm(model)
        after = folded(image)["out"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert before.std() > 0.1  # a real output, not a constant
    torch.testing.assert_close(after, before, atol=1e-3 * before.abs().max().item(), rtol=1e-3)


def test_half_precision_as_on_a_gpu_gives_the_same_maps_to_within_fp16_rounding() -> None:
    # The CUDA path's fp16 model and input handling, run on the CPU.
    images = [photo(96, 128, seed=11), photo(128, 80, seed=12)]
    classes = [ALL_CLASSES, ALL_CLASSES]
    full = Segmenter(varying_model(), name="m", weights_id="w", device="cpu", input_size=SIDE)
    half = Segmenter(
        varying_model(), name="m", weights_id="w", device="cpu", input_size=SIDE, half=True
    )
    assert half._model.classifier[-1].weight.dtype == torch.float16
    for exact, rounded in zip(
        full.predict(images, classes), half.predict(images, classes), strict=True
    ):
        assert rounded.dtype == np.float32 and rounded.shape == exact.shape
        assert np.abs(rounded - exact).mean() < 0.01
        # This deliberately high-contrast model amplifies rounding on a few pixels; the
        # foreground they describe is the same.
        assert np.mean((rounded > 0.5) != (exact > 0.5)) < 0.01
        assert exact.std() > 0.05


def test_the_chosen_probability_is_the_softmax_of_the_upsampled_logits_even_for_huge_ones() -> None:
    # Logits far past float32's exp range (exp(90) overflows) in neighbouring cells.
    logits = torch.randn(2, 21, 5, 7, generator=torch.Generator().manual_seed(1)) * 400
    selection = torch.zeros(2, 21)
    selection[0, PERSON] = 1
    selection[1, [CAR, PERSON]] = 1
    chosen = chosen_probability(logits, selection, (40, 56))
    upsampled = torch.nn.functional.interpolate(
        logits.double(), size=(40, 56), mode="bilinear", align_corners=False
    )
    expected = torch.einsum("nchw,nc->nhw", upsampled.softmax(dim=1), selection.double())
    assert np.isfinite(chosen).all()
    np.testing.assert_allclose(chosen, expected.numpy(), atol=1e-5)
    assert 0.05 < (chosen > 0.5).mean() < 0.95  # both classes and the rest win somewhere


def test_a_photo_is_shrunk_for_the_model_by_halving_first_to_nearly_a_direct_resize() -> None:
    image = cv2.resize(photo(60, 80, seed=10), (1600, 1200), interpolation=cv2.INTER_CUBIC)
    shrunk = _shrink(image, 520, 390)
    direct = cv2.resize(image, (520, 390), interpolation=cv2.INTER_AREA)
    assert shrunk.shape == direct.shape
    assert np.abs(shrunk.astype(np.int16) - direct).mean() < 1.0
    assert not np.array_equal(shrunk, direct)  # it did take the halving path


def test_a_photo_with_an_odd_side_is_shrunk_directly() -> None:
    image = photo(1201, 1600, seed=11)
    direct = cv2.resize(image, (520, 390), interpolation=cv2.INTER_AREA)
    assert np.array_equal(_shrink(image, 520, 390), direct)
