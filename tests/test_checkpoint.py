"""load_checkpoint: damaged or foreign files give one clear error naming the path, not a torch traceback."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vadclip.data import DataError
from vadclip.train import CHECKPOINT_LAST, CheckpointError, load_checkpoint, main

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
