"""The benchmarks' conventions, each defined once: what the authors' released lists, features and code fix.

Class codes and prompts (index 0 = normal), the normal label of the ground truth, 16-frame snippets,
feature file names `<video>__<k>.npy`, the list / ground-truth file names and the default test crop.
Constants and name functions only (no I/O): the readers (`layout`, `classes`, `dataset`), the writers
(`synthetic`, `vadclip.extract`), the metrics and the plots import them from here.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence

# Class codes as the authors' list labels write them, index 0 = normal: UCF-Crime class folder names,
# XD-Violence the keys of the authors' label_map (a list label joins up to 3 of them, `B2-G-B6`).
CLASS_CODES: dict[str, list[str]] = {
    "ucf": ["Normal", "Abuse", "Arrest", "Arson", "Assault", "Burglary", "Explosion", "Fighting",
            "RoadAccidents", "Robbery", "Shooting", "Shoplifting", "Stealing", "Vandalism"],
    "xd": ["A", "B1", "B2", "B4", "B5", "B6", "G"],
    # binary benchmarks: neither publishes per-video anomaly types (docs/decisions.md)
    "sht": ["Normal", "Anomaly"],
    "ubnormal": ["Normal", "Anomaly"],
}
# The authors' label_map values, in the same order as CLASS_CODES (`roadAccidents` is one word).
CLASS_PROMPTS: dict[str, list[str]] = {
    "ucf": ["normal", "abuse", "arrest", "arson", "assault", "burglary", "explosion", "fighting",
            "roadAccidents", "robbery", "shooting", "shoplifting", "stealing", "vandalism"],
    "xd": ["normal", "fighting", "shooting", "riot", "abuse", "car accident", "explosion"],
    "sht": ["normal", "anomaly"],
    "ubnormal": ["normal", "anomaly"],
}
DATASET_NAMES = {"ucf": "UCF-Crime", "xd": "XD-Violence", "sht": "ShanghaiTech", "ubnormal": "UBnormal"}
XD_PAD = "0"  # filler code of the authors' XD list labels (`B1-0-0`)
XD_LABEL_CODES = 3  # an XD list label holds 3 codes, padded with XD_PAD (`B1-0-0`, `B2-G-B6`)
# Segment label of every normal video in the authors' gt_label*.npy files, in both datasets.
GT_NORMAL = "A"

SNIPPET_FRAMES = 16  # frames per CLIP snippet (the authors' features): a video of T snippets has 16*T gt frames

# the single crop the authors' test lists use; sht/ubnormal features are centre crop only
DEFAULT_TEST_CROP = {"ucf": 5, "xd": 0, "sht": 0, "ubnormal": 0}
# Styles whose release has its own validation split with frame ground truth: it replaces held-out training videos.
VALIDATION_SPLIT_STYLES = ("ubnormal",)

CROP_SEPARATOR = "__"  # the authors' feature files are `<video>__<k>.npy`, k = crop index
FEATURE_SUFFIX = ".npy"
_CROP = re.compile(rf"^(?P<video>.+){CROP_SEPARATOR}(?P<crop>\d+)$")


def check_style(style: str) -> None:
    if style not in CLASS_CODES:
        raise ValueError(f"unknown label style {style!r}; expected one of {sorted(CLASS_CODES)}")


def list_files(style: str) -> dict[str, str]:
    """Official file names in the authors' `list/` folder (sht/ubnormal: the UCF/XD shape, decisions.md)."""
    check_style(style)
    if style == "ucf":
        return {"train": "ucf_CLIP_rgb.csv", "test": "ucf_CLIP_rgbtest.csv", "frame_gt": "gt_ucf.npy",
                "segments": "gt_segment_ucf.npy", "segment_labels": "gt_label_ucf.npy"}
    if style == "xd":
        return {"train": "xd_CLIP_rgb.csv", "test": "xd_CLIP_rgbtest.csv", "frame_gt": "gt.npy",
                "segments": "gt_segment.npy", "segment_labels": "gt_label.npy"}
    return {"train": f"{style}_CLIP_rgb.csv", "test": f"{style}_CLIP_rgbtest.csv", "frame_gt": f"gt_{style}.npy",
            "segments": f"gt_segment_{style}.npy", "segment_labels": f"gt_label_{style}.npy"}


def has_validation_split(style: str) -> bool:
    check_style(style)
    return style in VALIDATION_SPLIT_STYLES


def eval_files(style: str, split: str) -> dict[str, str]:
    """The list and ground-truth file names of an evaluated split, keys `list`, `frame_gt`, `segments`,
    `segment_labels`: "test" as `list_files`; "val" (styles with their own validation split) the same names
    with `val` after `rgb` and `_val` before `.npy` (`ubnormal_CLIP_rgbval.csv`, `gt_ubnormal_val.npy`)."""
    names = list_files(style)
    if split == "test":
        return {"list": names["test"], **{k: names[k] for k in ("frame_gt", "segments", "segment_labels")}}
    if split != "val" or not has_validation_split(style):
        raise ValueError(f"{style!r} has no {split!r} split with ground truth")
    return {"list": f"{style}_CLIP_rgbval.csv",
            **{k: names[k].removesuffix(".npy") + "_val.npy" for k in ("frame_gt", "segments", "segment_labels")}}


# Other names of the frame-level ground truth that the readers accept, after list_files' own: the authors'
# make_gt_xd.py writes gt_xd.npy while their xd_option.py reads gt.npy.
FRAME_GT_ALIASES: dict[str, tuple[str, ...]] = {"ucf": (), "xd": ("gt_xd.npy",), "sht": (), "ubnormal": ()}


def frame_gt_names(style: str, split: str = "test") -> tuple[str, ...]:
    """Accepted file names of the frame-level ground truth in the list folder, the preferred one first."""
    own = eval_files(style, split)["frame_gt"]
    return (own, *FRAME_GT_ALIASES[style]) if split == "test" else (own,)


def has_detection_map(class_codes: Sequence[str]) -> bool:
    """Whether the fine-grained mAP@IoU applies to a dataset of these class codes: it ranks class-named
    proposals, and a binary dataset (normal + one `Anomaly` code: sht, ubnormal) has no classes to localise."""
    return len(class_codes) > 2


def crop_file_name(video: str, k: int) -> str:
    """(`Abuse001_x264`, 3) -> `Abuse001_x264__3.npy`: the feature file of crop `k` of a video."""
    return f"{video}{CROP_SEPARATOR}{k}{FEATURE_SUFFIX}"


def split_crop(stem: str) -> tuple[str, int]:
    """`Abuse001_x264__3` -> (`Abuse001_x264`, 3); only the LAST `__<digits>` is the crop (XD names
    contain `__#`). A stem without a crop suffix is crop 0."""
    m = _CROP.match(stem)
    return (m["video"], int(m["crop"])) if m else (stem, 0)


def crop_index(file_name: str, video: str) -> int | None:
    """k when `file_name` is a crop file of `video` (`<video>__<k>.npy`, k any digits), else None."""
    prefix = video + CROP_SEPARATOR
    if not (file_name.startswith(prefix) and file_name.endswith(FEATURE_SUFFIX)):
        return None
    k = file_name[len(prefix):-len(FEATURE_SUFFIX)]
    return int(k) if k.isdigit() else None


def crop_glob(video: str) -> str:
    """Glob pattern of every crop file of `video`: `<video>__*.npy`, the video name escaped."""
    return f"{glob.escape(video)}{CROP_SEPARATOR}*{FEATURE_SUFFIX}"


def list_label(style: str, classes: Sequence[int]) -> str:
    """The list CSV's label of a video from the class index of each of its anomaly segments (in time order):
    UCF, sht and ubnormal the class name; XD the distinct codes in first-appearance order padded to three
    (`B2-G-0`); a normal video (no segments, or class 0) the normal code (`Normal`, `A`: not padded)."""
    codes = CLASS_CODES[style]
    if style != "xd" or not classes:
        return codes[classes[0] if classes else 0]
    unique = list(dict.fromkeys(codes[c] for c in classes))
    if unique == [codes[0]]:
        return codes[0]
    return "-".join(unique + [XD_PAD] * (XD_LABEL_CODES - len(unique)))
