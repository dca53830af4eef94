"""`make demo` / `backdrop demo`: the real flow on one machine, nothing to set up.

A real Celery worker process, the broker and database from the settings (by default a
broker folder and SQLite that need no server, and local storage), real photos, every effect.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from producer.client import Client
from producer.db import upgrade
from producer.errors import DemoFailed
from producer.jobtable import format_table
from producer.models import JobStatus
from producer.services import Services, default_services
from producer.settings import Settings
from producer.storage import join
from worker.imageio import decode_image
from worker.runner import preflight

log = logging.getLogger(__name__)

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png")
# What scikit-image's sample photos show (its documentation's words, shortened).
PHOTO_DESCRIPTIONS = (
    "astronaut: Eileen Collins, NASA portrait",
    "chelsea: Chelsea the cat",
    "coffee: a cup of coffee (no VOC class: expect little or no subject)",
    "motorcycle_left: a motorcycle (stereo pair, left view)",
)
BACKGROUND = "hubble_deep_field.jpg"
EFFECTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("remove-white", {"effect": "remove"}),
    ("remove-transparent", {"effect": "remove", "background": "transparent"}),
    ("replace", {"effect": "replace"}),
    ("blur", {"effect": "blur", "blur_strength": 0.6}),
    ("desaturate", {"effect": "desaturate"}),
)
# The contact sheet's header: one name per column, effect and background.
COLUMNS = (
    "original",
    "mask",
    "remove on white",
    "remove, transparent",
    "replace: Hubble field",
    "blur 0.6",
    "desaturate",
)
THUMB = 220
HEADER = 32


def sample_photos() -> Path:
    try:
        import skimage.data
    except ImportError:
        raise DemoFailed(
            "the demo photos come from scikit-image: pip install scikit-image"
        ) from None
    return Path(skimage.data.__file__).parent


def run_demo(settings: Settings, output_dir: Path, echo: Callable[[str], None] = print) -> None:
    started = time.monotonic()
    preflight(settings)  # the actionable weights message, before anything starts
    upgrade(settings.database_url)
    storage = default_services().storage
    client = Client(Services(settings))
    photos = sample_photos()
    run_id = time.strftime("%Y%m%d-%H%M%S")
    inputs = {}
    for name in (*PHOTOS, BACKGROUND):
        location = join(settings.input_prefix, f"demo-{run_id}/{name}")
        storage.upload_file(photos / name, location)
        inputs[name] = location
    echo(f"uploaded {len(PHOTOS)} photos and a background to {settings.input_prefix}:")
    for description in PHOTO_DESCRIPTIONS:
        echo(f"  {description}")
    echo(f"  background: {BACKGROUND.removesuffix('.jpg')} (for replace)")

    output_dir.mkdir(parents=True, exist_ok=True)
    worker_log = output_dir / "worker.log"
    with worker_log.open("w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "worker", "--concurrency", "4"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
        try:
            records = _submit_and_wait(client, inputs, run_id, worker, worker_log, echo)
        finally:
            _stop(worker)
    echo(format_table(records, labels=[label for _ in PHOTOS for label, _ in EFFECTS]))
    sheet = _contact_sheet(records, inputs, output_dir)
    succeeded = sum(r["status"] == JobStatus.SUCCEEDED for r in records)
    echo(f"\n{succeeded}/{len(records)} jobs succeeded in {time.monotonic() - started:.1f}s")
    echo(f"outputs and contact sheet: {output_dir}/ ({sheet.name}); worker log: {worker_log}")
    if succeeded != len(records):
        raise DemoFailed(f"{len(records) - succeeded} demo jobs did not succeed")


def _submit_and_wait(
    client: Client,
    inputs: dict[str, str],
    run_id: str,
    worker: subprocess.Popen[bytes],
    worker_log: Path,
    echo: Callable[[str], None],
) -> list[dict[str, Any]]:
    requests = []
    for photo in PHOTOS:
        for label, fields in EFFECTS:
            # The sheet shows every photo, the coffee's blank cut-out too: jobs refuse that
            # (no_subject) unless asked for it.
            request = {"input": inputs[photo], "fail_on_no_subject": False, **fields}
            if fields["effect"] == "replace":
                request["background"] = inputs[BACKGROUND]
            if label == "remove-white":
                # One folder per run, like the inputs: a second demo must not meet the first
                # one's masks (an output never replaces an object its job did not write).
                request["mask_output"] = join(
                    client.settings.output_prefix, f"demo-{run_id}/{Path(photo).stem}-mask.png"
                )
            requests.append(request)
    records = client.submit_many(requests)
    echo(f"submitted {len(records)} jobs; waiting for the worker (log: {worker_log})")
    ids = [r["id"] for r in records]
    done = 0
    while True:
        if worker.poll() is not None:
            tail = worker_log.read_text()[-3000:]
            raise DemoFailed(f"the worker exited with status {worker.returncode}:\n{tail}")
        try:
            return client.wait(ids, timeout=2.0)
        except TimeoutError:
            finished = sum(JobStatus(client.get(i)["status"]).final for i in ids)
            if finished != done:
                done = finished
                echo(f"  {done}/{len(ids)} jobs finished")


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    if pixels.shape[2] == 4:  # show transparency over a checkerboard
        h, w = pixels.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        board = np.where(((yy // 16 + xx // 16) % 2)[..., None] == 0, 200, 255).astype(np.uint8)
        alpha = pixels[..., 3:4].astype(np.float32) / 255
        pixels = (pixels[..., :3] * alpha + board * (1 - alpha)).astype(np.uint8)
    h, w = pixels.shape[:2]
    scale = THUMB / max(h, w)
    small = cv2.resize(
        pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    tile = np.full((THUMB, THUMB, 3), 255, np.uint8)
    y, x = (THUMB - small.shape[0]) // 2, (THUMB - small.shape[1]) // 2
    tile[y : y + small.shape[0], x : x + small.shape[1]] = small[..., :3]
    return tile


def _decode_any(data: bytes) -> np.ndarray:
    array = _imdecode(data, cv2.IMREAD_UNCHANGED)
    code = cv2.COLOR_BGRA2RGBA if array.ndim == 3 and array.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(array, code)


def _header() -> np.ndarray:
    """A white strip naming each column (transparent outputs show over a checkerboard)."""
    strip = np.full((HEADER, THUMB * len(COLUMNS), 3), 255, np.uint8)
    for column, name in enumerate(COLUMNS):
        cv2.putText(
            strip,
            name,
            (column * THUMB + 8, HEADER - 11),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (30, 30, 30),
            1,
            cv2.LINE_AA,
        )
    return strip


def _mask_tile(storage: Any, record: dict[str, Any]) -> np.ndarray:
    if record["status"] != JobStatus.SUCCEEDED or not record["mask_output"]:
        return np.full((THUMB, THUMB, 3), (255, 200, 200), np.uint8)
    mask = _imdecode(storage.read(record["mask_output"]), cv2.IMREAD_GRAYSCALE)
    return _thumbnail(np.repeat(mask[..., None], 3, axis=2))


def _imdecode(data: bytes, flags: int) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if array is None:
        raise DemoFailed("a job's output in storage is not an image OpenCV can decode")
    return array


def _contact_sheet(records: list[dict[str, Any]], inputs: dict[str, str], output_dir: Path) -> Path:
    """A header row naming the columns, then one row per photo: the original, its mask,
    then each effect's output; saves the outputs too."""
    storage = default_services().storage
    rows = [_header()]
    by_input: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_input.setdefault(record["input"], []).append(record)
    for photo in PHOTOS:
        original = decode_image(storage.read(inputs[photo]), max_pixels=10**9, max_bytes=10**9).rgb
        tiles = [_thumbnail(original), _mask_tile(storage, by_input[inputs[photo]][0])]
        for (label, _), record in zip(EFFECTS, by_input[inputs[photo]], strict=True):
            if record["status"] != JobStatus.SUCCEEDED:
                tiles.append(np.full((THUMB, THUMB, 3), (255, 200, 200), np.uint8))
                continue
            data = storage.read(record["output"])
            suffix = record["output"].rsplit(".", 1)[-1]
            (output_dir / f"{Path(photo).stem}-{label}.{suffix}").write_bytes(data)
            tiles.append(_thumbnail(_decode_any(data)))
        rows.append(np.hstack(tiles))
    sheet = np.vstack(rows)
    path = output_dir / "contact-sheet.png"
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path
