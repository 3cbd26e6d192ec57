"""A search's confirmation stage (same parent, children tagged by stage, the confirmed table as the headline,
--resume after a kill inside it adds no duplicate run) and trial reuse across studies (no trial trained twice)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from study import stages
from study.record import TrialView
from study.run import RunOptions, run_study
from tests.study.test_run_e2e import TINY, tiny_spec


def _trials(uri: str, name: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return pd.DataFrame()
    return mlflow.search_runs([exp.experiment_id], filter_string="tags.`vadclip.role` = 'trial'")


def test_search_confirm_stage_headline_and_resume_inside_it(tmp_path):
    name = "tiny_confirm"
    raw = {"kind": "search", "description": "window search with confirmation", "preset": "synthetic",
           "metric": "ap", "num_samples": 3, "max_concurrent": 1, "scheduler": {"type": "fifo"},
           "base": {"eval.score_branch": "a", **TINY}, "space": {"model.window": {"choice": [4, 8, 16]}},
           "confirm": {"top": 2, "seeds": 2}}
    spec_path = tmp_path / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "study.run", str(spec_path), "--max-epochs", "1", "--num-cpus", "1"]
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, confirmed = time.time() + 300, 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        try:
            runs = _trials(uri, name)
        except Exception:
            continue
        if len(runs) and "tags.stage" in runs:
            confirmed = int(((runs["tags.stage"] == "confirm") & (runs["status"] == "FINISHED")).sum())
        if confirmed >= 1:
            break
    assert proc.poll() is None, "the study finished before its confirmation stage could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "confirm stage" in err, err[-3000:]
    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    runs = _trials(uri, name)
    search, confirm = runs[runs["tags.stage"] == "search"], runs[runs["tags.stage"] == "confirm"]
    assert len(search) == 3 and set(search["status"]) == {"FINISHED"}
    # top 2 + the base, each on 2 fresh seeds; one run per (row, seed): the resume added no duplicate
    assert len(confirm) == 6 and confirm.groupby(["tags.variant", "tags.seed"]).size().max() == 1
    assert set(confirm["status"]) == {"FINISHED"} and runs["tags.mlflow.parentRunId"].nunique() == 1
    assert set(confirm["tags.seed"]) == {"235", "236"} and set(search["tags.seed"]) == {"234"}
    rows = set(confirm["tags.variant"])
    assert "base" in rows and {r.split(" ")[0] for r in rows - {"base"}} == {"top1", "top2"}
    # the top 2 are the best two distinct configurations of the search by their validation AP
    ranked = search.sort_values(["metrics.final/val/ap", "tags.trial_id"], ascending=[False, True])
    best = list(dict.fromkeys(ranked["params.model.window"]))[:2]
    tops = sorted(confirm.loc[confirm["tags.variant"] != "base", "params.model.window"].unique())
    assert sorted(best) == tops

    # the searcher's Optuna study lives beside the MLflow store, named after the invocation
    import optuna

    parent = mlflow.get_run(runs["tags.mlflow.parentRunId"].iloc[0])
    assert parent.data.tags["optuna.storage"] == f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name=parent.data.tags["optuna.study"], storage=parent.data.tags["optuna.storage"])
    assert len(study.trials) == 3 and {t.params["model.window"] for t in study.trials} <= {4, 8, 16}

    report = (tmp_path / "reports" / f"{name}.md").read_text()
    headline = report.split("## Confirmed on fresh seeds (the headline)", 1)[1].split("##", 1)[0]
    assert "\n| base " in headline and "ΔAP vs base" in headline and "p (Holm)" in headline and "top1" in headline
    assert report.index("Confirmed on fresh seeds") < report.index("search trials by")
    assert "\n| base " in resumed.stdout  # the console shows the confirmed table


def test_identical_trials_are_reused_across_studies_not_trained_again(tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = run_study(str(tiny_spec(tmp_path, "tiny_first")), RunOptions(max_epochs=1, project=tmp_path))
        raw = yaml.safe_load(tiny_spec(tmp_path, "tiny_second").read_text())
        # the same full row under another name, and one new row
        raw["variants"] = [{"name": "gcn", "set": {"model.temporal": "gcn"}},
                           {"name": "LGT again", "set": {"model.temporal": "local+gcn"}}]
        raw["full"] = "LGT again"
        path = tmp_path / "tiny_second.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        second = run_study(str(path), RunOptions(max_epochs=1, project=tmp_path))
        third = run_study(str(path), RunOptions(max_epochs=1, project=tmp_path, reuse=False, seeds=1))
    finally:
        ray.shutdown()
    uri = first["tracking_uri"]
    original = _trials(uri, "tiny_first")
    runs = _trials(uri, "tiny_second")
    by_parent = {p: r for p, r in runs.groupby("tags.mlflow.parentRunId")}
    reused = by_parent[second["parent_run_id"]]
    copies = reused[reused["tags.reused_from"].notna()] if "tags.reused_from" in reused else reused.iloc[:0]
    assert len(copies) == 2 and set(copies["tags.variant"]) == {"LGT again"}  # 2 seeds of the shared row
    lgt = original[original["tags.variant"] == "LGT"].set_index("run_id")
    for _, copy in copies.iterrows():
        source = lgt.loc[copy["tags.reused_from"]]
        assert source["tags.seed"] == copy["tags.seed"]
        assert copy["metrics.final/ap"] == source["metrics.final/ap"]
    # the reused row equals the original row in the reports
    table_first, table_second = first["report"].table, second["report"].table
    assert table_second.loc["LGT again", "ap_mean"] == table_first.loc["LGT", "ap_mean"]
    assert table_second.loc["LGT again", "reused"] == 2 and table_second.loc["gcn", "reused"] == 0
    assert any("Reused trials: 2 of 4 " in note for note in second["report"].notes)  # the md is rewritten below
    forced = by_parent[third["parent_run_id"]]
    assert "tags.reused_from" not in forced or forced["tags.reused_from"].isna().all()  # --no-reuse trains all
    assert len(forced) == 2


@pytest.mark.parametrize("flag", ["--confirm-top", "--confirm-seeds"])
def test_confirm_flags_are_checked(flag, capsys):
    from study.run import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["search_window", flag, "-1"])
    assert "expected an integer" in capsys.readouterr().err


def test_seeds_auto_adds_seeds_until_the_target_or_the_cap(tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        path = tiny_spec(tmp_path, "tiny_auto")
        capped = run_study(str(path), RunOptions(max_epochs=1, project=tmp_path, seeds_auto=True, ci_target=1e-6,
                                                 seeds_cap=3))
        met = run_study(str(path), RunOptions(max_epochs=1, project=tmp_path, seeds_auto=True, mdd_target=1e6,
                                              seeds_cap=3))
    finally:
        ray.shutdown()
    runs = _trials(capped["tracking_uri"], "tiny_auto")
    first = runs[runs["tags.mlflow.parentRunId"] == capped["parent_run_id"]]
    assert sorted(first["tags.seed"].unique()) == ["234", "235", "236"]  # 2 to start, 1 added, then the cap
    assert first.groupby("tags.variant").size().to_dict() == {"LGT": 3, "none": 3}
    assert any("cap 3 reached" in note for note in capped["report"].notes)
    second = runs[runs["tags.mlflow.parentRunId"] == met["parent_run_id"]]
    assert sorted(second["tags.seed"].unique()) == ["234", "235"]  # the target holds at once
    assert any("largest minimum detectable difference" in note and "<= target 1e+06" in note
               for note in met["report"].notes)


def _view(variant: str, seed: int, ap: float, status: str = "FINISHED") -> TrialView:
    return TrialView(f"{variant}{seed}", status, variant, str(seed), "ablation", "", {"final/ap": ap}, {}, {})


def test_the_detectable_difference_rule_is_the_reports_mdd_at_holms_level():
    from scipy import optimize
    from scipy import stats as sp

    rng = np.random.default_rng(7)
    full = rng.normal(0.8, 0.01, 6)
    rows = {"full": full, "a": full + rng.normal(0.0, 0.01, 6), "b": full + rng.normal(0.0, 0.03, 6)}
    trials = [_view(v, 100 + i, float(x)) for v, xs in rows.items() for i, x in enumerate(xs)]
    trials.append(_view("b", 200, 0.1, "FAILED"))  # neither a failed trial nor a seed at the limit counts
    trials.append(_view("a", 106, 0.1))

    def detectable(diff: np.ndarray, alpha: float) -> float:  # the |difference| with 80 % power, by scipy alone
        n, crit = len(diff), sp.t.ppf(1 - alpha / 2, len(diff) - 1)

        def power(d: float) -> float:
            ncp = d * math.sqrt(n)
            return sp.nct.sf(crit, n - 1, ncp) + sp.nct.cdf(-crit, n - 1, ncp) - 0.8
        return optimize.brentq(power, 0.1, 5) * diff.std(ddof=1)

    expected = max(detectable(rows[v] - full, 0.05 / 2) for v in ("a", "b")) * 100
    assert stages.largest_detectable(trials, "full", "ap", 106) == pytest.approx(expected, rel=1e-4)
    assert math.isnan(stages.largest_detectable(trials[:6] + trials[6:7], "full", "ap", 106))  # a row with 1 pair
    rule = stages.SeedsRule(detectable=True, target=expected + 0.01, cap=10)
    assert rule.verdict(rule.measure(trials, "full", "ap", 106), 6, "full", "ap").stop
    assert not stages.SeedsRule(True, expected - 0.01, 10).verdict(expected, 6, "full", "ap").stop
