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
    err = run([write(tmp_path, "name: x\nkind: [ablation\n")], tmp_path, monkeypatch, capsys)
    assert "bad.yaml" in err and "malformed YAML" in err


@pytest.mark.parametrize("body,needle", [
    ("variants: [{name: a, set: {model.temporal: lstm}}]", "allowed: none, local"),
    ("variants: [{name: a, set: {model.windw: 8}}]", "unknown key 'model.windw'"),
    ("variants: [{name: a, sett: {}}]", "unknown key 'sett'"),
    ("seeds: three\nvariants: [{name: a}]", "key 'seeds' must be a int"),
])
def test_invalid_ablation_keys_name_file_key_and_allowed(tmp_path, body, needle):
    message = spec_error(tmp_path, f"name: x\nkind: ablation\ndescription: d\n{body}\n")
    assert "bad.yaml" in message and needle in message


@pytest.mark.parametrize("domain,needle", [
    ("{loguniform: [0.0, 1.0]}", "loguniform needs low > 0"),
    ("{uniform: [2.0, 1.0]}", "low < high"),
    ("{gaussian: [0, 1]}", "unknown domain 'gaussian'"),
    ("{uniform: [0.1, 0.5]}\n  model.temporal: {uniform: [0, 1]}", "use choice"),
])
def test_search_space_optuna_cannot_express(tmp_path, domain, needle):
    text = f"name: x\nkind: search\ndescription: d\nspace:\n  model.temperature: {domain}\n"
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
