import filecmp
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from vadclip.data import (
    CLASS_CODES,
    DataError,
    DiskFeatureBank,
    FeatureBank,
    list_files,
    load_dataset,
    read_ground_truth,
    read_list,
    split_videos,
    write_synthetic,
)
from vadclip.data.synthetic import LISTS_DIR, ensure_synthetic

DIM = 32  # as in conftest.py

UCF_NAME = re.compile(r"^/home/xbgydx/Desktop/UCFClipFeatures/(?:"
                      r"(?P<cls>[A-Za-z]+)/(?P=cls)\d{3}_x264"
                      r"|Training_Normal_Videos_Anomaly/Normal_Videos\d{3}_x264"
                      r"|Testing_Normal_Videos_Anomaly/Normal_Videos_\d{3}_x264)__\d\.npy$")
XD_NAME = re.compile(r"^/home/xbgydx/Desktop/XD(?:Train|Test)ClipFeatures/[^/]+_label_(?P<label>[A-Z0-9-]+)__\d\.npy$")


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "path,label"
    return [tuple(line.rsplit(",", 1)) for line in lines[1:]]


def test_layout_file_names_and_list_order(written, small_synthetic):
    style, _, lists, features = written
    names = list_files(style)
    assert sorted(p.name for p in lists.iterdir()) == sorted(names.values())
    cfg = small_synthetic(style)
    train, test = _csv_rows(lists / names["train"]), _csv_rows(lists / names["test"])
    assert len(train) == (cfg.train_abnormal + cfg.train_normal) * cfg.crops
    assert len(test) == cfg.test_abnormal + cfg.test_normal
    normal = "Normal" if style == "ucf" else "A"
    for rows, n_abnormal in ((train, cfg.train_abnormal * cfg.crops), (test, cfg.test_abnormal)):
        assert all(label != normal for _, label in rows[:n_abnormal])  # abnormal first, then normal
        assert all(label == normal for _, label in rows[n_abnormal:])
    for path, label in train + test:
        m = (UCF_NAME if style == "ucf" else XD_NAME).match(path)
        assert m, path
        if style == "ucf" and m["cls"]:
            assert m["cls"] == label
        if style == "xd":
            assert m["label"] == label and (label == "A" or len(label.split("-")) == 3)
    default = "5" if style == "ucf" else "0"
    assert all(path.endswith(f"__{default}.npy") for path, _ in test)
    # training crops of one video are consecutive rows
    stems = [path.rsplit("__", 1)[0] for path, _ in train]
    assert stems == [s for s in stems[::cfg.crops] for _ in range(cfg.crops)]
    # every test video has all crops on disk; files sit in the official folders
    if style == "ucf":
        assert (features / "Training_Normal_Videos_Anomaly").is_dir() and (features / "Abuse").is_dir()
    else:
        assert sorted(p.name for p in features.iterdir()) == ["XDTestClipFeatures", "XDTrainClipFeatures"]
    assert len(list(features.rglob("*.npy"))) == (len(train) // cfg.crops + len(test)) * cfg.crops


def test_ground_truth_matches_lengths(written):
    style, _, lists, features = written
    rows = read_list(lists / list_files(style)["test"], features, style)
    lengths = [len(np.load(r.path)) for r in rows]
    frame_gt, segments, labels = read_ground_truth(lists, style)
    assert frame_gt.dtype == np.float32 and len(frame_gt) == 16 * sum(lengths)
    assert len(segments) == len(labels) == len(rows)
    offsets = np.cumsum([0] + [16 * t for t in lengths])
    codes = CLASS_CODES[style]
    for i, row in enumerate(rows):
        video_gt = frame_gt[offsets[i]:offsets[i + 1]]
        if row.classes == (0,):
            assert segments[i] == [(0, 16 * lengths[i])] and labels[i] == ["A"] and not video_gt.any()
        else:
            assert 0 < video_gt.mean() < 1  # anomaly segments plus normal snippets
            assert {codes.index(lab) for lab in labels[i]} == set(row.classes)
            for s, e in segments[i]:
                assert video_gt[s:e].all()
            assert video_gt.sum() == sum(e - s for s, e in segments[i])


def test_features_look_like_clip_and_some_videos_are_long(tmp_path, small_synthetic):
    lists, features = write_synthetic(tmp_path, small_synthetic("xd"), 512, seed=0)
    x = np.load(next(features.rglob("*.npy")))
    assert x.dtype == np.float32 and x.shape[1] == 512
    assert 0.2 < np.abs(x).mean() < 0.8 and 5 < np.linalg.norm(x, axis=1).mean() < 20
    lengths = [len(np.load(p, mmap_mode="r")) for p in features.rglob("*__0.npy")]
    assert sum(t > 256 for t in lengths) >= 4 and 256 in lengths


def test_deterministic_bytes(tmp_path, written, small_synthetic):
    style, out, _, _ = written
    again = tmp_path / "again"
    write_synthetic(again, small_synthetic(style), DIM, seed=7)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(out, again, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    other = tmp_path / "other"
    write_synthetic(other, small_synthetic(style), DIM, seed=8)
    assert not filecmp.cmp(out / "synthetic.json", other / "synthetic.json", shallow=False)


def test_split_videos_is_stratified_and_deterministic():
    is_normal = np.array([True] * 20 + [False] * 10)
    held = split_videos(is_normal, 0.2, seed=3)
    assert held[:20].sum() == 4 and held[20:].sum() == 2
    assert (held == split_videos(is_normal, 0.2, seed=3)).all()
    assert not split_videos(is_normal, 0.0, seed=3).any()
    assert split_videos(np.array([True, True, False, False]), 0.01, seed=0).tolist().count(True) == 2


@pytest.mark.parametrize("style", ["ucf", "xd"])
def test_load_dataset_round_trip(tmp_path, style, small_config):
    cfg = small_config(style, tmp_path)
    data = load_dataset(cfg)
    syn, C = cfg.data.synthetic, len(CLASS_CODES[style])
    assert data.style == style and data.class_codes == CLASS_CODES[style] and len(data.class_prompts) == C
    assert isinstance(data.train, FeatureBank) and data.feature_dim == DIM
    assert data.train.data.dtype == np.float32 and data.train.lengths.max() <= cfg.model.visual_length
    assert data.train_labels.shape == (len(data.train), C) and data.train_labels.dtype == np.float32
    # validation: whole videos, none on both sides, stratified
    assert data.val is not None and data.val.frame_gt is None and data.val.segments is None
    assert not set(data.val.names) & set(data.train_names)
    n_val = len(data.val)
    assert len(data.train) == (syn.train_normal + syn.train_abnormal - n_val) * syn.crops
    assert data.val.is_abnormal.any() and (~data.val.is_abnormal).any()
    assert np.bincount(data.train_video).tolist() == [syn.crops] * len(data.train_names)
    # test: raw lengths (some above visual_length), gt aligned
    test = data.test
    assert len(test) == syn.test_normal + syn.test_abnormal and test.labels.shape == (len(test), C)
    assert test.is_abnormal.tolist() == [True] * syn.test_abnormal + [False] * syn.test_normal
    assert len(test.frame_gt) == 16 * test.features.lengths.sum()
    assert test.features.lengths.max() > cfg.model.visual_length
    again = pickle.loads(pickle.dumps(data))  # shared through Ray's object store
    np.testing.assert_array_equal(again.train.data, data.train.data)
    assert again.test.segments == test.segments
    # the same files again, disk-backed
    disk = load_dataset(small_config(style, tmp_path, **{"data.in_memory": False}))
    assert isinstance(disk.train, DiskFeatureBank) and isinstance(disk.test.features, DiskFeatureBank)
    assert (disk.train.lengths == data.train.lengths).all()
    for i in (0, len(data.train) - 1):
        np.testing.assert_array_equal(disk.train[i], data.train[i])
    np.testing.assert_array_equal(disk.test.features[0], test.features[0])


def test_test_crop_choices(tmp_path, small_config):
    base = load_dataset(small_config("ucf", tmp_path))
    first = load_dataset(small_config("ucf", tmp_path, **{"data.test_crop": "0"}))
    mean = load_dataset(small_config("ucf", tmp_path, **{"data.test_crop": "mean"}))
    a, b, m = base.test.features[0], first.test.features[0], mean.test.features[0]
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(m, (a + b) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match=r"__3\.npy"):
        load_dataset(small_config("ucf", tmp_path, **{"data.test_crop": "3"}))


def test_cache_is_reused_and_atomic(tmp_path, small_synthetic):
    syn = small_synthetic("xd")
    lists, _ = ensure_synthetic(syn, DIM, 1, tmp_path)
    stamp = (lists / "gt.npy").stat().st_mtime_ns
    assert ensure_synthetic(syn, DIM, 1, tmp_path)[0] == lists
    assert (lists / "gt.npy").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [lists.parent.name]  # no temp folder left behind
    assert lists.name == LISTS_DIR
    assert ensure_synthetic(syn, DIM, 2, tmp_path)[0] != lists  # keyed by the seed


def _copy_layout(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_ground_truth_length(tmp_path, small_config):
    cfg = small_config("xd", tmp_path / "cache")
    lists, features = ensure_synthetic(cfg.data.synthetic, DIM, cfg.seed, cfg.data.cache_dir)
    copy = _copy_layout(lists.parent, tmp_path / "copy")
    gt = np.load(copy / "list" / "gt.npy")
    np.save(copy / "list" / "gt.npy", gt[:-16])
    real = small_config("xd", tmp_path, **{"data.dataset": "xd", "data.lists": str(copy / "list"),
                                           "data.features": str(copy / "features")})
    with pytest.raises(DataError) as err:
        load_dataset(real)
    assert "gt.npy" in str(err.value) and str(len(gt) - 16) in str(err.value) and str(len(gt)) in str(err.value)


def test_real_dataset_needs_folders(tmp_path, small_config):
    with pytest.raises(DataError, match="data.lists"):
        load_dataset(small_config("ucf", tmp_path, **{"data.dataset": "ucf"}))
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(small_config("ucf", tmp_path, **{"data.dataset": "ucf", "data.lists": str(tmp_path / "no"),
                                                      "data.features": str(tmp_path)}))


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_non_finite_features_name_the_file(tmp_path, small_config, split, in_memory):
    """NaN rows in one feature file: a DataError naming it and the first bad snippet, read in memory
    (at load_dataset) or from disk (at the first read of that item), instead of a loss error later."""
    cfg = small_config("ucf", tmp_path / "cache")
    lists, _ = ensure_synthetic(cfg.data.synthetic, DIM, cfg.seed, cfg.data.cache_dir)
    copy = _copy_layout(lists.parent, tmp_path / "copy")
    real = {"data.dataset": "ucf", "data.lists": str(copy / "list"), "data.features": str(copy / "features"),
            "data.in_memory": in_memory}
    clean = load_dataset(small_config("ucf", tmp_path, **{**real, "data.in_memory": False}))
    bank = clean.train if split == "train" else clean.test.features
    index = len(bank) - 1
    path = Path(bank.files[index][0])
    feats = np.load(path)
    feats[3:5] = np.nan
    np.save(path, feats)
    with pytest.raises(DataError) as err:
        data = load_dataset(small_config("ucf", tmp_path, **real))
        assert not in_memory  # a disk-backed bank reads features on access
        (data.train if split == "train" else data.test.features)[index]
    assert str(path) in str(err.value) and "snippet 3" in str(err.value)


def test_non_binary_frame_ground_truth(tmp_path, small_config):
    cfg = small_config("xd", tmp_path / "cache")
    lists, _ = ensure_synthetic(cfg.data.synthetic, DIM, cfg.seed, cfg.data.cache_dir)
    copy = _copy_layout(lists.parent, tmp_path / "copy")
    gt = np.load(copy / "list" / "gt.npy")
    np.save(copy / "list" / "gt.npy", np.full_like(gt, 7))
    real = small_config("xd", tmp_path, **{"data.dataset": "xd", "data.lists": str(copy / "list"),
                                           "data.features": str(copy / "features")})
    with pytest.raises(DataError) as err:
        load_dataset(real)
    assert str(copy / "list" / "gt.npy") in str(err.value) and "frame 0" in str(err.value)
