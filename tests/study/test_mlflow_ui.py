"""What a user sees in MLflow's UI (3.17), checked on a real temporary SQLite store: the experiment is a
model-training one with the study's description, child run names start with what tells them apart, the
parent run has summary metrics (chart view), and the report exists as one self-contained HTML page."""

from __future__ import annotations

import base64
import re

import matplotlib.pyplot as plt
import pytest
from mlflow.utils.validation import _validate_metric_name

from study.report.html import html_report  # study.report sets matplotlib's file-only backend
from study.tracking import (
    TrialRun,
    child_run_name,
    client,
    ensure_experiment,
    log_parent_summary,
    start_parent,
    ui_url,
)

VARIANTS = ["Baseline (w/o temporal modeling)", "Local TF-Encoder + Global TF-Encoder", "LGT-Adapter"]


@pytest.fixture()
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


def test_experiment_is_model_training_with_the_study_description(uri, tmp_path):
    exp = ensure_experiment(uri, "ablation_lgt", tmp_path / "artifacts", description="Table 5: the LGT-Adapter")
    tags = client(uri).get_experiment(exp).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's ExperimentKind for training
    assert tags["mlflow.note.content"] == "Table 5: the LGT-Adapter"  # the UI's experiment description

    # an experiment created before (by an older version, or by hand) is marked too, and keeps its id
    old = client(uri).create_experiment("old_study")
    assert ensure_experiment(uri, "old_study", description="searched window") == old
    tags = client(uri).get_experiment(old).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"] == "searched window"

    # a changed spec description follows; a description the user wrote in the UI is kept
    ensure_experiment(uri, "old_study", description="searched window (v2)")
    assert client(uri).get_experiment(old).tags["mlflow.note.content"] == "searched window (v2)"
    client(uri).set_experiment_tag(old, "mlflow.note.content", "my own notes")
    ensure_experiment(uri, "old_study", description="searched window (v3)")
    assert client(uri).get_experiment(old).tags["mlflow.note.content"] == "my own notes"
    assert ensure_experiment(uri, "old_study") == old  # no description: nothing changes


def test_ui_url_selects_the_model_training_workflow(uri):
    assert ui_url(uri, "3") == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert ui_url("http://head:5000/", "3", run_id="abc") == \
        "http://head:5000/#/experiments/3/runs/abc?workflowType=machine_learning"


def test_child_run_names_start_with_what_tells_them_apart(uri, tmp_path):
    assert child_run_name("LGT-Adapter", 234, "ab12c_00004") == "s234 · LGT-Adapter"
    assert child_run_name("Baseline (w/o temporal modeling)", 235, "ab12c_00001").startswith("s235 · Baseline")
    search = child_run_name("search", 234, "ab12c_00013", {"model.window": 8, "optim.lr": 1.234e-05})
    assert search == "#13 · window=8, lr=1.23e-05"  # sorted by the full key
    assert child_run_name("search", 234, "ab12c_00013") == "#13 · s234"

    exp = ensure_experiment(uri, "t", tmp_path / "artifacts")
    parent = start_parent(uri, exp, "study", {}, {})
    names = []
    for seed, trial in ((234, "ab12c_00000"), (235, "ab12c_00001")):
        run = TrialRun(uri, exp, parent, trial, child_run_name("LGT-Adapter", seed, trial), {"variant": "LGT-Adapter"})
        names.append(client(uri).get_run(run.run_id).info.run_name)
        assert client(uri).get_run(run.run_id).data.tags["trial_id"] == trial  # the full id stays a tag
    assert names == ["s234 · LGT-Adapter", "s235 · LGT-Adapter"]
    assert len({name[:6] for name in names}) == 2  # distinct in the first characters the UI shows


def test_parent_summary_metrics_have_mlflow_safe_keys_and_are_idempotent(uri, tmp_path):
    exp = ensure_experiment(uri, "t", tmp_path / "artifacts")
    parent = start_parent(uri, exp, "study", {}, {})
    summary = {VARIANTS[0]: {"ap": 0.27, "map@avg": 2.21, "auc": float("nan")},
               VARIANTS[1]: {"ap": 0.62}, VARIANTS[2]: {"ap": 0.81, "auc": 0.92}}
    keys = log_parent_summary(uri, parent, summary)
    assert keys == {"mean/Baseline_w_o_temporal_modeling/ap": 0.27,
                    "mean/Baseline_w_o_temporal_modeling/map_iouavg": 2.21,
                    "mean/Local_TF-Encoder_plus_Global_TF-Encoder/ap": 0.62,
                    "mean/LGT-Adapter/ap": 0.81, "mean/LGT-Adapter/auc": 0.92}
    for key in keys:
        _validate_metric_name(key)  # MLflow's own rule (no '(', '+', '@', no '..' or '//')
    c = client(uri)
    assert c.get_run(parent).data.metrics == keys

    log_parent_summary(uri, parent, summary)  # a second report of the same study: nothing new
    assert c.get_run(parent).data.metrics == keys
    assert all(len(c.get_metric_history(parent, key)) == 1 for key in keys)

    log_parent_summary(uri, parent, {"best": {"ap": 0.9, "val_ap": 0.8}}, prefix="")  # a search's best trial
    assert c.get_run(parent).data.metrics["best/ap"] == 0.9
    two = log_parent_summary(uri, parent, {"a+b": {"ap": 0.1}, "a plus b": {"ap": 0.2}}, prefix="x")
    assert two == {"x/a_plus_b/ap": 0.1, "x/a_plus_b_2/ap": 0.2}  # rows that sanitize alike stay apart


def _png(path):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)
    return path


def test_html_report_embeds_the_plot_as_a_data_uri(tmp_path):
    png = _png(tmp_path / "ablation_lgt_ap.png")
    extra = _png(tmp_path / "other.png")
    md = tmp_path / "ablation_lgt.md"
    md.write_text("# ablation_lgt: Table 5 <LGT>\n\n| Variant | AP |\n|:--|--:|\n"
                  "| LGT-Adapter (full) | **80.97 ± 2.83** |\n| a \\| b | 1 |\n\n"
                  "- Mean ± std over seeds; `tags.seed`.\n\n![AP per variant](ablation_lgt_ap.png)\n")
    page = html_report(md.read_text(), [png, extra])
    assert page.startswith("<!DOCTYPE html>") and "<title>ablation_lgt: Table 5 &lt;LGT&gt;</title>" in page
    sources = re.findall(r'<img alt="([^"]*)" src="([^"]+)"', page)
    assert [alt for alt, _ in sources] == ["AP per variant", "other.png"]  # referenced in place, others appended
    for (_, src), path in zip(sources, (png, extra)):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == path.read_bytes()
    assert "ablation_lgt_ap.png)" not in page  # no markdown image left as literal text
    assert '<th style="text-align: right;">AP</th>' in page
    assert '<td style="text-align: right;"><strong>80.97 ± 2.83</strong></td>' in page
    assert "a | b</td>" in page and "<li>Mean ± std over seeds; <code>tags.seed</code>.</li>" in page
    assert html_report(md.read_text(), {png.name: png.read_bytes(), extra.name: extra.read_bytes()}) == page
