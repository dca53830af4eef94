"""The names of the models a worker can run: the one registry settings validate against.

Kept apart from settings so that the worker image's weights layer (which imports only
worker/weights.py and what it needs) is not rebuilt whenever a setting changes.
"""

from typing import Literal, get_args

from producer.errors import InvalidRequest

# torchvision's DeepLabV3: the 20 Pascal VOC classes, which a job's `classes` select from.
DeepLabName = Literal["deeplabv3_resnet101", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large"]
# rembg's ONNX files (worker/salient.py): whatever stands out, no classes.
SalientName = Literal["u2net", "u2netp", "isnet-general-use"]
ModelName = Literal[DeepLabName, SalientName]

CLASS_AGNOSTIC: frozenset[str] = frozenset(get_args(SalientName))


def refuse_classes(classes: list[str] | None, model: str) -> None:
    """Raise InvalidRequest for a job that selects classes of a model that knows none: it
    would otherwise get the whole salient subject, not what it asked for."""
    if classes and model in CLASS_AGNOSTIC:
        raise InvalidRequest(
            f"classes apply to the DeepLabV3 models only; BACKDROP_MODEL={model} marks the "
            "photo's salient subject, whatever it is: submit without classes"
        )
