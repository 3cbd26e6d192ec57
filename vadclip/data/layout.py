"""Reading the authors' on-disk layout: list CSVs, per-crop feature `.npy` files, ground truth.

Every reader raises `DataError` whose message names the offending file (and CSV line) and what was
expected, so that a wrong `--lists` / `--features` folder is diagnosed in one line.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from vadclip.data.classes import parse_label
from vadclip.data.conventions import (
    CLASS_CODES,
    GT_NORMAL,
    SNIPPET_FRAMES,
    check_style,
    crop_index,
    eval_files,
    frame_gt_names,
    list_files,
    split_crop,
)
from vadclip.data.errors import DataError

__all__ = ["DataError", "ListRow", "read_list", "resolve_feature_path", "load_features", "feature_shape",
           "ground_truth_paths", "read_ground_truth", "write_ground_truth", "crop_files"]


@dataclass(frozen=True)
class ListRow:
    path: Path  # the feature file, re-rooted under the features folder
    label: str  # as written in the CSV
    video: str  # file stem without the `__<crop>` suffix
    crop: int
    classes: tuple[int, ...]  # class indices (0 = normal)


def _parts(csv_path: str) -> list[str]:
    # The authors' paths are POSIX; also accept Windows-style paths written by other tools.
    pure = PureWindowsPath(csv_path) if "\\" in csv_path else PurePosixPath(csv_path)
    return [p for p in pure.parts if p not in (pure.anchor, "/", "\\")]


def resolve_feature_path(csv_path: str, features_root: Path | None) -> tuple[Path | None, list[Path]]:
    """Map a list path onto `features_root`; returns (path or None, candidates tried).

    Rule: try the last 1, 2, 3, ... components of the CSV path joined under `features_root` and take
    the SHORTEST suffix that exists (so `--features` may point at the folder holding the files, or
    at any ancestor that mirrors the authors' sub-folders, e.g. `UCFClipFeatures/` holding `Abuse/`
    or a folder holding `XDTrainClipFeatures/` and `XDTestClipFeatures/`). Only if no suffix exists
    is the CSV path itself accepted as is (already-rewritten lists).
    """
    tried: list[Path] = []
    parts = _parts(csv_path)
    if features_root is not None:
        for k in range(1, len(parts) + 1):
            candidate = features_root.joinpath(*parts[-k:])
            tried.append(candidate)
            if candidate.is_file():
                return candidate, tried
    as_is = Path(csv_path)
    tried.append(as_is)
    return (as_is, tried) if as_is.is_file() else (None, tried)


def read_list(csv_path: str | Path, features_root: str | Path | None, style: str) -> list[ListRow]:
    """Rows of an authors' list CSV (`path,label`), each re-rooted, checked to exist and parsed."""
    csv_path = Path(csv_path)
    root = None if features_root is None else Path(features_root)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: list file not found; expected a CSV with header 'path,label' "
                        f"(official name {list_files(style)['train']} / {list_files(style)['test']})")
    rows: list[ListRow] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected header 'path,label', "
                            f"found {','.join(header) or 'nothing'}")
        reader.fieldnames = header
        for record in reader:
            where = f"{csv_path}:{reader.line_num}"
            raw, label = (record.get("path") or "").strip(), (record.get("label") or "").strip()
            if not raw:
                raise DataError(f"{where}: empty 'path' field; expected a feature .npy path")
            classes = parse_label(style, label, where)
            path, tried = resolve_feature_path(raw, root)
            if path is None:
                shown = ", ".join(str(p) for p in tried[:4]) + (", ..." if len(tried) > 4 else "")
                raise DataError(f"{where}: feature file {raw!r} not found under --features {root} "
                                f"(tried {shown}); expected the unpacked CLIP features there")
            video, crop = split_crop(path.stem)
            rows.append(ListRow(path, label, video, crop, classes))
    if not rows:
        raise DataError(f"{csv_path}: list is empty; expected one 'path,label' row per feature file")
    return rows


def _check_array(arr: np.ndarray, path: Path, dim: int) -> None:
    expected = f"expected a float array of shape (T, {dim}) (model.embed_dim = {dim})"
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{path}: feature dtype {arr.dtype}; {expected}")
    if arr.ndim != 2:
        raise DataError(f"{path}: feature array has {arr.ndim} dimension(s), shape {arr.shape}; {expected}")
    if arr.shape[1] != dim:
        raise DataError(f"{path}: feature width {arr.shape[1]}, shape {arr.shape}; {expected}")
    if arr.shape[0] == 0:
        raise DataError(f"{path}: feature array has no snippets (T = 0); {expected} with T >= 1")


def load_features(path: str | Path, dim: int) -> np.ndarray:
    """float32 (T, dim) features of one crop, validated."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read feature file ({e}); expected a .npy float array of "
                        f"shape (T, {dim})") from e
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise DataError(f"{path}: not a single .npy array; expected a float array of shape (T, {dim})")
    _check_array(arr, path, dim)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: reported below
        x = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(x).all():  # NaN / inf would surface epochs later as a loss error naming no file
        _raise_non_finite(arr, x, path)
    return x


def _raise_non_finite(arr: np.ndarray, x: np.ndarray, path: Path) -> None:
    bad_rows = ~np.isfinite(x).all(axis=1)
    row = int(np.argmax(bad_rows))
    col = int(np.argmax(~np.isfinite(x[row])))
    raise DataError(f"{path}: snippet {row} has non-finite feature value {float(arr[row, col])!r} (column {col}; "
                    f"{int(bad_rows.sum())} of {len(x)} snippets affected); expected finite float32 values "
                    f"(re-extract this video)")


def feature_shape(path: str | Path, dim: int) -> tuple[int, int]:
    """(T, dim) from the .npy header only (memory-mapped, no data read); same checks as load_features."""
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read feature file ({e}); expected a .npy float array of "
                        f"shape (T, {dim})") from e
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: not a single .npy array; expected a float array of shape (T, {dim})")
    try:
        _check_array(arr, path, dim)
        return int(arr.shape[0]), int(arr.shape[1])
    finally:
        del arr  # close the memory map now, not at garbage collection (many files)


def crop_files(listed: Path, video: str) -> dict[int, Path]:
    """All crop files `<video>__<k>.npy` next to a listed feature file, by crop index."""
    found: dict[int, Path] = {}
    with os.scandir(listed.parent) as it:
        for entry in it:
            k = crop_index(entry.name, video)
            if k is not None:
                found[k] = Path(entry.path)
    return dict(sorted(found.items()))


def _load_object(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found; expected the authors' list folder to hold it")
    try:
        return np.load(path, allow_pickle=True)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read {what} ({e})") from e


def ground_truth_paths(lists_dir: str | Path, style: str, split: str = "test") -> tuple[Path, Path, Path]:
    """The frame-level, segment and segment-label ground truth files of `lists_dir` (the frame labels under the
    first accepted name that exists, `conventions.frame_gt_names`); one DataError naming every missing one.
    `split` "val": those of a style's own validation split (`conventions.eval_files`)."""
    check_style(style)
    lists_dir, names = Path(lists_dir), eval_files(style, split)
    accepted = frame_gt_names(style, split)
    gt_path = next((lists_dir / n for n in accepted if (lists_dir / n).is_file()), lists_dir / accepted[0])
    seg_path, lab_path = lists_dir / names["segments"], lists_dir / names["segment_labels"]
    missing = [p.name for p in (gt_path, seg_path, lab_path) if not p.is_file()]
    if missing:
        if accepted[0] in missing and len(accepted) > 1:
            missing[0] = f"{accepted[0]} (or {', '.join(accepted[1:])}, as the authors' make_gt_{style}.py names it)"
        raise DataError(f"{lists_dir}: ground truth {', '.join(missing)} not found; expected the authors' list "
                        f"folder to hold the frame labels, segments and segment labels of the {split} list")
    return gt_path, seg_path, lab_path


def read_ground_truth(lists_dir: str | Path, style: str, split: str = "test"
                      ) -> tuple[np.ndarray, list[list[tuple[int, int]]], list[list[str]]]:
    """(frame_gt float32 (16*sum T,), per-video [(start, end)] frame segments, per-video labels).

    Segment coordinates may be strings in the real files (copied from annotation text): each is
    converted with int(float(x)). Labels are UCF class folder names / XD codes, `A` for normal.
    """
    gt_path, seg_path, lab_path = ground_truth_paths(lists_dir, style, split)
    frame_gt = _load_object(gt_path, "frame-level ground truth")
    if frame_gt.dtype == object:
        raise DataError(f"{gt_path}: frame-level ground truth is an object array; expected a float 0/1 array")
    frame_gt = np.asarray(frame_gt, dtype=np.float32).reshape(-1)
    binary = (frame_gt == 0) | (frame_gt == 1)  # anything else makes AUC / AP silently nan
    if not binary.all():
        i = int(np.argmin(binary))
        raise DataError(f"{gt_path}: frame {i} has label {float(frame_gt[i])!r} ({int((~binary).sum())} non-0/1 "
                        f"frames); expected only 0/1 frame labels")
    raw_segments = _load_object(seg_path, "segment ground truth")
    raw_labels = _load_object(lab_path, "segment labels")
    if len(raw_segments) != len(raw_labels):
        raise DataError(f"{seg_path} has {len(raw_segments)} videos but {lab_path} has {len(raw_labels)}; "
                        f"expected one entry per test video in both")
    allowed = set(CLASS_CODES[style]) | {GT_NORMAL}
    segments: list[list[tuple[int, int]]] = []
    labels: list[list[str]] = []
    for i, (segs, labs) in enumerate(zip(raw_segments, raw_labels)):
        try:
            pairs = np.asarray(segs, dtype=object).reshape(-1, 2)
            video_segs = [(int(float(s)), int(float(e))) for s, e in pairs]
        except (TypeError, ValueError) as e:
            raise DataError(f"{seg_path}: video {i}: segments {segs!r} are not [start, end] frame pairs") from e
        video_labs = [labs] if isinstance(labs, str) else [str(x) for x in np.asarray(labs, dtype=object).ravel()]
        if len(video_segs) != len(video_labs):
            raise DataError(f"{seg_path} / {lab_path}: video {i} has {len(video_segs)} segments but "
                            f"{len(video_labs)} labels; expected one label per segment")
        bad = [x for x in video_labs if x not in allowed]
        if bad:
            raise DataError(f"{lab_path}: video {i}: unknown segment label(s) {bad}; expected one of "
                            f"{', '.join(sorted(allowed))}")
        segments.append(video_segs)
        labels.append(video_labs)
    return frame_gt, segments, labels


Annotation = tuple[int, int, str]  # (start frame, end frame exclusive, class code / UCF class name)


def write_ground_truth(lists_dir: str | Path, style: str,
                       videos: list[tuple[int, list[Annotation]]], split: str = "test") -> None:
    """Write the three ground-truth files of the test list (official names) from annotations (`split` "val":
    of a style's own validation list).

    `videos`: per test video, in the order of the test CSV, (T snippets, its anomalous segments);
    no segments = a normal video. As in the authors' files: 16*T frame labels per video, abnormal
    segment coordinates as strings, normal videos one whole-video segment labelled `A`.
    """
    check_style(style)
    lists_dir = Path(lists_dir)
    allowed = set(CLASS_CODES[style][1:])
    frames: list[np.ndarray] = []
    # the authors' files: abnormal coordinates as strings, a normal video's one segment as ints
    segments: list[list[list[str]] | list[list[int]]] = []
    labels: list[list[str]] = []
    for i, (length, segs) in enumerate(videos):
        gt = np.zeros(SNIPPET_FRAMES * length, dtype=np.float32)
        for start, end, code in segs:
            if code not in allowed:
                raise DataError(f"ground truth of test video {i}: unknown class {code!r}; expected one of "
                                f"{', '.join(sorted(allowed))}")
            if not 0 <= start < end <= len(gt):
                raise DataError(f"ground truth of test video {i}: segment [{start}, {end}) is outside its "
                                f"{len(gt)} frames ({SNIPPET_FRAMES} per snippet)")
            gt[start:end] = 1.0
        frames.append(gt)
        if segs:
            ordered = sorted(segs)
            segments.append([[str(s), str(e)] for s, e, _ in ordered])
            labels.append([c for _, _, c in ordered])
        else:
            segments.append([[0, len(gt)]])
            labels.append([GT_NORMAL])
    names = eval_files(style, split)
    lists_dir.mkdir(parents=True, exist_ok=True)
    np.save(lists_dir / names["frame_gt"], np.concatenate(frames) if frames else np.zeros(0, np.float32))
    for key, items in (("segments", segments), ("segment_labels", labels)):
        arr = np.empty(len(items), dtype=object)
        for j, x in enumerate(items):
            arr[j] = x
        np.save(lists_dir / names[key], arr, allow_pickle=True)
