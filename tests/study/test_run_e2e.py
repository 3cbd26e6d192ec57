"""End to end on a local Ray instance: real trials, a real MLflow SQLite store, real reports."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from study import spec as specs
from study.run import RunOptions, run_study

TINY = {"data.synthetic.train_normal": 8, "data.synthetic.train_abnormal": 8, "data.synthetic.test_normal": 4,
        "data.synthetic.test_abnormal": 4, "data.synthetic.max_length": 150, "model.embed_dim": 32,
        "model.visual_length": 64, "optim.batch_size": 8, "data.val_fraction": 0.25}


def tiny_spec(tmp_path: Path, name: str = "tiny_ablation") -> Path:
    raw = {"name": name, "kind": "ablation", "description": "two rows of Table 5", "preset": "synthetic",
           "metric": "ap", "seeds": 2, "full": "LGT", "resources": {"cpu": 1, "gpu": 0}, "max_failures": 1,
           "base": {"eval.score_branch": "a", **TINY},
           "variants": [{"name": "none", "set": {"model.temporal": "none"}, "paper": {"ap": 72.22}},
                        {"name": "LGT", "set": {"model.temporal": "local+gcn"}, "paper": {"ap": 84.51}}]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def children(uri: str, experiment: str, parent: str):
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_tiny_study_parent_children_and_report_match_mlflow(tmp_path, ray_local):
    spec_path = tiny_spec(tmp_path)
    out = run_study(str(spec_path), RunOptions(max_epochs=1, project=tmp_path, verbose=0))
    uri = out["tracking_uri"]
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("tiny_ablation")
    parents = mlflow.search_runs([exp.experiment_id], filter_string="tags.`vadclip.role` = 'parent'")
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    runs = children(uri, "tiny_ablation", out["parent_run_id"])
    assert len(runs) == 4 and set(runs["status"]) == {"FINISHED"}
    # the cost on the parent: the children's run times summed, every trial kept
    seconds = ((runs["end_time"] - runs["start_time"]).dt.total_seconds()).sum()
    assert parents.iloc[0]["metrics.cost/trial_seconds"] == pytest.approx(seconds, abs=1e-3)
    assert parents.iloc[0]["metrics.cost/trial_seconds/kept"] == pytest.approx(seconds, abs=1e-3)
    assert parents.iloc[0]["metrics.cost/one_more_seed_seconds"] == pytest.approx(seconds / 4 * 2, abs=1e-3)
    assert parents.iloc[0]["metrics.cost/wall_seconds"] > 0
    assert set(runs["tags.variant"]) == {"none", "LGT"} and set(runs["tags.seed"]) == {"234", "235"}
    assert set(runs["params.model.temporal"]) == {"none", "local+gcn"}
    assert runs["metrics.final/ap"].notna().all() and runs["metrics.val/ap"].notna().all()
    client = mlflow.tracking.MlflowClient(uri)
    history = client.get_metric_history(runs.iloc[0]["run_id"], "train/loss")
    epochs = client.get_metric_history(runs.iloc[0]["run_id"], "epoch")  # x-axis: the global optimisation step
    assert [m.value for m in epochs] == [1] and [m.step for m in history] == [m.step for m in epochs] != [1]
    table = out["report"].table
    expected = runs.groupby("tags.variant")["metrics.final/ap"].agg(["mean", "std", "count"])
    for variant, row in expected.iterrows():
        assert table.loc[variant, "ap_mean"] == pytest.approx(row["mean"])
        assert table.loc[variant, "ap_std"] == pytest.approx(row["std"])
        assert table.loc[variant, "ap_n"] == row["count"]
    assert "data:image/png;base64," in out["report"].html.read_text()  # the plot inside the page MLflow shows
    # each run's test scores are stored: its video bootstrap can be recomputed from MLflow alone
    from vadclip.bootstrap import BOOTSTRAP_FILE, TEST_SCORES_FILE, load_bootstrap, load_test_scores, video_bootstrap

    run = runs.iloc[0]
    scores = mlflow.artifacts.download_artifacts(run_id=run["run_id"], artifact_path=TEST_SCORES_FILE,
                                                 dst_path=str(tmp_path / "dl"))
    stored = load_bootstrap(mlflow.artifacts.download_artifacts(run_id=run["run_id"], artifact_path=BOOTSTRAP_FILE,
                                                                dst_path=str(tmp_path / "dl")))
    again = video_bootstrap(load_test_scores(scores), seed=int(run["tags.seed"]))
    for m in stored:  # NaN where a resample holds one class only, in both
        np.testing.assert_array_equal(again[m], stored[m])
    assert table.loc["LGT", "ap_boot_low"] <= table.loc["LGT", "ap_mean"] <= table.loc["LGT", "ap_boot_high"]
    md = (tmp_path / "reports" / "tiny_ablation.md").read_text()
    assert "LGT" in md and "84.51" in md and "average_precision_score" in md
    tex = (tmp_path / "reports" / "tiny_ablation.tex").read_text()
    assert tex.count("\\toprule") == 3 and "under each selection protocol" in tex  # compact, details, protocols
    # Tune reuses the worker processes: 4 trials, 2 slots, at most 2 processes importing torch and building CLIP
    import json

    pids = {json.loads(f.read_text().splitlines()[0])["pid"] for f in Path(out["storage"]).glob("*/result.json")}
    assert len(pids) <= 2 and (runs["metrics.final/time/fit_seconds"] > 0).all()


def test_failing_trial_is_retried_then_counted_and_study_completes(tmp_path, ray_local):
    spec_path = tiny_spec(tmp_path, "tiny_failure")
    out = run_study(str(spec_path), RunOptions(max_epochs=1, seeds=1, project=tmp_path, verbose=0,
                                               fail_at_epoch={"none": 1}))
    assert out["failed"] == 1
    runs = children(out["tracking_uri"], "tiny_failure", out["parent_run_id"])
    assert len(runs) == 2  # the retry continued the same child run, no duplicate
    status = dict(zip(runs["tags.variant"], runs["status"]))
    assert status == {"none": "FAILED", "LGT": "FINISHED"}
    assert out["report"].table.loc["none", "failed"] == 1
    assert "Failed trials (status FAILED): 1 of 2" in out["report"].md.read_text()


def test_interrupted_study_resumes_with_one_child_per_trial(tmp_path):
    spec_path = tiny_spec(tmp_path, "tiny_resume")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "study.run", str(spec_path), "--max-epochs", "2", "--seeds", "3",
           "--num-cpus", "1"]
    uri = f"sqlite:///{tmp_path / 'studies.db'}"  # not the default: --resume must find it on its own
    proc = subprocess.Popen([*cmd, "--tracking-uri", uri], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    finished = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(2)
        try:
            mlflow.set_tracking_uri(uri)
            exp = mlflow.get_experiment_by_name("tiny_resume")
            if exp is not None:
                runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.`vadclip.role` = 'trial'")
                finished = int((runs["status"] == "FINISHED").sum()) if len(runs) else 0
        except Exception:
            continue
        if finished >= 2:
            break
    assert proc.poll() is None, "the study finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    # interrupted: exit 130, no report, the parent left KILLED for --resume, the command to continue printed
    assert proc.returncode == 130, err[-3000:]
    assert "tiny_resume.yaml --resume" in err and "no report written" in err
    assert not (tmp_path / "reports").exists()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("tiny_resume")
    parents = mlflow.search_runs([exp.experiment_id], filter_string="tags.`vadclip.role` = 'parent'")
    assert list(parents["status"]) == ["KILLED"]
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.`vadclip.role` = 'trial'")
    assert "tags.stopped_early" not in runs or runs["tags.stopped_early"].isna().all()  # not a scheduler decision
    # the message counts what really ended: the stopped and never-started trials are not "done"
    counts = re.search(r"(\d+)/6 trials ended \((\d+) done, 0 failed\), (\d+) interrupted or never started", err)
    assert counts is not None, err[-2000:]
    done = int(counts[2])
    # (a trial whose run had just FINISHED when Tune stopped it is resumed, and counted with the interrupted)
    assert done <= int((runs["status"] == "FINISHED").sum()) and done + int(counts[3]) == 6
    # the printed command, as printed: it restores the invocation's flags (2 epochs, 3 seeds)
    printed = re.search(r"Continue it with: (python -m study\.run \S+ --resume)", err)
    assert printed is not None
    resumed = subprocess.run([sys.executable, *printed[1].split()[1:]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("tiny_resume")
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.`vadclip.role` = 'trial'")
    assert len(runs) == 6 and runs["tags.trial_id"].nunique() == 6
    assert set(runs["status"]) == {"FINISHED"}
    assert set(runs["params.optim.epochs"]) == {"2"}
    assert "tags.stopped_early" not in runs or runs["tags.stopped_early"].isna().all()
    assert "tags.interrupted" not in runs or runs["tags.interrupted"].isna().all()
    parents = mlflow.search_runs([exp.experiment_id], filter_string="tags.`vadclip.role` = 'parent'")
    assert list(parents["status"]) == ["FINISHED"]
    assert not (tmp_path / "mlruns.db").exists()


@pytest.mark.parametrize("name", sorted(specs.available()))
def test_every_study_yaml_loads_and_dry_runs(name, capsys, tmp_path):
    out = run_study(name, RunOptions(dry_run=True, project=tmp_path))
    assert out["dry_run"] and len(out["trials"]) >= 1
    assert f"study {name}" in capsys.readouterr().out
    assert not (tmp_path / "mlruns.db").exists()  # a dry run writes nothing


def test_trial_failing_before_its_run_exists_counts_as_failed(tmp_path, ray_local):
    spec_path = tiny_spec(tmp_path, "tiny_early_failure")
    out = run_study(str(spec_path), RunOptions(max_epochs=1, seeds=1, project=tmp_path, verbose=0,
                                               fail_at_epoch={"none": 0}))  # 0: before the MLflow child
    assert out["failed"] == 1
    runs = children(out["tracking_uri"], "tiny_early_failure", out["parent_run_id"])
    status = dict(zip(runs["tags.variant"], runs["status"]))
    assert status == {"none": "FAILED", "LGT": "FINISHED"}
    failed = runs[runs["status"] == "FAILED"].iloc[0]
    assert "injected failure" in failed["tags.error"] and failed["tags.seed"] == "234"
    assert out["report"].table.loc["none", "failed"] == 1
    assert "Failed trials (status FAILED): 1 of 2" in out["report"].md.read_text()


def test_cli_prints_a_short_log_and_an_honest_report(tmp_path):
    spec_path = tiny_spec(tmp_path, "tiny_cli")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-m", "study.run", str(spec_path), "--max-epochs", "1", "--seeds", "1",
                           "--num-cpus", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) < 45, "\n".join(lines)
    assert "Trial status" not in proc.stdout and "Checkpoint successfully created" not in proc.stdout + proc.stderr
    assert proc.stderr.count("RANDOM weights") == 1  # the banner once per study, not per trial
    assert sum("trials ended" in line for line in lines) >= 1  # the progress line
    md = tmp_path / "reports" / "tiny_cli.md"
    text = md.read_text()
    assert "Synthetic data: the paper's values are for the real dataset" in text
    assert "partial results" not in text  # written at the study's end: complete
    assert "Seeds: 1 per variant planned; 1 seen (234)" in text
    assert str(tmp_path) not in text and "sqlite:///mlruns.db" in text  # no machine path
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in (tmp_path / "reports").iterdir())


def test_failure_after_the_parent_exists_marks_it_failed_and_keeps_the_resume_pointer(tmp_path, ray_local,
                                                                                      monkeypatch):
    import json

    from study import run as run_module

    spec_path = tiny_spec(tmp_path, "tiny_broken")
    state = tmp_path / ".study_state" / "tiny_broken.json"
    state.parent.mkdir()
    earlier = {"run_name": "tiny_broken-earlier", "parent_run_id": "abc", "storage": str(tmp_path),
               "experiment_id": "1", "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    state.write_text(json.dumps(earlier))

    def broken(*args, **kwargs):  # a fault between the parent's creation and Tune's first trial
        raise OSError("disk full")

    monkeypatch.setattr(run_module, "_tune", broken)
    with pytest.raises(OSError, match="disk full"):
        run_study(str(spec_path), RunOptions(max_epochs=1, seeds=1, project=tmp_path))
    assert json.loads(state.read_text()) == earlier  # --resume still targets the last resumable invocation
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = mlflow.get_experiment_by_name("tiny_broken")
    parents = mlflow.search_runs([exp.experiment_id], filter_string="tags.`vadclip.role` = 'parent'")
    assert list(parents["status"]) == ["FAILED"]


def test_fused_study_has_the_unfused_rows_runs_and_params(tmp_path, ray_local):
    """fuse_seeds 2: one Tune trial trains both seeds of a row, each seed still its own child run with the same
    params, tags and artifacts as an unfused trial (plus `fused_group`); the report has the same rows and n."""
    from study.record import FUSED_GROUP

    for folder in ("plain", "fused"):
        (tmp_path / folder).mkdir()
    plain = run_study(str(tiny_spec(tmp_path / "plain", "tiny_unfused")),
                      RunOptions(max_epochs=2, project=tmp_path / "plain", verbose=0, fuse_seeds=1, reuse=False))
    fused = run_study(str(tiny_spec(tmp_path / "fused", "tiny_fused")),
                      RunOptions(max_epochs=2, project=tmp_path / "fused", verbose=0, fuse_seeds=2, reuse=False))
    a = children(plain["tracking_uri"], "tiny_unfused", plain["parent_run_id"])
    b = children(fused["tracking_uri"], "tiny_fused", fused["parent_run_id"])
    assert len(a) == len(b) == 4 and set(b["status"]) == {"FINISHED"}
    assert b["tags.trial_id"].nunique() == 2 and set(b[f"tags.{FUSED_GROUP}"]) == {"234,235"}
    assert FUSED_GROUP not in {c[len("tags."):] for c in a.columns if c.startswith("tags.")}
    for column in ("params", "metrics"):  # the same params (values too, but for the seed) and metrics
        assert {c for c in a.columns if c.startswith(column)} == {c for c in b.columns if c.startswith(column)}
    params = [c for c in a.columns if c.startswith("params.")]
    key = ["tags.variant", "tags.seed"]
    assert a.sort_values(key)[params].values.tolist() == b.sort_values(key)[params].values.tolist()
    client = mlflow.tracking.MlflowClient(fused["tracking_uri"])
    for run_id in b["run_id"]:
        names = {f.path for f in client.list_artifacts(run_id)}
        assert {"config.json", "metrics.json", "history.json", "scores.png"} <= names
        assert len(client.get_metric_history(run_id, "epoch")) == 2
    t1, t2 = plain["report"].table, fused["report"].table
    assert list(t1.index) == list(t2.index) and list(t1["ap_n"]) == list(t2["ap_n"]) == [2, 2]
    assert "Fused seeds:" in fused["report"].md.read_text() and "groups 234,235" in fused["report"].md.read_text()
    assert "Fused seeds:" not in plain["report"].md.read_text()
    # the fused seeds follow the lone ones; after two epochs they differ only by rounding drift
    np.testing.assert_allclose(a.sort_values(key)["metrics.train/loss"], b.sort_values(key)["metrics.train/loss"],
                               rtol=1e-2)


def test_fused_trial_failing_fails_every_seed_of_its_group(tmp_path, ray_local):
    spec_path = tiny_spec(tmp_path, "tiny_fused_failure")
    out = run_study(str(spec_path), RunOptions(max_epochs=1, project=tmp_path, verbose=0, fuse_seeds=2,
                                               fail_at_epoch={"none": 1}))
    assert out["failed"] == 1
    runs = children(out["tracking_uri"], "tiny_fused_failure", out["parent_run_id"])
    assert len(runs) == 4  # the retry continued both seeds' runs, no duplicate
    status = {(v, s): st for v, s, st in zip(runs["tags.variant"], runs["tags.seed"], runs["status"])}
    assert status == {("none", "234"): "FAILED", ("none", "235"): "FAILED",
                      ("LGT", "234"): "FINISHED", ("LGT", "235"): "FINISHED"}
    assert runs[runs["status"] == "FAILED"]["tags.error"].str.contains("injected failure").all()
    assert out["report"].table.loc["none", "failed"] == 2
