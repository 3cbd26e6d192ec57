"""Feature extraction over a Ray cluster: `python -m vadclip.extract VIDEOS OUT --address auto|HOST:PORT|local`.

The same outputs as a local run (`vadclip.extract.extract_videos`): the same `.npy` per (video, crop) and the same
list CSV. Workers read VIDEOS at the same path on every node (the cluster's synced data folder, or a shared file
system; a frame folder's job carries the frame names the driver listed, so every worker reads the same frames in
the same order) and send each video's features back through Ray's object store; the driver writes them into OUT, so OUT
needs to exist on the driver's machine only (docs/extraction.md: from videos in S3 to features in S3).

- One worker = one Ray actor holding one CLIP image tower, built once (`--workers`, default: as many as the
  cluster's CPUs, or GPUs with `--gpus-per-worker`, allow; fractional GPUs share a device).
- Videos are handed out one at a time to whichever worker is free, largest first in bytes (the file, or a frame
  folder's images; long videos last would leave one worker busy at the end).
- A worker lost mid-video (node down, process killed) never leaves a half-written video: only the driver
  writes, a whole video at a time (each file atomic; a video counts only once all its crops exist). The video
  goes back to the queue and a new worker replaces the lost one; a video that has lost `MAX_ATTEMPTS` workers
  is reported failed.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

from vadclip.extract.encode import encode_video, load_clip
from vadclip.extract.errors import ExtractError, VideoError
from vadclip.extract.jobs import VideoJob
from vadclip.extract.preprocess import Preprocess
from vadclip.extract.summary import ExtractSummary, progress_bars, record_video

log = logging.getLogger("vadclip.extract")
MAX_ATTEMPTS = 3  # workers a video may take down (or lose) before it counts as failed
LOST = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)


@dataclass(frozen=True)
class Settings:
    """What every worker needs to encode a video exactly as a local run would."""

    crops: int
    snippet: str
    batch_size: int
    clip_model: str
    clip_weights: str | None
    device: str  # "auto": the GPU Ray assigned, else the CPU
    threads: int  # torch CPU threads per worker


class ExtractWorker:
    """A Ray actor: CLIP's image tower, built once, then `extract(job)` for video after video."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        torch.set_num_threads(settings.threads)
        gpus = ray.get_gpu_ids()
        device = settings.device if settings.device != "auto" else ("cuda" if gpus else "cpu")
        self.device = torch.device(device)
        self.model = load_clip(settings.clip_model, settings.clip_weights, self.device)
        self.preprocess = Preprocess(self.model, self.device)

    def where(self) -> str:
        return f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"

    def extract(self, job: VideoJob) -> tuple[int, np.ndarray | None, str | None]:
        """Encode `job`: (frames decoded, its (crops, T, D) features or None, error or None)."""
        s, frames = self.s, 0

        def on_frames(n: int) -> None:
            nonlocal frames
            frames += n

        try:
            feats = encode_video(job.source, self.model, self.preprocess, crops=s.crops, snippet=s.snippet,
                                 batch_size=s.batch_size, on_frames=on_frames)
        except VideoError as exc:
            return frames, None, str(exc)
        return frames, feats, None


def start_ray(address: str) -> None:
    """`local`: a Ray instance on this machine; `auto` or HOST:PORT: join that cluster."""
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)


def worker_count(requested: int | None, cpus_per_worker: float, gpus_per_worker: float, videos: int) -> int:
    """Workers to start: as asked, else as many as the cluster's resources hold; never more than videos."""
    if requested is not None:
        if requested < 1:
            raise ExtractError(f"--workers: {requested} must be at least 1")
        return min(requested, videos)
    total = ray.cluster_resources()
    fit = (total.get("GPU", 0) / gpus_per_worker) if gpus_per_worker > 0 else total.get("CPU", 0) / cpus_per_worker
    if int(fit) < 1:
        what = f"{gpus_per_worker} GPU" if gpus_per_worker > 0 else f"{cpus_per_worker} CPU"
        raise ExtractError(f"the cluster ({total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs) cannot hold "
                           f"one worker of {what}")
    return max(1, min(int(fit), videos))


def run_on_cluster(todo: Sequence[VideoJob], out_dir: Path, settings: Settings, summary: ExtractSummary, *,
                   address: str,
                   workers: int | None = None, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                   progress: bool = True) -> None:
    """Encode `todo` on Ray actors and write their features into `out_dir`, filling `summary` (extracted, failed,
    frames, snippets, seconds)."""
    if cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise ExtractError(f"--cpus-per-worker must be > 0 and --gpus-per-worker >= 0, got {cpus_per_worker}, "
                           f"{gpus_per_worker}")
    start_ray(address)
    n = worker_count(workers, cpus_per_worker, gpus_per_worker, len(todo))
    actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(ExtractWorker)
    queue = deque(sorted(todo, key=lambda j: j.size(), reverse=True))  # largest first (bytes)
    attempts: dict[str, int] = {}
    idle: list[Any] = [actor.remote(settings) for _ in range(n)]
    running: dict[Any, tuple[Any, VideoJob]] = {}
    try:
        with progress_bars(len(todo), summary, progress) as (videos_bar, frames_bar):
            while queue or running:
                while idle and queue:
                    worker, job = idle.pop(), queue.popleft()
                    running[worker.extract.remote(job)] = (worker, job)
                done, _ = ray.wait(list(running), num_returns=1)
                worker, job = running.pop(done[0])
                try:
                    frames, feats, error = ray.get(done[0])
                except LOST as exc:  # the worker is gone: a fresh one takes its place, the video goes back
                    attempts[job.rel] = attempts.get(job.rel, 0) + 1
                    log.warning("worker lost while encoding %s (attempt %d): %s", job.rel, attempts[job.rel],
                                type(exc).__name__)
                    ray.kill(worker, no_restart=True)
                    idle.append(actor.remote(settings))
                    if attempts[job.rel] < MAX_ATTEMPTS:
                        queue.appendleft(job)
                    else:
                        summary.failed[job.rel] = f"lost {MAX_ATTEMPTS} workers while encoding it"
                        videos_bar.update(1)
                    continue
                idle.append(worker)
                frames_bar.update(frames)
                summary.frames += frames
                record_video(summary, job, out_dir, feats, error)
                videos_bar.update(1)
    finally:
        for worker in idle + [w for w, _ in running.values()]:
            ray.kill(worker, no_restart=True)
