"""`extract_videos`: every video under VIDEOS encoded into OUT, in this process or on Ray workers
(`vadclip.extract.cluster`, imported only then), with the same outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import open_clip
from torch import nn

from vadclip.device import resolve_device
from vadclip.extract.encode import encode_video, load_clip
from vadclip.extract.errors import ExtractError, VideoError
from vadclip.extract.jobs import VideoJob, make_jobs
from vadclip.extract.options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CLIP_MODEL,
    DEFAULT_CROPS,
    DEFAULT_LIST_NAME,
    DEFAULT_SNIPPET,
)
from vadclip.extract.preprocess import Preprocess, crop_boxes
from vadclip.extract.summary import ExtractSummary, progress_bars, record_video
from vadclip.extract.video import snippet_frames
from vadclip.extract.write import check_manifest, is_complete, manifest, remove_stray_temps, write_list

log = logging.getLogger("vadclip.extract")  # one logger for the package: its name is in every log line


def _list_path(out_dir: Path, list_name: str) -> Path:
    name = list_name if list_name.endswith(".csv") else f"{list_name}.csv"
    if not list_name or "/" in name or "\\" in name or name.startswith("."):
        raise ExtractError(f"list_name: {list_name!r} must be a plain file name (written into OUT)")
    return out_dir / name


def _validate(crops: int, snippet: str, batch_size: int, clip_model: str) -> None:
    crop_boxes(crops)
    snippet_frames([0], snippet)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ExtractError(f"batch_size: {batch_size!r} must be a positive integer")
    if clip_model not in open_clip.list_models():
        raise ExtractError(f"clip_model: unknown CLIP model {clip_model!r} (e.g. ViT-B-16, vadclip-tiny; "
                           f"any of open_clip.list_models())")


def extract_videos(videos_dir: str | Path, out_dir: str | Path, *, crops: int = DEFAULT_CROPS,
                   snippet: str = DEFAULT_SNIPPET, batch_size: int = DEFAULT_BATCH_SIZE,
                   clip_model: str = DEFAULT_CLIP_MODEL, clip_weights: str | None = None, device: str = "auto",
                   label_file: str | Path | None = None, list_name: str = DEFAULT_LIST_NAME,
                   overwrite: bool = False, progress: bool = True, address: str | None = None,
                   workers: int | None = None, cpus_per_worker: float = 1,
                   gpus_per_worker: float = 0) -> ExtractSummary:
    """Extract CLIP features of every video under `videos_dir` into `out_dir` (layout in the module doc).
    A video is a video file, or a frame folder: a folder holding images (.jpg .jpeg .png .bmp) and no videos or
    subfolders, its frames in natural name order, named after the folder (`vadclip.extract.jobs`).

    Resumable: videos whose crops are all present are skipped (unless `overwrite`). A video that cannot
    be decoded, or decodes well short of its advertised frame count, or a frame folder with an unreadable image
    or one of another size than its first, is recorded in `summary.failed` and gets no features. Bad input
    raises ExtractError. `address` (`local`, `auto`, HOST:PORT): encode on Ray workers instead of this process
    (`vadclip.extract.cluster`), with the same outputs.
    """
    videos_dir, out_dir = Path(videos_dir).absolute(), Path(out_dir).absolute()  # absolute paths in the list
    _validate(crops, snippet, batch_size, clip_model)
    torch_device = resolve_device(device if not address else "cpu")  # on a cluster, each worker resolves its own
    list_path = _list_path(out_dir, list_name)
    jobs = make_jobs(videos_dir, Path(label_file) if label_file is not None else None)
    if clip_weights is not None and not Path(clip_weights).is_file():
        raise ExtractError(f"--clip-weights: no checkpoint file at {str(clip_weights)!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_manifest(out_dir, manifest(clip_model, clip_weights, crops, snippet), overwrite)

    summary = ExtractSummary(out_dir=out_dir, list_path=None)
    for job in jobs:
        remove_stray_temps(job, out_dir)
    todo = [j for j in jobs if overwrite or not is_complete(j, out_dir, crops)]
    todo_rels = {j.rel for j in todo}
    summary.skipped = [j.rel for j in jobs if j.rel not in todo_rels]
    folders = sum(1 for j in jobs if j.frames)
    log.info("%d videos%s: %d to extract, %d complete (skipped); CLIP %s on %s, %d crops, snippet %s",
             len(jobs), f" ({folders} of them frame folders)" if folders else "", len(todo), len(summary.skipped),
             clip_model, address or torch_device, crops, snippet)
    if todo and address:
        from vadclip.extract.cluster import Settings, run_on_cluster  # Ray is imported for cluster runs only

        settings = Settings(crops, snippet, batch_size, clip_model, clip_weights, device,
                            threads=max(1, int(cpus_per_worker)))
        run_on_cluster(todo, out_dir, settings, summary, address=address, workers=workers,
                       cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, progress=progress)
    elif todo:
        t0 = time.perf_counter()
        model = load_clip(clip_model, clip_weights, torch_device)
        preprocess = Preprocess(model, torch_device)
        summary.load_seconds = time.perf_counter() - t0
        _run_jobs(todo, out_dir, model, preprocess, summary, crops=crops, snippet=snippet,
                  batch_size=batch_size, progress=progress)

    done = [j for j in jobs if j.rel not in summary.failed]
    if done:
        write_list(done, out_dir, crops, list_path)
        summary.list_path = list_path
    return summary


def _run_jobs(todo: Sequence[VideoJob], out_dir: Path, model: nn.Module, preprocess: Preprocess,
              summary: ExtractSummary, *, crops: int, snippet: str, batch_size: int, progress: bool) -> None:
    with progress_bars(len(todo), summary, progress) as (videos_bar, frames_bar):
        def on_frames(n: int) -> None:
            summary.frames += n
            frames_bar.update(n)

        for job in todo:
            videos_bar.set_postfix_str(job.rel, refresh=False)
            feats, error = None, None
            try:
                feats = encode_video(job.source, model, preprocess, crops=crops, snippet=snippet,
                                     batch_size=batch_size, on_frames=on_frames)
            except VideoError as exc:
                error = str(exc)
            record_video(summary, job, out_dir, feats, error)
            videos_bar.update(1)

