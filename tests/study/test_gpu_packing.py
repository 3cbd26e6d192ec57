"""GPU packing: a trial's `device: auto` is the GPU Ray assigned to it, and a trial without a GPU stays on the CPU
even where CUDA is present (Ray leaves CUDA_VISIBLE_DEVICES alone for a task that asked for no GPU)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from study.trainable import trial_device
from tests.study.test_cluster_e2e import end_ray


@pytest.mark.parametrize(("requested", "gpu_ids", "cuda", "expected"), [
    ("auto", [], True, "cpu"),  # gpu: 0 on a GPU node: never grab a GPU
    ("auto", [], False, "cpu"),
    ("auto", ["0"], True, "cuda"),  # Ray's CUDA_VISIBLE_DEVICES makes `cuda` the assigned GPU
    ("auto", ["3"], True, "cuda"),
    ("auto", ["0"], False, "cpu"),  # a GPU resource declared on a node without CUDA
    ("cpu", ["0"], True, "cpu"),  # explicit devices are used as given
    ("cuda:1", [], True, "cuda:1"),
])
def test_trial_device(requested, gpu_ids, cuda, expected):
    assert trial_device(requested, gpu_ids, cuda) == expected


@pytest.fixture
def ray_one_gpu():
    """A local Ray that declares one GPU (a logical resource: Ray schedules and sets CUDA_VISIBLE_DEVICES for it
    whether or not the machine has one)."""
    import ray

    temp = tempfile.mkdtemp(prefix="gp", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    try:
        ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
        yield ray
    finally:
        ray.shutdown()
        left = end_ray(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


def test_fractional_gpu_trials_share_the_assigned_gpu_and_gpu0_stays_on_cpu(ray_one_gpu):
    ray = ray_one_gpu

    @ray.remote(num_cpus=0)
    class Trial:  # what a trial sees of Ray's assignment (train_trial passes ray.get_gpu_ids() to trial_device)
        def assigned(self) -> tuple[list[str], str | None]:
            return [str(i) for i in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")

    packed = [Trial.options(num_gpus=0.25).remote() for _ in range(4)]  # all four alive at once on one GPU
    assigned = ray.get([t.assigned.remote() for t in packed], timeout=120)
    assert assigned == [(["0"], "0")] * 4
    assert {trial_device("auto", ids, cuda_available=True) for ids, _ in assigned} == {"cuda"}  # = cuda:0 = GPU 0
    ids, _ = ray.get(Trial.options(num_gpus=0).remote().assigned.remote(), timeout=120)
    assert ids == [] and trial_device("auto", ids, cuda_available=True) == "cpu"
