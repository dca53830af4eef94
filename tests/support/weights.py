"""Random-init models whose output varies with the image, for tests and benchmarks.

Plain random init collapses every activation to about zero, so every map is one constant:
no comparison between maps could fail, and the worker's refinement skips its work. BatchNorm
statistics measured on noise (a data-dependent init) bring MobileNetV3's activations back.

ResNet-101 needs more: with statistics from noise, real photos drive its residual stream so
far off that one class wins every pixel of every photo (a map of 1.0 everywhere). Statistics
measured on real photos, at the size the model will see, keep its features varying; then the
classifier's last conv is rescaled so that background versus any class has a spread of a few
logits around zero over those photos, which puts both sides of 0.5 in most maps.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Logits of background versus "any class": their spread over the calibration photos' pixels.
LOGIT_SPREAD = 10.0
CALIBRATION_SIDE = 256
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle_left")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def photo_batch(side: int = CALIBRATION_SIDE) -> torch.Tensor:
    """scikit-image's sample photos (those the benchmarks use), resized to side x side and
    normalised as the segmenter does."""
    import cv2
    import numpy as np
    import skimage.data
    from PIL import Image

    folder = Path(skimage.data.__file__).parent
    photos = [
        np.asarray(Image.open(folder / f"{name}.png").convert("RGB")) for name in SAMPLE_PHOTOS
    ]
    pixels = np.stack([cv2.resize(photo, (side, side)) for photo in photos])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


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
