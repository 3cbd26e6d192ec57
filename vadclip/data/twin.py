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
# sht/ubnormal have no released feature set: the twins put every video in one folder per dataset
BINARY_FEATURES = {"sht": "SHTClipFeatures", "ubnormal": "UBnormalClipFeatures"}


def binary_video_rel(style: str, abnormal: bool, number: int) -> str:
    """A sht / ubnormal twin video's path under the features folder, without `__<crop>.npy`, in the dataset's
    own name shape: ShanghaiTech `<scene>_<id>` (abnormal ids 4 digits, normal 3, as in Zhong et al.'s split),
    UBnormal `<abnormal|normal>_scene_<N>_scenario_<k>`; `number` counts from 1 per kind and dataset."""
    scene = (number - 1) % (13 if style == "sht" else 29) + 1  # 13 campus scenes; 29 UBnormal scenes
    if style == "sht":
        name = f"{scene:02d}_{number:04d}" if abnormal else f"{scene:02d}_{number:03d}"
    else:
        name = f"{'abnormal' if abnormal else 'normal'}_scene_{scene}_scenario_{number}"
    return f"{BINARY_FEATURES[style]}/{name}"


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
