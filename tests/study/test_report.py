"""study.report on runs written straight into a temporary SQLite MLflow store (no Ray, no training)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats
from sqlalchemy import event
from sqlalchemy.engine import Engine

from study import report
from study.report.notes import AP_NOTE
from study.report.search import param_importances, status_counts
from study.spec import parse
from vadclip.io import write_atomically

ABLATION = {
    "name": "ablation_t", "kind": "ablation", "description": "Test ablation (LGT rows)", "metric": "ap",
    "seeds": 3, "paper_table": 5, "full": "LGT-Adapter",
    "variants": [
        {"name": "Baseline", "set": {"model.temporal": "none"}, "paper": {"ap": 72.22, "map_avg": 15.64}},
        {"name": "LGT-Adapter", "set": {"model.temporal": "local+gcn"}, "paper": {"ap": 84.51, "map_avg": 24.70}},
    ],
}
SEARCH = {
    "name": "search_t", "kind": "search", "description": "Test search", "metric": "ap", "num_samples": 6,
    "space": {"model.window": {"choice": [4, 8, 16]}, "loss.cts_weight": {"loguniform": [1.0e-5, 1.0]}},
}
# seed -> (auc, ap, ano_auc, map_avg); Baseline's seeds are logged out of order so pairing must use the tag
RUNS = {
    "Baseline": {2: (0.92, 0.72, 0.61, 15.0), 0: (0.90, 0.70, 0.60, 14.0), 1: (0.91, 0.74, 0.62, 16.0)},
    "LGT-Adapter": {0: (0.88, 0.84, 0.70, 24.0), 1: (0.89, 0.85, 0.71, 25.5), 2: (0.87, 0.86, 0.72, 23.0)},
}
TRIALS = [  # (window, cts_weight, final ap) of the search's finished trials
    (4, 1e-4, 0.80), (16, 1e-2, 0.65), (8, 3e-5, 0.78), (16, 0.5, 0.60),
]
TRIAL_TAGS = {"dataset": "synthetic", "selection": "val", "score_branch": "a", "map_protocol": "official"}


def _parent(c: MlflowClient, exp: str, name: str, kind: str, status: str, start: int) -> str:
    tags = {"vadclip.role": "parent", "study": name, "study.kind": kind, "code_version": "abc1234", **TRIAL_TAGS}
    run = c.create_run(exp, start_time=start, tags=tags)
    c.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _trial(c: MlflowClient, exp: str, parent: str, variant: str, seed: int, final: dict[str, float],
           params: dict[str, object], status: str = "FINISHED", epochs: int = 4, tags: dict | None = None) -> str:
    run = c.create_run(exp, tags={"mlflow.parentRunId": parent, "vadclip.role": "trial", "variant": variant,
                                  "seed": str(seed), "trial_id": f"{variant}_{seed}", **TRIAL_TAGS, **(tags or {})})
    now = int(time.time() * 1000)
    metrics = [Metric("epoch", float(e), now, e) for e in range(1, epochs + 1)]
    metrics += [Metric("train/loss", 1.0 / e, now, e) for e in range(1, epochs + 1)]
    metrics += [Metric(f"final/{k}", v, now, epochs) for k, v in final.items()]
    c.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    c.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _final(auc: float, ap: float, ano_auc: float, map_avg: float) -> dict[str, float]:
    return {"auc": auc, "ap": ap, "ano_auc": ano_auc, "map_avg": map_avg, "map_iou0.1": map_avg + 5,
            "map_iou0.5": map_avg - 5, "best_epoch": 3.0}


def _no_fsync(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=OFF")
    cursor.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One SQLite store with an ablation, a search and an all-failed experiment. MLflow creates it through ~50
    migrations, each committed with an fsync: without fsync (a throwaway file) that takes 1/3 of the time."""
    event.listen(Engine, "connect", _no_fsync)
    try:
        yield _fill_store(tmp_path_factory.mktemp("mlflow"))
    finally:
        event.remove(Engine, "connect", _no_fsync)


def _fill_store(root: Path) -> dict[str, str]:
    uri = f"sqlite:///{root / 'mlruns.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("ablation_t", artifact_location=(root / "artifacts").as_uri())
    now = int(time.time() * 1000)
    old = _parent(c, exp, "ablation_t", "ablation", "FINISHED", now - 60_000)
    _trial(c, exp, old, "Baseline", 0, _final(0.5, 0.5, 0.5, 5.0), {"model.temporal": "none"})
    parent = _parent(c, exp, "ablation_t", "ablation", "FINISHED", now)
    _parent(c, exp, "ablation_t", "ablation", "FAILED", now + 60_000)  # newer but failed: not reported
    for variant, seeds in RUNS.items():
        # the trial's own config says which mAP protocol it used, whatever the study-wide tag says
        params = {"model.temporal": "none", "eval.map_protocol": "official"} if variant == "Baseline" else \
            {"model.temporal": "local+gcn", "eval.map_protocol": "paper"}
        for seed, values in seeds.items():
            _trial(c, exp, parent, variant, seed, _final(*values), params)
    _trial(c, exp, parent, "Baseline", 3, {}, {"model.temporal": "none"}, status="FAILED", epochs=1)

    sexp = c.create_experiment("search_t", artifact_location=(root / "artifacts").as_uri())
    sparent = _parent(c, sexp, "search_t", "search", "FINISHED", now)
    c.log_param(sparent, "study.trials", 7)  # a --num-samples override: the YAML says 6
    for i, (window, weight, ap) in enumerate(TRIALS):
        _trial(c, sexp, sparent, "search", i, _final(0.9, ap, 0.6, 20.0 + i),
               {"model.window": window, "loss.cts_weight": weight})
    _trial(c, sexp, sparent, "search", 10, {}, {"model.window": 4, "loss.cts_weight": 0.1}, status="KILLED",
           epochs=1, tags={"stopped_early": "true"})
    _trial(c, sexp, sparent, "search", 11, {}, {"model.window": 8, "loss.cts_weight": 0.2}, status="FAILED",
           epochs=2)

    empty = c.create_experiment("empty_t", artifact_location=(root / "artifacts").as_uri())
    eparent = _parent(c, empty, "empty_t", "ablation", "FINISHED", now)
    _trial(c, empty, eparent, "Baseline", 0, {}, {"model.temporal": "none"}, status="FAILED", epochs=1)
    return {"uri": uri, "parent": parent, "old": old, "search_parent": sparent}


@pytest.fixture(scope="module")
def ablation(store: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> report.ReportFiles:
    spec = parse(ABLATION, Path("ablation_t.yaml"))
    return report.build_report(spec, store["uri"], tmp_path_factory.mktemp("reports"))


def _search_runs(uri: str, monkeypatch: pytest.MonkeyPatch, experiment: str, parent: str) -> pd.DataFrame:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # an earlier test's set_tracking_uri outranks the environment
    return mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


# ---------------------------------------------------------------- ablation


def test_ablation_writes_every_file(ablation: report.ReportFiles) -> None:
    for path in (ablation.md, ablation.tex, ablation.csv, *ablation.plots):
        assert path.is_file() and path.stat().st_size > 0
    assert ablation.plots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(ablation.md.parent.glob("*.tmp"))  # no temporary files left behind


def test_ablation_table_equals_independent_groupby(ablation: report.ReportFiles, store: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _search_runs(store["uri"], monkeypatch, "ablation_t", store["parent"])
    finished = runs[runs["status"] == "FINISHED"]
    table = ablation.table
    assert list(table.index) == ["Baseline", "LGT-Adapter"]  # spec order
    for metric in ("auc", "ap", "ano_auc", "map_avg", "map_iou0.1", "map_iou0.5"):
        expected = finished.groupby("tags.variant")[f"metrics.final/{metric}"].agg(["mean", "std", "count"])
        pd.testing.assert_series_equal(table[f"{metric}_mean"], expected["mean"].reindex(table.index),
                                       check_names=False, check_index_type=False)
        pd.testing.assert_series_equal(table[f"{metric}_std"], expected["std"].reindex(table.index),
                                       check_names=False, check_index_type=False)
        assert table[f"{metric}_n"].tolist() == expected["count"].reindex(table.index).tolist()
    assert table.loc["LGT-Adapter", "ap_mean"] == pytest.approx(0.85)  # fractions, not percent


def test_latest_finished_parent_and_explicit_parent(store: dict[str, str], tmp_path: Path) -> None:
    spec = parse(ABLATION, Path("ablation_t.yaml"))
    old = report.build_report(spec, store["uri"], tmp_path, parent_run_id=store["old"])
    assert old.table.loc["Baseline", "ap_mean"] == pytest.approx(0.5)
    assert old.table.loc["LGT-Adapter", "ap_n"] == 0  # a row without runs stays, empty
    assert "LGT-Adapter (full)" in old.text and store["old"] in old.md.read_text()
    with pytest.raises(report.ReportError, match="not a parent run"):
        report.build_report(spec, store["uri"], tmp_path / "x", parent_run_id=store["search_parent"])
    assert not (tmp_path / "x").exists()


def test_failed_trials_counted(ablation: report.ReportFiles) -> None:
    assert ablation.table.loc["Baseline", "failed"] == 1
    assert ablation.table.loc["LGT-Adapter", "failed"] == 0
    assert ablation.table.loc["Baseline", "ap_n"] == 3  # the failed seed is not averaged
    assert "Failed trials (status FAILED): 1 of 7" in ablation.md.read_text()


def test_paired_t_test_matches_scipy(ablation: report.ReportFiles) -> None:
    seeds = [0, 1, 2]
    base = [RUNS["Baseline"][s][1] for s in seeds]
    full = [RUNS["LGT-Adapter"][s][1] for s in seeds]
    expected = stats.ttest_rel(base, full).pvalue
    row = ablation.table.loc["Baseline"]
    assert row["ap_p"] == pytest.approx(expected)
    assert row["ap_delta"] == pytest.approx(sum(base) / 3 - sum(full) / 3)
    assert row["ap_pairs"] == 3
    assert pd.isna(ablation.table.loc["LGT-Adapter", "ap_p"])  # the reference row
    assert f"{expected:.3f}" in ablation.md.read_text()


def test_bold_marks_best_mean_per_metric(ablation: report.ReportFiles) -> None:
    md = ablation.md.read_text()
    assert "**85.00 ± 1.00 [" in md  # AP: the full model is best (with its t-interval)
    assert "**91.00 ± 1.00 [" in md  # AUC: the baseline is best
    assert "**72.00 ± 2.00" not in md
    assert r"\textbf{85.00 $\pm$ 1.00 [" in ablation.tex.read_text()


def test_paper_values_and_protocol_footer(ablation: report.ReportFiles) -> None:
    md = ablation.md.read_text()
    assert "AP (paper)" in md and "84.51" in md and "15.64" in md
    assert AP_NOTE in md
    assert ("mAP protocol: official (all test videos and classes incl. normal); except LGT-Adapter: paper "
            "(abnormal videos and classes only)") in md
    assert "model selection on val" in md and "Dataset: synthetic" in md


def test_csv_is_machine_readable(ablation: report.ReportFiles) -> None:
    csv = pd.read_csv(ablation.csv, index_col="variant")
    for column in ("ap_mean", "ap_std", "ap_n", "ap_paper", "ap_p", "ap_delta", "map_iou0.1_mean", "failed"):
        assert column in csv
    assert csv.loc["Baseline", "ap_mean"] == pytest.approx(0.72)


def test_tex_is_booktabs_and_escaped(ablation: report.ReportFiles) -> None:
    tex = ablation.tex.read_text()
    for token in (r"\begin{tabular}", r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}"):
        assert token in tex
    body = tex[tex.index(r"\toprule"):]
    assert not re.search(r"(?<!\\)[_%]", body)  # every _ and % in the table and notes is escaped
    header = body.splitlines()[1]
    assert header.count(" & ") == len(ablation.text.splitlines()[0].strip("|").split("|")) - 1


# ---------------------------------------------------------------- search


def test_search_report_has_importances_and_plot(store: dict[str, str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    files = report.build_report(parse(SEARCH, Path("search_t.yaml")), store["uri"], tmp_path)
    table = files.table
    assert table["ap"].tolist() == sorted((t[2] for t in TRIALS), reverse=True)
    assert table["model.window"].tolist() == [4, 8, 16, 16] and table["loss.cts_weight"].iloc[0] == 1e-4
    md = files.md.read_text()
    assert "Parameter importances" in md and "| model.window" in md and "| loss.cts_weight" in md
    assert "FAILED 1" in md and "KILLED 1" in md and "early-stopped" in md
    assert "FINISHED 4" in md and "samples: 7." in md
    assert files.plots[0].read_bytes()[:4] == b"\x89PNG"
    assert r"\toprule" in files.tex.read_text()
    runs = _search_runs(store["uri"], monkeypatch, "search_t", store["search_parent"])
    assert len(table) == int((runs["status"] == "FINISHED").sum())


def test_status_counts_early_stopped(store: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _search_runs(store["uri"], monkeypatch, "search_t", store["search_parent"])
    counts = status_counts(runs)
    assert counts["FINISHED"] == 4 and counts["FAILED"] == 1 and counts["KILLED"] == 1
    assert counts["early-stopped"] == 1  # the failed trial also ran fewer epochs but counts as failed


def test_importances_degrade_to_a_note() -> None:
    spec = parse(SEARCH, Path("search_t.yaml"))
    one = pd.DataFrame({"model.window": [4], "loss.cts_weight": [1e-3], "ap": [0.5]})
    values, note = param_importances(spec.space, one, "ap")
    assert values == {} and "at least 2" in note
    flat = pd.DataFrame({"model.window": [4, 8, 16], "loss.cts_weight": [1e-3, 1e-2, 1e-1], "ap": [0.5] * 3})
    values, note = param_importances(spec.space, flat, "ap")
    assert values == {} and "could not be computed" in note
    single = parse({**SEARCH, "space": {"model.window": {"choice": [4, 8]}}}, Path("search_t.yaml"))
    values, note = param_importances(single.space, one, "ap")
    assert values == {} and "single searched parameter" in note


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["ablation_lgt", "empty_t"])
def test_missing_experiment_or_no_finished_trials(name: str, store: dict[str, str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / f"{name}.yaml"
    spec_path.write_text(f"name: {name}\nkind: ablation\ndescription: x\nvariants:\n  - name: Baseline\n")
    out = tmp_path / "reports"
    target = "ablation_lgt" if name == "ablation_lgt" else str(spec_path)  # a real study name, not in the store
    assert report.main([target, "--tracking-uri", store["uri"], "--out", str(out)]) != 0
    assert not out.exists()
    err = capsys.readouterr().err
    assert ("no MLflow experiment 'ablation_lgt'" if name == "ablation_lgt" else "with a FINISHED trial") in err


def test_unknown_study_and_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    assert report.main(["no_such_study", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}", "--out", str(out)]) != 0
    assert "unknown study" in capsys.readouterr().err
    assert report.main(["ablation_lgt", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}", "--out", str(out)]) != 0
    assert "no MLflow store" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "x.db").exists()


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(OSError):
        write_atomically({tmp_path / "a.md": b"x", tmp_path / "blocker" / "b.png": b"y"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]  # neither a.md nor a temporary file


def test_main_prints_table_and_paths(store: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / "ablation_t.yaml"
    spec_path.write_text(yaml.safe_dump(ABLATION))
    assert report.main([str(spec_path), "--tracking-uri", store["uri"], "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "LGT-Adapter (full)" in printed and "wrote" in printed and "ablation_t.md" in printed


def test_search_ranks_by_the_validation_metric_it_optimised(store: dict[str, str], tmp_path: Path) -> None:
    c = MlflowClient(tracking_uri=store["uri"])
    exp = c.create_experiment("search_v", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = _parent(c, exp, "search_v", "search", "FINISHED", int(time.time() * 1000))
    # (window, test ap, validation ap of the selected checkpoint): the best on test is the worst on validation
    for i, (window, ap, val_ap) in enumerate([(4, 0.90, 0.60), (8, 0.70, 0.95), (16, 0.80, 0.75)]):
        _trial(c, exp, parent, "search", i, {**_final(0.9, ap, 0.6, 20.0), "val/ap": val_ap},
               {"model.window": window, "loss.cts_weight": 1e-3})
    spec = parse({**SEARCH, "name": "search_v"}, Path("search_v.yaml"))
    files = report.build_report(spec, store["uri"], tmp_path)
    assert list(files.table["model.window"]) == [8, 16, 4]  # by validation AP, not test AP
    assert list(files.table["val_ap"]) == [0.95, 0.75, 0.60] and list(files.table["ap"]) == [0.70, 0.80, 0.90]
    header = files.text.splitlines()[0]
    assert "AP (val, ranked)" in header and "AP (test)" in header
    assert "Ranked by the validation AP" in files.md.read_text()
    assert "## Top 5 search trials by validation AP" in files.md.read_text()
    assert files.summary == {"best": {"auc": 0.9, "ap": 0.70, "ano_auc": 0.6, "map_avg": 20.0, "val_ap": 0.95}}


def test_an_interrupted_invocation_with_results_is_reported_as_partial(store: dict[str, str], tmp_path: Path) -> None:
    c = MlflowClient(tracking_uri=store["uri"])
    exp = c.create_experiment("ablation_k", artifact_location=(tmp_path / "artifacts").as_uri())
    now = int(time.time() * 1000)
    done = _parent(c, exp, "ablation_k", "ablation", "FINISHED", now - 60_000)
    _trial(c, exp, done, "Baseline", 0, _final(0.5, 0.5, 0.5, 5.0), {"model.temporal": "none"})
    killed = _parent(c, exp, "ablation_k", "ablation", "KILLED", now)  # Ctrl-C after one trial finished
    _trial(c, exp, killed, "Baseline", 0, _final(0.6, 0.6, 0.6, 6.0), {"model.temporal": "none"})
    _parent(c, exp, "ablation_k", "ablation", "FAILED", now + 60_000)  # failed before any trial: skipped
    files = report.build_report(parse({**ABLATION, "name": "ablation_k"}, Path("ablation_k.yaml")), store["uri"],
                                tmp_path)
    assert f"parent run {killed} (KILLED: partial results)" in files.md.read_text()
    complete = report.build_report(parse({**ABLATION, "name": "ablation_k"}, Path("ablation_k.yaml")),
                                   store["uri"], tmp_path / "done", parent_run_id=done)
    assert "partial results" not in complete.md.read_text()
