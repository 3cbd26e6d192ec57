"""The videos to extract: found under VIDEOS, each with its label (its folder, or a label file)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from vadclip.data.conventions import crop_file_name
from vadclip.extract.errors import ExtractError

VIDEO_EXTS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                        ".3gp", ".ts"})


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
