"""Random-init models whose output varies with the image, for tests and benchmarks.

Plain random init collapses every activation to about zero, so every map is one constant:
no comparison between maps could fail, and the worker's refinement skips its work. BatchNorm
statistics measured on noise (a data-dependent init) bring the activations back.
"""

from __future__ import annotations

from pathlib import Path

import torch


def calibrate_on_noise(model: torch.nn.Module, side: int = 128) -> torch.nn.Module:
    """Every BatchNorm's statistics set from one batch of noise; the model in eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, side, side))
    return model.eval()


def save_varying_mobilenet(path: Path) -> Path:
    """A DeepLabV3-MobileNetV3 state dict, shaped like the published file, whose masks vary
    with the photo and the classes: what every real worker in tests and benchmarks runs."""
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    )
    torch.save(calibrate_on_noise(model).state_dict(), path)
    return path
