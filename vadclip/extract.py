"""Frozen-CLIP feature extraction: videos → one `(T, D)` float32 `.npy` per video and crop, plus the list CSV.

    python -m vadclip.extract VIDEOS OUT [--crops 10|5|1] [--snippet mean|middle] [--clip-weights PATH] ...

Layout written (what the trainer reads): `OUT/<label>/<video>__<k>.npy` for crops k = 0..n-1, and
`OUT/<list_name>.csv` with header `path,label` (absolute paths). T = ceil(frames / 16): a last partial
snippet is kept and uses the frames it has. See docs/extraction.md for the choices and their reasons.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
import open_clip
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image
from torch import nn
from torchvision.transforms import Compose, Normalize
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vadclip.cli import Parser
from vadclip.data.conventions import CLASS_CODES, SNIPPET_FRAMES, crop_file_name, crop_glob
from vadclip.device import resolve_device
from vadclip.errors import VadClipError
from vadclip.io import atomic_write, atomic_write_text
from vadclip.model.clip import create_clip

log = logging.getLogger("vadclip.extract")  # not "__main__" under python -m

RESIZE_WH = (340, 256)  # authors' crop.py resizes every frame to 340×256 (W×H) before cropping
CROP_SIZE = 224
CROP_CHOICES = (10, 5, 1)
SNIPPET_CHOICES = ("mean", "middle")
DEFAULT_CROPS = 10
DEFAULT_SNIPPET = "mean"
DEFAULT_BATCH_SIZE = 200  # images per encode_image call (20 frames × 10 crops)
DEFAULT_CLIP_MODEL = "ViT-B-16-quickgelu"  # OpenAI's ViT-B/16 (QuickGELU), the authors' CLIP
DEFAULT_LIST_NAME = "CLIP_rgb"
MANIFEST_NAME = "extract_config.json"
RANDOM_WEIGHTS_SEED = 0  # random-weight runs are reproducible, so a resumed run matches the first one
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                        ".3gp", ".ts"})
# The normal class codes, UCF `Normal` and XD `A`, in any case: listed last, as in the authors' lists.
NORMAL_LABELS = frozenset(codes[0].lower() for codes in CLASS_CODES.values())

T = TypeVar("T")


class ExtractError(VadClipError, ValueError):
    """Bad input or options: one clear message, no extraction."""


class VideoError(RuntimeError):
    """One video could not be decoded; it is reported and skipped."""


# What PyAV raises for unreadable, corrupt or truncated input (InvalidDataError is a ValueError). Only
# decoding is guarded, so a bug in the encoding side still stops the run instead of failing every video.
DECODE_ERRORS = (av.FFmpegError, OSError, ValueError)


# --------------------------------------------------------------------------------------------- crops


def crop_boxes(n_crops: int, width: int = RESIZE_WH[0], height: int = RESIZE_WH[1],
               size: int = CROP_SIZE) -> list[tuple[int, int, bool]]:
    """(top, left, flipped) of each crop: 0 centre, 1 top-left, 2 top-right, 3 bottom-left, 4 bottom-right,
    5-9 the horizontal flips of 0-4."""
    if n_crops not in CROP_CHOICES:
        raise ExtractError(f"crops: {n_crops!r} is not one of {list(CROP_CHOICES)}")
    dy, dx = height - size, width - size
    five = [(dy // 2, dx // 2), (0, 0), (0, dx), (dy, 0), (dy, dx)]
    boxes = [(top, left, False) for top, left in five] + [(top, left, True) for top, left in five]
    return boxes[:n_crops]


def _resize_rgb(frame: np.ndarray, wh: tuple[int, int] = RESIZE_WH) -> np.ndarray:
    if frame.shape[1::-1] == wh:
        return frame
    return np.asarray(Image.fromarray(frame).resize(wh, Image.Resampling.BILINEAR))


def crop_stack(frame: np.ndarray, n_crops: int) -> np.ndarray:
    """`(n_crops, 224, 224, 3)` uint8 crops of one RGB frame (resized to 340×256 first if needed)."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"crop_frames wants an (H, W, 3) uint8 RGB frame, got {frame.dtype} {frame.shape}")
    frame = _resize_rgb(frame)
    out = np.empty((n_crops, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    for i, (top, left, flipped) in enumerate(crop_boxes(n_crops)):
        crop = frame[top:top + CROP_SIZE, left:left + CROP_SIZE]
        out[i] = crop[:, ::-1] if flipped else crop
    return out


def crop_frames(frame: np.ndarray, n_crops: int = DEFAULT_CROPS) -> list[np.ndarray]:
    """The authors' crops of one `(H, W, 3)` uint8 RGB frame, in their order (see `crop_boxes`)."""
    return list(crop_stack(frame, n_crops))


# ------------------------------------------------------------------------------------ preprocessing


def clip_eval_transform(model: nn.Module) -> Compose:
    """open_clip's eval transform for this model (resize bicubic, centre crop, model/OpenAI mean and std):
    a torchvision Compose, PIL image -> (3, H, W) float tensor."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    return open_clip.image_transform(cfg.get("size", CROP_SIZE), is_train=False, mean=cfg.get("mean"),
                                     std=cfg.get("std"), resize_mode=cfg.get("resize_mode"),
                                     interpolation=cfg.get("interpolation"))


class Preprocess:
    """Turns uint8 crops into CLIP input exactly as open_clip's eval transform does.

    For 224×224 crops and a 224 model the transform's resize and centre crop are identities, so the
    batch is normalised as one tensor on the device (checked bit-exact against the transform at start);
    any other model size falls back to the PIL transform per crop.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.transform = clip_eval_transform(model)
        self.device = device
        norm = next(t for t in self.transform.transforms if isinstance(t, Normalize))
        self.mean = torch.as_tensor(norm.mean, dtype=torch.float32)
        self.std = torch.as_tensor(norm.std, dtype=torch.float32)
        probe = np.random.default_rng(0).integers(0, 256, (1, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
        self.fast = torch.equal(self._tensor_path(probe, torch.device("cpu")), self._pil_path(probe))
        if not self.fast:
            log.info("crops differ from the model's input size: using open_clip's PIL transform per crop")

    def _tensor_path(self, crops: np.ndarray, device: torch.device) -> torch.Tensor:
        # Same ops as ToTensor + Normalize (float, /255, -mean, /std), done in the contiguous HWC layout
        # (5x faster than on the permuted view); uint8 travels to the device, 4x less to copy.
        x = torch.from_numpy(crops).to(device, non_blocking=True).float().div_(255)
        x = x.sub_(self.mean.to(device)).div_(self.std.to(device))
        return x.permute(0, 3, 1, 2)  # NCHW view of channels-last memory; conv2d takes either

    def _pil_path(self, crops: np.ndarray) -> torch.Tensor:
        return torch.stack([self.transform(Image.fromarray(c)) for c in crops])

    def __call__(self, crops: np.ndarray) -> torch.Tensor:
        if self.fast:
            return self._tensor_path(crops, self.device)
        return self._pil_path(crops).to(self.device)


# ----------------------------------------------------------------------------------------- decoding


def advertised_frames(container: av.container.InputContainer, stream: av.VideoStream) -> int | None:
    """Frames the container says the stream has: the smaller of the index's count and duration × average
    rate (an edit list trims the duration but not the count), whichever is known; None if neither."""
    counts = [stream.frames] if stream.frames else []
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    else:
        seconds = container.duration / av.time_base if container.duration else 0.0
    if rate and seconds > 0:
        counts.append(round(seconds * float(rate)))
    return min(counts) if counts else None


def short_by_too_much(decoded: int, advertised: int) -> bool:
    """A snippet or 2% of slack: decoders may drop a few frames (B-frame delay, timestamp rounding)."""
    return advertised - decoded > max(SNIPPET_FRAMES, advertised // 50)


def iter_frames(path: Path) -> Iterator[av.VideoFrame]:
    """Decoded frames of the first video stream (FFmpeg threads on). A file that ends well before the
    frame count its header advertises (a truncated copy: FFmpeg just stops) raises VideoError at the end."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        advertised = advertised_frames(container, stream)
        decoded = 0
        for frame in container.decode(stream):
            decoded += 1
            yield frame
        if advertised is not None and short_by_too_much(decoded, advertised):
            raise VideoError(f"decoded {decoded} of {advertised} frames the container advertises; the file "
                             f"ends early (truncated or damaged copy?)")


def frame_to_rgb(frame: av.VideoFrame, reformatter: VideoReformatter | None = None) -> np.ndarray:
    """`(256, 340, 3)` uint8 RGB: FFmpeg converts and resizes (bilinear, like crop.py's cv2.resize) at once."""
    reformatter = reformatter or VideoReformatter()  # one per video reuses FFmpeg's scaler context
    rgb = reformatter.reformat(frame, width=RESIZE_WH[0], height=RESIZE_WH[1], format="rgb24",
                               interpolation="BILINEAR")
    return rgb.to_ndarray()


def snippets(frames: Iterable[T], clip_len: int = SNIPPET_FRAMES) -> Iterator[list[T]]:
    """Consecutive groups of `clip_len` frames; the last partial group is kept (T = ceil(frames / clip_len))."""
    buf: list[T] = []
    for frame in frames:
        buf.append(frame)
        if len(buf) == clip_len:
            yield buf
            buf = []
    if buf:
        yield buf


def snippet_frames(snippet: Sequence[T], mode: str) -> Sequence[T]:
    """Frames of a snippet that CLIP encodes: all of them (`mean`) or the middle one (`middle`)."""
    if mode == "mean":
        return snippet
    if mode == "middle":
        return [snippet[len(snippet) // 2]]
    raise ExtractError(f"snippet: {mode!r} is not one of {list(SNIPPET_CHOICES)}")


@dataclass
class _Batch:
    crops: np.ndarray  # (F * n_crops, 224, 224, 3) uint8
    snippet_ids: np.ndarray  # (F,) snippet index of each frame, non-decreasing
    new_frames: int  # frames decoded since the previous batch (progress bar)


@dataclass
class _DecodeStats:
    frames: int = 0
    snippets: int = 0


def _batches(path: Path, n_crops: int, mode: str, batch_size: int, stats: _DecodeStats) -> Iterator[_Batch]:
    """Decode, pick, crop; emit whole frames (all their crops) in batches of about `batch_size` images."""
    per_batch = max(1, batch_size // n_crops)
    crops: list[np.ndarray] = []
    ids: list[int] = []
    reported = 0
    reformatter = VideoReformatter()

    def flush() -> _Batch:
        nonlocal crops, ids, reported
        batch = _Batch(np.concatenate(crops), np.asarray(ids), stats.frames - reported)
        crops, ids, reported = [], [], stats.frames
        return batch

    def counted(frames: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
        try:
            for frame in frames:
                stats.frames += 1
                yield frame
        except DECODE_ERRORS as exc:
            raise VideoError(f"{type(exc).__name__}: {exc}") from exc

    for idx, snippet in enumerate(snippets(counted(iter_frames(path)))):
        stats.snippets = idx + 1
        for frame in snippet_frames(snippet, mode):  # only picked frames are converted to RGB
            try:
                rgb = frame_to_rgb(frame, reformatter)
            except DECODE_ERRORS as exc:
                raise VideoError(f"{type(exc).__name__}: {exc}") from exc
            crops.append(crop_stack(rgb, n_crops))
            ids.append(idx)
            if len(ids) == per_batch:
                yield flush()
    if ids:
        yield flush()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run `items` in a background thread, `depth` ahead, so decoding overlaps encoding (the GPU never waits)."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # re-raised in the consumer
            put(_Raised(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # closes the container when the consumer stopped early

    worker = threading.Thread(target=work, name="vadclip-decode", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()


# ----------------------------------------------------------------------------------------- encoding


class _SnippetMeans:
    """Running per-snippet sums of frame embeddings, grown as snippets arrive."""

    def __init__(self, n_crops: int) -> None:
        self.n_crops = n_crops
        self.sums: np.ndarray | None = None
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, ids: np.ndarray, emb: np.ndarray) -> None:  # emb: (F, n_crops, D)
        if self.sums is None:
            self.sums = np.zeros((64, self.n_crops, emb.shape[-1]), dtype=np.float64)
            self.counts = np.zeros(64, dtype=np.int64)
        need = int(ids[-1]) + 1
        if need > len(self.counts):
            grow = max(need, 2 * len(self.counts))
            self.sums = np.concatenate([self.sums, np.zeros((grow - len(self.sums), *self.sums.shape[1:]))])
            self.counts = np.concatenate([self.counts, np.zeros(grow - len(self.counts), dtype=np.int64)])
        np.add.at(self.sums, ids, emb)
        np.add.at(self.counts, ids, 1)

    def means(self, n_snippets: int) -> np.ndarray:
        """(n_crops, T, D) float32."""
        assert self.sums is not None and (self.counts[:n_snippets] > 0).all()
        mean = self.sums[:n_snippets] / self.counts[:n_snippets, None, None]
        return np.ascontiguousarray(mean.transpose(1, 0, 2), dtype=np.float32)


@torch.inference_mode()
def encode_video(path: Path, model: open_clip.CLIP, preprocess: Preprocess, *, crops: int, snippet: str,
                 batch_size: int, on_frames: Callable[[int], None] | None = None) -> np.ndarray:
    """`(crops, T, D)` float32: raw `encode_image` output (never L2-normalised, as the authors'), one row
    per snippet, `mean` over its frames or its `middle` frame."""
    stats = _DecodeStats()
    acc = _SnippetMeans(crops)
    for batch in prefetch(_batches(path, crops, snippet, batch_size, stats)):
        emb = model.encode_image(preprocess(batch.crops)).float().cpu().numpy()
        acc.add(batch.snippet_ids, emb.reshape(len(batch.snippet_ids), crops, -1))
        if on_frames is not None:
            on_frames(batch.new_frames)
    if stats.frames == 0:
        raise VideoError("no frames decoded")
    return acc.means(stats.snippets)


# ------------------------------------------------------------------------------------ videos, labels


@dataclass(frozen=True)
class VideoJob:
    path: Path
    rel: str  # path relative to VIDEOS, used in reports
    name: str  # file name without extension
    label: str

    def output(self, out_dir: Path, k: int) -> Path:
        return out_dir / self.label / crop_file_name(self.name, k)


def find_videos(videos_dir: Path) -> list[Path]:
    """Video files under `videos_dir` (recursive, hidden entries ignored), sorted."""
    if not videos_dir.is_dir():
        raise ExtractError(f"VIDEOS: {str(videos_dir)!r} is not a directory")
    found = [p for p in videos_dir.rglob("*")
             if p.suffix.lower() in VIDEO_EXTS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(videos_dir).parts)]
    if not found:
        raise ExtractError(f"VIDEOS: no video files ({', '.join(sorted(VIDEO_EXTS))}) under {str(videos_dir)!r}")
    return sorted(found)


def video_key(name: str) -> str:
    """`dir/Abuse001_x264.mp4` → `Abuse001_x264`; only a known video extension is dropped (XD names hold dots)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return stem if dot and f".{ext.lower()}" in VIDEO_EXTS else base


def read_label_file(path: Path) -> dict[str, str]:
    """`video,label` per line (CSV, optional header) or `video label` (whitespace); `#` starts a comment."""
    if not path.is_file():
        raise ExtractError(f"--label-file: no file at {str(path)!r}")
    labels: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        row = next(csv.reader(io.StringIO(line))) if "," in line else line.rsplit(None, 1)
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ExtractError(f"--label-file {path}:{lineno}: expected 'video,label', got {line!r}")
        video, label = row[0].strip(), row[1].strip()
        if not labels and lineno == 1 and label.lower() == "label":
            continue  # header
        labels[video_key(video)] = label
    if not labels:
        raise ExtractError(f"--label-file: no 'video,label' rows in {str(path)!r}")
    return labels


def _check_label(label: str, video: str) -> str:
    if not label or label in {".", ".."} or any(c in label for c in "/\\\0"):
        raise ExtractError(f"label {label!r} of {video!r} cannot name an output folder")
    return label


def make_jobs(videos_dir: Path, label_file: Path | None) -> list[VideoJob]:
    """One job per video; label from the label file, else the video's parent folder name."""
    paths = find_videos(videos_dir)
    table = read_label_file(label_file) if label_file is not None else None
    jobs, missing = [], []
    for path in paths:
        rel = path.relative_to(videos_dir).as_posix()
        name = path.stem
        if table is None:
            label = path.parent.name
        elif name in table:
            label = table[name]
        else:
            missing.append(rel)
            continue
        jobs.append(VideoJob(path, rel, name, _check_label(label, rel)))
    if missing:
        raise ExtractError(f"--label-file: no label for {len(missing)} video(s), e.g. {missing[:3]}")
    seen: dict[str, str] = {}
    for job in jobs:  # lists identify a video by its name, whatever its label folder
        other = seen.setdefault(job.name, job.rel)
        if other != job.rel:
            raise ExtractError(f"{other!r} and {job.rel!r} have the same name {job.name!r}; "
                               f"their features could not be told apart")
    return jobs


# ------------------------------------------------------------------------------------------ outputs


def save_npy_atomic(array: np.ndarray, path: Path) -> None:
    """A crash never leaves a half-written `.npy` (see `vadclip.io.temp_name` for the stray pattern)."""
    atomic_write(path, lambda f: np.save(f, array))


def write_features(job: VideoJob, out_dir: Path, feats: np.ndarray) -> None:
    """`feats` (crops, T, D) → one file per crop; each file is atomic, and a video counts as done (resume)
    only once all its crops exist."""
    (out_dir / job.label).mkdir(parents=True, exist_ok=True)
    for k, feat in enumerate(feats):
        save_npy_atomic(feat, job.output(out_dir, k))


def remove_stray_temps(job: VideoJob, out_dir: Path) -> None:
    for stray in (out_dir / job.label).glob(f".{crop_glob(job.name)}.*.tmp"):  # vadclip.io.temp_name
        stray.unlink(missing_ok=True)


def is_complete(job: VideoJob, out_dir: Path, crops: int) -> bool:
    return all(job.output(out_dir, k).is_file() for k in range(crops))


def write_list(jobs: Sequence[VideoJob], out_dir: Path, crops: int, path: Path) -> None:
    """`path,label` rows with absolute paths; abnormal videos first, normal last (authors' order), crops
    0..n-1 of a video consecutive."""
    ordered = sorted(jobs, key=lambda j: (j.label.lower() in NORMAL_LABELS, j.label, j.name))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label"])
    for job in ordered:
        writer.writerows([str(job.output(out_dir, k)), job.label] for k in range(crops))
    atomic_write_text(buf.getvalue(), path)


def _manifest(clip_model: str, clip_weights: str | None, crops: int, snippet: str) -> dict[str, Any]:
    return {"clip_model": clip_model, "clip_weights": Path(clip_weights).name if clip_weights else None,
            "crops": crops, "snippet": snippet, "clip_len": SNIPPET_FRAMES, "resize_wh": list(RESIZE_WH),
            "crop_size": CROP_SIZE}


def check_manifest(out_dir: Path, wanted: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume into an OUT made with other settings (skipped files would silently differ)."""
    path = out_dir / MANIFEST_NAME
    if path.is_file() and not overwrite:
        found = json.loads(path.read_text())
        diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
        if diff:
            what = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in diff.items())
            raise ExtractError(f"OUT {str(out_dir)!r} holds features made with {what}; "
                               f"use another OUT or --overwrite (overwrite=True)")
    atomic_write_text(json.dumps(wanted, indent=2) + "\n", path)


# ---------------------------------------------------------------------------------------------- API


@dataclass
class ExtractSummary:
    out_dir: Path
    list_path: Path | None  # None when no video succeeded
    extracted: list[str] = field(default_factory=list)  # encoded in this run (paths relative to VIDEOS)
    skipped: list[str] = field(default_factory=list)  # all crops already there (resume)
    failed: dict[str, str] = field(default_factory=dict)  # video → reason
    frames: int = 0  # frames decoded in this run
    snippets: int = 0  # rows written per crop in this run (sum of T)
    seconds: float = 0.0  # decode + encode + write, model loading excluded
    load_seconds: float = 0.0  # building CLIP

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        lines = [f"extracted {len(self.extracted)}, skipped {len(self.skipped)} (complete), "
                 f"failed {len(self.failed)}; {self.frames} frames → {self.snippets} snippets in "
                 f"{self.seconds:.1f} s ({self.fps:.1f} frames/s)"]
        lines += [f"  FAILED {video}: {reason}" for video, reason in self.failed.items()]
        lines.append(f"list: {self.list_path}" if self.list_path else "list: not written (no video succeeded)")
        return "\n".join(lines)


def load_clip(clip_model: str, clip_weights: str | None, device: torch.device) -> nn.Module:
    """create_clip; random weights (with its loud warning) are seeded so reruns give the same features."""
    if clip_weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            return create_clip(clip_model, None, device=device)
    return create_clip(clip_model, clip_weights, device=device)


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

    Resumable: videos whose crops are all present are skipped (unless `overwrite`). A video that cannot
    be decoded, or decodes well short of its advertised frame count, is recorded in `summary.failed` and
    gets no features. Bad input raises ExtractError. `address` (`local`, `auto`, HOST:PORT): encode on Ray
    workers instead of this process (`vadclip.extract_cluster`), with the same outputs.
    """
    videos_dir, out_dir = Path(videos_dir).absolute(), Path(out_dir).absolute()  # absolute paths in the list
    _validate(crops, snippet, batch_size, clip_model)
    torch_device = resolve_device(device if not address else "cpu")  # on a cluster, each worker resolves its own
    list_path = _list_path(out_dir, list_name)
    jobs = make_jobs(videos_dir, Path(label_file) if label_file is not None else None)
    if clip_weights is not None and not Path(clip_weights).is_file():
        raise ExtractError(f"--clip-weights: no checkpoint file at {str(clip_weights)!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_manifest(out_dir, _manifest(clip_model, clip_weights, crops, snippet), overwrite)

    summary = ExtractSummary(out_dir=out_dir, list_path=None)
    for job in jobs:
        remove_stray_temps(job, out_dir)
    todo = [j for j in jobs if overwrite or not is_complete(j, out_dir, crops)]
    todo_rels = {j.rel for j in todo}
    summary.skipped = [j.rel for j in jobs if j.rel not in todo_rels]
    log.info("%d videos: %d to extract, %d complete (skipped); CLIP %s on %s, %d crops, snippet %s",
             len(jobs), len(todo), len(summary.skipped), clip_model, address or torch_device, crops, snippet)
    if todo and address:
        from vadclip.extract_cluster import Settings, run_on_cluster

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


@contextlib.contextmanager
def progress_bars(total: int, summary: ExtractSummary, progress: bool) -> Iterator[tuple[tqdm, tqdm]]:
    """The bar over videos and the one over decoded frames, log lines above them; `summary.seconds` is the time
    spent inside. `progress` false hides them (else tqdm's own rule: none when stderr is not a terminal)."""
    hide = None if progress else True
    t0 = time.perf_counter()
    videos_bar = tqdm(total=total, desc="videos", unit="video", disable=hide, position=0)
    frames_bar = tqdm(desc="frames", unit="frame", disable=hide, position=1)
    try:
        with logging_redirect_tqdm():
            yield videos_bar, frames_bar
    finally:
        summary.seconds = time.perf_counter() - t0
        frames_bar.close()
        videos_bar.close()


def record_video(summary: ExtractSummary, job: VideoJob, out_dir: Path, feats: np.ndarray | None,
                 error: str | None) -> None:
    """One video's outcome: its features written and counted, or why it could not be read (logged)."""
    if feats is None:
        summary.failed[job.rel] = str(error)
        log.warning("skipping unreadable video %s: %s", job.rel, error)
        return
    write_features(job, out_dir, feats)
    summary.extracted.append(job.rel)
    summary.snippets += feats.shape[1]


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
                feats = encode_video(job.path, model, preprocess, crops=crops, snippet=snippet,
                                     batch_size=batch_size, on_frames=on_frames)
            except VideoError as exc:
                error = str(exc)
            record_video(summary, job, out_dir, feats, error)
            videos_bar.update(1)


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m vadclip.extract", description=__doc__.splitlines()[0])
    p.add_argument("videos", metavar="VIDEOS", help="folder of videos (recursive); class folders give labels")
    p.add_argument("out", metavar="OUT", help="output folder: OUT/<label>/<video>__<k>.npy and the list CSV")
    p.add_argument("--crops", type=int, choices=CROP_CHOICES, default=DEFAULT_CROPS,
                   help="10: centre, 4 corners and their flips; 5: no flips; 1: centre (default %(default)s)")
    p.add_argument("--snippet", choices=SNIPPET_CHOICES, default=DEFAULT_SNIPPET,
                   help=f"one vector per {SNIPPET_FRAMES} frames: mean of the frame embeddings or the middle "
                        "frame's (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images per CLIP forward pass (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="open_clip model name (default %(default)s)")
    p.add_argument("--clip-weights", metavar="PATH", default=None,
                   help="local CLIP checkpoint (OpenAI ViT-B-16.pt or open_clip); without it: RANDOM weights")
    p.add_argument("--label-file", metavar="PATH", default=None,
                   help="CSV/txt 'video,label' per line; default: label = the video's parent folder name")
    p.add_argument("--list-name", default=DEFAULT_LIST_NAME, help="list CSV written as OUT/NAME.csv "
                                                                  "(default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="re-extract videos whose outputs exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    ray = p.add_argument_group("on a Ray cluster (vadclip.extract_cluster)")
    ray.add_argument("--address", default=None,
                     help="encode on Ray workers: local (a Ray instance on this machine), auto (the cluster this "
                          "node belongs to) or HOST:PORT; VIDEOS at the same path on every node, OUT on this one")
    ray.add_argument("--workers", type=int, default=None,
                     help="workers (each builds CLIP once); default: as many as the cluster's CPUs or GPUs hold")
    ray.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker (default %(default)s)")
    ray.add_argument("--gpus-per-worker", type=float, default=0,
                     help="GPUs per worker, fractions share a GPU, e.g. 0.5 (default %(default)s: CPU workers)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0: all videos done; 1: some videos failed (listed); 2: bad input or options."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = extract_videos(args.videos, args.out, crops=args.crops, snippet=args.snippet,
                                 batch_size=args.batch_size, clip_model=args.clip_model,
                                 clip_weights=args.clip_weights, device=args.device, label_file=args.label_file,
                                 list_name=args.list_name, overwrite=args.overwrite,
                                 progress=not args.no_progress, address=args.address, workers=args.workers,
                                 cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker)
    except VadClipError as exc:  # ExtractError, DeviceError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.report(), file=sys.stderr if summary.failed else sys.stdout)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
