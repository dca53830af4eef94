"""How a worker sizes its threads to its cores: job threads, CPU slots, torch threads."""

from __future__ import annotations

import os
import threading

import pytest

from producer.settings import Settings
from worker.threadplan import (
    CpuSlots,
    ThreadPlan,
    model_device,
    plan_threads,
    prepare_environment,
    resolve_max_batch,
)

MOBILENET = "deeplabv3_mobilenet_v3_large"


def test_by_default_each_core_gets_a_cpu_slot_and_a_torch_thread() -> None:
    plan = plan_threads(Settings(model=MOBILENET, max_batch=8), cores=4, device_type="cpu")
    assert (plan.cpu_slots, plan.torch_threads, plan.interop_threads) == (4, 4, 1)
    assert plan.model_lanes == 1


def test_job_threads_fill_a_batch_besides_the_slots_and_one_io_thread_per_core() -> None:
    def job_threads(max_batch: int, cores: int) -> int:
        settings = Settings(model=MOBILENET, max_batch=max_batch)
        return plan_threads(settings, cores=cores, device_type="cpu").job_threads

    assert job_threads(8, cores=2) == 8 + 2 + 2
    assert job_threads(1, cores=2) == 1 + 2 + 2
    assert job_threads(16, cores=16) == 16 + 16 + 16


def test_settings_and_concurrency_override_each_part_of_the_plan() -> None:
    settings = Settings(max_batch=4, cpu_slots=3, torch_threads=1, model_lanes=1)
    assert plan_threads(settings, cores=8) == ThreadPlan(
        max_batch=4, job_threads=4 + 3 + 8, cpu_slots=3, torch_threads=1
    )
    assert plan_threads(settings, cores=8, concurrency=5).job_threads == 5


def test_model_lanes_share_the_cores_and_each_gets_a_batch_of_job_threads() -> None:
    plan = plan_threads(Settings(max_batch=1, model_lanes=2), cores=2)
    assert (plan.model_lanes, plan.torch_threads) == (2, 1)
    assert plan.job_threads == 2 * 1 + 2 + 2


def test_the_default_batch_is_one_photo_on_a_cpu_and_eight_on_a_gpu() -> None:
    settings = Settings(model=MOBILENET)
    assert resolve_max_batch(settings, "cpu") == 1
    assert resolve_max_batch(settings, "cuda") == 8
    assert plan_threads(settings, cores=2, device_type="cpu").job_threads == 1 + 2 + 2
    assert plan_threads(settings, cores=2, device_type="cuda").job_threads == 8 + 2 + 2


@pytest.mark.parametrize("model", ["deeplabv3_resnet101", "deeplabv3_resnet50"])
def test_a_resnet_on_a_cpu_runs_in_two_lanes_of_half_the_threads(model: str) -> None:
    plan = plan_threads(Settings(model=model), cores=2, device_type="cpu")
    assert (plan.model_lanes, plan.torch_threads, plan.job_threads) == (2, 1, 2 * 1 + 2 + 2)
    assert plan_threads(Settings(model=model), cores=16, device_type="cpu").model_lanes == 2
    assert plan_threads(Settings(model=model), cores=1, device_type="cpu").model_lanes == 1


def test_a_resnet_on_a_gpu_keeps_one_lane_for_its_batches() -> None:
    plan = plan_threads(Settings(), cores=2, device_type="cuda")
    assert (plan.model_lanes, plan.max_batch) == (1, 8)


def test_a_max_batch_that_was_set_is_kept_on_any_device() -> None:
    assert resolve_max_batch(Settings(max_batch=4), "cpu") == 4
    assert resolve_max_batch(Settings(max_batch=4), "cuda") == 4


def test_a_device_that_was_named_decides_the_batch_without_asking_torch() -> None:
    assert model_device("cpu") == "cpu"
    assert model_device("cuda:1") == "cuda"
    assert resolve_max_batch(Settings(device="cpu")) == 1


def test_a_machine_reporting_no_cores_still_gets_one_of_each() -> None:
    plan = plan_threads(Settings(max_batch=1), cores=0, device_type="cpu")
    assert (plan.job_threads, plan.cpu_slots, plan.torch_threads) == (3, 1, 1)


def test_openmp_waits_passively_unless_the_user_chose_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    prepare_environment()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    prepare_environment()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_jobs_beyond_the_slots_wait_until_one_is_free() -> None:
    slots = CpuSlots(1)
    inside, release = threading.Event(), threading.Event()
    entered: list[str] = []

    def first() -> None:
        with slots.hold():
            inside.set()
            release.wait(10)
            entered.append("first leaves")

    def second() -> None:
        with slots.hold():
            entered.append("second enters")

    holder = threading.Thread(target=first)
    holder.start()
    inside.wait(10)
    waiter = threading.Thread(target=second)
    waiter.start()
    waiter.join(0.2)
    assert entered == [], "the second job got in while the only slot was held"
    release.set()
    holder.join(10)
    waiter.join(10)
    assert entered == ["first leaves", "second enters"]
