"""Selection protocols from logged histories: every evaluation (epoch ends and step-wise ones) is logged at its
global step; the val/test/last protocol values of a trial equal a direct computation from those histories, and a
`selection=test` run without reload equals the `test` protocol of a `selection=val` run of the same seed."""

from __future__ import annotations

import math

import pytest

from study.report.protocols import derive, evaluations, protocol_frame
from study.tracking import TrialRun, client, ensure_experiment, start_parent
from tests.test_train import TINY
from vadclip.config import apply_overrides, preset
from vadclip.data import load_dataset
from vadclip.train import fit

METRICS = ("auc", "ap", "ano_auc", "map_avg", "map@0.1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocols")
    cfg = preset("synthetic", overrides={**TINY, "optim.epochs": 3, "eval.eval_every_steps": 1,
                                         "eval.reload_best": False, "data.cache_dir": str(tmp / "cache")})
    data = load_dataset(cfg)
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    exp = ensure_experiment(uri, "protocols", tmp / "artifacts")
    parent = start_parent(uri, exp, "p", {}, {})
    out = {}
    for selection in ("val", "test"):
        run = TrialRun(uri, exp, parent, f"trial_{selection}", selection, {"selection_metric": cfg.selection_metric})
        result = fit(apply_overrides(cfg, {"eval.selection": selection}), data, out_dir=tmp / selection,
                     progress=False, callbacks=[lambda r, run=run: run.log_epoch(r.epoch, r.metrics, r.evaluations)])
        out[selection] = (run.run_id, result)
    return uri, cfg, out


def _direct(result, metric: str, sel: str) -> dict[str, float]:
    """The three protocols computed straight from the trainer's records, without MLflow."""
    evals = sorted([*result.evaluations, *result.history], key=lambda e: e["step"])  # stable: step-wise first
    best_val = max(evals, key=lambda e: e[f"val/{sel}"])  # max returns the first of equal maxima
    best_test = max(evals, key=lambda e: e[f"test/{sel}"])
    return {"val": best_val[f"test/{metric}"], "test": best_test[f"test/{metric}"], "last": evals[-1][f"test/{metric}"]}


def test_every_evaluation_is_logged_at_its_global_step(runs):
    uri, cfg, out = runs
    run_id, result = out["val"]
    evals = evaluations(client(uri), run_id, cfg.selection_metric, METRICS)
    steps = sorted({e["step"] for e in [*result.evaluations, *result.history]})
    assert list(evals.index) == steps and len(result.evaluations) > 0  # step-wise ones too
    assert evals.notna().all().all()
    epochs = client(uri).get_metric_history(run_id, "epoch")
    assert [(m.step, m.value) for m in epochs] == [(h["step"], h["epoch"]) for h in result.history]


def test_protocols_equal_a_direct_computation_from_the_histories(runs):
    uri, cfg, out = runs
    run_id, result = out["val"]
    sel = cfg.selection_metric
    derived = derive(evaluations(client(uri), run_id, sel, METRICS), sel)
    for metric in METRICS:
        direct = _direct(result, metric, sel)
        for protocol in ("val", "test", "last"):
            assert derived[protocol][metric] == pytest.approx(direct[protocol], abs=1e-12), (protocol, metric)
    # the selected checkpoint re-evaluated (metrics.json) is the val protocol of a selection=val run
    for metric in METRICS:
        assert derived["val"][metric] == pytest.approx(result.metrics["test"][metric], abs=1e-12)


def test_selection_test_without_reload_is_the_test_protocol_of_a_val_run(runs):
    uri, cfg, out = runs
    frame = protocol_frame(client(uri), _runs_frame(out), cfg.selection_metric, METRICS)
    val_run, test_run = out["val"][0], out["test"][0]
    authors = out["test"][1].metrics["test"]
    for metric in METRICS:
        assert frame.at[val_run, f"test/{metric}"] == authors[metric]
        # the same seed and no reload: both runs follow one trajectory
        assert frame.at[test_run, f"last/{metric}"] == frame.at[val_run, f"last/{metric}"]


def test_derive_without_validation_metrics_leaves_val_undefined():
    import pandas as pd

    evals = pd.DataFrame({"test/ap": [0.5, 0.7, 0.6]}, index=[10, 20, 30])
    derived = derive(evals, "ap")
    assert math.isnan(derived["val"]["ap"]) and derived["test"]["ap"] == 0.7 and derived["last"]["ap"] == 0.6


def _runs_frame(out):
    import pandas as pd

    return pd.DataFrame({"run_id": [out["val"][0], out["test"][0]]})
