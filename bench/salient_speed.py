"""CPU seconds per photo for each salient model, through SalientSegmenter.predict on onnxruntime.

The published files cannot be downloaded here, so each model is rebuilt from its paper's
architecture (U²-Net and U²-NetP: Qin et al. 2020, their RSU blocks and channel widths;
ISNet: Qin et al. 2022, U²-Net's stages behind a stride-2 input convolution), random-init,
exported to ONNX at the published input size, and timed like a worker runs it: rembg's
preprocessing of a 1280x960 photo (Lanczos to the square input), the session, min-max and the
map fitted back. The parameter count printed beside each is the check that the rebuilt graph
is the published one's size (u2net.onnx and isnet-general-use.onnx are 176 MB, 44 M float32
parameters; u2netp.onnx 4.7 MB, 1.1 M). Speed does not depend on the weights' values.

    .venv/bin/python bench/salient_speed.py [--models u2net,u2netp,isnet-general-use]
        [--repeats 3] [--threads N]

Baseline for the same photo: bench/model_speed.py (DeepLabV3 through Segmenter.predict).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worker.salient import SALIENT_MODELS, SalientSegmenter, open_session


class Conv(nn.Sequential):
    """REBNCONV: 3x3 convolution (dilated), BatchNorm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


def upsample_like(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=target.shape[2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """A residual U-block of `height` levels (RSU-7 … RSU-4); `dilated`: RSU-4F, which keeps
    its resolution and widens its field with dilations 1, 2, 4, 8 instead."""

    def __init__(self, height: int, in_ch: int, mid: int, out_ch: int, dilated: bool = False):
        super().__init__()
        self.dilated = dilated
        self.conv_in = Conv(in_ch, out_ch)
        rates = [1, 2, 4, 8] if dilated else [1] * (height - 1) + [2]
        self.encoder = nn.ModuleList(
            [Conv(out_ch if i == 0 else mid, mid, rate) for i, rate in enumerate(rates)]
        )
        self.decoder = nn.ModuleList(
            [Conv(2 * mid, out_ch if i == 0 else mid, rate) for i, rate in enumerate(rates[:-1])]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.conv_in(x)
        skips, h = [], x_in
        for i, conv in enumerate(self.encoder):
            h = conv(h)
            skips.append(h)
            if not self.dilated and i < len(self.encoder) - 2:
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
        h = skips.pop()
        for conv in reversed(self.decoder):
            skip = skips.pop()
            if not self.dilated:
                h = upsample_like(h, skip)
            h = conv(torch.cat((h, skip), 1))
        return h + x_in


class U2Net(nn.Module):
    """U²-Net (widths of `full`) or U²-NetP; ISNet's general-use net with `isnet`."""

    def __init__(self, small: bool = False, isnet: bool = False) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 64, 3, stride=2, padding=1) if isnet else None
        first = 64 if isnet else 3
        if small:
            enc = [(7, first, 16, 64), (6, 64, 16, 64), (5, 64, 16, 64), (4, 64, 16, 64)]
            enc_f = [(64, 16, 64), (64, 16, 64)]
            dec = [(4, 128, 16, 64), (5, 128, 16, 64), (6, 128, 16, 64), (7, 128, 16, 64)]
            dec_f = (128, 16, 64)
            sides = [64] * 6
        else:
            enc = [(7, first, 32, 64), (6, 64, 32, 128), (5, 128, 64, 256), (4, 256, 128, 512)]
            enc_f = [(512, 256, 512), (512, 256, 512)]
            dec = [(4, 1024, 128, 256), (5, 512, 64, 128), (6, 256, 32, 64), (7, 128, 16, 64)]
            dec_f = (1024, 256, 512)
            sides = [64, 64, 128, 256, 512, 512]
        self.encoder = nn.ModuleList(
            [RSU(*spec) for spec in enc] + [RSU(4, *spec, dilated=True) for spec in enc_f]
        )
        self.decoder = nn.ModuleList([RSU(4, *dec_f, dilated=True)] + [RSU(*spec) for spec in dec])
        self.sides = nn.ModuleList([nn.Conv2d(ch, 1, 3, padding=1) for ch in sides])
        self.fuse = None if isnet else nn.Conv2d(6, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.conv_in(x) if self.conv_in is not None else x
        skips = []
        for i, stage in enumerate(self.encoder):
            h = stage(h)
            if i < len(self.encoder) - 1:
                skips.append(h)
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
        decoded = [h]
        for stage in self.decoder:
            skip = skips.pop()
            h = stage(torch.cat((upsample_like(h, skip), skip), 1))
            decoded.append(h)
        maps = [
            upsample_like(side(d), x) for side, d in zip(self.sides, reversed(decoded), strict=True)
        ]
        if self.fuse is not None:  # U²-Net's d0 fuses the six side maps
            maps.insert(0, self.fuse(torch.cat(maps, 1)))
        return tuple(torch.sigmoid(m) for m in maps)


def exported(model_name: str, folder: Path) -> tuple[Path, int]:
    torch.manual_seed(0)
    model = U2Net(small=model_name == "u2netp", isnet=model_name.startswith("isnet")).eval()
    side = SALIENT_MODELS[model_name].input_size  # type: ignore[index]
    path = folder / f"{model_name}.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, 3, side, side),),
        str(path),
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
        opset_version=11,
        dynamo=False,
    )
    return path, sum(p.numel() for p in model.parameters())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SALIENT_MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    photo = np.random.default_rng(0).integers(0, 256, (960, 1280, 3), dtype=np.uint8)
    print(f"{cpu_name()}, onnxruntime CPU, 1280x960 photo, median of {args.repeats}")
    print("| model | input | parameters | ONNX file | s per photo (wall) | CPU s per photo |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            path, parameters = exported(name, Path(folder))
            session = open_session(path, name, device="cpu", threads=args.threads)
            segmenter = SalientSegmenter(session, name=name, weights_id="random", path=path)
            segmenter.predict([photo], [[]])  # warm-up: onnxruntime plans its buffers
            walls, cpus = [], []
            for _ in range(args.repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                segmenter.predict([photo], [[]])
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            side = SALIENT_MODELS[name].input_size  # type: ignore[index]
            print(
                f"| {name} | {side}x{side} | {parameters / 1e6:.2f} M | "
                f"{path.stat().st_size / 1e6:.1f} MB | {statistics.median(walls):.2f} | "
                f"{statistics.median(cpus):.2f} |"
            )


if __name__ == "__main__":
    main()
