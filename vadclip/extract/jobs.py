"""The videos to extract: found under VIDEOS (video files, and frame folders: a folder of images is one video),
each with its label (its folder, or a label file)."""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from vadclip.data.conventions import crop_file_name
from vadclip.extract.errors import ExtractError
from vadclip.extract.video import FrameFolder

log = logging.getLogger("vadclip.extract")  # one logger for the package: its name is in every log line

VIDEO_EXTS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                        ".3gp", ".ts"})
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})  # frames of a frame folder (any case)


@dataclass(frozen=True)
class VideoJob:
    path: Path  # the video file, or the frame folder
    rel: str  # path relative to VIDEOS, used in reports
    name: str  # file name without extension; a frame folder's own name
    label: str
    frames: tuple[str, ...] = field(default=(), repr=False)  # a frame folder's images in order; () for a file

    @property
    def source(self) -> Path | FrameFolder:
        """What `encode_video` reads: the video file, or the frame folder with its frames."""
        return FrameFolder(self.path, self.frames) if self.frames else self.path

    def size(self) -> int:
        """Bytes to read (a cluster hands out the largest videos first)."""
        if self.frames:
            return sum((self.path / name).stat().st_size for name in self.frames)
        return self.path.stat().st_size

    def output(self, out_dir: Path, k: int) -> Path:
        return out_dir / self.label / crop_file_name(self.name, k)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def frame_sort_key(name: str) -> tuple[list[int | str], str]:
    """Natural order: runs of digits compare as numbers, the rest case-insensitively, so `2.jpg` < `10.jpg` and
    `img_9.png` < `img_10.png` whatever the widths (zero-padded names keep their plain order); the name itself
    breaks ties (`01.jpg`, `1.jpg`)."""
    parts = re.split(r"(\d+)", name)
    return [int(part) if i % 2 else part.casefold() for i, part in enumerate(parts)], name


def list_frames(folder: Path) -> tuple[str, ...]:
    """A frame folder's frames: its image files (IMAGE_EXTS, not hidden), in natural order (`frame_sort_key`)."""
    names = [p.name for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file()]
    return tuple(sorted(names, key=frame_sort_key))


def is_frame_folder(folder: Path) -> bool:
    """A folder holding image files and neither video files nor subfolders (hidden entries and other files, say
    Thumbs.db or a .txt, aside) is a video of those frames."""
    images = False
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() or (entry.suffix.lower() in VIDEO_EXTS and entry.is_file()):
            return False
        images = images or (entry.suffix.lower() in IMAGE_EXTS and entry.is_file())
    return images


def find_videos(videos_dir: Path) -> list[Path]:
    """Video files and frame folders (`is_frame_folder`) under `videos_dir` (recursive, hidden entries ignored),
    sorted. Images elsewhere (next to videos or subfolders, or in VIDEOS itself) are ignored, with a warning."""
    if not videos_dir.is_dir():
        raise ExtractError(f"VIDEOS: {str(videos_dir)!r} is not a directory")
    entries = [p for p in videos_dir.rglob("*") if not _hidden(p, videos_dir)]
    files = [p for p in entries if p.suffix.lower() in VIDEO_EXTS and p.is_file()]
    folders = [p for p in entries if p.is_dir() and is_frame_folder(p)]
    in_folders = set(folders)
    stray = [p for p in entries if p.suffix.lower() in IMAGE_EXTS and p.parent not in in_folders and p.is_file()]
    if stray and (files or folders):
        log.warning("ignoring %d image file(s) not in a frame folder (a folder holding images and no videos or "
                    "subfolders), e.g. %s", len(stray), sorted(p.relative_to(videos_dir).as_posix() for p in stray)[:3])
    if not files and not folders:
        hint = ""
        if any(p.parent == videos_dir for p in stray):
            hint = ("; VIDEOS itself holds images: pass the folder that holds it (each folder of images under "
                    "VIDEOS is one video)")
        raise ExtractError(f"VIDEOS: no video files ({', '.join(sorted(VIDEO_EXTS))}) or folders of frames "
                           f"({', '.join(sorted(IMAGE_EXTS))}) under {str(videos_dir)!r}{hint}")
    return sorted(files + folders)


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
    """One job per video file or frame folder; label from the label file, else the parent folder's name."""
    paths = find_videos(videos_dir)
    table = read_label_file(label_file) if label_file is not None else None
    jobs, missing = [], []
    for path in paths:
        rel = path.relative_to(videos_dir).as_posix()
        folder = path.is_dir()
        frames = list_frames(path) if folder else ()
        name = path.name if folder else path.stem  # a folder's name is kept whole (XD-like names hold dots)
        if table is None:
            label = path.parent.name
        elif name in table:
            label = table[name]
        else:
            missing.append(rel)
            continue
        jobs.append(VideoJob(path, rel, name, _check_label(label, rel), frames))
    if missing:
        raise ExtractError(f"--label-file: no label for {len(missing)} video(s), e.g. {missing[:3]}")
    seen: dict[str, str] = {}
    for job in jobs:  # lists identify a video by its name, whatever its label folder
        other = seen.setdefault(job.name, job.rel)
        if other != job.rel:
            raise ExtractError(f"{other!r} and {job.rel!r} have the same name {job.name!r}; "
                               f"their features could not be told apart")
    return jobs
