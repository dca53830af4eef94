"""CPU seconds per image for each DeepLabV3 variant, through Segmenter.predict.

Random-init weights: speed does not depend on the values, and this runs offline. The time
includes fitting a 1280x960 photo into its canvas (520x416 at the default input size) and
turning the logits into the chosen classes' probability, as a worker pays them. Beside it, the
stock torchvision forward pass (plain NCHW layout, BatchNorm unfolded) on the same canvas
shows what the segmenter's optimisations buy.

    .venv/bin/python bench/model_speed.py [--models deeplabv3_resnet50,...] [--repeats 3]
        [--batch-sizes 1,4] [--input-size 520] [--device cpu|cuda]

On cuda it also prints the peak memory torch allocated per model and batch size.
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


def stock_model(model_name: str, device: str = "cpu") -> torch.nn.Module:
    return (
        MODELS[model_name]
        .builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False)
        .eval()
        .to(device)
    )


def build(model_name: str, input_size: int, device: str) -> Segmenter:
    return Segmenter(
        stock_model(model_name),
        name=model_name,
        weights_id="random",
        device=device,
        input_size=input_size,
    )


def synchronize(device: str) -> None:
    # CUDA runs asynchronously: without this a timer stops before the work does.
    if device == "cuda":
        torch.cuda.synchronize()


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


@torch.inference_mode()
def stock_seconds_per_image(
    model: torch.nn.Module, shape: tuple[int, int], batch: int, repeats: int, device: str
) -> float:
    batch_input = torch.randn(batch, 3, *shape, device=device)
    model(batch_input)  # warm-up
    runs = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        model(batch_input)["out"].softmax(dim=1)
        synchronize(device)
        runs.append((time.perf_counter() - started) / batch)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size")
    # Batch 4 of ResNet-101 takes ~3 minutes on 2 cores, so the default run stays at batch 1.
    parser.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,4")
    parser.add_argument("--input-size", type=int, default=520)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    batches = [int(b) for b in args.batch_sizes.split(",")]

    torch.manual_seed(0)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    side = args.input_size
    shape = (-(-side * 3 // 4 // 32) * 32, side)
    print(
        f"1280x960 photos, canvas {shape[1]}x{shape[0]}, median of {args.repeats} after a warm-up"
    )
    print(
        f"{'model':<30} {'params':>7} {'batch':>5} {'s/image':>8} {'min':>7} {'img/s':>6}"
        f" {'stock s/image':>14} {'speed-up':>9}"
    )
    for name in args.models.split(","):
        stock = stock_model(name, args.device)
        params = sum(p.numel() for p in stock.parameters()) / 1e6
        segmenter = build(name, args.input_size, args.device)
        for batch in batches:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            # Warm-up: the allocator and oneDNN's kernel choice, once per input shape.
            seconds_per_image(segmenter, batch, 1)
            runs = seconds_per_image(segmenter, batch, args.repeats)
            median = statistics.median(runs)
            plain = stock_seconds_per_image(stock, shape, batch, args.repeats, args.device)
            peak = (
                f" peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
                if args.device == "cuda"
                else ""
            )
            print(
                f"{name:<30} {params:>6.1f}M {batch:>5} {median:>8.3f} {min(runs):>7.3f}"
                f" {1 / median:>6.2f} {plain:>14.3f} {plain / median:>8.2f}x{peak}",
                flush=True,
            )


if __name__ == "__main__":
    main()
