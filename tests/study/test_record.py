"""The run record round trip: a real search with its confirmation stage written through the tracking layer into a
temporary store, read back through the report, the selection protocols and the confirm selection. A tag written
but never read, or read but never written, fails here; so does a tag name that study.record does not declare."""

from __future__ import annotations

import ast
from pathlib import Path

import mlflow
import pytest
import yaml

from study import record
from study.compare import differences, read_side
from study.report import build_report
from study.run import RunOptions, run_study
from study.spec import load
from tests.study.test_run_e2e import TINY, ray_local  # noqa: F401  (the fixture)

ROOT = Path(__file__).parents[2]
WRITERS = ("study/tracking.py", "study/trainable.py", "study/run.py", "study/reuse.py")


def _search_spec(tmp_path: Path) -> Path:
    raw = {"name": "tiny_record", "kind": "search", "description": "the record round trip", "preset": "synthetic",
           "metric": "ap", "num_samples": 2, "max_concurrent": 1, "scheduler": {"type": "fifo"},
           "base": {"eval.score_branch": "a", **TINY}, "space": {"model.window": {"choice": [4, 8]}},
           "confirm": {"top": 1, "seeds": 2}}
    path = tmp_path / "tiny_record.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _written(uri: str, name: str) -> set[str]:
    """Every tag on the study's runs (parent and trials), MLflow's own left out."""
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    return {k for r in runs for k in r.data.tags if not k.startswith("mlflow.")}


def _constants_used(path: Path) -> set[str]:
    """The `record.<NAME>` attributes a module uses."""
    tree = ast.parse(path.read_text())
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "record"}


def test_every_tag_written_is_read_and_every_tag_read_is_written(tmp_path, ray_local):  # noqa: F811
    spec_path = _search_spec(tmp_path)
    with record.traced_reads() as reads:
        out = run_study(str(spec_path), RunOptions(max_epochs=1, project=tmp_path, verbose=0))
        # the report again under a history-derived protocol: the protocols read each run's selection metric
        build_report(load(str(spec_path)), out["tracking_uri"], tmp_path / "again", out["parent_run_id"],
                     protocol="test")
        # study.compare reads the side-level tags (data fingerprint, packages, code): the study against itself
        side = read_side(str(spec_path), out["tracking_uri"], out["parent_run_id"])
        assert not differences(side, side) and side.configs
    written = _written(out["tracking_uri"], "tiny_record")
    reads = {t for t in reads if not t.startswith("mlflow.")}  # MLflow's own (parent run, run name)

    assert reads <= record.TAGS, f"read but not declared in study.record: {sorted(reads - record.TAGS)}"
    assert written <= record.TAGS, f"written but not declared in study.record: {sorted(written - record.TAGS)}"
    unread = written - reads - record.FOR_PEOPLE - record.READ_IN_TRIALS
    assert not unread, f"written but never read back (read them, or declare them FOR_PEOPLE): {sorted(unread)}"
    # what this run did not write (a fused group, a reused run, the driver's verdicts, --seeds auto) must have a
    # writer all the same
    names = {getattr(record, n): n for n in dir(record) if n.isupper() and isinstance(getattr(record, n), str)}
    used = set().union(*(_constants_used(ROOT / w) for w in WRITERS))
    unwritten = {t for t in reads - written if names.get(t) not in used and t not in record.KERNEL_TAGS}
    assert not unwritten, f"read but written nowhere: {sorted(unwritten)}"
    for tag in record.FOR_PEOPLE:
        assert names.get(tag) in used, f"{tag} is declared FOR_PEOPLE but nothing writes it"
    in_trials = _constants_used(ROOT / "study/trainable.py") | _constants_used(ROOT / "study/reuse.py")
    for tag in record.READ_IN_TRIALS:  # a Ray worker's reads are not traced here
        assert names.get(tag) in in_trials, f"{tag} is declared READ_IN_TRIALS but no trial code uses it"


@pytest.mark.parametrize(("selection", "key"), [("val", "final/val/ap"), ("test", "final/ap")])
def test_the_objective_key_rule(selection, key):
    assert record.final_objective_key(selection, "ap") == key
    assert record.objective_key(selection, "ap") == f"{selection}/ap"
    metrics = {"final/ap": 0.5, "final/val/ap": 0.7, "final/map@0.1": 0.2, "final/time/fit_seconds": 3.0}
    assert record.objective_metrics(metrics, selection)[f"{selection}/ap"] == metrics[key]
