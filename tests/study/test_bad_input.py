"""Bad input: one clear message, non-zero exit, nothing written to MLflow or reports/."""

from pathlib import Path

import pytest

from study.run import main
from study.spec import SpecError, load


def run(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "reports").exists()
    return err


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


def spec_error(tmp_path: Path, text: str) -> str:
    """The SpecError message of loading `text` as a study YAML."""
    with pytest.raises(SpecError) as err:
        load(write(tmp_path, text))
    return str(err.value)


def test_unknown_study_lists_the_studies(tmp_path, monkeypatch, capsys):
    err = run(["no_such_study"], tmp_path, monkeypatch, capsys)
    assert "unknown study 'no_such_study'" in err and "ablation_lgt" in err


def test_malformed_yaml(tmp_path, monkeypatch, capsys):
    err = run([write(tmp_path, "kind: [ablation\n")], tmp_path, monkeypatch, capsys)
    assert "bad.yaml" in err and "malformed YAML" in err


@pytest.mark.parametrize("body,needle", [
    ("variants: [{name: a, set: {model.temporal: lstm}}]", "allowed: none, local"),
    ("variants: [{name: a, set: {model.windw: 8}}]", "unknown key 'model.windw'"),
    ("variants: [{name: a, sett: {}}]", "unknown key 'sett'"),
    ("seeds: three\nvariants: [{name: a}]", "key 'seeds' must be a int"),
])
def test_invalid_ablation_keys_name_file_key_and_allowed(tmp_path, body, needle):
    message = spec_error(tmp_path, f"kind: ablation\ndescription: d\n{body}\n")
    assert "bad.yaml" in message and needle in message


@pytest.mark.parametrize("domain,needle", [
    ("{loguniform: [0.0, 1.0]}", "loguniform needs low > 0"),
    ("{uniform: [2.0, 1.0]}", "low < high"),
    ("{gaussian: [0, 1]}", "unknown domain 'gaussian'"),
    ("{uniform: [0.1, 0.5]}\n  model.temporal: {uniform: [0, 1]}", "use choice"),
])
def test_search_space_optuna_cannot_express(tmp_path, domain, needle):
    text = f"kind: search\ndescription: d\nspace:\n  model.temperature: {domain}\n"
    assert needle in spec_error(tmp_path, text)


def test_missing_data_folder(tmp_path, monkeypatch, capsys):
    err = run(["ablation_lgt", "--dataset", "xd", "--lists", str(tmp_path / "nope"), "--features",
               str(tmp_path)], tmp_path, monkeypatch, capsys)
    assert "nope" in err and "does not exist" in err


def test_unreachable_tracking_uri(tmp_path, monkeypatch, capsys):
    err = run(["ablation_lgt", "--tracking-uri", "http://127.0.0.1:9"], tmp_path, monkeypatch, capsys)
    assert "http://127.0.0.1:9" in err and "unreachable" in err


def test_file_store_uri_is_refused(tmp_path, monkeypatch, capsys):
    err = run(["ablation_lgt", "--tracking-uri", str(tmp_path / "mlruns")], tmp_path, monkeypatch, capsys)
    assert "file store is deprecated" in err


# ---------------------------------------------------------------- what a new user hits (flags and YAMLs)


def xd_lists(tmp_path: Path) -> Path:
    lists = tmp_path / "list"
    lists.mkdir()
    (lists / "xd_CLIP_rgb.csv").write_text("path,label\n")
    return lists


def test_lists_without_dataset_is_inferred_from_the_list_files(tmp_path):
    from study.run import RunOptions, plan
    from vadclip.cli import Override

    lists = xd_lists(tmp_path)
    opts = RunOptions(flags=[Override("data.lists", str(lists), f"--lists {lists}"),
                             Override("data.features", str(tmp_path), f"--features {tmp_path}")], project=tmp_path)
    p = plan(load("ablation_lgt"), opts)
    assert p.dataset == "xd" and p.base.data.dataset == "xd" and p.base.data.lists == str(lists)


def test_lists_without_recognisable_list_files_is_refused(tmp_path, monkeypatch, capsys):
    err = run(["ablation_lgt", "--lists", str(tmp_path), "--features", str(tmp_path)], tmp_path, monkeypatch,
              capsys)
    assert f"--lists {tmp_path}" in err and "xd_CLIP_rgb.csv" in err and "--dataset" in err


def test_train_cli_lists_without_dataset_never_trains_on_synthetic(tmp_path, capsys):
    from vadclip.train import main as train_main

    assert train_main(["--lists", str(tmp_path), "--features", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--lists" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_folders_with_synthetic_dataset_are_a_config_error():
    from vadclip.config import ConfigError, preset

    with pytest.raises(ConfigError, match="data.dataset is synthetic"):
        preset("synthetic", "official", {"data.lists": "/x"})


@pytest.mark.parametrize("flag", ["--seeds", "--num-samples", "--max-epochs", "--num-cpus"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_counts_below_one_are_refused(flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["ablation_lgt", flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: expected an integer >= 1, got {int(value)}" in capsys.readouterr().err
    assert not (tmp_path / "mlruns.db").exists()


def test_repeated_set_keeps_every_override(tmp_path, capsys):
    from study.run import RunOptions, plan
    from vadclip.cli import parse_set

    flags = parse_set(["optim.epochs=3"]) + parse_set(["model.window=8"])
    p = plan(load("ablation_lgt"), RunOptions(flags=flags, project=tmp_path))
    assert p.base.optim.epochs == 3 and p.base.model.window == 8
    from study.run import build_parser
    args = build_parser().parse_args(["x", "--set", "optim.epochs=3", "--set", "model.window=8"])
    assert args.set == ["optim.epochs=3", "model.window=8"]


def test_set_errors_blame_the_flag_not_the_yaml(tmp_path, monkeypatch, capsys):
    err = run(["ablation_lgt", "--set", "model.window=48", "--set", "optim.lr=0.1"], tmp_path, monkeypatch, capsys)
    assert "--set model.window=48 (study ablation_lgt.yaml)" in err and "optim.lr" not in err
    assert "must divide model.visual_length" in err


def test_unused_yaml_keys_are_refused(tmp_path):
    message = spec_error(tmp_path, "kind: search\ndescription: d\nmax_epochs: 3\nspace:\n"
                                   "  model.sigma: {uniform: [0.5, 2.0]}\n")
    assert "unknown key 'max_epochs'" in message


def test_the_study_name_is_the_file_name(tmp_path):
    message = spec_error(tmp_path, "name: search_window\nkind: search\ndescription: d\nspace:\n"
                                   "  model.sigma: {uniform: [0.5, 2.0]}\n")
    assert "name 'search_window' differs from the file's name 'bad'" in message
    path = tmp_path / "mine.yaml"
    path.write_text("kind: search\ndescription: d\nspace:\n  model.sigma: {uniform: [0.5, 2.0]}\n")
    assert load(str(path)).name == "mine"


def test_unreachable_ray_address_fails_fast_before_any_run(tmp_path, monkeypatch, capsys):
    import time

    t0 = time.monotonic()
    err = run(["ablation_lgt", "--seeds", "1", "--max-epochs", "1", "--address", "127.0.0.1:1"], tmp_path,
              monkeypatch, capsys)
    assert time.monotonic() - t0 < 30
    assert "--address 127.0.0.1:1: no Ray cluster answers there" in err
    assert not (tmp_path / ".study_state").exists()


def test_unwritable_storage_fails_before_any_run(tmp_path, monkeypatch, capsys):
    storage = tmp_path / "file-not-folder"
    storage.write_text("x")
    err = run(["ablation_lgt", "--storage", str(storage / "sub")], tmp_path, monkeypatch, capsys)
    assert "--storage" in err and str(storage) in err


def test_report_default_store_is_the_current_folder(tmp_path, monkeypatch):
    from study import report

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert report.main(["ablation_lgt"]) == 2
    # study.run writes ./mlruns.db: study.report reads the same file (and, finding none, creates nothing)
    assert not (tmp_path / "mlruns.db").exists()


def test_report_default_uri_matches_run(tmp_path, monkeypatch, capsys):
    from study import report

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report.main(["ablation_lgt"])
    assert f"no MLflow store at sqlite:///{tmp_path.resolve() / 'mlruns.db'}" in capsys.readouterr().err


def test_train_out_does_not_overwrite_an_earlier_run(tmp_path, capsys):
    from vadclip.train import main as train_main

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert train_main(["--out", str(out), "--epochs", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize("argv,needle", [
    (["ablation_lgt", "--fuse-seeds", "0"], "--fuse-seeds: fuse_seeds must be auto or an integer >= 1"),
    (["ablation_lgt", "--fuse-seeds", "3", "--set", "optim.recompute_activations=true"],
     "recompute_activations=true cannot train fused seeds"),
    (["ablation_lgt", "--fuse-seeds", "3", "--set", "optim.compile=true"],
     "study ablation_lgt, the base configuration (every row): optim.compile=true cannot train fused seeds"),
    (["ablation_lgt", "--set", "optim.precision=fp8"], "optim.precision"),
])
def test_bad_fuse_seeds_is_refused_before_anything_starts(argv, needle, tmp_path, monkeypatch, capsys):
    assert needle in run(argv, tmp_path, monkeypatch, capsys)


def test_fuse_seeds_in_a_yaml_is_checked_and_auto_fuses_only_gpu_trials(tmp_path):
    body = "kind: ablation\ndescription: d\nvariants: [{name: a, set: {model.temporal: none}}]\n"
    message = spec_error(tmp_path, body + "fuse_seeds: two\n")
    assert "bad.yaml: fuse_seeds must be auto or an integer >= 1 (1 = no fusing), got 'two'" in message
    assert load(write(tmp_path, body)).fuse_size() == 1  # a CPU trial: each seed its own
    assert load(write(tmp_path, body + "resources: {cpu: 1, gpu: 0.5}\n")).fuse_size() == 5
    assert load(write(tmp_path, body + "fuse_seeds: 3\n")).fuse_size() == 3
