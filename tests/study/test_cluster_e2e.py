"""Multi-node on one machine: a real Ray cluster (a head and two worker nodes on loopback, Ray's own
`ray.cluster_utils.Cluster`), a real study driven by `python -m study.run NAME --address ...`, and a worker node
killed mid-study. The trials it ran resume from their last checkpoint on another node; MLflow ends with one child
run per trial and every epoch metric logged exactly once.

Each worker node declares one GPU (a logical resource where the machine has none) and the study YAML asks for
half a GPU per trial, as a GPU cluster would: the trials must get the GPU Ray assigns them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.study.test_run_e2e import TINY

ROOT = Path(__file__).resolve().parents[2]
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # each raylet's helpers
EPOCHS = 10
NAME = "tiny_cluster"


def ray_processes(temp: str) -> dict[int, str]:
    """pid -> name of every live process (but this one) of the Ray whose temp dir is `temp`: it names the dir in
    its command line or environment, or holds a file open in it (Ray's agents write their process title over
    their environment, but keep their logs open)."""
    needle = temp.rstrip("/")
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if "\nState:\tZ" in (proc / "status").read_text():  # exited; only its parent's wait is missing
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ours = needle in cmd or needle.encode() in (proc / "environ").read_bytes()
            ours = ours or any(_link(fd).startswith(needle + "/") for fd in (proc / "fd").iterdir())
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if ours:
            found[int(proc.name)] = cmd[:120]
    return found


def _link(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:
        return ""


def wait_gone(temp: str, timeout: float = 60, ignore: tuple[str, ...] = ()) -> dict[int, str]:
    """Wait until no process of that Ray is left (but those whose name starts with one of `ignore`)."""
    deadline = time.time() + timeout
    while True:
        left = {pid: name for pid, name in ray_processes(temp).items() if not name.startswith(ignore)}
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


def end_ray(temp: str) -> dict[int, str]:
    """After a Ray was shut down (or its driver killed): what of it outlived it by 30 s. Its raylet's two agents
    linger about a minute before they notice the raylet is gone, so they are ended here, as is everything else
    (only this test's processes: they hold its temp dir); the caller asserts the returned dict is empty."""
    left = wait_gone(temp, timeout=30, ignore=AGENTS)
    for pid in ray_processes(temp):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return {**left, **wait_gone(temp, timeout=10)}


def lose_node(c, node) -> None:
    """A machine lost at once: the node's workers (the raylet's children) die with it. Ray's remove_node alone kills
    the raylet, and a worker would go on training (and reporting) for a moment before it noticed."""
    raylet = node.all_processes["raylet"][0].process.pid
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == raylet:
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):  # exited meanwhile
            continue
    c.remove_node(node, allow_graceful=False)


def study_yaml(tmp_path: Path, name: str, epochs: int, **extra) -> Path:
    """Two variants x two seeds of a small synthetic set: each epoch is a fraction of a second."""
    raw = {"name": name, "kind": "ablation", "description": "two rows of Table 5", "preset": "synthetic",
           "metric": "ap", "seeds": 2, "full": "LGT", "resources": {"cpu": 1, "gpu": 0}, "max_failures": 3,
           "base": {"eval.score_branch": "a", **TINY, "data.synthetic.train_normal": 24,
                    "data.synthetic.train_abnormal": 24, "optim.epochs": epochs},
           "variants": [{"name": "none", "set": {"model.temporal": "none"}},
                        {"name": "LGT", "set": {"model.temporal": "local+gcn"}}], **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def trial_runs(uri: str, name: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], filter_string="tags.`vadclip.role` = 'trial'", max_results=1000)


def assert_epochs_logged_once(uri: str, runs: list, epochs: int) -> None:
    """Every per-epoch metric of every run holds epochs 1..N (at their global steps), each exactly once; every
    final metric once, at the last epoch's step."""
    c = MlflowClient(uri)
    for run in runs:
        keys = list(run.data.metrics)
        assert "epoch" in keys and "train/loss" in keys and "final/ap" in keys, keys
        epoch_history = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "epoch"))
        assert [v for _, v in epoch_history] == list(range(1, epochs + 1)), epoch_history
        epoch_steps = [s for s, _ in epoch_history]
        for key in keys:
            steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, key))
            expected = epoch_steps[-1:] if key.startswith("final/") else epoch_steps
            assert steps == expected, (run.data.tags["trial_id"], key, steps)


def assert_report_complete(tmp_path: Path, name: str, n: int) -> None:
    table = pd.read_csv(tmp_path / "reports" / f"{name}.csv", index_col="variant")
    assert set(table.index) == {"none", "LGT"}
    assert (table["ap_n"] == n).all() and (table["failed"] == 0).all(), table
    assert table["ap_mean"].notna().all()


def driver_env(ray_tmpdir: str | None = None) -> dict[str, str]:
    """The environment of a `python -m study.run` subprocess; a local Ray it starts keeps its files in ray_tmpdir."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    return {**env, "RAY_TMPDIR": ray_tmpdir} if ray_tmpdir else env


@contextlib.contextmanager
def local_cluster(prefix: str, **resources: float) -> Iterator[tuple]:
    """A head with no resources (only the driver's side) and two worker nodes of `resources` each, on loopback;
    yields (cluster, workers, node_args). All torn down after (an in-process driver too), and no process of theirs
    may outlive the test."""
    import ray
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    node_args = {"temp_dir": temp, **resources}
    c = Cluster(initialize_head=True, head_node_args={**node_args, **{k: 0 for k in resources},
                                                       "include_dashboard": False})
    try:
        workers = [c.add_node(**node_args) for _ in range(2)]
        c.wait_for_nodes()
        yield c, workers, node_args
    finally:
        ray.shutdown()  # a no-op unless the test's own process joined the cluster
        c.shutdown()
        left = end_ray(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


@pytest.fixture
def cluster() -> Iterator[tuple]:
    """Two worker nodes of 1 CPU and 1 (logical) GPU."""
    with local_cluster("rc", num_cpus=1, num_gpus=1) as c:
        yield c


@pytest.mark.timeout(420)
def test_worker_node_killed_mid_study_fused_trials_resume_elsewhere(tmp_path, cluster):
    """GPU trials fuse the seeds of a row (fuse_seeds auto): two trials of two seeds each; the trial on the killed
    node restores both of its seeds from its one checkpoint on another node."""
    c, workers, node_args = cluster
    spec_path = study_yaml(tmp_path, NAME, EPOCHS, resources={"cpu": 1, "gpu": 0.5})
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    log = (tmp_path / "driver.log").open("w")
    cmd = [sys.executable, "-m", "study.run", str(spec_path), "--address", c.address]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=driver_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        worker_ids = {w.node_id: w for w in workers}
        seen: dict[str, set[str]] = {}  # trial_id -> nodes it was seen running on before the kill
        victim = None
        deadline = time.time() + 240
        while victim is None:
            assert proc.poll() is None, "driver ended before a node could be killed:\n" + tail(tmp_path)
            assert time.time() < deadline, "no trial reached epoch 2 on a worker node:\n" + tail(tmp_path)
            time.sleep(0.3)
            try:
                runs = trial_runs(uri, NAME)
            except Exception:  # the store is being created by the driver
                continue
            for run in runs:
                node = run.data.tags.get("ray.node_id")
                if node:
                    seen.setdefault(run.data.tags["trial_id"], set()).add(node)
            on_nodes = {n for nodes in seen.values() for n in nodes}
            if len(on_nodes) < 2:
                continue  # trials run on both workers before one is killed
            for run in runs:
                node = run.data.tags.get("ray.node_id")
                if run.info.status == "RUNNING" and node in worker_ids and run.data.metrics.get("epoch", 0) >= 2:
                    victim = worker_ids[node]  # its epoch-1 checkpoint is in storage by now
                    break
        assert on_nodes <= set(worker_ids) and len(on_nodes) == 2, "trials were not spread over both workers"
        lose_node(c, victim)
        killed_at = {r.data.tags["trial_id"]: r.data.metrics.get("epoch", 0) for r in trial_runs(uri, NAME)
                     if r.data.tags.get("ray.node_id") == victim.node_id and r.info.status == "RUNNING"}
        assert killed_at, "the killed node ran no trial"
        replacement = c.add_node(**node_args)  # the cluster keeps two trial slots
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, tail(tmp_path)

    runs = trial_runs(uri, NAME)
    by_seed = {(r.data.tags["trial_id"], r.data.tags["seed"]): r for r in runs}
    assert len(runs) == 4 and len(by_seed) == 4 and len({t for t, _ in by_seed}) == 2, "a child run per seed"
    assert {r.data.tags["fused_group"] for r in runs} == {"234,235"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # `auto` on the GPU Ray assigned (none here: cpu)
    assert {(r.data.tags["ray.gpu_ids"], r.data.tags["device"]) for r in runs} == {("0", device)}
    for trial, epoch in killed_at.items():
        group = [r.data.tags for r in runs if r.data.tags["trial_id"] == trial]
        assert len(group) == 2  # both seeds of the killed trial restored
        for tags in group:
            nodes = tags["ray.nodes"].split(",")
            assert victim.node_id in nodes and tags["ray.node_id"] != victim.node_id, nodes
            assert tags["ray.node_id"] in {*worker_ids, replacement.node_id}
            assert 1 <= int(tags["restored_from_epoch"]) <= epoch, (tags.get("restored_from_epoch"), epoch)
    for run in runs:  # a trial the kill did not touch ran on one node from start to end
        if victim.node_id not in run.data.tags["ray.nodes"]:
            assert "," not in run.data.tags["ray.nodes"] and "restored_from_epoch" not in run.data.tags
    assert_epochs_logged_once(uri, runs, EPOCHS)
    assert_report_complete(tmp_path, NAME, n=2)
    assert "failed trials 0" in (tmp_path / "driver.log").read_text()


def tail(tmp_path: Path, n: int = 4000) -> str:
    path = tmp_path / "driver.log"
    return path.read_text()[-n:] if path.is_file() else ""
