"""The memory budget: its admission logic on its own, then decompression bombs sent all at once
through a real worker with a small budget, its peak resident memory measured."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from producer.errors import InputTooLarge
from producer.settings import Settings
from tests.support.polling import poll_until
from tests.support.stack import Stack, build_stack, small_photo
from worker import budget
from worker.budget import MB, Expired, MemoryBudget

# --- admission ----------------------------------------------------------------------------


class Waiter:
    """A thread that reserves `size` bytes and holds them until told to let go."""

    def __init__(self, memory: MemoryBudget, size: int) -> None:
        self.admitted = threading.Event()
        self.let_go = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(memory, size), daemon=True)
        self.thread.start()

    def _run(self, memory: MemoryBudget, size: int) -> None:
        with memory.reserve(size, timeout=30):
            self.admitted.set()
            self.let_go.wait(timeout=30)

    def release(self) -> None:
        self.let_go.set()
        self.thread.join(timeout=30)


def test_a_reservation_that_fits_is_granted_at_once_and_given_back_on_leaving() -> None:
    memory = MemoryBudget(100)
    with memory.reserve(60, timeout=0):
        assert memory.free == 40
    assert memory.free == 100


def test_memory_is_given_back_when_the_job_fails_inside_the_reservation() -> None:
    memory = MemoryBudget(100)
    with pytest.raises(RuntimeError), memory.reserve(60, timeout=0):
        raise RuntimeError("the imaging blew up")
    assert memory.free == 100


def test_a_photo_needing_more_than_the_whole_budget_fails_input_too_large_without_waiting() -> None:
    memory = MemoryBudget(100 * MB)
    holder = Waiter(memory, 100 * MB)
    assert holder.admitted.wait(timeout=10)
    with pytest.raises(InputTooLarge) as refused:
        memory.reserve(101 * MB, timeout=30, what="this photo")
    assert refused.value.message == (
        "this photo needs about 101 MB of memory to process; this worker's budget is 100 MB"
        " (BACKDROP_MEMORY_BUDGET_MB)"
    )
    assert memory.waiting == 0
    holder.release()


def test_a_job_that_does_not_fit_waits_until_another_gives_memory_back() -> None:
    memory = MemoryBudget(100)
    first = Waiter(memory, 60)
    assert first.admitted.wait(timeout=10)
    second = Waiter(memory, 50)
    poll_until(lambda: memory.waiting == 1, timeout=10, what="the second job to wait")
    assert not second.admitted.is_set() and memory.free == 40
    first.release()
    assert second.admitted.wait(timeout=10)
    assert memory.free == 50
    second.release()
    assert memory.free == 100


def test_jobs_are_admitted_in_arrival_order_so_a_big_one_is_never_starved_by_small_ones() -> None:
    memory = MemoryBudget(100)
    first = Waiter(memory, 60)
    assert first.admitted.wait(timeout=10)
    big = Waiter(memory, 50)
    poll_until(lambda: memory.waiting == 1, timeout=10, what="the big job to wait")
    small = Waiter(memory, 10)
    # The small job would fit in the 40 free bytes, but queues behind the big one.
    poll_until(lambda: memory.waiting == 2, timeout=10, what="the small job to queue")
    assert not small.admitted.is_set()
    first.release()
    assert big.admitted.wait(timeout=10) and small.admitted.wait(timeout=10)
    assert memory.free == 40
    big.release()
    small.release()


def test_a_wait_that_outlasts_its_timeout_expires_and_leaves_the_queue() -> None:
    memory = MemoryBudget(100)
    holder = Waiter(memory, 60)
    assert holder.admitted.wait(timeout=10)
    with pytest.raises(Expired):
        memory.reserve(50, timeout=0.05)
    assert memory.waiting == 0
    with memory.reserve(40, timeout=0):
        assert memory.free == 0
    holder.release()


def test_a_jobs_need_grows_with_its_photo_mask_and_background() -> None:
    photo = budget.need_bytes((4000, 3000))
    assert 540 * MB < photo < 700 * MB  # measured: 542 MB at 12 MP
    assert budget.need_bytes((10_000, 10_000)) > 4_000 * MB
    assert budget.need_bytes((4000, 3000), mask=(4000, 3000)) > photo
    assert budget.need_bytes((4000, 3000), background=(4000, 3000)) > photo


# --- the default budget --------------------------------------------------------------------


def physical_memory() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"memory.max": "1073741824\n"}, 1 << 30),
        ({"memory.max": "max\n"}, None),
        ({"memory/memory.limit_in_bytes": "2147483648\n"}, 2 << 30),
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
        ({}, None),
    ],
    ids=["v2", "v2-unlimited", "v1", "v1-unlimited", "no-cgroup"],
)
def test_the_memory_limit_is_the_cgroups_or_else_the_machines(
    tmp_path: Path, files: dict[str, str], expected: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert budget.memory_limit(tmp_path) == (expected or physical_memory())


def test_the_budget_is_the_setting_or_else_half_the_memory_limit() -> None:
    assert budget.capacity_bytes(Settings(memory_budget_mb=750)) == 750 * MB
    assert budget.capacity_bytes(Settings(), limit=16 << 30) == 8 << 30


# --- decompression bombs through a real worker ---------------------------------------------

BUDGET_MB = 1000
BOMB_SIDE = 4000  # 16 MP, with a 16 MP mask: about 960 MB to process, one at a time fits
OVER_BUDGET_SIDE = 6000  # 36 MP: about 1,800 MB, more than the whole budget
BOMBS = 5
# What a job holds outside the budget (its compressed input and encoded output, thread
# stacks, allocator slack) on top of the budget itself.
MARGIN_MB = 300


def bomb(side: int, mode: str = "RGB") -> bytes:
    """A small PNG that decodes to side x side pixels: two flat colours and a hard edge.

    As a job's mask ("L") it gives the refinement a real edge to work on whatever the model
    makes of a flat photo, so each job does its full work at full resolution."""
    image = Image.new(mode, (side, side), 0 if mode == "L" else (20, 120, 200))
    ellipse = (side // 4, side // 8, 3 * side // 4, 7 * side // 8)
    ImageDraw.Draw(image).ellipse(ellipse, 255 if mode == "L" else "orange")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def memory_of(pid: int, field: str) -> int:
    """A /proc/PID/status memory field, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


@pytest.fixture(scope="module")
def stack(
    s3_server: str, mobilenet_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = build_stack(
        tmp_path_factory.mktemp("budget"),
        s3_server,
        mobilenet_weights,
        BACKDROP_MEMORY_BUDGET_MB=str(BUDGET_MB),
        # The lease must outlast a bomb's turn in the queue on a loaded two-core machine.
        BACKDROP_JOB_LEASE_S="60",
    )
    try:
        stack.start_workers(1)
        yield stack
    finally:
        stack.close()


@pytest.mark.integration
@pytest.mark.slow
def test_concurrent_decompression_bombs_wait_for_the_budget_and_the_worker_stays_within_it(
    stack: Stack, photo_bytes: dict[str, bytes]
) -> None:
    (worker,) = stack.workers
    warm_up = stack.submit(
        [{"input": stack.upload("warm-up.png", small_photo(photo_bytes["coffee"]))}]
    )
    assert stack.wait_final(warm_up, timeout=120)[warm_up[0]]["status"] == "succeeded"
    bombs = [stack.upload(f"bombs/{n}.png", bomb(BOMB_SIDE)) for n in range(BOMBS)]
    mask = stack.upload("bombs/mask.png", bomb(BOMB_SIDE, "L"))
    too_big = stack.upload("bombs/too-big.png", bomb(OVER_BUDGET_SIDE))
    files = [*bombs, mask, too_big]
    assert max(len(stack.storage.read(location)) for location in files) < 300_000

    Path(f"/proc/{worker.pid}/clear_refs").write_text("5")  # the peak restarts from now
    idle = memory_of(worker.pid, "VmRSS")
    requests = [{"input": location, "mask": mask} for location in bombs]
    job_ids = stack.submit([*requests, {"input": too_big}])
    records = stack.wait_final(job_ids, timeout=600)
    peak = memory_of(worker.pid, "VmHWM") - idle

    assert worker.alive
    *bombed, refused = (records[job_id] for job_id in job_ids)
    for record in bombed:
        assert record["status"] == "succeeded", record["error"]
        assert record["input_size"] == [BOMB_SIDE, BOMB_SIDE] and record["attempts"] == 1
    assert refused["status"] == "failed" and refused["error"]["code"] == "input_too_large"
    assert "BACKDROP_MEMORY_BUDGET_MB" in refused["error"]["message"]
    print(
        f"\nFIGURE worker peak above idle, {BOMBS} x {BOMB_SIDE}x{BOMB_SIDE} bombs at once,"
        f" budget {BUDGET_MB} MB: {peak / MB:.0f} MB"
    )
    assert peak < (BUDGET_MB + MARGIN_MB) * MB
