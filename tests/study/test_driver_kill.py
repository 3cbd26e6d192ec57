"""The driver killed outright (SIGKILL: no handler runs, nothing is saved on the way out) in the middle of a study,
then `python -m study.run NAME --resume`: every trial ends exactly once, nothing is lost or logged twice.

Two kills, each followed by a resume: right after a trial ended (before Tune's next snapshot of the experiment, so
the resumed study runs that trial again from its last checkpoint), then while a trial is half way through."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.study.test_cluster_e2e import (
    AGENTS,
    assert_epochs_logged_once,
    assert_report_complete,
    driver_env,
    end_ray,
    study_yaml,
    trial_runs,
    wait_gone,
)

EPOCHS = 6
NAME = "tiny_driver_kill"


def kill_driver_when(cmd: list[str], cwd: Path, env: dict[str, str], uri: str, temp: str,
                     when: Callable[[list], dict]) -> dict:
    """Start the study, SIGKILL its driver once `when(trial runs)` returns something, return that."""
    with (cwd / "driver.log").open("a") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 180
            while True:
                assert proc.poll() is None, "the study ended before the driver could be killed"
                assert time.time() < deadline, "the moment to kill the driver never came"
                time.sleep(0.3)
                try:
                    runs = trial_runs(uri, NAME)
                except Exception:  # the store is being created by the driver
                    continue
                hit = when(runs)
                if hit:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    # Ray's processes share the driver's fate: none may go on training (and logging) beside the resumed study.
    # Only the raylet's two agents outlive it, for about a minute, before they notice it is gone.
    left = wait_gone(temp, timeout=30, ignore=AGENTS)
    assert not left, f"Ray processes outlived the killed driver: {left}"
    return hit


def just_ended(runs: list) -> dict[str, float]:
    """The first trial has ended and the next one has not begun (serial trials)."""
    done = {r.data.tags["trial_id"]: EPOCHS for r in runs if r.info.status == "FINISHED"}
    return done if done and len(done) == len(runs) else {}


def snapshot_epochs(storage: Path) -> dict[str, int]:
    """Each trial's last checkpointed epoch in Tune's newest snapshot of the experiment (what a resume restores)."""
    states = sorted(storage.glob(f"{NAME}-*/experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError):  # being written
        return {}
    return {json.loads(state)["trial_id"]: int(last["training_iteration"])
            for state, meta in trials if (last := json.loads(meta).get("last_result") or {}).get("checkpoint_dir_name")}


def half_way(storage: Path) -> Callable[[list], dict[str, tuple[float, int]]]:
    """Two trials ended and one is half way, with a checkpoint in Tune's snapshot (SIGKILL leaves none to a
    later one): {trial: (its epochs logged so far, the snapshot's checkpoint epoch)}."""
    def when(runs: list) -> dict[str, tuple[float, int]]:
        finished = sum(r.info.status == "FINISHED" for r in runs)
        middle = {r.data.tags["trial_id"]: r.data.metrics["epoch"] for r in runs
                  if r.info.status == "RUNNING" and 2 <= r.data.metrics.get("epoch", 0) < EPOCHS}
        if finished < 2 or not middle:
            return {}
        saved = snapshot_epochs(storage)
        return {trial: (epoch, saved[trial]) for trial, epoch in middle.items() if trial in saved}
    return when


@pytest.mark.timeout(480)
def test_sigkilled_driver_resumes_without_lost_or_duplicated_trials(tmp_path):
    # a new worker process per trial (as before workers were reused): its start leaves the moments this test
    # kills at (between two trials, half way through one) wide enough to hit
    spec_path = study_yaml(tmp_path, NAME, EPOCHS, reuse_workers=False)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    temp = tempfile.mkdtemp(prefix="dk", dir="/tmp")  # the drivers' Ray files: tells this test's processes apart
    env = driver_env(temp)
    cmd = [sys.executable, "-m", "study.run", str(spec_path), "--num-cpus", "1"]  # 4 trials, one at a time
    try:
        kill_driver_when(cmd, tmp_path, env, uri, temp, just_ended)
        interrupted = kill_driver_when([*cmd, "--resume"], tmp_path, env, uri, temp, half_way(tmp_path / "ray_results"))
        before = {r.data.tags["trial_id"]: r.info.status for r in trial_runs(uri, NAME)}
        assert "RUNNING" in before.values() and len(before) < 4, before  # one trial not even begun
        resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=240)
    finally:
        left = end_ray(temp)  # never leave a Ray behind, whatever failed above
        shutil.rmtree(temp, ignore_errors=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not left, f"Ray processes left behind: {left}"

    runs = trial_runs(uri, NAME)
    by_trial = {r.data.tags["trial_id"]: r for r in runs}
    assert len(runs) == 4 and len(by_trial) == 4, "one child run per trial"
    assert set(before) <= set(by_trial), "the resumed study continued the same trials"
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {(r.data.tags["ray.gpu_ids"], r.data.tags["device"]) for r in runs} == {("", "cpu")}  # gpu: 0, no GPU
    assert sorted((r.data.tags["variant"], r.data.tags["seed"]) for r in runs) == sorted(
        (v, s) for v in ("none", "LGT") for s in ("234", "235"))
    for trial, (epoch, saved) in interrupted.items():  # continued from its last checkpoint, not from scratch
        restored = by_trial[trial].data.tags.get("restored_from_epoch")
        assert restored is not None and 1 <= saved <= int(restored) <= epoch, (trial, restored, saved, epoch)
    assert_epochs_logged_once(uri, runs, EPOCHS)  # the final metrics of a trial run again included
    assert_report_complete(tmp_path, NAME, n=2)
    c = MlflowClient(uri)
    parents = c.search_runs([c.get_experiment_by_name(NAME).experiment_id],
                            filter_string="tags.`vadclip.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "failed trials 0" in resumed.stdout
