"""Stand-in ONNX files for the salient models: the published files' signature, tiny weights.

Signature as the published files have it, as far as it could be learnt without them: one
float32 input (N, 3, S, S) — named "input.1" for U²-Net (PyTorch's export default) and
"input_image" for ISNet (onnxruntime's error in rembg issue 463 names it and its fixed 1024
sides) — and float32 (N, 1, S, S) sigmoid maps in [0, 1], the first one the map rembg reads
(U²-Net exports its seven side outputs d0…d6). The map is a 1x1 convolution of the colour, so
it varies with the photo: red things are salient, grey and white ones are not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.salient import salient_spec

INPUT_NAMES = {"u2net": "input.1", "u2netp": "input.1", "isnet-general-use": "input_image"}
U2NET_SIDE_OUTPUTS = 7
# Red minus the other channels, steep: a red subject ~1, a grey or white backdrop ~0.
RED_WEIGHTS = (4.0, -2.0, -2.0)
BIAS = -1.0


def standin_model(
    model_name: str,
    *,
    batch: int | str = "batch",
    side: int | None = None,
    channels: int = 3,
    input_type: int = TensorProto.FLOAT,
    weights: tuple[float, float, float] = RED_WEIGHTS,
) -> onnx.ModelProto:
    """A stand-in of `model_name`'s file. `batch`: a fixed size or a named (dynamic) axis;
    `side`, `channels` and `input_type` other than the model's make a misfit file."""
    side = side or salient_spec(model_name).input_size
    name = INPUT_NAMES[model_name]
    outputs = U2NET_SIDE_OUTPUTS if model_name.startswith("u2net") else 1
    output_names = [f"d{i}" for i in range(outputs)] if outputs > 1 else ["output_image"]
    kernel = np.zeros((1, channels, 1, 1), np.float32)
    kernel[0, :3, 0, 0] = weights[:channels]
    nodes = [
        helper.make_node("Cast", [name], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w", "b"], ["logits"]),
    ]
    for i, output in enumerate(output_names):
        # Side outputs blurrier than d0, as U²-Net's are: only d0 may be read.
        scaled = f"logits_{i}"
        nodes.append(helper.make_node("Mul", ["logits", f"scale_{i}"], [scaled]))
        nodes.append(helper.make_node("Sigmoid", [scaled], [output]))
    initializers = [
        numpy_helper.from_array(kernel, "w"),
        numpy_helper.from_array(np.full(1, BIAS, np.float32), "b"),
        *(
            numpy_helper.from_array(np.array(1.0 / (1 + i), np.float32), f"scale_{i}")
            for i in range(len(output_names))
        ),
    ]
    graph = helper.make_graph(
        nodes,
        f"standin-{model_name}",
        [helper.make_tensor_value_info(name, input_type, [batch, channels, side, side])],
        [
            helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, 1, side, side])
            for output in output_names
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7  # what onnxruntime releases of the last years all read
    onnx.checker.check_model(model)
    return model


def save_standin(path: Path, model_name: str, **kwargs: object) -> Path:
    """standin_model(model_name, **kwargs) written to `path`."""
    onnx.save(standin_model(model_name, **kwargs), str(path))  # type: ignore[arg-type]
    return path
