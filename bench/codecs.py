"""Codec speed and size on photos: the candidates for the worker's encode and decode paths.

Every figure is the median CPU time (time.process_time) of N runs on one thread (OpenCV told
so with cv2.setNumThreads(1)): what one job costs one core, however busy the machine is.
Inputs are scikit-image's photos upscaled to ~2 MP and ~12 MP with bicubic interpolation, and
an RGBA cut-out (a horse silhouette with a soft edge, straight alpha). Upscaled photos are
smoother than camera photos, so every encoder's files are smaller than on real shots; the
ratios between encoders are what this measures.

Candidates that are not installed are skipped with a line saying so; only Pillow, OpenCV and
fpng are worker dependencies (`pip install imagecodecs pyspng-seunglab simplejpeg` for the
rest). Packages measured, and how they are kept (latest release on PyPI at the time of writing):
  Pillow          libpng/zlib, libjpeg-turbo, libwebp   monthly-quarterly releases
  opencv-python   libpng, libjpeg-turbo                 several releases a year
  fpng            0.1.0, Dec 2024, the only release (py-fpng-nb, MIT, wheels for Linux
                  x86-64/aarch64, macOS, Windows); wraps richgel999/fpng, a small, finished
                  SIMD encoder: 8-bit RGB/RGBA only, no ancillary chunks (the worker splices
                  in iCCP itself), "small" falls back to Pillow should it ever go stale
  pyspng-seunglab 1.1.3, Mar 2026 (libspng; encode with a zlib level, grey to RGBA)
  imagecodecs     2026.3.6, Mar 2026 (C. Gohlke; libpng, libspng, libjpeg-turbo, libwebp;
                  a 45 MB wheel)
  simplejpeg      1.9.0 (libjpeg-turbo; decode with DCT scaling to 1/2, 1/4, 1/8)
  PyTurboJPEG     2.6.1, Oct 2026, needs a system libturbojpeg: skipped where it is absent

Run: .venv/bin/python bench/codecs.py [--repeat N] [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import imageio

SKIMAGE_DATA = Path(skimage.data.__file__).parent
SIZES = {"2 MP": (1632, 1224), "12 MP": (4000, 3000)}

Encoder = Callable[[np.ndarray], bytes]


def photo(name: str, width: int, height: int) -> np.ndarray:
    image = np.asarray(Image.open(SKIMAGE_DATA / f"{name}.png").convert("RGB"))
    return np.ascontiguousarray(cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC))


def cutout(width: int, height: int) -> np.ndarray:
    """Chelsea the cat inside a horse silhouette with a soft edge: what 'remove' writes."""
    horse = (~skimage.data.horse()).astype(np.uint8) * 255
    alpha = cv2.GaussianBlur(cv2.resize(horse, (width, height)), (0, 0), 3)
    return np.ascontiguousarray(np.dstack([photo("chelsea", width, height), alpha]))


def cpu_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def optional(module: str) -> object | None:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # missing package or missing system library (PyTurboJPEG)
        print(f"  (skipping {module}: {type(exc).__name__}: {exc})")
        return None


def pillow(fmt: str, **options: object) -> Encoder:
    def encode(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt, **options)
        return buffer.getvalue()

    return encode


def opencv(ext: str, params: list[int]) -> Encoder:
    def encode(pixels: np.ndarray) -> bytes:
        code = cv2.COLOR_RGBA2BGRA if pixels.shape[2] == 4 else cv2.COLOR_RGB2BGR
        ok, data = cv2.imencode(ext, cv2.cvtColor(pixels, code), params)
        assert ok
        return data.tobytes()

    return encode


def png_encoders() -> dict[str, Encoder]:
    encoders: dict[str, Encoder] = {
        f"Pillow PNG level {level}": pillow("PNG", compress_level=level) for level in (1, 3, 6)
    }
    for level in (1, 3):
        encoders[f"OpenCV PNG level {level}"] = opencv(".png", [cv2.IMWRITE_PNG_COMPRESSION, level])
    if fpng := optional("fpng"):
        encoders["fpng"] = fpng.from_ndarray
    if spng := optional("pyspng"):
        encoders["pyspng level 1"] = lambda px: spng.encode(px, compress_level=1)
    if codecs := optional("imagecodecs"):
        encoders["imagecodecs PNG level 1 (RLE, SUB)"] = lambda px: codecs.png_encode(
            px, level=1, strategy=3, filter=16
        )
        encoders["imagecodecs PNG level 3"] = lambda px: codecs.png_encode(px, level=3)
    for mode in ("fast", "small"):
        encoders[f"worker encode_image ({mode})"] = lambda px, m=mode: imageio.encode_image(
            px, "png", png_compression=m
        )
    print("  (fpng, pyspng, imagecodecs cannot embed an ICC profile; the worker splices one in)")
    return encoders


def turbojpeg_library(turbo: object) -> object | None:
    try:
        return turbo.TurboJPEG()
    except RuntimeError as exc:  # the wheel is Python only; libturbojpeg comes from the system
        print(f"  (skipping PyTurboJPEG: {exc})")
        return None


def mask_encoders() -> dict[str, Encoder]:
    encoders: dict[str, Encoder] = {
        f"Pillow PNG L level {level}": pillow("PNG", compress_level=level) for level in (1, 3)
    }
    encoders["worker encode_mask"] = imageio.encode_mask
    return encoders


def lossy_encoders() -> dict[str, Encoder]:
    encoders: dict[str, Encoder] = {
        "Pillow JPEG q92 4:2:0": pillow("JPEG", quality=92, subsampling=2),
        "OpenCV JPEG q92 4:2:0": opencv(
            ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 92, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, 0x221111]
        ),
    }
    if simplejpeg := optional("simplejpeg"):
        encoders["simplejpeg q92 4:2:0"] = lambda px: simplejpeg.encode_jpeg(
            px, quality=92, colorspace="RGB", colorsubsampling="420"
        )
    if (turbo := optional("turbojpeg")) and (jpeg := turbojpeg_library(turbo)):
        encoders["PyTurboJPEG q92 4:2:0"] = lambda px: jpeg.encode(
            px, quality=92, pixel_format=turbo.TJPF_RGB, jpeg_subsample=turbo.TJSAMP_420
        )
    for method in (0, 2, 4):
        encoders[f"Pillow WebP q92 method {method}"] = pillow("WEBP", quality=92, method=method)
    return encoders


def decoders(model_side: int) -> dict[str, Callable[[bytes], np.ndarray]]:
    """Full decodes, and reduced decodes for the model's copy (short side >= model_side)."""

    def pillow_full(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def pillow_draft(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (model_side, model_side))
        return np.asarray(image.convert("RGB"))

    def opencv_full(data: bytes) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

    def opencv_reduced(data: bytes) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_4)

    found: dict[str, Callable[[bytes], np.ndarray]] = {
        "Pillow full": pillow_full,
        "Pillow draft (DCT scaling)": pillow_draft,
        "OpenCV full": opencv_full,
        "OpenCV IMREAD_REDUCED_COLOR_4": opencv_reduced,
    }
    if simplejpeg := optional("simplejpeg"):
        found["simplejpeg full"] = lambda data: simplejpeg.decode_jpeg(data, colorspace="RGB")
        found["simplejpeg min_height (DCT scaling)"] = lambda data: simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=model_side, min_width=model_side
        )
    return found


def encode_table(title: str, encoders: dict[str, Encoder], images: dict, repeat: int) -> None:
    print(f"\n{title}")
    print(f"  {'encoder':40} {'input':18} {'CPU ms':>8} {'size KB':>9}")
    for label, pixels in images.items():
        for name, encode in encoders.items():
            try:
                data = encode(pixels)
            except Exception as exc:
                print(f"  {name:40} {label:18} fails: {type(exc).__name__}: {exc}")
                continue
            if "PNG" in title:
                decoded = np.asarray(Image.open(io.BytesIO(data)))
                assert np.array_equal(decoded, pixels), f"{name} is not lossless on {label}"
            ms = 1000 * cpu_time(lambda e=encode, p=pixels: e(p), repeat)
            print(f"  {name:40} {label:18} {ms:8.1f} {len(data) / 1024:9.0f}")


def decode_table(jpeg: bytes, repeat: int, model_side: int) -> None:
    width, height = Image.open(io.BytesIO(jpeg)).size
    print(f"\nJPEG decode, {width}x{height} ({len(jpeg) // 1024} KB), model side {model_side}")
    print(f"  {'decoder':40} {'output':>12} {'CPU ms':>8}")
    for name, decode in decoders(model_side).items():
        out = decode(jpeg)
        ms = 1000 * cpu_time(lambda d=decode: d(jpeg), repeat)
        print(f"  {name:40} {out.shape[1]:>5}x{out.shape[0]:<6} {ms:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 MP only")
    args = parser.parse_args()
    cv2.setNumThreads(1)

    sizes = {"2 MP": SIZES["2 MP"]} if args.quick else SIZES
    rgb = {f"coffee {label}": photo("coffee", *size) for label, size in sizes.items()}
    rgb.update({f"astronaut {label}": photo("astronaut", *size) for label, size in sizes.items()})
    rgba = {f"cut-out {label}": cutout(*size) for label, size in sizes.items()}

    encode_table("PNG encode (lossless, checked)", png_encoders(), {**rgb, **rgba}, args.repeat)
    masks = {f"mask {label}": cutout(*size)[:, :, 3].copy() for label, size in sizes.items()}
    encode_table("PNG encode of masks (greyscale, checked)", mask_encoders(), masks, args.repeat)
    encode_table("JPEG / WebP encode", lossy_encoders(), rgb, args.repeat)
    twelve = photo("coffee", *SIZES["12 MP"])
    buffer = io.BytesIO()
    Image.fromarray(twelve).save(buffer, "JPEG", quality=92)
    decode_table(buffer.getvalue(), args.repeat, model_side=520)

    print(
        "\nChosen: PNG through fpng by default (BACKDROP_PNG_COMPRESSION=fast), Pillow zlib"
        " level 3 with BACKDROP_PNG_COMPRESSION=small. Masks (greyscale, which fpng cannot"
        " write) stay on Pillow. JPEG, WebP, AVIF stay on Pillow: the JPEG encoders are all"
        " libjpeg-turbo, a few ms apart at 2 MP."
    )


if __name__ == "__main__":
    main()
