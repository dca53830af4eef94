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


def test_by_default_each_core_gets_a_cpu_slot_and_a_torch_thread() -> None:
    plan = plan_threads(Settings(max_batch=8), cores=4)
    assert (plan.cpu_slots, plan.torch_threads, plan.interop_threads) == (4, 4, 1)


def test_job_threads_fill_a_batch_besides_the_slots_and_one_io_thread_per_core() -> None:
    assert plan_threads(Settings(max_batch=8), cores=2).job_threads == 8 + 2 + 2
    assert plan_threads(Settings(max_batch=1), cores=2).job_threads == 1 + 2 + 2
    assert plan_threads(Settings(max_batch=16), cores=16).job_threads == 16 + 16 + 16


def test_settings_and_concurrency_override_each_part_of_the_plan() -> None:
    settings = Settings(max_batch=4, cpu_slots=3, torch_threads=1)
    assert plan_threads(settings, cores=8) == ThreadPlan(
        max_batch=4, job_threads=4 + 3 + 8, cpu_slots=3, torch_threads=1
    )
    assert plan_threads(settings, cores=8, concurrency=5).job_threads == 5


def test_the_default_batch_is_one_photo_on_a_cpu_and_eight_on_a_gpu() -> None:
    assert resolve_max_batch(Settings(), "cpu") == 1
    assert resolve_max_batch(Settings(), "cuda") == 8
    assert plan_threads(Settings(), cores=2, device_type="cpu").job_threads == 1 + 2 + 2
    assert plan_threads(Settings(), cores=2, device_type="cuda").job_threads == 8 + 2 + 2


def test_a_max_batch_that_was_set_is_kept_on_any_device() -> None:
    assert resolve_max_batch(Settings(max_batch=4), "cpu") == 4
    assert resolve_max_batch(Settings(max_batch=4), "cuda") == 4


def test_a_device_that_was_named_decides_the_batch_without_asking_torch() -> None:
    assert model_device("cpu") == "cpu"
    assert model_device("cuda:1") == "cuda"
    assert resolve_max_batch(Settings(device="cpu")) == 1


def test_a_machine_reporting_no_cores_still_gets_one_of_each() -> None:
    plan = plan_threads(Settings(max_batch=1), cores=0)
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
