"""Extraction over a Ray cluster (`vadclip.extract.cluster`) on a real local cluster: a head and two worker nodes
(Ray's `ray.cluster_utils.Cluster`), tiny CLIP, small videos and a frame folder. Outputs equal the local extractor's
bit for bit, and a worker node lost mid-run still yields every video exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.study.test_cluster_e2e import local_cluster, lose_node
from tests.test_extract import asym_frames, corrupt_video, files_under, run, small_video
from tests.test_extract_frames import frame_folder

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = {"Abuse/a1.mp4": 70, "Abuse/a2.mp4": 33, "Fighting/f1.mp4": 120, "Normal/n1.mp4": 17,
           "Normal/n2.mp4": 48, "Normal/n3.mp4": 95}


@pytest.fixture
def cluster() -> Iterator[tuple]:
    """Two 1-CPU worker nodes."""
    with local_cluster("rx", num_cpus=1) as c:
        yield c


def videos_folder(root: Path, lengths: dict[str, int]) -> Path:
    videos = root / "videos"
    for i, (rel, n) in enumerate(lengths.items()):
        small_video(videos / rel, n, seed=i)
    return videos


def local_run(videos: Path, out: Path, **kw):
    """The local extractor with one torch thread, as each 1-CPU worker runs: the thread count changes how
    torch splits its sums, hence the last bits of the features (the same holds between two local runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(videos, out, **kw)
    finally:
        torch.set_num_threads(threads)


def assert_same_outputs(local: Path, other: Path) -> None:
    """The same files; every feature array equal bit for bit; the same list up to the output folder's path."""
    assert files_under(local) == files_under(other)
    for rel in files_under(local):
        if rel.endswith(".npy"):
            a, b = np.load(local / rel), np.load(other / rel)
            assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), rel
    for csv in local.glob("*.csv"):
        assert csv.read_text().replace(str(local), "OUT") == (other / csv.name).read_text().replace(str(other), "OUT")


def test_cluster_outputs_equal_the_local_run_bit_for_bit(tmp_path: Path, cluster) -> None:
    c, _, _ = cluster
    videos = videos_folder(tmp_path, LENGTHS)
    corrupt_video(videos / "Normal/broken.mp4")
    frame_folder(videos / "Normal/frames01", asym_frames(40, width=64, height=48, seed=9),
                 [f"{i + 1}.jpg" for i in range(40)])  # a frame folder (ShanghaiTech's test set), natural order
    local = local_run(videos, tmp_path / "local", crops=5, batch_size=16)
    remote = run(videos, tmp_path / "remote", crops=5, batch_size=16, address=c.address)
    assert sorted(remote.extracted) == sorted(local.extracted) and len(local.extracted) == len(LENGTHS) + 1
    assert "Normal/frames01" in remote.extracted
    assert remote.failed.keys() == local.failed.keys() == {"Normal/broken.mp4"}
    assert remote.frames == local.frames and remote.snippets == local.snippets
    assert_same_outputs(tmp_path / "local", tmp_path / "remote")
    again = run(videos, tmp_path / "remote", crops=5, batch_size=16, address=c.address)  # resumable
    assert again.extracted == [] and len(again.skipped) == len(LENGTHS) + 1


@pytest.mark.timeout(300)
def test_worker_node_lost_mid_run_every_video_exactly_once(tmp_path: Path, cluster) -> None:
    c, workers, node_args = cluster
    lengths = {f"{'Abuse' if i % 2 else 'Normal'}/v{i:02d}.mp4": 160 + 7 * i for i in range(10)}
    videos = videos_folder(tmp_path, lengths)
    out = tmp_path / "remote"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vadclip.extract", str(videos), str(out), "--clip-model", "vadclip-tiny",
           "--crops", "5", "--batch-size", "16", "--device", "cpu", "--no-progress", "--address", c.address,
           "--workers", "2"]
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while len(list(out.rglob("*.npy"))) < 10:  # two videos done: both workers busy with the next ones
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()
            assert time.time() < deadline, "no video finished:\n" + (tmp_path / "driver.log").read_text()
            time.sleep(0.1)
        lose_node(c, workers[0])
        c.add_node(**node_args)  # the replacement worker needs a CPU
        assert proc.wait(timeout=180) == 0, (tmp_path / "driver.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_text = (tmp_path / "driver.log").read_text()
    assert "worker lost while encoding" in log_text, log_text
    assert "extracted 10, skipped 0 (complete), failed 0" in log_text, log_text
    listed = [line.split(",")[0] for line in (out / "CLIP_rgb.csv").read_text().splitlines()[1:]]
    assert len(listed) == len(set(listed)) == 10 * 5  # every video once, all its crops
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    local = local_run(videos, tmp_path / "local", crops=5, batch_size=16)
    assert len(local.extracted) == 10
    assert_same_outputs(tmp_path / "local", out)
