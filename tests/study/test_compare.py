"""`python -m study.compare` on real stores: a study against itself (Δ = 0, every row equivalent), and the same
study before and after a code change (a copy of the code with one edited file, run into the same store): the
report names the changed code digest, and the rows still match by their resolved config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from study import record
from study.compare import compare, differences, main, read_side
from tests.study.test_run_e2e import tiny_spec

ROOT = Path(__file__).resolve().parents[2]


def run_study(spec: Path, project: Path, code: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-m", "study.run", str(spec), "--max-epochs", "1", "--num-cpus", "2"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path, str]:
    """The tiny study run twice into one store: by this code, then by a copy with an edited comment."""
    work = tmp_path_factory.mktemp("compare")
    spec = tiny_spec(work, "tiny_compare")
    run_study(spec, work, ROOT)
    changed = work / "changed"
    for package in ("study", "vadclip", "search_spaces"):
        shutil.copytree(ROOT / package, changed / package, ignore=shutil.ignore_patterns("__pycache__"))
    losses = changed / "vadclip" / "losses.py"
    losses.write_text(losses.read_text() + "\n# an edit: the code is not the same any more\n")
    run_study(spec, work, changed)
    return work, spec, f"sqlite:///{work / 'mlruns.db'}"


def parents(uri: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny_compare")
    runs = client.search_runs([experiment.experiment_id], filter_string=record.parents_filter(),
                              order_by=["attributes.start_time ASC"])
    return [r.info.run_id for r in runs]


def test_a_study_against_itself_is_zero_and_equivalent(two_runs):
    work, spec, uri = two_runs
    first = parents(uri)[0]
    a = read_side(str(spec), uri, first)
    table = compare(a, a, 1.0)
    assert list(table["row A"]) == ["none", "LGT"] and (table["row A"] == table["row B"]).all()
    assert (table["delta"] == 0).all() and (table["verdict"] == "equivalent").all()
    assert differences(a, a) == []


def test_a_compare_across_a_code_change_names_the_changed_digest(two_runs, capsys):
    work, spec, uri = two_runs
    first, second = parents(uri)
    a, b = read_side(str(spec), uri, first), read_side(str(spec), uri, second)
    changed = {what: (va, vb) for what, va, vb in differences(a, b)}
    assert record.SOURCE_DIGEST in changed and changed[record.SOURCE_DIGEST][0] != changed[record.SOURCE_DIGEST][1]
    assert record.DATA_FINGERPRINT not in changed and record.PACKAGES not in changed
    assert not [w for w in changed if w.startswith("config ")]  # the same configs: every row matched
    # the CLI as a user runs it: the latest run (B) against the first (A) by parent run ids
    assert main([str(spec), str(spec), "--store", uri, "--parent-a", first, "--parent-b", second,
                 "--out", str(work / "reports")]) == 0
    text = capsys.readouterr().out
    assert f"{record.SOURCE_DIGEST}: A `{changed[record.SOURCE_DIGEST][0]}`" in text
    written = (work / "reports" / "compare-tiny_compare-vs-tiny_compare.md").read_text()
    assert "| none" in written and "| LGT" in written
    # the edit is a comment: the same numbers, so every row is equivalent within 1 point
    assert set(pd.Series(compare(a, b, 1.0)["verdict"])) == {"equivalent"}


def test_bad_input_names_what_is_missing(two_runs, capsys):
    work, spec, uri = two_runs
    assert main([str(spec), "reproduce", "--store", uri]) == 2
    assert "study.compare:" in capsys.readouterr().err
