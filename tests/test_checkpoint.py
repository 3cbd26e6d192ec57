"""load_checkpoint: damaged or foreign files give one clear error naming the path, not a torch traceback; a resume
keeps the trained best checkpoint (or refuses), and a checkpoint of another model shape is one line naming it."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vadclip.config import preset
from vadclip.data import DataError, load_dataset
from vadclip.train import (
    CHECKPOINT_BEST,
    CHECKPOINT_LAST,
    CheckpointError,
    fit,
    load_checkpoint,
    load_weights,
    main,
    make_model,
    weight_mismatch,
)

TINY = {"data.synthetic.train_normal": 4, "data.synthetic.train_abnormal": 4, "data.synthetic.test_normal": 2,
        "data.synthetic.test_abnormal": 2, "data.synthetic.max_length": 60, "model.embed_dim": 32,
        "model.visual_length": 32, "optim.batch_size": 4, "optim.epochs": 1, "data.val_fraction": 0,
        "eval.selection": "test"}


def _checkpoint(path: Path) -> Path:
    """A real checkpoint of the trainer's shape (weights, optimizer state, epoch, history)."""
    layer = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    torch.save({"model": layer.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "best_score": 0.5,
                "best_epoch": 2, "history": [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]}, path)
    return path


def test_good_checkpoint_and_folder(tmp_path):
    _checkpoint(tmp_path / CHECKPOINT_LAST)
    ckpt = load_checkpoint(tmp_path)  # a folder means its last.pt
    assert ckpt["epoch"] == 3 and ckpt["model"]["weight"].shape == (64, 64)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_truncated_checkpoint_names_the_path(tmp_path):
    path = _checkpoint(tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "truncated, corrupt" in msg and "vadclip.train" in msg
    assert msg.count("\n") == 0 and len(msg) < 400  # one line, not torch's essay


@pytest.mark.parametrize("kind", ["text", "empty", "numpy", "state_dict", "tensor", "pickled_object"])
def test_foreign_file_names_the_path(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("epoch: 3\nmodel: weights.bin\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "numpy":
        np.save(path.with_suffix(".npy"), np.ones(3))
        path.with_suffix(".npy").rename(path)
    elif kind == "state_dict":  # e.g. someone's bare model weights
        torch.save(torch.nn.Linear(4, 4).state_dict(), path)
    elif kind == "tensor":
        torch.save(torch.ones(3), path)
    else:  # not loadable with weights_only=True
        torch.save({"model": {}, "epoch": 1, "extra": Path("x")}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "expected" in msg and msg.count("\n") == 0 and len(msg) < 400
    if kind == "state_dict":
        assert "missing key(s) 'model', 'epoch'" in msg


def test_checkpoint_error_is_caught_by_the_clis(tmp_path, capsys):
    """A DataError (and ValueError): `python -m vadclip.train` and the study CLI already report those."""
    assert issubclass(CheckpointError, DataError) and issubclass(CheckpointError, ValueError)
    bad = tmp_path / "resume.pt"
    bad.write_text("not a checkpoint\n")
    args = ["--preset", "synthetic", "--out", str(tmp_path / "o"), "--no-progress", "--resume", str(bad),
            "--set", *[f"{k}={v}" for k, v in TINY.items()], f"data.cache_dir={tmp_path / 'c'}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-CLIP-weights banner is expected here
        assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and err.count("\n") == 1


# ---------------------------------------------------------------- resume: the best checkpoint and the model's shape


def _config(tmp_path, **overrides):
    return preset("synthetic", overrides={**TINY, "data.cache_dir": str(tmp_path / "c"), **overrides})


def _trained(tmp_path, name: str, **overrides) -> tuple[Path, dict]:
    """A finished run's folder and its metrics.json."""
    cfg = _config(tmp_path, **overrides)
    fit(cfg, load_dataset(cfg), out_dir=tmp_path / name, progress=False)
    return tmp_path / name, json.loads((tmp_path / name / "metrics.json").read_text())


def _last_alone(run: Path, to: Path, **patch) -> Path:
    """`run`'s last.pt copied alone into `to` (its best.pt lost), with `patch` applied to its keys."""
    to.mkdir()
    ckpt = torch.load(run / CHECKPOINT_LAST, weights_only=True)
    torch.save({**ckpt, **patch}, to / CHECKPOINT_LAST)
    return to / CHECKPOINT_LAST


@pytest.mark.parametrize("reload_best", [True, False])
def test_resume_without_best_pt_keeps_the_trained_best(tmp_path, reload_best):
    """The tester's case: a folder without best.pt reported the untrained weights as 'best epoch 1'. Its last.pt's
    weights are provably the best here (reloaded every epoch; or the last epoch-end evaluation set the best)."""
    overrides = {"eval.reload_best": reload_best}
    run, metrics = _trained(tmp_path, "a", **overrides)
    last = _last_alone(run, tmp_path / "b")
    cfg = _config(tmp_path, **overrides)
    resumed = fit(cfg, load_dataset(cfg), out_dir=tmp_path / "b", resume=last, progress=False)
    assert resumed.metrics["best_epoch"] == metrics["best_epoch"] == 1
    assert resumed.metrics["test"] == metrics["test"]
    assert torch.load(tmp_path / "b" / CHECKPOINT_BEST, weights_only=True)["epoch"] == 1  # the folder whole again


def test_resume_without_best_pt_refuses_when_the_best_weights_are_lost(tmp_path, capsys):
    run, _ = _trained(tmp_path, "a", **{"eval.reload_best": False, "optim.epochs": 2})
    last = _last_alone(run, tmp_path / "b", best_epoch=1)  # epoch 1 the best: only a best.pt held its weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--preset", "synthetic", "--out", str(tmp_path / "b"), "--no-progress", "--resume", str(last),
                     "--set", *[f"{k}={v}" for k, v in TINY.items()], f"data.cache_dir={tmp_path / 'c'}",
                     "eval.reload_best=false", "optim.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'b' / CHECKPOINT_BEST}: not found; {last} names epoch 1 of 2 as the best, "
                   f"whose weights only best.pt holds; resume from the folder that holds both files\n")
    assert not (tmp_path / "b" / "metrics.json").exists()


def test_resume_with_no_best_yet_restores_the_untrained_weights(tmp_path):
    """best_epoch 0 (no evaluation beat the initial weights): those are rebuilt from the seed, as best.pt held them."""
    cfg = _config(tmp_path, **{"eval.reload_best": False})
    run, _ = _trained(tmp_path, "a", **{"eval.reload_best": False})
    last = _last_alone(run, tmp_path / "b", best_epoch=0, best_score=-math.inf)
    data = load_dataset(cfg)
    result = fit(cfg, data, out_dir=tmp_path / "b", resume=last, progress=False)
    assert result.metrics["best_epoch"] == 0
    initial = make_model(cfg, data, torch.device("cpu")).trainable_state_dict()
    best = torch.load(tmp_path / "b" / CHECKPOINT_BEST, weights_only=True)
    assert best["epoch"] == 0 and all(torch.equal(best["model"][k], v) for k, v in initial.items())


def test_a_best_pt_of_another_epoch_is_refused(tmp_path):
    run, _ = _trained(tmp_path, "a")
    best = torch.load(run / CHECKPOINT_BEST, weights_only=True)
    torch.save({**best, "epoch": 5}, run / CHECKPOINT_BEST)
    cfg = _config(tmp_path)
    with pytest.raises(CheckpointError) as err:
        fit(cfg, load_dataset(cfg), out_dir=run, resume=run, progress=False)
    assert str(err.value) == (f"{run / CHECKPOINT_BEST}: holds epoch 5, but {run / CHECKPOINT_LAST} names epoch 1 as "
                              f"the best; expected the best.pt written by the same run")


def test_a_checkpoint_of_another_config_is_one_line_naming_it(tmp_path, capsys):
    run, _ = _trained(tmp_path, "a")
    args = ["--preset", "synthetic", "--out", str(tmp_path / "b"), "--no-progress", "--resume", str(run),
            "--set", *[f"{k}={v}" for k, v in TINY.items()], f"data.cache_dir={tmp_path / 'c'}",
            "model.visual_length=64", "optim.epochs=2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("data: ")  # what was loaded, before the refusal
    assert captured.err == (
        f"error: {run / CHECKPOINT_LAST}: weights of another model configuration (shapes differ: "
        f"temporal.position.embedding.weight (32, 32) (this model (64, 32))); it was saved with "
        f"model.visual_length=32 (this run 64); expected a checkpoint of this config\n")


def test_weight_mismatch_names_at_most_a_few(tmp_path):
    cfg = _config(tmp_path)
    model = make_model(cfg, load_dataset(cfg), torch.device("cpu"))
    state = {k: torch.zeros(1) for k in model.trainable_state_dict()}  # every shape wrong
    state["extra.weight"] = torch.zeros(1)
    problem = weight_mismatch(model, state)
    assert problem is not None and problem.count("(this model") == 3 and " more" in problem
    assert problem.endswith("; unexpected: extra.weight")
    with pytest.raises(CheckpointError, match=r"^x\.pt: weights of another model configuration"):
        load_weights(model, state, "x.pt")
    assert weight_mismatch(model, model.trainable_state_dict()) is None
