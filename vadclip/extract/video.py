"""Decoding: a video's frames (a video file through PyAV, or a folder of frame images through PIL), grouped into
16-frame snippets, the picked frames cropped and batched, decoded in a background thread ahead of the encoder."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from vadclip.data.conventions import SNIPPET_FRAMES
from vadclip.extract.errors import ExtractError, VideoError
from vadclip.extract.options import RESIZE_WH, SNIPPET_CHOICES
from vadclip.extract.preprocess import crop_stack

T = TypeVar("T")

# What PyAV raises for unreadable, corrupt or truncated input (InvalidDataError is a ValueError). Only
# decoding is guarded, so a bug in the encoding side still stops the run instead of failing every video.
DECODE_ERRORS = (av.FFmpegError, OSError, ValueError)
# What PIL raises for a missing, unreadable, corrupt or truncated image (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class FrameFolder:
    """A video stored as a folder of images, one per frame: frame i is `path / names[i]`. The names are listed
    once, where the jobs are made (`vadclip.extract.jobs.list_frames`, natural order), and travel with the job,
    so a cluster worker reads exactly those frames, in that order, at the same path."""

    path: Path
    names: tuple[str, ...]


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


def iter_frames(source: Path | FrameFolder) -> Iterator[av.VideoFrame]:
    """Decoded frames of a video file's first video stream, or of a frame folder's images in order."""
    if isinstance(source, FrameFolder):
        return iter_image_frames(source)
    return _iter_video_frames(source)


def _iter_video_frames(path: Path) -> Iterator[av.VideoFrame]:
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


def iter_image_frames(folder: FrameFolder) -> Iterator[av.VideoFrame]:
    """A frame folder's images (PIL, converted to RGB) as rgb24 frames, so that from here on they take the same
    path as a decoded video's frames (`frame_to_rgb`: FFmpeg's bilinear resize; swscale gives the same pixels
    from any RGB layout, so a lossless video of the same frames gives the same features). An image PIL cannot
    read, or one whose size differs from the first frame's, raises VideoError naming it."""
    first: tuple[str, tuple[int, int]] | None = None
    for name in folder.names:
        try:
            with Image.open(folder.path / name) as image:
                size = image.size
                if first is not None and size != first[1]:
                    raise VideoError(f"frame {name} is {size[0]}x{size[1]} pixels, expected {first[1][0]}x"
                                     f"{first[1][1]} like the folder's first frame {first[0]}")
                rgb = np.asarray(image.convert("RGB"))
        except IMAGE_ERRORS as exc:
            raise VideoError(f"frame {name} is not a readable image ({type(exc).__name__}: {exc})") from exc
        first = first or (name, size)
        yield av.VideoFrame.from_ndarray(rgb, format="rgb24")


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
class CropBatch:
    crops: np.ndarray  # (F * n_crops, 224, 224, 3) uint8
    snippet_ids: np.ndarray  # (F,) snippet index of each frame, non-decreasing
    new_frames: int  # frames decoded since the previous batch (progress bar)


@dataclass
class DecodeStats:
    frames: int = 0
    snippets: int = 0


def crop_batches(source: Path | FrameFolder, n_crops: int, mode: str, batch_size: int,
                 stats: DecodeStats) -> Iterator[CropBatch]:
    """Decode, pick, crop; emit whole frames (all their crops) in batches of about `batch_size` images."""
    per_batch = max(1, batch_size // n_crops)
    crops: list[np.ndarray] = []
    ids: list[int] = []
    reported = 0
    reformatter = VideoReformatter()

    def flush() -> CropBatch:
        nonlocal crops, ids, reported
        batch = CropBatch(np.concatenate(crops), np.asarray(ids), stats.frames - reported)
        crops, ids, reported = [], [], stats.frames
        return batch

    def counted(frames: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
        try:
            for frame in frames:
                stats.frames += 1
                yield frame
        except DECODE_ERRORS as exc:
            raise VideoError(f"{type(exc).__name__}: {exc}") from exc

    for idx, snippet in enumerate(snippets(counted(iter_frames(source)))):
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
