"""What the two synthetic writers share, `synthetic` (the small learnable benchmark) and `fullscale` (the
full-size twins of the released feature sets): the folders they write, the authors' folder names their lists
pretend the files are in, and one video's plan."""

from __future__ import annotations

from dataclasses import dataclass, field

from vadclip.data.conventions import CLASS_CODES

AUTHORS_ROOT = "/home/xbgydx/Desktop"  # fake authors' prefix in the lists (forces re-rooting)
LISTS_DIR, FEATURES_DIR = "list", "features"
UCF_FEATURES = "UCFClipFeatures"
UCF_TRAIN_NORMAL, UCF_TEST_NORMAL = "Training_Normal_Videos_Anomaly", "Testing_Normal_Videos_Anomaly"
XD_TRAIN, XD_TEST = "XDTrainClipFeatures", "XDTestClipFeatures"


@dataclass
class VideoPlan:
    """One video to write: its file path, list row, length and anomaly segments (both writers use it)."""

    rel: str  # path under the features folder without `__<crop>.npy`
    csv_prefix: str  # the authors' folder the list pretends the file is in
    label: str  # CSV label
    length: int
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, class) snippets
    spikes: list[tuple[int, int]] = field(default_factory=list)  # (position, class)


def ucf_video_rel(label: str, number: int, split: str) -> str:
    """The authors' path of a UCF video under the features folder, without `__<crop>.npy`: abnormal videos by
    class (`Abuse/Abuse001_x264`), normal ones by split (`Training_Normal_Videos_Anomaly/Normal_Videos001_x264`,
    `Testing_Normal_Videos_Anomaly/Normal_Videos_001_x264`); `number` counts from 1."""
    if label != CLASS_CODES["ucf"][0]:
        return f"{label}/{label}{number:03d}_x264"
    if split == "train":
        return f"{UCF_TRAIN_NORMAL}/Normal_Videos{number:03d}_x264"
    return f"{UCF_TEST_NORMAL}/Normal_Videos_{number:03d}_x264"
