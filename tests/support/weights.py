"""Random-init models whose output varies with the image, for tests and benchmarks.

Plain random init collapses every activation to about zero, so every map is one constant:
no comparison between maps could fail, and the worker's refinement skips its work. BatchNorm
statistics measured on noise (a data-dependent init) bring MobileNetV3's activations back.

ResNet-101 needs more: with statistics from noise, real photos drive its residual stream so
far off that one class wins every pixel of every photo (a map of 1.0 everywhere). Statistics
measured on real photos, at the size the model will see, keep its features varying; then the
classifier's last conv is rescaled so that background versus any class has a spread of a few
logits around zero over those photos, which puts both sides of 0.5 in most maps.

Such maps are noise: blobs all over the frame, with a quarter of the photo on their edges. That
suits tests of class selection, but it makes edge work (refinement, colour estimation) cost
several times what it costs on a real photo of one subject. subject_model trains the classifier
(the backbone stays random) to outline the subject of each sample photo instead, for benchmarks
whose figures must reflect real edge lengths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Logits of background versus "any class": their spread over the calibration photos' pixels.
LOGIT_SPREAD = 10.0
CALIBRATION_SIDE = 256
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle_left")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# subject_model: the class its subjects get (VOC's person), the long side it trains at (the
# worker's input size puts MobileNetV3's cells at 33 x 25 on these photos' 4:3; 390 gives
# 25 x 19, cheap to train on yet wide enough for the ASPP's dilations), and its training.
SUBJECT_CLASS = 15
SUBJECT_SIDE = 390
SUBJECT_STEPS = 150
SUBJECT_LEARNING_RATE = 1e-3
GRABCUT_ITERATIONS = 5


def calibrate_on_noise(model: torch.nn.Module, side: int = 128) -> torch.nn.Module:
    """Every BatchNorm's statistics set from one batch of noise; the model in eval mode."""
    return calibrate_batchnorm(model, torch.randn(4, 3, side, side))


def calibrate_batchnorm(model: torch.nn.Module, batch: torch.Tensor) -> torch.nn.Module:
    """Every BatchNorm's statistics set from `batch` (normalised images); the model in eval."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(batch)
    return model.eval()


def sample_photos() -> list[np.ndarray]:
    """scikit-image's sample photos (those the benchmarks use), RGB uint8."""
    import skimage.data
    from PIL import Image

    folder = Path(skimage.data.__file__).parent
    return [np.asarray(Image.open(folder / f"{name}.png").convert("RGB")) for name in SAMPLE_PHOTOS]


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 photos as the segmenter feeds them to the model."""
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def photo_batch(side: int = CALIBRATION_SIDE) -> torch.Tensor:
    """The sample photos resized to side x side and normalised as the segmenter does."""
    import cv2

    return normalise(np.stack([cv2.resize(photo, (side, side)) for photo in sample_photos()]))


def _background_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per pixel, the background logit minus the log-sum of every class's."""
    return logits[:, 0] - logits[:, 1:].logsumexp(dim=1)


def spread_classifier(model: torch.nn.Module, batch: torch.Tensor) -> torch.nn.Module:
    """The classifier's last conv scaled so background versus any class spreads over about
    LOGIT_SPREAD logits on `batch`, its background bias shifted so the median pixel is 0.5."""
    classifier: torch.nn.Sequential = model.classifier  # type: ignore[assignment]
    final = classifier[-1]
    assert isinstance(final, torch.nn.Conv2d) and final.bias is not None
    with torch.no_grad():
        # Only the last conv changes: its input, computed once, is all the steps need.
        hidden = model.backbone(batch)["out"]  # type: ignore[operator]
        for layer in list(classifier)[:-1]:
            hidden = layer(hidden)
        for _ in range(3):  # log-sum-exp is not linear in the scale: settle in a few steps
            scale = LOGIT_SPREAD / max(float(_background_margin(final(hidden)).std()), 1e-6)
            final.weight.mul_(scale)
            final.bias.mul_(scale)
            final.bias[0] -= float(_background_margin(final(hidden)).median())
    return model


def varying_model(model_name: str, seed: int = 0) -> torch.nn.Module:
    """A random-init model of `model_name` (DeepLabV3, aux head included, shaped like the
    published file) whose maps vary with the photo: BatchNorm calibrated on real photos,
    classifier spread; eval mode."""
    from worker.weights import NUM_CLASSES, model_spec

    torch.manual_seed(seed)
    model = model_spec(model_name).builder(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True
    )
    batch = photo_batch()
    return spread_classifier(calibrate_batchnorm(model, batch), batch)


def subject_photos(side: int = SUBJECT_SIDE) -> list[np.ndarray]:
    """The sample photos with their long side at `side`, aspect kept."""
    import cv2

    photos = []
    for photo in sample_photos():
        scale = side / max(photo.shape[:2])
        photos.append(cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    return photos


def subject_target(photo: np.ndarray) -> np.ndarray:
    """A (h, w) float32 0/1 mask of the photo's subject: GrabCut inside a centred rectangle,
    the way a person marks a subject by hand."""
    import cv2

    height, width = photo.shape[:2]
    labels = np.zeros((height, width), np.uint8)
    rect = (width // 10, height // 20, width * 8 // 10, height * 9 // 10)
    cv2.setRNGSeed(0)
    cv2.grabCut(
        photo,
        labels,
        rect,
        np.zeros((1, 65)),
        np.zeros((1, 65)),
        GRABCUT_ITERATIONS,
        cv2.GC_INIT_WITH_RECT,
    )
    return np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)


def subject_model(model_name: str, steps: int = SUBJECT_STEPS) -> torch.nn.Module:
    """varying_model(model_name) with its classifier (ASPP and head; the backbone stays random)
    trained to give SUBJECT_CLASS over the subject of each sample photo and background
    elsewhere: one-subject maps with a real photo's edge length; eval mode."""
    import cv2
    import torch.nn.functional as functional

    model = varying_model(model_name)
    classifier: torch.nn.Sequential = model.classifier  # type: ignore[assignment]
    features: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    with torch.no_grad():
        for photo in subject_photos():
            hidden = model.backbone(normalise(photo[None]))["out"]  # type: ignore[operator]
            cells = (hidden.shape[3], hidden.shape[2])
            mask = cv2.resize(subject_target(photo), cells, interpolation=cv2.INTER_AREA)
            features.append(hidden)
            targets.append(torch.from_numpy(mask)[None, None])
    # Trained in eval mode: BatchNorm keeps the statistics measured on photos, dropout stays off.
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(classifier.parameters(), lr=SUBJECT_LEARNING_RATE)
    for _ in range(steps):
        optimiser.zero_grad()
        for hidden, target in zip(features, targets, strict=True):
            margin = _subject_margin(classifier(hidden))
            loss = functional.binary_cross_entropy_with_logits(margin, target)
            torch.autograd.backward(loss)
        optimiser.step()
    final = classifier[-1]
    assert isinstance(final, torch.nn.Conv2d) and final.bias is not None
    with torch.no_grad():  # every other class far below: the subject is SUBJECT_CLASS alone
        others = [c for c in range(1, final.bias.shape[0]) if c != SUBJECT_CLASS]
        final.bias[others] -= 20.0
    return model.eval()


def _subject_margin(logits: torch.Tensor) -> torch.Tensor:
    """SUBJECT_CLASS's logit over the background's, (N, 1, H, W)."""
    return logits[:, SUBJECT_CLASS : SUBJECT_CLASS + 1] - logits[:, :1]


def save_subject_weights(model_name: str, path: Path) -> Path:
    """subject_model(model_name)'s state dict, saved at `path`."""
    torch.save(subject_model(model_name).state_dict(), path)
    return path


def save_varying_weights(model_name: str, path: Path) -> Path:
    """varying_model(model_name)'s state dict, saved at `path`."""
    torch.save(varying_model(model_name).state_dict(), path)
    return path


def save_varying_mobilenet(path: Path) -> Path:
    """A DeepLabV3-MobileNetV3 state dict, shaped like the published file, whose masks vary
    with the photo and the classes: what every real worker in tests runs (calibrated on noise,
    which suffices for MobileNetV3; tests' expected outputs were made with it)."""
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    )
    torch.save(calibrate_on_noise(model).state_dict(), path)
    return path
