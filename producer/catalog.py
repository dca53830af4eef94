"""The names of the models a worker can run: the one registry settings validate against.

Kept apart from settings so that the worker image's weights layer (which imports only
worker/weights.py and what it needs) is not rebuilt whenever a setting changes.
"""

from typing import Literal

ModelName = Literal["deeplabv3_resnet101", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large"]
