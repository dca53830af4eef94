"""CPU seconds per image for each DeepLabV3 variant, through Segmenter.predict.

Random-init weights: speed does not depend on the values, and this runs offline. The time
includes letterboxing a 1280x960 photo and the softmax, as a worker pays them.

    .venv/bin/python bench/model_speed.py [--models deeplabv3_resnet50,...] [--repeats 3]
        [--batch-sizes 1,4] [--input-size 520]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from worker.segmenter import Segmenter
from worker.weights import MODELS, NUM_CLASSES

PERSON = 15


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(model_name: str, input_size: int) -> Segmenter:
    model = MODELS[model_name].builder(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False
    )
    return Segmenter(
        model, name=model_name, weights_id="random", device="cpu", input_size=input_size
    )


def seconds_per_image(segmenter: Segmenter, batch: int, repeats: int) -> list[float]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (960, 1280, 3), dtype=np.uint8) for _ in range(batch)]
    classes = [[PERSON]] * batch
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        segmenter.predict(images, classes)
        runs.append((time.perf_counter() - started) / batch)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size")
    # Batch 4 of ResNet-101 takes ~3 minutes on 2 cores, so the default run stays at batch 1.
    parser.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,4")
    parser.add_argument("--input-size", type=int, default=520)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]

    torch.manual_seed(0)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"input {args.input_size}x{args.input_size}, median of {args.repeats} after a warm-up")
    print(f"{'model':<30} {'params':>7} {'batch':>5} {'s/image':>8} {'min':>7} {'img/s':>6}")
    for name in args.models.split(","):
        segmenter = build(name, args.input_size)
        params = sum(p.numel() for p in segmenter._model.parameters()) / 1e6
        for batch in batches:
            # Warm-up: the allocator and oneDNN's kernel choice, once per input shape.
            seconds_per_image(segmenter, batch, 1)
            runs = seconds_per_image(segmenter, batch, args.repeats)
            median = statistics.median(runs)
            print(
                f"{name:<30} {params:>6.1f}M {batch:>5} {median:>8.3f} {min(runs):>7.3f}"
                f" {1 / median:>6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
