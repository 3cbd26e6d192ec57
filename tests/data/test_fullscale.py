"""The full-scale writer (`vadclip.data.fullscale`) at fraction 0.01: counts, crop files, official lists,
read back by `load_dataset`, the length model, determinism, atomic refusal of a non-empty folder."""

import filecmp
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from vadclip.config import preset
from vadclip.data import CLASS_CODES, list_files, load_dataset
from vadclip.data.fullscale import SPECS, FullScaleLayout, main, sample_lengths, video_counts, write_full_scale

FRACTION = 0.01
FULL = {"ucf-full": (800, 810, 150, 140), "xd-full": (2049, 1905, 300, 500)}  # the authors' lists
STYLE = {"ucf-full": "ucf", "xd-full": "xd"}
TEST_CROP = {"ucf": 5, "xd": 0}
NAME = {"ucf": re.compile(r"^/home/xbgydx/Desktop/UCFClipFeatures/(?:(?P<cls>[A-Za-z]+)/(?P=cls)\d{3}_x264"
                          r"|Training_Normal_Videos_Anomaly/Normal_Videos\d{3}_x264"
                          r"|Testing_Normal_Videos_Anomaly/Normal_Videos_\d{3}_x264)__(?P<crop>\d)\.npy$"),
        "xd": re.compile(r"^/home/xbgydx/Desktop/XD(?:Train|Test)ClipFeatures/[^/]+__#\d\d-\d\d-\d\d_\d\d-\d\d-\d\d"
                         r"_label_(?P<label>[A-Z0-9-]+)__(?P<crop>\d)\.npy$")}


@pytest.fixture(scope="module", params=["ucf-full", "xd-full"])
def written(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "layout"
    layout = write_full_scale(out, request.param, fraction=FRACTION, seed=1)
    yield request.param, layout
    shutil.rmtree(out, ignore_errors=True)  # a few hundred MB: not kept for pytest's last-3-runs


def _rows(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "path,label"
    return [(p, lab) for p, lab in (line.rsplit(",", 1) for line in lines[1:])]


def _rel(csv_path: str, style: str) -> str:
    """The file under --features: the authors' prefix dropped (UCF keeps the class folder)."""
    return csv_path.split("/UCFClipFeatures/" if style == "ucf" else "/Desktop/", 1)[1]


def test_counts_crops_and_official_lists(written):
    scale, layout = written
    style = STYLE[scale]
    expected = [max(2, math.floor(n * FRACTION + 0.5)) for n in FULL[scale]]
    assert [layout.train_normal, layout.train_abnormal, layout.test_normal, layout.test_abnormal] == expected
    assert video_counts(scale, FRACTION) == dict(zip(["train_normal", "train_abnormal", "test_normal",
                                                      "test_abnormal"], expected))
    assert layout.style == style and layout.crops == 10 and layout.dim == 512
    names = list_files(style)
    assert sorted(p.name for p in layout.lists.iterdir()) == sorted(names.values())
    train, test = _rows(layout.lists / names["train"]), _rows(layout.lists / names["test"])
    normal = CLASS_CODES[style][0]
    # train: one row per crop, crops 0..9 consecutive, abnormal videos first
    assert len(train) == layout.train_videos * 10
    assert [lab != normal for _, lab in train[::10]] == [True] * layout.train_abnormal + [False] * layout.train_normal
    for i in range(0, len(train), 10):
        video = train[i:i + 10]
        assert [NAME[style].match(p)["crop"] for p, _ in video] == [str(k) for k in range(10)]
        assert len({p.rsplit("__", 1)[0] for p, _ in video}) == 1 and len({lab for _, lab in video}) == 1
    # test: one row per video, the default crop, abnormal first; every crop on disk
    assert len(test) == layout.test_videos
    assert [lab != normal for _, lab in test] == [True] * layout.test_abnormal + [False] * layout.test_normal
    for path, label in train + test:
        m = NAME[style].match(path)
        assert m, path
        if style == "ucf" and m["cls"]:
            assert m["cls"] == label
        if style == "xd":
            assert m["label"] == label and (label == "A" or len(label.split("-")) == 3)
    for path, _ in test:
        assert path.endswith(f"__{TEST_CROP[style]}.npy")
        stem = _rel(path, style).rsplit("__", 1)[0]
        assert all((layout.features / f"{stem}__{k}.npy").is_file() for k in range(10))
    assert all((layout.features / _rel(p, style)).is_file() for p, _ in train)
    npy = list(layout.features.rglob("*.npy"))
    assert len(npy) == layout.files == (layout.train_videos + layout.test_videos) * 10
    assert layout.bytes_written == sum(p.stat().st_size for p in layout.root.rglob("*") if p.is_file())
    assert not [p for p in layout.root.parent.iterdir() if p.name.startswith(".")]  # temp folder moved away


def test_load_dataset_reads_it_back(written):
    scale, layout = written
    style = layout.style
    # disk-backed banks: headers only at load (no feature cache, fast); a few items read below
    cfg = preset(style, overrides={"data.lists": str(layout.lists), "data.features": str(layout.features),
                                   "model.embed_dim": 512, "clip.weights": None, "data.in_memory": False})
    data = load_dataset(cfg)
    n_val = 0 if data.val is None else len(data.val)
    assert len(data.train) == (layout.train_videos - n_val) * 10
    assert len(data.test) == layout.test_videos and int(data.test.is_abnormal.sum()) == layout.test_abnormal
    assert int(data.test.features.lengths.sum()) * 16 == len(data.test.frame_gt)
    lo, hi = SPECS[scale].lengths.low, SPECS[scale].lengths.high
    assert lo <= data.test.features.lengths.min() and data.test.features.lengths.max() <= hi
    assert data.test.segments is not None and data.test.segment_labels is not None
    for i, abnormal in enumerate(data.test.is_abnormal):
        segs, labels = data.test.segments[i], data.test.segment_labels[i]
        if abnormal:
            assert 1 <= len(segs) <= 3 and all(0 <= s < e <= 16 * data.test.features.lengths[i] for s, e in segs)
            present = {CLASS_CODES[style].index(lab) for lab in labels}
            assert present == set(np.flatnonzero(data.test.labels[i]))
        else:
            assert segs == [(0, 16 * int(data.test.features.lengths[i]))] and labels == ["A"]
    for x in (data.train[0], data.train[len(data.train) - 1], data.test.features[0]):
        assert x.dtype == np.float32 and x.shape[1] == 512 and np.isfinite(x).all()
        assert 0.15 < np.abs(x - x.mean(axis=0)).mean() < 0.5 and 4 < np.linalg.norm(x, axis=1).mean() < 15


@pytest.mark.parametrize("scale", ["ucf-full", "xd-full"])
def test_length_distribution(scale):
    model = SPECS[scale].lengths
    t = sample_lengths(scale, 200_000, np.random.default_rng(0))
    assert t.dtype == np.int64 and t.min() >= model.low and t.max() <= model.high
    assert abs(t.mean() / model.target_mean - 1) < 0.15
    if scale == "ucf-full":
        assert 0.002 < (t > 3000).mean() < 0.02  # a tail: some of the 1 610 training videos exceed 3 000
    assert (sample_lengths(scale, 100, np.random.default_rng(5)) == sample_lengths(scale, 100,
                                                                                np.random.default_rng(5))).all()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_deterministic_under_the_seed_whatever_the_threads(tmp_path):
    a = write_full_scale(tmp_path / "a", "xd-full", FRACTION, seed=3, dim=8, workers=1)
    b = write_full_scale(tmp_path / "b", "xd-full", FRACTION, seed=3, dim=8, workers=3)
    c = write_full_scale(tmp_path / "c", "xd-full", FRACTION, seed=4, dim=8)
    files = _files(a.root)
    assert files == _files(b.root) and a.bytes_written == b.bytes_written
    _, mismatch, errors = filecmp.cmpfiles(a.root, b.root, files, shallow=False)
    assert not mismatch and not errors
    assert not filecmp.cmp(a.lists / "xd_CLIP_rgb.csv", c.lists / "xd_CLIP_rgb.csv", shallow=False)


def test_refuses_a_non_empty_folder_and_cli(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        write_full_scale(out, "ucf-full", FRACTION, dim=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left behind
    assert main(["--scale", "ucf-full", str(out), "--fraction", "0.01", "--dim", "8"]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fraction"):
        write_full_scale(tmp_path / "new", "ucf-full", 0.0, dim=8)
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine
    assert main(["--scale", "ucf-full", str(empty), "--fraction", "0.01", "--dim", "8", "--seed", "2"]) == 0
    text = capsys.readouterr().out
    assert "train: 16 videos (8 normal, 8 abnormal) x 10 crops = 160 feature files" in text
    assert (f"python -m vadclip.train --dataset ucf --lists {empty / 'list'} --features {empty / 'features'}"
            in text) and "--set model.embed_dim=8" in text
    assert isinstance(write_full_scale(tmp_path / "z", "xd-full", FRACTION, dim=8), FullScaleLayout)
