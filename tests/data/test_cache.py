"""The packed, memory-mapped feature cache: same values as reading every file, keyed by the files' stats,
built atomically once and reused, float16 at half the size, pickled by reference."""

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import TINY
from vadclip.config import apply_overrides, preset
from vadclip.data import DiskFeatureBank, FeatureBank, MappedFeatureBank, cache_location, load_dataset
from vadclip.data import cache as cache_module
from vadclip.data.synthetic import ensure_synthetic
from vadclip.train import fit

DIM = 32  # as in conftest.py


def _banks(data):
    return {"train": data.train, "val": data.val.features, "test": data.test.features}


def _assert_same(cached, read):
    for part, bank in _banks(cached).items():
        other = _banks(read)[part]
        assert isinstance(bank, MappedFeatureBank) and not isinstance(other, MappedFeatureBank), part
        np.testing.assert_array_equal(bank.lengths, other.lengths)
        for i in range(len(other)):
            x = bank[i]
            assert x.dtype == np.float32 and np.array_equal(x, other[i]), (part, i)
    np.testing.assert_array_equal(cached.train_labels, read.train_labels)
    np.testing.assert_array_equal(cached.test.frame_gt, read.test.frame_gt)
    assert cached.val.names == read.val.names and cached.test.names == read.test.names


def _built(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "vadclip.data.cache" and " built in " in r.getMessage()]




@pytest.mark.parametrize("style", ["ucf", "xd"])
def test_float32_cache_equals_reading_every_file(tmp_path, small_config, style, caplog):
    caplog.set_level(logging.INFO, logger="vadclip.data.cache")
    cfg = small_config(style, tmp_path)
    cached = load_dataset(cfg)
    _assert_same(cached, load_dataset(small_config(style, tmp_path, **{"data.feature_cache": False})))
    assert isinstance(cached.train, FeatureBank) and cached.train.data.dtype == np.float32
    assert not cached.train.data.flags.writeable  # a read-only map of the file, not a copy
    folder = cache_location(cfg)
    assert folder is not None and folder.parent.name == ".vadclip-cache" and (folder / "complete").is_file()
    assert folder.parent.parent == ensure_synthetic(cfg.data.synthetic, DIM, cfg.seed, cfg.data.cache_dir)[1]
    assert not list(folder.glob("*.npy"))  # invisible to scans of the feature files (study.reuse)
    (message,) = _built(caplog)
    assert str(folder) in message and ("KiB" in message or "MiB" in message)
    disk = load_dataset(small_config(style, tmp_path, **{"data.in_memory": False}))
    assert isinstance(disk.train, DiskFeatureBank)  # the authors' reads bypass the cache
    assert cache_location(small_config(style, tmp_path, **{"data.in_memory": False})) is None
    assert cache_location(small_config(style, tmp_path, **{"data.feature_cache": False})) is None


def test_fit_is_identical_with_and_without_the_cache(tmp_path):
    runs = {}
    for flag in (True, False):
        cfg = preset("synthetic", overrides={**TINY, "data.cache_dir": str(tmp_path / "cache"),
                                             "data.feature_cache": flag})
        res = fit(cfg, out_dir=tmp_path / str(flag), progress=False)
        runs[flag] = (json.loads((tmp_path / str(flag) / "metrics.json").read_text()),
                      [h["train/loss"] for h in res.history])
    (metrics, losses), (plain_metrics, plain_losses) = runs[True], runs[False]
    assert losses == plain_losses and len(losses) == TINY["optim.epochs"]
    assert metrics["test"] == plain_metrics["test"]


def test_second_load_maps_the_first_build(tmp_path, small_config, caplog):
    caplog.set_level(logging.INFO, logger="vadclip.data.cache")
    cfg = small_config("ucf", tmp_path)
    first = load_dataset(cfg)
    folder = cache_location(cfg)
    stamp = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())]
    second = load_dataset(cfg)
    assert len(_built(caplog)) == 1 and any("mapped" in r.getMessage() for r in caplog.records)
    assert [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())] == stamp
    np.testing.assert_array_equal(second.train.data, first.train.data)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["dtype"] == "float32" and meta["parts"]["train"]["items"] == len(first.train)
    # nothing else beside the cache: no temporary folder left behind, one lock file per key
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, f".{folder.name}.lock"])


def test_touching_or_adding_a_listed_file_rebuilds(real, caplog):
    caplog.set_level(logging.INFO, logger="vadclip.data.cache")
    config, lists, features = real
    cfg = config()
    before = load_dataset(cfg)
    first = cache_location(cfg)
    path = before.train.spec.files["train"][0][0]  # a listed training crop
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    touched = cache_location(cfg)
    assert touched != first and not (touched / "complete").exists()
    after = load_dataset(cfg)
    assert len(_built(caplog)) == 2 and (touched / "complete").is_file()
    np.testing.assert_array_equal(after.train.data, before.train.data)
    # a new crop of a training video, listed: a new key, and the bank holds it
    src = Path(path)
    rows = (lists / "xd_CLIP_rgb.csv").read_text().splitlines()[1:]
    listed, label = next(r.rsplit(",", 1) for r in rows if r.split(",")[0].endswith("/" + src.name))
    video = src.name.rsplit("__", 1)[0]
    np.save(src.with_name(f"{video}__7.npy"), np.load(src) + 1)
    with open(lists / "xd_CLIP_rgb.csv", "a") as f:
        f.write(f"{listed.rsplit('__', 1)[0]}__7.npy,{label}\n")
    grown = load_dataset(cfg)
    assert cache_location(cfg) not in (first, touched) and len(_built(caplog)) == 3
    assert len(grown.train) == len(after.train) + 1
    np.testing.assert_array_equal(grown.train[len(grown.train) - 1],
                                  load_dataset(config(**{"data.feature_cache": False})).train[len(grown.train) - 1])


def test_a_crash_during_the_build_leaves_nothing_that_loads(real, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="vadclip.data.cache")
    config, _, _ = real
    cfg = config()
    write_part = cache_module._write_part

    def crash_after_train(folder, part, bank, dtype):
        if part != "train":
            raise RuntimeError("killed midway")
        write_part(folder, part, bank, dtype)

    monkeypatch.setattr(cache_module, "_write_part", crash_after_train)
    with pytest.raises(RuntimeError, match="killed midway"):
        load_dataset(cfg)
    monkeypatch.undo()
    folder = cache_location(cfg)
    assert not folder.exists() and [p.name for p in folder.parent.iterdir()] == [f".{folder.name}.lock"]
    # what a killed process leaves: its temporary folder, or (foreign) a key folder without `complete`
    for junk in (folder.parent / f".{folder.name}.tmp-dead", folder):
        junk.mkdir()
        (junk / "train.feat").write_bytes(b"half")
    data = load_dataset(cfg)
    assert len(_built(caplog)) == 1 and (folder / "complete").is_file()
    assert not (folder.parent / f".{folder.name}.tmp-dead").exists()
    _assert_same(data, load_dataset(config(**{"data.feature_cache": False})))


def test_float16_halves_the_cache_within_1e_3(tmp_path, small_config):
    full = load_dataset(small_config("xd", tmp_path))
    half = load_dataset(small_config("xd", tmp_path, **{"data.cache_dtype": "float16"}))
    sizes = {}
    for name in ("float32", "float16"):
        folder = cache_location(small_config("xd", tmp_path, **{"data.cache_dtype": name}))
        sizes[name] = sum(p.stat().st_size for p in folder.glob("*.feat"))
    assert half.train.data.dtype == np.float16 and half.train.data.nbytes * 2 == full.train.data.nbytes
    assert abs(sizes["float16"] / sizes["float32"] - 0.5) < 0.01  # the .npy headers aside
    for part, bank in _banks(half).items():
        other = _banks(full)[part]
        np.testing.assert_array_equal(bank.lengths, other.lengths)
        for i in range(len(bank)):
            x = bank[i]
            assert x.dtype == np.float32
            np.testing.assert_allclose(x, other[i], rtol=1e-3, atol=1e-3, err_msg=f"{part} {i}")


def test_pickles_by_reference_and_rebuilds_where_missing(tmp_path, small_config):
    cfg = small_config("ucf", tmp_path)
    data = load_dataset(cfg)
    blob = pickle.dumps(data)
    banks = _banks(data).values()
    assert len(pickle.dumps(list(banks))) < sum(b.data.nbytes for b in banks) / 10  # names, not feature values
    from ray import cloudpickle  # what tune.with_parameters puts into Ray's object store

    uncached = load_dataset(apply_overrides(cfg, {"data.feature_cache": False}))
    features = sum(b.data.nbytes for b in banks)
    assert len(cloudpickle.dumps(data)) + 0.9 * features < len(cloudpickle.dumps(uncached))  # the arrays stay out
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.train.data, data.train.data)
    assert not again.train.data.flags.writeable
    shutil.rmtree(cache_location(cfg))  # another node: the same features, no cache yet
    moved = pickle.loads(blob)
    np.testing.assert_array_equal(moved.test.features.data, data.test.features.data)
    assert (cache_location(cfg) / "complete").is_file()


def test_cache_falls_back_to_the_home_folder(tmp_path, small_config, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = small_config("xd", tmp_path / "syn")
    features = ensure_synthetic(cfg.data.synthetic, DIM, cfg.seed, cfg.data.cache_dir)[1]
    (features / ".vadclip-cache").write_text("not a folder")  # the features' folder cannot hold the cache
    folder = cache_location(cfg)
    assert folder.parent == tmp_path / "home" / ".cache" / "vadclip" / "features"
    data = load_dataset(cfg)
    assert (folder / "complete").is_file() and len(data.train) > 0


def test_unreadable_cache_is_rebuilt(tmp_path, small_config, caplog):
    caplog.set_level(logging.INFO, logger="vadclip.data.cache")
    cfg = small_config("xd", tmp_path)
    clean = np.array(load_dataset(cfg).test.features.data)  # a copy: the map of a truncated file faults (SIGBUS)
    folder = cache_location(cfg)
    (folder / "test.feat").write_bytes(b"truncated")
    again = load_dataset(cfg)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line == f"feature cache {folder}: test.feat is truncated: 9 bytes, expected " \
                   f"{(folder / 'test.feat').stat().st_size}; rebuilding"
    assert len(_built(caplog)) == 2
    np.testing.assert_array_equal(again.test.features.data, clean)


def test_relative_folders_give_the_same_cache_from_any_working_folder(real, tmp_path, monkeypatch):
    config, lists, features = real
    absolute = cache_location(config())
    monkeypatch.chdir(tmp_path)
    cfg = config(**{"data.lists": os.path.relpath(lists), "data.features": os.path.relpath(features)})
    assert cache_location(cfg) == absolute  # the key holds names relative to the folders
    blob = pickle.dumps(load_dataset(cfg))
    shutil.rmtree(absolute)
    (tmp_path / "trial").mkdir()
    monkeypatch.chdir(tmp_path / "trial")  # where a Ray trial unpickles
    again = pickle.loads(blob)
    assert (absolute / "complete").is_file() and len(again.train) == len(again.train.spec.files["train"])
    np.testing.assert_array_equal(again.train[0], load_dataset(config(**{"data.feature_cache": False})).train[0])
