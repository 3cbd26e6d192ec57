"""TrialRun on a temporary SQLite MLflow store: one child run per trial across attempts, no duplicate
or missing epochs, final metrics once, tags of an earlier attempt removable. The driver alone decides
`stopped_early` (a normal end of Tune) or `interrupted` (Ctrl-C); trials that failed before creating their
run get one."""

from __future__ import annotations

import pytest

from study.tracking import (
    FailedTrial,
    TrialRun,
    child_run_name,
    children,
    client,
    close_unfinished_children,
    ensure_experiment,
    error_line,
    mark_interrupted_children,
    record_failed_trials,
    start_parent,
    tune_failures,
)


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


@pytest.fixture()
def study(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    exp = ensure_experiment(uri, "t", tmp_path / "artifacts")
    return uri, exp, start_parent(uri, exp, "study", {}, {})


def _states(uri, exp, parent):
    return {r.data.tags["trial_id"]: (r.info.status, {k: v for k, v in r.data.tags.items()
                                                      if k in ("stopped_early", "interrupted", "error")})
            for r in children(uri, exp, parent)}


def test_after_a_normal_fit_only_the_driver_tags_stopped_early(study):
    uri, exp, parent = study
    runs = {t: TrialRun(uri, exp, parent, t, t, {"variant": "v"})
            for t in ("alive", "killed", "failed", "done", "ctrlc")}
    runs["killed"].end("KILLED")  # its worker was stopped inside tune.report: KILLED, no verdict
    runs["done"].end("FINISHED")
    mark_interrupted_children(uri, exp, parent)  # an earlier Ctrl-C... (all RUNNING ones so far)
    for t in ("alive", "failed"):  # ...then --resume continued these two
        TrialRun(uri, exp, parent, t, t, {"variant": "v"})

    failures = {"failed": "ValueError: window must be > 0\nsecond line"}
    assert close_unfinished_children(uri, exp, parent, failures) == 2
    assert _states(uri, exp, parent) == {
        "alive": ("KILLED", {"stopped_early": "true"}),  # still RUNNING when Tune ended: the scheduler stopped it
        "killed": ("KILLED", {"stopped_early": "true"}),  # the worker's KILLED gets the driver's verdict
        "failed": ("FAILED", {"error": "ValueError: window must be > 0"}),  # Tune says ERROR: not stopped early
        "done": ("FINISHED", {}),
        "ctrlc": ("KILLED", {"interrupted": "true"}),  # interrupted and not continued: no claim about it
    }
    assert close_unfinished_children(uri, exp, parent, failures) == 0  # idempotent
    assert _states(uri, exp, parent)["killed"] == ("KILLED", {"stopped_early": "true"})


def test_ctrl_c_marks_running_children_interrupted_and_resume_drops_stale_verdicts(study):
    uri, exp, parent = study
    a = TrialRun(uri, exp, parent, "a", "a", {})
    b = TrialRun(uri, exp, parent, "b", "b", {})
    b.end("KILLED")  # stopped inside tune.report by the Ctrl-C itself
    TrialRun(uri, exp, parent, "c", "c", {}).end("FINISHED")
    TrialRun(uri, exp, parent, "d", "d", {}).end("KILLED")  # stopped by the scheduler before the Ctrl-C
    assert mark_interrupted_children(uri, exp, parent) == 1  # without Tune's word: the RUNNING ones only
    assert _states(uri, exp, parent) == {"a": ("KILLED", {"interrupted": "true"}), "b": ("KILLED", {}),
                                         "c": ("FINISHED", {}), "d": ("KILLED", {})}
    assert mark_interrupted_children(uri, exp, parent, ["a", "b"]) == 1  # Tune: a and b did not end
    assert _states(uri, exp, parent) == {"a": ("KILLED", {"interrupted": "true"}),
                                         "b": ("KILLED", {"interrupted": "true"}),
                                         "c": ("FINISHED", {}), "d": ("KILLED", {})}

    b.set_tags({"stopped_early": "true", "error": "old"})  # verdicts of an earlier invocation
    again = TrialRun(uri, exp, parent, "a", "a", {})
    again_b = TrialRun(uri, exp, parent, "b", "b", {})
    assert again.resumed and again.run_id == a.run_id and again_b.run_id == b.run_id
    assert _states(uri, exp, parent) == {"a": ("RUNNING", {}), "b": ("RUNNING", {}), "c": ("FINISHED", {}),
                                         "d": ("KILLED", {})}
    assert not {"interrupted", "stopped_early", "error"} & (set(again.tags) | set(again_b.tags))


def test_trials_that_failed_before_creating_their_run_are_recorded_once(study):
    uri, exp, parent = study
    ok = TrialRun(uri, exp, parent, "ab_00000", "s234 · LGT", {"variant": "LGT", "seed": "234"})
    ok.log_params({"seed": 234})
    ok.end("FINISHED")
    early = TrialRun(uri, exp, parent, "ab_00001", "s235 · LGT", {"variant": "LGT", "seed": "235"})
    early.end("FAILED")  # failed inside its run: no error tag yet
    ray_text = ("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=10.0.0.1, actor_id=ff, repr=train_trial)\n"
                "  File \"/x/trainable.py\", line 64, in train_trial\n    cfg, variant = trial_config(params, ctx)\n"
                "vadclip.config.ConfigError: model.window: 0 is not > 0\nsee the spec\n")
    failures = {
        "ab_00002": FailedTrial(error_line(ray_text), {"variant": "Only GCN", "seed": "234"},
                                {"variant": "Only GCN", "seed": 234}),
        "ab_00003": ValueError("x" * 900),
        "ab_00001": "RuntimeError: CUDA out of memory",
    }
    created = record_failed_trials(uri, exp, parent, failures, {"study": "ablation_lgt", "dataset": "synthetic"})
    assert len(created) == 2
    c = client(uri)
    runs = {r.data.tags["trial_id"]: r for r in children(uri, exp, parent)}
    assert len(runs) == 4 and runs["ab_00000"].info.status == "FINISHED" and "error" not in runs["ab_00000"].data.tags
    assert runs["ab_00001"].data.tags["error"] == "RuntimeError: CUDA out of memory"
    new = runs["ab_00002"]
    assert new.info.run_id in created and new.info.status == "FAILED"
    assert new.info.run_name == "s234 · Only GCN"
    tags = new.data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["vadclip.role"] == "trial"
    assert (tags["variant"], tags["seed"], tags["study"], tags["dataset"]) == ("Only GCN", "234", "ablation_lgt",
                                                                             "synthetic")
    assert tags["error"] == "vadclip.config.ConfigError: model.window: 0 is not > 0"
    assert not new.data.params  # a later attempt of the trial logs its full config
    assert runs["ab_00003"].data.tags["error"] == "ValueError: " + "x" * 488  # 500 chars at most

    assert record_failed_trials(uri, exp, parent, failures, {"study": "ablation_lgt"}) == []  # idempotent
    assert len(children(uri, exp, parent)) == 4
    assert close_unfinished_children(uri, exp, parent, failures) == 0
    assert c.get_run(new.info.run_id).info.status == "FAILED"

    retried = TrialRun(uri, exp, parent, "ab_00002", "s234 · Only GCN", {})  # e.g. restarted by hand later
    retried.log_params({"seed": 234, "model.temporal": "gcn"})
    run = c.get_run(retried.run_id)
    assert run.info.run_id == new.info.run_id and run.data.params["model.temporal"] == "gcn"
    assert "error" not in run.data.tags


def test_error_line_and_tune_failures_read_ray_results():
    class Result:  # the fields of ray.tune.Result that tune_failures reads
        def __init__(self, trial_id, error, config):
            self.metrics, self.path, self.error, self.config = {"trial_id": trial_id}, f"/r/{trial_id}", error, config

    class RayTaskError(RuntimeError):
        def __init__(self, cause):
            super().__init__("ray::ImplicitFunc.train() (pid=1)\n  File x\nboom")
            self.cause = cause

    results = [Result("t_0", None, {"variant": "A", "seed": 0}),
               Result("t_1", None, {"variant": "A", "seed": 1}),
               Result("t_2", RayTaskError(KeyError("model.windw")), {"variant": "A", "seed": 2}),
               Result("t_3", "Traceback (most recent call last):\n  File y\nOSError: disk full", {"seed": 3,
                                                                                                 "model.window": 8})]
    failed = tune_failures(results)
    assert failed == {"t_2": FailedTrial("KeyError: 'model.windw'", {"variant": "A", "seed": "2"},
                                         {"variant": "A", "seed": 2}),
                      "t_3": FailedTrial("OSError: disk full", {"variant": "search", "seed": "3"},
                                         {"seed": 3, "model.window": 8})}
    assert child_run_name("search", 3, "t_3", {"model.window": 8}) == "#3 · window=8"


def test_a_trial_stopped_by_the_scheduler_is_killed_by_its_worker_and_tagged_by_the_driver(study, tmp_path):
    """Real Ray Tune, real trainable: the worker ends the stopped trial's run KILLED but claims no reason."""
    ray = pytest.importorskip("ray")
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    from study.progress import StudyProgress
    from study.trainable import TrialContext, train_trial
    from vadclip.config import apply_overrides, preset
    from vadclip.data import load_dataset

    class StopAfterFirstEpoch(FIFOScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            return TrialScheduler.STOP

    uri, exp, parent = study
    tiny = {"data.synthetic.train_normal": 8, "data.synthetic.train_abnormal": 8, "data.synthetic.test_normal": 4,
            "data.synthetic.test_abnormal": 4, "data.synthetic.max_length": 150, "model.embed_dim": 32,
            "model.visual_length": 64, "optim.batch_size": 8, "data.val_fraction": 0.25, "optim.epochs": 3,
            "data.cache_dir": str(tmp_path / "synthetic"), "device": "cpu"}
    base = preset("synthetic", overrides=tiny)
    rows = {"LGT-Adapter": apply_overrides(base, {"model.temporal": "local+gcn"})}
    ctx = TrialContext(study="t", base=base, rows=rows,
                       tracking_uri=uri, experiment_id=exp, parent_run_id=parent, tags={"study": "t"})
    progress = StudyProgress("t", 1, "val/ap", "ap")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        results = tune.Tuner(
            tune.with_parameters(train_trial, data=load_dataset(base), ctx=ctx),
            param_space={"variant": "LGT-Adapter", "seed": 234},
            tune_config=tune.TuneConfig(scheduler=StopAfterFirstEpoch(), trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0, callbacks=[progress]),
        ).fit()
    finally:
        ray.shutdown()
    assert results.num_errors == 0 and results[0].metrics["training_iteration"] == 1
    assert not progress.interrupted and progress.unfinished_ids == []  # the scheduler's stop is an end
    (run,) = children(uri, exp, parent)
    assert run.info.run_name == "s234 · LGT-Adapter"
    assert run.info.status in ("KILLED", "RUNNING")  # KILLED when the stop reached it inside tune.report
    assert "stopped_early" not in run.data.tags and "interrupted" not in run.data.tags
    assert close_unfinished_children(uri, exp, parent, tune_failures(results)) == 1  # Tune ended normally
    assert _states(uri, exp, parent) == {results[0].metrics["trial_id"]: ("KILLED", {"stopped_early": "true"})}
