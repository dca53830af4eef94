"""How a worker sizes its threads to its cores: job threads, CPU slots, torch threads."""

from __future__ import annotations

import os
import threading

import pytest

from producer.settings import Settings
from worker.threadplan import CpuSlots, ThreadPlan, plan_threads, prepare_environment


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
        job_threads=4 + 3 + 8, cpu_slots=3, torch_threads=1
    )
    assert plan_threads(settings, cores=8, concurrency=5).job_threads == 5


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
