"""Data that cannot lie: a damaged feature cache is found by its checksums and rebuilt (one warning line, the same
numbers as a clean build), non-finite features are one error naming the file, the list folder's ground truth is
checked before any feature is packed, and the CLI says what it loaded."""

import json
import logging
import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.data.test_cache import _assert_same, _built
from tests.test_checkpoint import TINY
from vadclip.config import preset
from vadclip.data import DataError, cache_location, load_dataset, read_layout
from vadclip.data import cache as cache_module
from vadclip.data.dataset import describe
from vadclip.train import main


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "vadclip.data.cache"]


def _overwrite(path, at, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def _data_start(path) -> int:
    """Byte offset of the first value of a .npy-format file (after its header)."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def _damage(folder, kind: str) -> str:
    """Damage the cache in `folder` the way `kind` says; returns what the warning line must say."""
    if kind == "bytes":
        _overwrite(folder / "train.feat", _data_start(folder / "train.feat") + 100, b"\x01\x02\x03\x04")
        return "checksum mismatch in train.feat (bytes 0-"
    if kind == "nan":
        _overwrite(folder / "test.feat", _data_start(folder / "test.feat"), np.float32(np.nan).tobytes() * 3)
        return "checksum mismatch in test.feat"
    if kind == "offset":
        offsets = np.load(folder / "train.offsets")
        offsets[1] += 1  # still increasing: only the checksum tells
        with open(folder / "train.offsets", "r+b") as f:
            np.save(f, offsets)
        return "checksum mismatch in train.offsets"
    if kind == "truncated":
        size = (folder / "train.feat").stat().st_size
        with open(folder / "train.feat", "r+b") as f:
            f.truncate(size // 2)
        return f"train.feat is truncated: {size // 2} bytes, expected {size}"
    if kind == "missing":
        (folder / "val.offsets").unlink()
        return "val.offsets is missing"
    if kind == "no checksums":  # a cache written before checksums were recorded
        meta = json.loads((folder / "meta.json").read_text())
        del meta["checksums"]
        (folder / "meta.json").write_text(json.dumps(meta))
        return "meta.json is unreadable or has no checksums (built by an older version)"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["bytes", "nan", "offset", "truncated", "missing", "no checksums"])
def test_a_damaged_cache_is_rebuilt_with_one_line(tmp_path, small_config, caplog, kind):
    caplog.set_level(logging.INFO, logger="vadclip.data.cache")
    cfg = small_config("xd", tmp_path)
    load_dataset(cfg)
    folder = cache_location(cfg)
    said = _damage(folder, kind)
    data = load_dataset(cfg)
    (line,) = _warnings(caplog)
    assert line.startswith(f"feature cache {folder}: {said}") and line.endswith("; rebuilding") and "\n" not in line
    assert len(_built(caplog)) == 2 and (folder / "complete").is_file()
    _assert_same(data, load_dataset(small_config("xd", tmp_path, **{"data.feature_cache": False})))
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, f".{folder.name}.lock"])
    caplog.clear()
    load_dataset(cfg)  # whole again: mapped, not rebuilt
    assert not _warnings(caplog) and not _built(caplog)


def test_an_intact_cache_is_read_for_its_checksums_once_per_process(tmp_path, small_config, monkeypatch, caplog):
    """A process trusts the stat of files it verified, and a trial unpickling a bank trusts the stat the pickling
    process verified; any write changes the ctime, so damage after that is still found."""
    caplog.set_level(logging.INFO, logger="vadclip.data.cache")
    monkeypatch.setattr(cache_module, "_verified", {})
    crc = cache_module._crc
    reads: list[str] = []
    monkeypatch.setattr(cache_module, "_crc", lambda path, start, length: reads.append(path.name) or crc(path, start,
                                                                                                          length))
    cfg = small_config("ucf", tmp_path)
    load_dataset(cfg)
    load_dataset(cfg)  # files written just now: a same-tick write could hide behind an equal ctime, so read again
    assert reads and not cache_module._verified
    monkeypatch.setattr(cache_module, "SETTLED_NS", -10**18)  # as if the build were long ago
    data = load_dataset(cfg)
    reads.clear()
    load_dataset(cfg)
    assert reads == []  # same process, same stat
    blob = pickle.dumps(data)
    cache_module._verified.clear()  # a fresh process (a Ray trial)
    again = pickle.loads(blob)
    assert reads == [] and np.array_equal(again.train.data, data.train.data)
    folder = cache_location(cfg)
    time.sleep(0.05)  # past the file clock's tick
    _damage(folder, "bytes")
    cache_module._verified.clear()
    del data, again
    moved = pickle.loads(blob)
    assert reads and [m for m in _warnings(caplog) if "checksum mismatch in train.feat" in m]
    _assert_same(moved, load_dataset(small_config("ucf", tmp_path, **{"data.feature_cache": False})))


def test_cli_on_a_damaged_cache_rebuilds_and_gives_the_clean_numbers(tmp_path, caplog, capsys):
    """The tester's case: bytes of train.feat overwritten with NaN gave other numbers (or a sklearn traceback)
    and exit 0."""
    caplog.set_level(logging.INFO, logger="vadclip.data.cache")
    sets = [f"{k}={v}" for k, v in TINY.items()] + [f"data.cache_dir={tmp_path / 'c'}"]

    def run(out: str) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-CLIP-weights banner
            assert main(["--preset", "synthetic", "--out", str(tmp_path / out), "--no-progress", "--set", *sets]) == 0
        return json.loads((tmp_path / out / "metrics.json").read_text())

    clean = run("clean")
    folder = cache_location(preset("synthetic", overrides={**TINY, "data.cache_dir": str(tmp_path / "c")}))
    start = _data_start(folder / "train.feat")
    _overwrite(folder / "train.feat", start, np.full(64, np.nan, np.float32).tobytes())
    assert run("damaged") == clean
    (line,) = _warnings(caplog)
    assert line.startswith(f"feature cache {folder}: checksum mismatch in train.feat") and line.endswith("rebuilding")
    out = capsys.readouterr().out
    assert out.count("data: ") == 2  # the counts line, once per run


# ---------------------------------------------------------------- feature files




@pytest.mark.parametrize("part,value", [("train", np.nan), ("test", np.inf)])
def test_a_non_finite_feature_file_is_one_error_naming_it(real, part, value):
    config, _, _ = real
    path = Path(read_layout(config()).files[part][0][0])  # a file the load reads
    x = np.load(path)
    x[3, 5] = value
    np.save(path, x)
    for cache in (True, False):
        with pytest.raises(DataError) as err:
            load_dataset(config(**{"data.feature_cache": cache}))
        msg = str(err.value)
        assert msg.startswith(f"{path}: snippet 3 has non-finite feature value {value!r}") and "\n" not in msg
    folder = cache_location(config())
    assert not folder.exists()  # nothing half-built carries the key


def test_a_crop_mean_beyond_float32_is_one_error_naming_the_file(real):
    config, _, _ = real
    cfg = config(**{"data.test_crop": "mean"})
    crops = read_layout(cfg).files["test"][0]  # the crops averaged into the first test video
    assert len(crops) > 1
    for path in crops:
        np.save(path, np.full_like(np.load(path), 3e38))  # finite; their sum is not
    for cache in (True, False):
        with pytest.raises(DataError) as err:
            load_dataset(config(**{"data.test_crop": "mean", "data.feature_cache": cache}))
        assert str(err.value) == (f"{crops[0]}: the mean over its crops or pooled snippets overflows float32; "
                                  f"expected feature values far below float32's limit (3.4e38)")


# ---------------------------------------------------------------- the list folder first


@pytest.mark.parametrize("gone,named", [
    (["gt.npy"], "gt.npy (or gt_xd.npy, as the authors' make_gt_xd.py names it)"),
    (["gt_segment.npy", "gt_label.npy"], "gt_segment.npy, gt_label.npy"),
])
def test_missing_ground_truth_is_named_before_any_packing(real, monkeypatch, gone, named):
    config, lists, _ = real
    for name in gone:
        (lists / name).unlink()

    def no_packing(*args, **kwargs):
        raise AssertionError("packed features before checking the ground truth")

    monkeypatch.setattr(cache_module, "_build", no_packing)
    with pytest.raises(DataError) as err:
        load_dataset(config())
    assert str(err.value) == (f"{lists}: ground truth {named} not found; expected the authors' list folder to hold the "
                              f"frame labels, segments and segment labels of the test list")


def test_the_authors_gt_xd_name_is_accepted(real):
    config, lists, _ = real
    before = load_dataset(config(**{"data.feature_cache": False}))
    (lists / "gt.npy").rename(lists / "gt_xd.npy")
    after = load_dataset(config(**{"data.feature_cache": False}))
    np.testing.assert_array_equal(after.test.frame_gt, before.test.frame_gt)
    np.save(lists / "gt_xd.npy", np.zeros(16, np.float32))
    with pytest.raises(DataError, match=r"gt_xd\.npy: 16 frames, expected"):
        load_dataset(config(**{"data.feature_cache": False}))


# ---------------------------------------------------------------- what was loaded


def test_describe_counts_crops_videos_and_snippets(tmp_path, small_config):
    data = load_dataset(small_config("ucf", tmp_path))
    line = describe(data)
    snippets = int(data.test.features.lengths.sum())
    assert line == (f"data: {len(data.train)} training crops of {len(data.train_names)} videos, {len(data.val)} "
                    f"validation videos, {len(data.test)} test videos ({snippets} snippets)")
    assert len(data.train) == 2 * len(data.train_names)  # 2 crops per training video (conftest.SMALL)
    no_val = load_dataset(small_config("ucf", tmp_path, **{"data.val_fraction": 0}))
    assert ", 0 validation videos," in describe(no_val)
