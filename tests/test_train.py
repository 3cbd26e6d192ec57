"""Trainer: end to end on tiny synthetic data, checkpoints, resume, determinism, exact speed-ups."""

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadclip.config import ConfigError, preset
from vadclip.data import collate, load_dataset
from vadclip.evaluate import predict
from vadclip.losses import total_loss
from vadclip.metrics import detection_map
from vadclip.train import fit, load_checkpoint, main, make_model

TINY = {"data.synthetic.train_normal": 10, "data.synthetic.train_abnormal": 10, "data.synthetic.test_normal": 4,
        "data.synthetic.test_abnormal": 4, "data.synthetic.max_length": 150, "model.embed_dim": 32,
        "model.visual_length": 64, "optim.batch_size": 8, "optim.epochs": 2, "data.val_fraction": 0.2}


@pytest.fixture
def tiny(tmp_path):
    cfg = preset("synthetic", overrides={**TINY, "data.cache_dir": str(tmp_path / "cache")})
    return cfg, load_dataset(cfg)


def test_fit_writes_metrics_and_checkpoints(tiny, tmp_path):
    cfg, data = tiny
    seen = []
    res = fit(cfg, data, out_dir=tmp_path / "out", progress=False, callbacks=[seen.append])
    assert [r.epoch for r in seen] == [1, 2]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("auc", "ap", "ano_auc", "map@0.1", "map@0.5", "map_avg", "c_auc", "a_ap"):
        assert key in metrics["test"]
    assert metrics["selection"] == "val" and 0 <= metrics["test"]["auc"] <= 1
    for name in ("best.pt", "last.pt"):
        state = torch.load(tmp_path / "out" / name, weights_only=True)
        assert not any(k.startswith("prompt.encoder.") for k in state["model"])  # frozen CLIP not saved
    assert res.history[-1]["epoch"] == 2 and "val/ap" in res.history[-1]


def test_deterministic_and_resume_equals_uninterrupted(tiny, tmp_path):
    cfg, data = tiny
    full = fit(cfg, data, out_dir=tmp_path / "a", progress=False)
    again = fit(cfg, data, out_dir=tmp_path / "b", progress=False)
    assert full.history[-1]["train/loss"] == again.history[-1]["train/loss"]
    one = fit(preset("synthetic", overrides={**TINY, "optim.epochs": 1, "data.cache_dir": cfg.data.cache_dir}),
              data, out_dir=tmp_path / "c", progress=False)
    assert load_checkpoint(tmp_path / "c")["epoch"] == 1 and one.history[0]["epoch"] == 1
    resumed = fit(cfg, data, out_dir=tmp_path / "c", progress=False, resume=tmp_path / "c")
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[-1]["train/loss"] == pytest.approx(full.history[-1]["train/loss"], rel=1e-5)


def test_synthetic_preset_learns_beyond_chance(tmp_path):
    """The full model on the embedded default learns: frame AUC and A-branch mAP far above what random
    scores give on the same test set (the preset reaches AUC ~0.9; the bound here is looser)."""
    cfg = preset("synthetic", overrides={"data.cache_dir": str(tmp_path / "cache")})
    data = load_dataset(cfg)
    test = fit(cfg, data, out_dir=tmp_path / "out", progress=False).metrics["test"]
    rng = np.random.default_rng(0)
    lengths = data.test.features.lengths
    chance_auc = roc_auc_score(data.test.frame_gt, rng.random(len(data.test.frame_gt)))
    # per-snippet class probabilities: detection_map itself brings them to frame resolution
    chance_map = np.mean([detection_map([rng.dirichlet(np.ones(len(data.class_codes)), t) for t in lengths],
                                        data.test.segments, data.test.segment_labels,
                                        data.class_codes)["map_avg"] for _ in range(3)])
    assert abs(chance_auc - 0.5) < 0.05
    assert test["auc"] >= 0.8 > chance_auc + 0.2
    assert test["a_auc"] >= 0.8
    assert test["map_avg"] >= chance_map + 20, (test["map_avg"], chance_map)


def test_cli_runs_and_reports_bad_input(tmp_path, capsys):
    args = ["--preset", "synthetic", "--out", str(tmp_path / "o"), "--no-progress", "--epochs", "1",
            "--set", *[f"{k}={v}" for k, v in TINY.items()], f"data.cache_dir={tmp_path / 'c'}"]
    assert main(args) == 0
    assert "map_avg" in capsys.readouterr().out
    assert main(["--preset", "xd", "--lists", str(tmp_path / "missing"), "--features", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["--preset", "synthetic", "--set", "model.window=0"]) == 2
    assert "model.window must be >= 1" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        fit(preset("synthetic", overrides={"data.val_fraction": 0.0}), out_dir=tmp_path / "z")


def _fast_and_straightforward(cfg, data):
    """One model with the exact speed-ups, one without, the same weights (frozen CLIP included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = make_model(cfg, data, torch.device("cpu"))
        slow = make_model(cfg, data, torch.device("cpu"), straightforward=True)
    slow.load_state_dict(fast.state_dict())
    assert not slow.temporal.local.windows_as_batch and slow.temporal.gcn.rebuild_distance  # passed down
    assert not slow.prompt.encoder.truncate and fast.prompt.encoder.truncate
    return fast, slow


def test_batched_evaluation_equals_the_authors_loop(tiny):
    cfg, data = tiny
    fast_model, slow_model = _fast_and_straightforward(cfg, data)
    fast = predict(fast_model, data.test, cfg.model.visual_length, "cpu", batched=True)
    slow = predict(slow_model, data.test, cfg.model.visual_length, "cpu", batched=False)
    for a, b in zip(fast.class_probs + fast.c_scores, slow.class_probs + slow.c_scores):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert any(len(f) > cfg.model.visual_length for f in (data.test.features[i] for i in range(len(data.test))))


def test_training_step_equals_the_straightforward_version(tiny):
    """Loss and every learnable gradient of one step on padded samples: exact speed-ups on vs off."""
    cfg, data = tiny
    models = _fast_and_straightforward(cfg, data)
    idx = np.arange(8)
    feats, lengths = collate(data.train, idx, cfg.model.visual_length)
    assert (lengths < cfg.model.visual_length - cfg.model.window).any()  # whole windows of padding
    x, n, y = torch.from_numpy(feats), torch.from_numpy(lengths), torch.from_numpy(data.train_labels[idx])
    results = []
    for model in models:
        loss = total_loss(model(x, n), n, y, cfg.loss)["loss"]
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for k, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][k], rtol=1e-3, atol=1e-6, msg=k)


def test_max_steps_per_epoch_trains_a_prefix_of_each_epoch(tiny, tmp_path):
    cfg, data = tiny
    capped = fit(preset("synthetic", overrides={**TINY, "optim.max_steps_per_epoch": 1, "eval.eval_every_steps": 1,
                                                "data.cache_dir": cfg.data.cache_dir}),
                 data, out_dir=tmp_path / "capped", progress=False)
    assert [h["step"] for h in capped.history] == [1, 2]  # one step per epoch, counted globally
    assert capped.evaluations == []  # the only step of an epoch is evaluated at the epoch's end
    full = fit(cfg, data, out_dir=tmp_path / "full", progress=False)
    assert full.history[0]["step"] > 1
    with pytest.raises(ConfigError, match="optim.max_steps_per_epoch must be >= 0"):
        preset("synthetic", overrides={"optim.max_steps_per_epoch": -1})


@pytest.mark.parametrize("temporal", ["local+gcn", "global_tf"])
def test_recomputed_activations_give_the_same_step_bit_for_bit(tiny, temporal):
    """optim.recompute_activations: loss and every learnable gradient equal the default path exactly."""
    cfg, data = tiny
    idx = np.arange(8)
    feats, lengths = collate(data.train, idx, cfg.model.visual_length)
    x, n, y = torch.from_numpy(feats), torch.from_numpy(lengths), torch.from_numpy(data.train_labels[idx])
    results = []
    for recompute in (False, True):
        c = preset("synthetic", overrides={**TINY, "model.temporal": temporal,
                                           "optim.recompute_activations": recompute})
        torch.manual_seed(c.seed)  # random CLIP weights come from the RNG, as in fit
        model = make_model(c, data, torch.device("cpu"))
        model.train()
        loss = total_loss(model(x, n), n, y, c.loss)["loss"]
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for k, g in results[0][1].items():
        assert torch.equal(g, results[1][1][k]), k


def test_recomputed_activations_train_to_the_same_metrics(tiny, tmp_path):
    cfg, data = tiny
    plain = fit(cfg, data, out_dir=tmp_path / "plain", progress=False)
    recompute = preset("synthetic", overrides={**TINY, "optim.recompute_activations": True,
                                               "data.cache_dir": cfg.data.cache_dir})
    again = fit(recompute, data, out_dir=tmp_path / "recompute", progress=False)
    assert again.metrics["test"] == plain.metrics["test"]
    assert [h["train/loss"] for h in again.history] == [h["train/loss"] for h in plain.history]
