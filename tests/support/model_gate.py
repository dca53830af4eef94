"""`backdrop worker` with a gate inside the model, so a test can kill a worker while a batch
is in the middle of DeepLabV3's forward pass.

    python -m tests.support.model_gate worker --concurrency 4    (MODEL_GATE_DIR=/some/folder)

The worker is the real one, unchanged; a global forward pre-hook waits while the gate is
closed, at the start of the DeepLabV3 backbone's forward pass (or of the whole model's, if
it is ever called as one). The gate is a folder: a file `closed` in it closes the
gate, and a batch waiting at it leaves `inside-<pid>` (holding the batch's size), so the test
knows which worker to kill and when.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

GATE_ENV = "MODEL_GATE_DIR"
# How often a waiting batch looks whether the gate opened (the wait is the fault injected,
# not a test's synchronisation).
LOOK_EVERY_S = 0.02


class ModelGate:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def is_closed(self) -> bool:
        return (self.folder / "closed").exists()

    def close(self) -> None:
        (self.folder / "closed").touch()

    def open(self) -> None:
        (self.folder / "closed").unlink(missing_ok=True)

    def inside(self) -> dict[int, int]:
        """Worker pid → images in the batch it holds at the gate."""
        return {
            int(marker.name.removeprefix("inside-")): int(marker.read_text() or 0)
            for marker in self.folder.glob("inside-*")
        }

    def wait(self, images: int) -> None:
        """Worker side: stay here, with the batch, while the gate is closed."""
        if not self.is_closed:
            return
        marker = self.folder / f"inside-{os.getpid()}"
        marker.write_text(str(images))
        try:
            stop = threading.Event()
            while self.is_closed:
                stop.wait(LOOK_EVERY_S)
        finally:
            marker.unlink(missing_ok=True)


def main() -> None:
    import torch
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabV3

    from producer.cli import main as backdrop

    gate = ModelGate(Path(os.environ[GATE_ENV]))

    def hold_the_batch(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        if isinstance(module, DeepLabV3 | IntermediateLayerGetter):
            gate.wait(len(inputs[0]))

    torch.nn.modules.module.register_module_forward_pre_hook(hold_the_batch)
    backdrop()


if __name__ == "__main__":
    main()
