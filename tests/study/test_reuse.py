"""No trial trained twice: fingerprints of code, data and config, and finding and copying a finished run, on a
real SQLite MLflow store (one per module: creating a store costs seconds)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, RunTag

import vadclip
from study import record
from study.reuse import (
    ReuseError,
    code_digest,
    config_key,
    copy_results,
    data_fingerprint,
    find_reusable,
    trial_fingerprint,
)
from study.tracking import client, ensure_experiment
from vadclip.config import apply_overrides, preset
from vadclip.errors import VadClipError


def test_code_digest_follows_python_files_only(tmp_path):
    package = tmp_path / "vadclip"
    shutil.copytree(Path(vadclip.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest(package)
    assert code_digest(package) == before
    assert code_digest() == code_digest(Path(vadclip.__file__).parent)  # the installed package, cached

    (package / "README.md").write_text("notes\n")
    assert code_digest(package) == before

    losses = package / "losses.py"
    losses.write_text(losses.read_text() + "\n# changed\n")
    assert code_digest(package) != before


def _layout(root: Path) -> tuple[Path, Path]:
    lists, features = root / "list", root / "features"
    (features / "Abuse").mkdir(parents=True)
    lists.mkdir()
    (lists / "xd_CLIP_rgb.csv").write_text("path,label\nfeatures/Abuse/a__0.npy,B1\n")
    np.save(features / "Abuse" / "a__0.npy", np.zeros((3, 4), np.float32))
    np.save(features / "b__0.npy", np.ones((2, 4), np.float32))
    return lists, features


def _xd(lists: Path, features: Path):
    return preset("xd", "official", {"data.lists": str(lists), "data.features": str(features)})


def test_data_fingerprint(tmp_path):
    assert data_fingerprint(preset("synthetic", "official")) == "synthetic"

    lists, features = _layout(tmp_path)
    cfg = _xd(lists, features)
    first = data_fingerprint(cfg)
    assert data_fingerprint(cfg) == first and first != "synthetic"

    feature = features / "Abuse" / "a__0.npy"
    info = feature.stat()
    os.utime(feature, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    touched = data_fingerprint(cfg)
    assert touched != first

    (features / "Abuse" / "notes.txt").write_text("not a feature")  # not read by training: ignored
    assert data_fingerprint(cfg) == touched
    np.save(features / "Abuse" / "c__0.npy", np.zeros((1, 4), np.float32))
    assert data_fingerprint(cfg) != touched

    with_list = data_fingerprint(cfg)
    (lists / "xd_CLIP_rgbtest.csv").write_text("path,label\n")
    assert data_fingerprint(cfg) != with_list

    missing = tmp_path / "nowhere"
    with pytest.raises(ReuseError, match="nowhere") as err:
        data_fingerprint(_xd(lists, missing))
    assert isinstance(err.value, VadClipError) and "data.features" in str(err.value)


def test_trial_fingerprint_sees_results_not_spelling(tmp_path):
    cfg = preset("synthetic", "official")
    fp = trial_fingerprint(cfg, "synthetic", "code")
    assert trial_fingerprint(cfg, "synthetic", "code") == fp
    assert trial_fingerprint(apply_overrides(cfg, {"seed": cfg.seed + 1}), "synthetic", "code") != fp
    assert trial_fingerprint(cfg, "synthetic", "other code") != fp
    assert trial_fingerprint(apply_overrides(cfg, {"device": "cpu"}), "synthetic", "code") != fp

    # 'auto' and the value it resolves to (synthetic is XD-style: A-branch, AP) train the same
    assert cfg.eval.score_branch == "auto" and cfg.eval.selection_metric == "auto"
    resolved = apply_overrides(cfg, {"eval.score_branch": cfg.score_branch,
                                     "eval.selection_metric": cfg.selection_metric})
    assert trial_fingerprint(resolved, "synthetic", "code") == fp
    other_branch = "c" if cfg.score_branch == "a" else "a"
    assert trial_fingerprint(apply_overrides(cfg, {"eval.score_branch": other_branch}), "synthetic", "code") != fp
    assert trial_fingerprint(apply_overrides(cfg, {"eval.max_plot_videos": 9}), "synthetic", "code") == fp

    # the same data in another folder: the data fingerprint stands for it, not the path
    lists, features = _layout(tmp_path)
    xd = _xd(lists, features)
    moved = apply_overrides(xd, {"data.features": str(tmp_path / "elsewhere")})
    assert "data.features" not in config_key(xd) and "data.lists" not in config_key(xd)
    assert trial_fingerprint(moved, "data", "code") == trial_fingerprint(xd, "data", "code")
    assert trial_fingerprint(xd, "data", "code") != trial_fingerprint(xd, "other data", "code")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    first = ensure_experiment(uri, "study-a", root / "artifacts")
    second = ensure_experiment(uri, "study-b", root / "artifacts")
    return uri, first, second


def _run(uri: str, experiment: str, tags: dict[str, str], status: str | None = "FINISHED",
         start: int | None = None) -> str:
    c = client(uri)
    run_id = c.create_run(experiment, start_time=start, tags=tags).info.run_id
    if status is not None:
        c.set_terminated(run_id, status)
    return run_id


def test_find_reusable_takes_finished_originals_across_experiments(store):
    uri, first, second = store
    fp = "f" * 64
    assert find_reusable(uri, fp) is None
    _run(uri, first, {record.FINGERPRINT: fp}, "FAILED")
    _run(uri, first, {record.FINGERPRINT: fp}, None)  # still RUNNING
    _run(uri, second, {record.FINGERPRINT: "0" * 64})
    assert find_reusable(uri, fp) is None

    original = _run(uri, second, {record.FINGERPRINT: fp}, start=2_000)
    assert find_reusable(uri, fp) == original
    assert find_reusable(uri, fp, exclude_run_id=original) is None
    later = _run(uri, first, {record.FINGERPRINT: fp}, start=3_000)
    assert find_reusable(uri, fp) == original  # the earliest-started original
    # a copy started before the original is still not chosen over it
    copy = _run(uri, first, {record.FINGERPRINT: fp, record.REUSED_FROM: original}, start=1_000)
    assert find_reusable(uri, fp) == original
    # ... nor is an earlier copy of a run that no longer exists
    stray = _run(uri, second, {record.FINGERPRINT: fp, record.REUSED_FROM: "0" * 32}, start=500)
    assert find_reusable(uri, fp) == original

    # only copies left (the originals deleted): the earliest copy, or its original when that is usable
    c = client(uri)
    c.delete_run(later)
    c.delete_run(original)
    assert find_reusable(uri, fp) == stray  # its original never existed
    c.delete_run(stray)
    assert find_reusable(uri, fp) == copy  # its original is deleted
    c.restore_run(original)
    c.set_tag(original, record.FINGERPRINT, "moved")  # no longer found by its tag, yet the copy points at it
    assert find_reusable(uri, fp) == original


def test_copy_results_copies_history_artifacts_and_is_idempotent(store, tmp_path):
    uri, first, second = store
    c = client(uri)
    fp = "c" * 64
    source = _run(uri, first, {record.FINGERPRINT: fp, "test_branch": "a"}, None)
    metrics = [Metric("val/ap", 0.5 + step / 10, 1_000 + step, step) for step in range(1, 4)]
    metrics += [Metric("epoch", float(step), 1_000 + step, step) for step in range(1, 4)]
    metrics += [Metric("final/ap", 0.8, 2_000, 3)]
    c.log_batch(source, metrics=metrics)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "scores.txt").write_text("scores\n")
    (tmp_path / "report.json").write_text("{}\n")
    c.log_artifact(source, str(tmp_path / "plots" / "scores.txt"), "plots")
    c.log_artifact(source, str(tmp_path / "report.json"))
    c.set_terminated(source, "FINISHED")

    target = _run(uri, second, {record.FINGERPRINT: fp, "variant": "new"}, None)
    copy_results(uri, source, target)
    copy_results(uri, source, target)  # a retried trial: nothing twice

    for key in ("val/ap", "epoch", "final/ap"):
        want = [(m.step, m.timestamp, m.value) for m in c.get_metric_history(source, key)]
        got = [(m.step, m.timestamp, m.value) for m in c.get_metric_history(target, key)]
        assert sorted(got) == sorted(want) and len(got) == len(want) > 0
    assert len(c.get_metric_history(target, "val/ap")) == 3
    run = c.get_run(target)
    assert run.data.tags[record.REUSED_FROM] == source
    assert run.data.tags["test_branch"] == "a" and run.data.tags["variant"] == "new"
    assert {f.path for f in c.list_artifacts(target)} == {"plots", "report.json"}
    assert [f.path for f in c.list_artifacts(target, "plots")] == ["plots/scores.txt"]
    local = Path(c.download_artifacts(target, "plots/scores.txt", str(tmp_path / "back")))
    assert local.read_text() == "scores\n"

    # a copy of the copy names the original
    third = _run(uri, first, {record.FINGERPRINT: fp}, None)
    copy_results(uri, target, third)
    assert c.get_run(third).data.tags[record.REUSED_FROM] == source
    assert len(c.get_metric_history(third, "epoch")) == 3

    # a copy cut short (one point missing) gets only what it lacks
    partial = _run(uri, first, {record.FINGERPRINT: fp}, None)
    c.log_batch(partial, metrics=metrics[:2], tags=[RunTag("note", "partial")])
    copy_results(uri, source, partial)
    assert sorted(m.step for m in c.get_metric_history(partial, "val/ap")) == [1, 2, 3]
