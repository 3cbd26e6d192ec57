"""What a new user hit (issue 22, items 2 and 4): resume restores the invocation, interrupted trials are not
counted as done, output folders are checked before anything starts, two studies can start on one new store,
bounded intervals, one-line flag errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from study import spec as specs
from study.run import RunOptions, StudyError, main, new_run_name, plan, restore_invocation, run_study
from study.tracking import is_mlflow_store, prepare_store
from tests.study.test_run_e2e import children, ray_local, tiny_spec  # noqa: F401 (a fixture)
from vadclip.cli import parse_set

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------- resume restores the invocation


def started(**kw) -> dict:
    return RunOptions(**kw).invocation()


def test_resume_alone_restores_the_flags_seeds_and_overrides():
    stored = json.loads(json.dumps(started(seeds=3, flags=parse_set(["optim.epochs=2", "model.window=8"]),
                                           reuse=False)))  # as the state file holds it
    opts = restore_invocation(RunOptions(resume=True), stored, "ablation_lgt")
    assert opts.seeds == 3 and opts.reuse is False
    assert [(o.key, o.value) for o in opts.flags] == [("optim.epochs", "2"), ("model.window", "8")]
    assert plan(specs.load("ablation_lgt"), opts).base.optim.epochs == 2


def test_resume_with_the_same_flags_again_is_fine_and_conflicting_ones_are_named():
    stored = started(seeds=3, flags=parse_set(["optim.epochs=2"]))
    again = restore_invocation(RunOptions(seeds=3, flags=parse_set(["optim.epochs=2"])), stored, "s")
    assert again.seeds == 3
    with pytest.raises(StudyError) as err:
        restore_invocation(RunOptions(seeds=5, flags=parse_set(["optim.epochs=6", "model.window=8"])), stored, "s")
    message = str(err.value)
    assert "--seeds 5" in message and "--set optim.epochs=6" in message and "--set model.window=8" in message
    assert "was started (--seeds 3 --set optim.epochs=2)" in message


def test_resume_pointer_stores_the_invocation(tmp_path, ray_local):  # noqa: F811
    spec_path = tiny_spec(tmp_path, "tiny_pointer")
    run_study(str(spec_path), RunOptions(max_epochs=1, seeds=1, project=tmp_path, reuse=False))
    state = json.loads((tmp_path / ".study_state" / "tiny_pointer.json").read_text())
    assert state["invocation"]["seeds"] == 1 and state["invocation"]["max_epochs"] == 1
    assert state["invocation"]["reuse"] is False


def test_run_names_are_unique_within_a_second():
    assert len({new_run_name("s") for _ in range(50)}) == 50


# ---------------------------------------------------------------- bad input refused before anything starts


def refused(argv: list[str], tmp_path: Path, monkeypatch, capsys) -> str:
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ro") == [], "bad input left files behind"
    return err


@pytest.mark.parametrize("argv,needle", [
    (["--seeds-cap", "4"], "--seeds-cap 4: only with --seeds auto"),
    (["--ci-target", "2"], "--ci-target 2.0: only with --seeds auto"),
    (["--mdd-target", "2"], "--mdd-target 2.0: only with --seeds auto"),
    (["--seeds", "auto", "--mdd-target", "0"], "--mdd-target must be > 0 (points), got 0.0"),
    (["--seeds", "auto", "--mdd-target", "2", "--ci-target", "1"], "--seeds auto stops on one of them; give one"),
    (["--seeds", "auto", "--seeds-cap", "2"], "--seeds-cap 2 is below the 3 seeds per row --seeds auto starts from"),
])
def test_seeds_auto_bounds(argv, needle, tmp_path, monkeypatch, capsys):
    assert needle in refused(["ablation_lgt", *argv], tmp_path, monkeypatch, capsys)


def test_unknown_flag_is_one_line_without_the_usage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["ablation_lgt", "--seeds", "two"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "usage" not in err
    assert "argument --seeds" in err and "(see python -m study.run -h)" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_reports_folder_is_refused_before_any_trial(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    err = refused(["ablation_lgt", "--seeds", "1"], tmp_path / "ro", monkeypatch, capsys)
    assert "not writable" in err


def test_read_only_reports_folder_is_refused_even_for_root(tmp_path, monkeypatch, capsys):
    (tmp_path / "reports").write_text("a file where the reports folder goes")
    monkeypatch.chdir(tmp_path)
    assert main(["ablation_lgt", "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert "reports folder" in err and "is not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]  # no store, no ray_results, no state


def test_bad_input_leaves_no_empty_storage_folder(tmp_path, monkeypatch, capsys):
    refused(["ablation_lgt", "--storage", str(tmp_path / "runs"), "--seeds-cap", "3"], tmp_path, monkeypatch,
            capsys)
    assert not (tmp_path / "runs").exists()


def test_report_on_an_empty_store_file_changes_nothing(tmp_path, monkeypatch, capsys):
    from study import report

    store = tmp_path / "mlruns.db"
    store.touch()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert report.main(["ablation_lgt"]) == 2
    assert "holds no MLflow tables" in capsys.readouterr().err
    assert store.stat().st_size == 0 and not is_mlflow_store(store)


# ---------------------------------------------------------------- two studies at once on a new store


def test_two_processes_create_one_new_store_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    code = ("import sys; from study.tracking import prepare_store, ensure_experiment; "
            f"prepare_store({uri!r}); print(ensure_experiment({uri!r}, 'same'))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=tmp_path) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs[0][1][-2000:]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, found by all
    prepare_store(uri)  # idempotent
    assert is_mlflow_store(tmp_path / "new.db")


# ---------------------------------------------------------------- the progress line after a Ctrl-C


class FakeTrial:
    def __init__(self, trial_id: str, status: str):
        self.trial_id, self.status, self.config = trial_id, status, {"variant": "v", "seed": 1}


def test_interrupted_and_never_started_trials_are_not_counted_done():
    import io

    from study.progress import StudyProgress

    out = io.StringIO()
    progress = StudyProgress("s", 7, "val/ap", "ap", out=out)
    trials = [FakeTrial("t0", "TERMINATED")] + [FakeTrial(f"t{i}", "PENDING") for i in range(1, 7)]  # t0 resumed
    progress.on_step_begin(0, trials)
    for trial in trials[1:3]:  # two finish; Tune calls the hook before it changes the status
        progress.on_trial_complete(0, trials, trial)
        trial.status = "TERMINATED"
    for trial in trials[3:]:  # Ctrl-C: Tune stops the rest without a hook, TERMINATED like finished ones
        trial.status = "TERMINATED"
    progress.on_experiment_end(trials)
    assert progress.interrupted and progress.unfinished_ids == ["t3", "t4", "t5", "t6"]
    line = progress.line()
    assert "7/7" not in line and "3/7 trials ended (3 done, 0 failed), 4 interrupted or never started" in line
    assert "best validation (video-level) AP" in line


def test_a_resumed_experiment_whose_trials_had_all_ended_is_not_interrupted():
    from study.progress import StudyProgress

    progress = StudyProgress("s", 3, "val/ap", "ap")
    trials = [FakeTrial(f"t{i}", "TERMINATED") for i in range(3)]  # restored; Tune runs no step at all
    progress.on_experiment_end(trials)
    assert not progress.interrupted and "3/3 trials ended (3 done, 0 failed)" in progress.line()


def test_a_reported_trial_error_counts_failed_and_prints_one_line():
    import io

    from study.progress import StudyProgress
    from study.tracking import TRIAL_ERROR

    out = io.StringIO()
    progress = StudyProgress("s", 2, "test/ap", "ap", out=out)
    trials = bad, good = [FakeTrial("t0", "RUNNING"), FakeTrial("t1", "RUNNING")]
    progress.on_step_begin(0, trials)
    progress.on_trial_result(0, trials, bad, {TRIAL_ERROR: "ConfigError: bad window"})
    progress.on_trial_result(0, trials, bad, {TRIAL_ERROR: "ConfigError: bad window"})  # said once
    for trial in trials:
        progress.on_trial_complete(0, trials, trial)
        trial.status = "TERMINATED"
    progress.on_experiment_end(trials)
    assert not progress.interrupted
    assert out.getvalue().count("failed: ConfigError: bad window (not retried") == 1
    assert "2/2 trials ended (1 done, 1 failed)" in progress.line() and "best test AP" in progress.line()


# ---------------------------------------------------------------- intervals within the metric's range


def test_intervals_are_cut_at_the_metric_range_and_marked():
    from study.report.render import CLIPPED, mean_std

    row = pd.Series({"ap_mean": 0.95, "ap_std": 0.04, "ap_n": 3, "ap_low": 0.85, "ap_high": 1.034, "runs": 3,
                     "map_avg_mean": 2.0, "map_avg_std": 1.0, "map_avg_n": 3, "map_avg_low": -0.3,
                     "map_avg_high": 4.8, "best_epoch_mean": 2.0, "best_epoch_std": 1.0, "best_epoch_n": 3,
                     "best_epoch_low": -1.0, "best_epoch_high": 5.0})
    assert mean_std(row, "ap", interval_of_mean=True) == f"95.00 ± 4.00 [85.0, 100.0]{CLIPPED}"
    assert mean_std(row, "map_avg", interval_of_mean=True) == f"2.00 ± 1.00 [0.0, 4.8]{CLIPPED}"
    assert mean_std(row, "best_epoch", interval_of_mean=True) == "2.00 ± 1.00 [-1.0, 5.0]"  # unbounded


# ---------------------------------------------------------------- the synthetic writer's CLI


def test_synthetic_writer_cli_prints_no_runpy_warning():
    proc = subprocess.run([sys.executable, "-m", "vadclip.data.synthetic", "--help"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "RuntimeWarning" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- Ctrl-C once every trial has ended


def test_ctrl_c_after_the_last_trial_still_writes_the_report(tmp_path, ray_local, monkeypatch, capsys):  # noqa: F811
    import study.report as report_module
    from study.progress import StudyProgress

    real_end, real_build = StudyProgress.on_experiment_end, report_module.build_report

    def end_then_sigint(self, trials, **info):  # Ctrl-C as Tune finishes: every trial has ended
        os.kill(os.getpid(), signal.SIGINT)
        return real_end(self, trials, **info)

    def sigint_then_build(*args, **kwargs):  # and once more while the report is written
        os.kill(os.getpid(), signal.SIGINT)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(StudyProgress, "on_experiment_end", end_then_sigint)
    spec_path = tiny_spec(tmp_path, "tiny_late_ctrl_c")
    out = run_study(str(spec_path), RunOptions(max_epochs=1, seeds=1, project=tmp_path, reuse=False))
    assert out["report"].md.is_file() and out["failed"] == 0
    assert "writing the report" in capsys.readouterr().err
    runs = children(out["tracking_uri"], "tiny_late_ctrl_c", out["parent_run_id"])
    assert set(runs["status"]) == {"FINISHED"}
    # a Ctrl-C while the report is written (no Tune handler then) is absorbed as well
    monkeypatch.setattr(StudyProgress, "on_experiment_end", real_end)
    monkeypatch.setattr(report_module, "build_report", sigint_then_build)
    out = run_study(str(spec_path), RunOptions(max_epochs=1, seeds=1, project=tmp_path))
    assert out["report"].md.is_file()


# ---------------------------------------------------------------- a deterministic trial error


def test_config_error_in_a_trial_fails_once_in_one_line(tmp_path, capfd):
    spec_path = tiny_spec(tmp_path, "tiny_config_error")
    text = spec_path.read_text().replace("name: none", "name: bad-config")
    spec_path.write_text(text.replace("max_failures: 1", "max_failures: 3"))
    code = (f"import sys; from pathlib import Path; from study.run import RunOptions, run_study; "
            f"out = run_study({str(spec_path)!r}, RunOptions(max_epochs=1, seeds=1, num_cpus=2, "
            f"project=Path({str(tmp_path)!r}), fail_at_epoch={{'bad-config': 1}})); print('FAILED', out['failed'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILED 1" in proc.stdout
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "InjectedConfigError" in line]
    assert len(lines) == 1 and "not retried" in lines[0], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = mlflow.get_experiment_by_name("tiny_config_error")
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.`vadclip.role` = 'trial'")
    status = dict(zip(runs["tags.variant"], runs["status"]))
    assert status == {"bad-config": "FAILED", "LGT": "FINISHED"}
    failed = runs[runs["tags.variant"] == "bad-config"].iloc[0]
    assert failed["tags.error"].startswith("InjectedConfigError: injected failure in 'bad-config' at epoch 1")
    assert "tags.restored_from_epoch" not in runs or runs["tags.restored_from_epoch"].isna().all()  # no retry


def test_train_bad_resume_leaves_no_empty_out_folder(tmp_path, capsys):
    from vadclip.train import main as train_main

    out = tmp_path / "new-run"
    code = train_main(["--out", str(out), "--epochs", "1", "--resume", str(tmp_path / "nope" / "last.pt"),
                       "--set", "data.synthetic.train_normal=8", "data.synthetic.train_abnormal=8",
                       "data.synthetic.test_normal=4", "data.synthetic.test_abnormal=4", "model.embed_dim=32",
                       "model.visual_length=64", f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 2 and "nope" in capsys.readouterr().err
    assert not out.exists()
