"""The authors' UCF evaluation cadence at their batch size (64 normal + 64 abnormal per step): a test after every
1,280 samples counted from each epoch's step 0, i.e. after iterations 11, 21, ..., 121, none at the epoch end, and
the epoch-end reload of the best in-loop checkpoint, so the steps after the last test are discarded
(`eval.cadence=authors`); `eval.cadence=steps` keeps the cadence before issue 22."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.reference import ucf_test_iterations
from vadclip.config import ConfigError, VadClipConfig, preset
from vadclip.data import FeatureBank, load_dataset
from vadclip.data.dataset import VadDataset
from vadclip.train import EpochRecord, _Member, evaluates_after, fit, fit_fused, load_checkpoint

PER_SIDE = 7_900  # 7,900 // 64 = 123 steps of 64 + 64: two steps after the last test (121)
STEPS = PER_SIDE // 64
SMALL = {"data.synthetic.style": "ucf", "data.synthetic.train_normal": 2, "data.synthetic.train_abnormal": 2,
         "data.synthetic.test_normal": 2, "data.synthetic.test_abnormal": 2, "data.synthetic.crops": 1,
         "data.synthetic.min_length": 4, "data.synthetic.max_length": 8, "data.val_fraction": 0.0,
         "model.embed_dim": 16, "model.visual_length": 8, "model.window": 4, "model.temporal": "none",
         "model.branches": "c", "eval.score_branch": "c", "optim.epochs": 1,
         "eval.selection": "test", "eval.reload_best": True}


def _config(tmp_path) -> VadClipConfig:
    """A small model on the official UCF batch (64 + 64 per step), sampler and evaluation cadence."""
    ucf = preset("ucf")
    official = {f"eval.{k}": getattr(ucf.eval, k) for k in ("cadence", "eval_every_samples", "eval_every_steps")}
    return preset("synthetic", overrides={**SMALL, **official, "optim.batch_size": ucf.optim.batch_size,
                                          "optim.sampler": ucf.optim.sampler,
                                          "data.cache_dir": str(tmp_path / "cache")})


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> tuple[VadClipConfig, VadDataset]:
    """A UCF-style dataset with PER_SIDE short training samples per side (one step = 64 + 64, as the authors')."""
    tmp = tmp_path_factory.mktemp("cadence")
    cfg = _config(tmp)
    data = load_dataset(cfg)
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, 2 * PER_SIDE)
    bank = FeatureBank(rng.standard_normal((int(lengths.sum()), cfg.model.embed_dim)).astype(np.float32),
                       np.concatenate([[0], np.cumsum(lengths)]))
    normal = data.train_labels[data.train_labels[:, 0] > 0.5][0]
    abnormal = data.train_labels[data.train_labels[:, 0] < 0.5][0]
    labels = np.stack([normal] * PER_SIDE + [abnormal] * PER_SIDE).astype(np.float32)
    return cfg, dataclasses.replace(data, train=bank, train_labels=labels,
                                    train_video=np.arange(2 * PER_SIDE, dtype=np.int64))


class Scripted:
    """Stands in for `_Member.evaluate_both`: returns the next scripted test AUC and snapshots the live weights."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)
        self.weights: list[dict[str, torch.Tensor]] = []

    def __call__(self, member: _Member, data: VadDataset, device: torch.device) -> dict[str, float]:
        self.weights.append({k: v.detach().clone() for k, v in member.model.trainable_state_dict().items()})
        score = self.scores[len(self.weights) - 1]
        return {"test/auc": score, "test/ap": score / 2}


def _epoch_end_weights(record: EpochRecord) -> dict[str, torch.Tensor]:
    """The trainable weights an epoch ended with, from the last.pt written before the callbacks."""
    return load_checkpoint(record.out_dir)["model"]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_official_ucf_is_the_authors_cadence():
    e = preset("ucf").eval
    assert (e.cadence, e.eval_every_samples) == ("authors", 1280)
    assert preset("ucf", "paper").eval.eval_every_samples == 0  # the paper: once per epoch, no reload
    assert preset("xd").eval.eval_every_samples == 0 and preset("synthetic").eval.cadence == "steps"
    with pytest.raises(ConfigError, match="eval.eval_every_steps=5 is read by eval.cadence='steps' only"):
        preset("xd", overrides={"eval.eval_every_steps": 5})


@pytest.mark.parametrize("batch", [64, 32, 48, 96])
def test_in_loop_tests_follow_the_authors_sample_count(tmp_path, batch):
    """`step = i * batch * 2; if step % 1280 == 0 and step != 0`: 48 per side tests after iterations 41, 81, 121."""
    cfg = dataclasses.replace(_config(tmp_path), optim=dataclasses.replace(preset("ucf").optim, batch_size=batch))
    ours = [i for i in range(STEPS) if evaluates_after(i, STEPS, cfg)]
    assert ours == ucf_test_iterations(STEPS, batch) and ours


def test_authors_cadence_tests_after_iterations_11_to_121_and_keeps_the_best_in_loop_weights(large, tmp_path,
                                                                                             monkeypatch):
    cfg, data = large
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=2))
    first = [0.5, 0.6, 0.9, 0.7, 0.8, 0.6, 0.7, 0.8, 0.85, 0.6, 0.7, 0.75]  # best: the third test (step 31)
    second = [0.5, 0.95, 0.6, 0.7, 0.8, 0.6, 0.7, 0.8, 0.9, 0.6, 0.7, 0.75]  # best: the second (step 123 + 21)
    scripted = Scripted(first + second)
    monkeypatch.setattr(_Member, "evaluate_both", lambda self, d, device: scripted(self, d, device))
    seen: list[dict[str, torch.Tensor]] = []  # the live weights after each epoch (after the reload)
    result = fit(cfg, data, out_dir=tmp_path / "run", progress=False,
                 callbacks=[lambda r: seen.append(_epoch_end_weights(r))])
    tested = [i + 1 for i in ucf_test_iterations(STEPS, 64)]
    assert tested == list(range(11, 122, 10))
    assert [e["step"] for e in result.evaluations] == tested + [STEPS + s for s in tested]
    assert len(scripted.weights) == 24  # no evaluation at an epoch end
    assert [h["step"] for h in result.history] == [STEPS, 2 * STEPS] == [123, 246]
    assert [h["test/auc"] for h in result.history] == [first[-1], second[-1]]  # each repeats its epoch's last test
    assert _equal(seen[0], scripted.weights[2])  # reloaded: steps 32-123 discarded
    assert not _equal(scripted.weights[2], scripted.weights[11])
    assert _equal(seen[1], scripted.weights[13])  # epoch 2's best: steps 145-246 discarded
    assert result.metrics["best_epoch"] == 2


def test_fused_seeds_follow_the_same_cadence_each_with_its_own_best(large, tmp_path, monkeypatch):
    cfg, data = large
    cfgs = [cfg, dataclasses.replace(cfg, seed=cfg.seed + 1)]
    own = [[0.5] * 12, [0.5] * 12]
    own[0][2], own[1][4] = 0.9, 0.9  # seed 0's best: the third test; seed 1's: the fifth
    scripted = Scripted([own[s][j] for j in range(12) for s in range(2)])  # the seeds take turns at each test
    monkeypatch.setattr(_Member, "evaluate_both", lambda self, d, device: scripted(self, d, device))
    results = fit_fused(cfgs, data, out_dir=tmp_path / "run", progress=False)
    for s, result in enumerate(results):
        assert [e["step"] for e in result.evaluations] == list(range(11, 122, 10))
        assert result.model is not None
        assert _equal(result.model.trainable_state_dict(), scripted.weights[2 * own[s].index(0.9) + s])


def test_steps_cadence_is_the_cadence_before_issue_22(large, tmp_path, monkeypatch):
    """`eval.cadence=steps`: after steps 10, 20, ... and at the epoch end, the best of them kept (25 steps here)."""
    cfg, data = large
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, cadence="steps"),
                              optim=dataclasses.replace(cfg.optim, max_steps_per_epoch=25))
    scripted = Scripted([0.5, 0.6, 0.9])  # the epoch-end evaluation is the best
    monkeypatch.setattr(_Member, "evaluate_both", lambda self, d, device: scripted(self, d, device))
    result = fit(cfg, data, out_dir=tmp_path / "run", progress=False)
    assert [e["step"] for e in result.evaluations] == [10, 20]
    assert len(scripted.weights) == 3 and result.history[0]["test/auc"] == 0.9
    assert result.model is not None
    assert _equal(result.model.trainable_state_dict(), scripted.weights[-1])  # the weights after step 25


def test_an_epoch_shorter_than_the_interval_is_evaluated_at_its_end(large, tmp_path, monkeypatch):
    """Where ucf_train.py would reload a checkpoint it never saved (no test yet), the epoch end evaluates."""
    cfg, data = large
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps_per_epoch=5, epochs=2))
    scripted = Scripted([0.7, 0.6])
    monkeypatch.setattr(_Member, "evaluate_both", lambda self, d, device: scripted(self, d, device))
    result = fit(cfg, data, out_dir=tmp_path / "run", progress=False)
    assert result.evaluations == [] and [h["test/auc"] for h in result.history] == [0.7, 0.6]
    assert result.model is not None
    assert _equal(result.model.trainable_state_dict(), scripted.weights[0])  # epoch 2 discarded: 0.6 < 0.7
