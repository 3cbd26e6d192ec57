"""Studies on the binary benchmarks' twins (`--dataset sht|ubnormal --lists … --features …`): a report with the
published value beside (keyed by dataset), no mAP column, and UBnormal selecting on its own validation split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from tests.data.test_binary import DIM, FRACTION
from vadclip.data.fullscale import write_full_scale

ROOT = Path(__file__).parents[2]
PUBLISHED = {"sht": 97.49, "ubnormal": 62.32}
FLAGS = [f"model.embed_dim={DIM}", "clip.model=vadclip-tiny", "model.visual_length=64", "optim.batch_size=4"]


def _spec(tmp_path: Path) -> Path:
    paper = {"sht": {"auc": PUBLISHED["sht"]}, "ubnormal": {"auc": PUBLISHED["ubnormal"]}}
    raw = {"name": "tiny_binary", "kind": "ablation", "description": "two rows on a binary benchmark",
           "preset": "synthetic", "metric": "auto", "seeds": 2, "full": "LGT", "resources": {"cpu": 1, "gpu": 0},
           "columns": ["auc", "ap", "map_avg"],
           "variants": [{"name": "none", "set": {"model.temporal": "none"}, "paper": {"ap": 72.22}},
                        {"name": "LGT", "set": {"model.temporal": "local+gcn"}, "paper": paper}]}
    path = tmp_path / "tiny_binary.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("dataset", ["sht", "ubnormal"])
def test_study_on_a_binary_twin_reports_auc_beside_the_published_value(tmp_path, dataset):
    root = tmp_path / "twin"
    write_full_scale(root, f"{dataset}-full", FRACTION, seed=3, dim=DIM)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "study.run", str(_spec(tmp_path)), "--dataset", dataset, "--lists",
           str(root / "list"), "--features", str(root / "features"), "--max-epochs", "1", "--num-cpus", "2",
           "--set", *FLAGS]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]

    table = pd.read_csv(tmp_path / "reports" / "tiny_binary.csv", index_col="variant")
    assert (table["runs"] == 2).all() and table["auc_mean"].notna().all()
    # the published value of this dataset beside the row that quotes it; an unkeyed (XD) number is not shown
    assert table.loc["LGT", "auc_paper"] == PUBLISHED[dataset] and "ap_paper" not in table
    assert not [c for c in table if c.startswith("map")]  # binary: no classes, no mAP@IoU
    md = (tmp_path / "reports" / "tiny_binary.md").read_text()
    assert "mAP" not in md and "third-party re-run" in md  # no mAP column or protocol note; the value's note

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")  # not the global URI other tests rely on
    exp = client.get_experiment_by_name("tiny_binary")
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`vadclip.role` = 'trial'")
    runs = pd.DataFrame([{**{f"tags.{k}": v for k, v in r.data.tags.items()},
                          **{f"params.{k}": v for k, v in r.data.params.items()},
                          **{f"metrics.{k}": v for k, v in r.data.metrics.items()}} for r in trials])
    assert set(runs["tags.selection_metric"]) == {"auc"} and set(runs["params.data.dataset"]) == {dataset}
    # ubnormal selects on its validation videos' frame ground truth, not on held-out training videos
    assert set(runs["params.data.val_fraction"]) == ({"0.0"} if dataset == "ubnormal" else {"0.1"})
    assert runs["metrics.final/val/auc"].notna().all()
