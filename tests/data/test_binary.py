"""The binary benchmarks `sht` (ShanghaiTech weak split) and `ubnormal` (UBnormal, with its own validation split):
their twins written by `python -m vadclip.data.synthetic --scale sht-full|ubnormal-full --fraction F`, read back by
`load_dataset`, trained on briefly, and bad inputs reported in one line naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from vadclip.cli import infer_dataset
from vadclip.config import ConfigError, preset
from vadclip.data import DataError, load_dataset
from vadclip.data.conventions import eval_files, list_files
from vadclip.data.fullscale import main as twin_main
from vadclip.data.fullscale import video_counts, write_full_scale
from vadclip.train import fit

DIM = 32
FRACTION = 0.1  # sht: 24 train / 20 test videos; ubnormal: 27 train / 7 val / 21 test
TINY = {"model.embed_dim": DIM, "clip.model": "vadclip-tiny", "model.visual_length": 64, "optim.batch_size": 4,
        "optim.epochs": 1, "eval.eval_every_samples": 0, "eval.eval_every_steps": 0}


@pytest.fixture(scope="module", params=["sht", "ubnormal"])
def twin(request, tmp_path_factory) -> tuple[str, Path]:
    """(dataset, root) of a small twin, written once per dataset."""
    root = tmp_path_factory.mktemp(f"twin-{request.param}") / "layout"
    write_full_scale(root, f"{request.param}-full", FRACTION, seed=3, dim=DIM)
    return request.param, root


def _config(dataset: str, root: Path, **overrides):
    return preset(dataset, overrides={**TINY, "data.lists": str(root / "list"), "data.features": str(root / "features"),
                                      **overrides})


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


def test_twin_loads_with_binary_labels_and_frame_gt(twin):
    dataset, root = twin
    counts = video_counts(f"{dataset}-full", FRACTION)
    data = load_dataset(_config(dataset, root))
    assert data.class_codes == ["Normal", "Anomaly"] and data.class_prompts == ["normal", "anomaly"]
    assert data.train_labels.shape[1] == 2 and data.feature_dim == DIM
    test = data.test
    assert len(test) == counts["test_normal"] + counts["test_abnormal"]
    assert int(test.is_abnormal.sum()) == counts["test_abnormal"]
    assert test.is_abnormal[:counts["test_abnormal"]].all()  # abnormal videos first, as the weak-split lists
    lengths = np.asarray(test.features.lengths)
    assert test.frame_gt is not None and test.segments is not None and test.segment_labels is not None
    assert len(test.frame_gt) == 16 * int(lengths.sum())
    start = 0
    for i, t in enumerate(lengths):  # 16 frames per snippet, per video, in list order
        gt = test.frame_gt[start:start + 16 * t]
        start += 16 * t
        if test.is_abnormal[i]:
            assert gt.any() and set(test.segment_labels[i]) == {"Anomaly"}
        else:
            assert not gt.any() and test.segments[i] == [(0, 16 * int(t))] and test.segment_labels[i] == ["A"]
    assert data.val is not None
    if dataset == "ubnormal":  # its own validation split with frame gt; every training video trained on
        assert len(data.train_names) == counts["train_normal"] + counts["train_abnormal"]
        assert len(data.val) == counts["val_normal"] + counts["val_abnormal"]
        assert data.val.frame_gt is not None
        assert len(data.val.frame_gt) == 16 * int(np.asarray(data.val.features.lengths).sum())
        assert not set(data.val.names) & (set(data.train_names) | set(test.names))
    else:  # held-out training videos, video-level validation
        assert data.val.frame_gt is None and not set(data.val.names) & set(data.train_names)


def test_fit_on_twin_reports_auc_ap_and_no_map(twin, tmp_path):
    dataset, root = twin
    cfg = _config(dataset, root)
    assert cfg.selection_metric == "auc" and cfg.score_branch == "c" and cfg.eval.selection == "val"
    res = fit(cfg, out_dir=tmp_path / "out", progress=False)
    test = res.metrics["test"]
    assert 0 <= test["auc"] <= 1 and 0 <= test["ap"] <= 1 and "c_auc" in test and "a_auc" in test
    assert not [k for k in test if "map" in k]  # binary: no classes to localise
    assert "val/auc" in res.history[-1]


def test_infer_dataset_from_the_twin_lists(twin, tmp_path):
    dataset, root = twin
    assert infer_dataset(None, str(root / "list")) == dataset
    both = _copy(root, tmp_path) / "list"
    (both / list_files("ucf")["train"]).write_text("path,label\n")
    with pytest.raises(ConfigError, match="expected exactly one"):
        infer_dataset(None, str(both))


@pytest.mark.parametrize("split", ["test", "val"])
def test_ground_truth_shorter_than_the_features_names_the_file(twin, tmp_path, split):
    dataset, root = twin
    if split == "val" and dataset == "sht":
        pytest.skip("sht has no validation list")
    copy = _copy(root, tmp_path)
    gt = copy / "list" / eval_files(dataset, split)["frame_gt"]
    np.save(gt, np.load(gt)[:-16])
    with pytest.raises(DataError, match=rf"^{gt}: \d+ frames, expected \d+ \(16 per snippet"):
        load_dataset(_config(dataset, copy))


@pytest.mark.parametrize("split", ["train", "test", "val"])
def test_listed_video_missing_on_disk_names_the_list(twin, tmp_path, split):
    dataset, root = twin
    if split == "val" and dataset == "sht":
        pytest.skip("sht has no validation list")
    copy = _copy(root, tmp_path)
    csv = copy / "list" / (list_files(dataset)["train"] if split == "train" else eval_files(dataset, split)["list"])
    gone = csv.read_text().splitlines()[2].split(",")[0].rsplit("/", 1)[1]
    next((copy / "features").rglob(gone)).unlink()
    with pytest.raises(DataError, match=rf"^{csv}:3: feature file .*{gone}.* not found"):
        load_dataset(_config(dataset, copy))


def test_ubnormal_refuses_held_out_training_videos(twin):
    dataset, root = twin
    if dataset != "ubnormal":
        pytest.skip("only ubnormal has its own validation split")
    with pytest.raises(DataError, match="data.val_fraction=0.1: UBnormal validates on its own list"):
        load_dataset(_config(dataset, root, **{"data.val_fraction": 0.1}))


def test_cli_writes_the_ubnormal_twin(tmp_path, capsys):
    assert twin_main(["--scale", "ubnormal-full", str(tmp_path / "ub"), "--fraction", "0.02", "--dim", "8"]) == 0
    assert "val: 4 videos (2 normal, 2 abnormal) x 1 crops" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "ub" / "list").iterdir()}
    assert {"ubnormal_CLIP_rgb.csv", "ubnormal_CLIP_rgbval.csv", "ubnormal_CLIP_rgbtest.csv", "gt_ubnormal.npy",
            "gt_ubnormal_val.npy", "gt_segment_ubnormal_val.npy", "gt_label_ubnormal_val.npy"} <= names
