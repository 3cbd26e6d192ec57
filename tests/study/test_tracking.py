"""TrialRun on a temporary SQLite MLflow store: one child run per trial across attempts, no duplicate
or missing epochs, final metrics once, tags of an earlier attempt removable."""

from __future__ import annotations

from study.tracking import TrialRun, client, ensure_experiment, start_parent


def test_attempts_of_a_trial_share_one_run_without_gaps_or_duplicates(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    exp = ensure_experiment(uri, "t", tmp_path / "artifacts")
    parent = start_parent(uri, exp, "study", {}, {"study.trials": 2})
    first = TrialRun(uri, exp, parent, "trial_1", "v-s1-trial_1", {"variant": "v"})
    assert not first.resumed
    first.log_epoch(1, {"val/ap": 0.5})
    first.log_epoch(2, {"val/ap": 0.6})
    first.set_tags({"restored_from_epoch": "1"})
    first.end("FAILED")

    again = TrialRun(uri, exp, parent, "trial_1", "v-s1-trial_1", {"variant": "v"})
    assert again.resumed and again.run_id == first.run_id
    assert again.tags["restored_from_epoch"] == "1"
    again.backfill([{"epoch": 1, "val/ap": 0.5}, {"epoch": 2, "val/ap": 0.6}, {"epoch": 3, "val/ap": 0.7}])
    again.log_epoch(3, {"val/ap": 0.7})  # already there: not logged twice
    again.delete_tag("restored_from_epoch")
    again.delete_tag("restored_from_epoch")  # absent now: no error
    again.log_final({"ap": 0.7}, step=3)
    again.log_final({"ap": 0.7}, step=3)
    again.end("FINISHED")

    c = client(uri)
    runs = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and "restored_from_epoch" not in run.data.tags
    assert [m.step for m in c.get_metric_history(run.info.run_id, "epoch")] == [1, 2, 3]
    assert len(c.get_metric_history(run.info.run_id, "final/ap")) == 1
    other = TrialRun(uri, exp, parent, "trial_2", "v-s2-trial_2", {"variant": "v"})
    assert other.run_id != run.info.run_id and not other.resumed
