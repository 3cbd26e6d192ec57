"""Fused seeds (vadclip.fused): one fused step = each seed alone (to float32 rounding), stacked AdamW = k AdamWs
(bit for bit), fused fits resume exactly, and their per-seed files are single-seed files."""

import numpy as np
import pytest
import torch

from vadclip.config import ConfigError, apply_overrides, preset
from vadclip.data import collate, epoch_batches, load_dataset
from vadclip.fused import SeedStack
from vadclip.losses import total_loss
from vadclip.model.clip import create_clip
from vadclip.train import fit, fit_fused, load_checkpoint, make_model, seed_everything, seed_folder

TINY = {"data.synthetic.train_normal": 10, "data.synthetic.train_abnormal": 10, "data.synthetic.test_normal": 4,
        "data.synthetic.test_abnormal": 4, "data.synthetic.max_length": 150, "model.embed_dim": 32,
        "model.visual_length": 64, "model.window": 16, "optim.batch_size": 8, "optim.epochs": 2,
        "data.val_fraction": 0.2}
SEEDS = (234, 235, 236)
# one step: float32 rounding of batched vs single kernels (the math attention under vmap, bmm for mm, bias adds)
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = preset("synthetic", overrides={**TINY, "data.cache_dir": str(tmp_path_factory.mktemp("cache"))})
    return cfg, load_dataset(cfg)


def _models(cfg, data, seeds=SEEDS):
    models = []
    for seed in seeds:  # as fit builds a seed's model: seeded, then CLIP (random: from the RNG state), then VadCLIP
        seed_everything(seed)
        models.append(make_model(apply_overrides(cfg, {"seed": seed}), data, torch.device("cpu")))
    return models


def _batches(cfg, data, seeds=SEEDS):
    out = []
    for seed in seeds:
        idx = epoch_batches(data.train_labels[:, 0] > 0.5, cfg.optim.batch_size, cfg.optim.sampler,
                            np.random.default_rng([seed, 0]))[0]
        feats, lengths = collate(data.train, idx, cfg.model.visual_length)
        out.append((torch.from_numpy(feats), torch.from_numpy(lengths), torch.from_numpy(data.train_labels[idx])))
    return out


@pytest.mark.parametrize("overrides", [
    {},  # official: LGT-Adapter, both branches, learnable prompt, anomaly-focus visual prompt
    {"model.temporal": "global_tf+gcn", "model.prompt": "handcrafted", "model.visual_prompt": "average"},
    {"model.temporal": "local", "model.branches": "a", "model.visual_prompt": "none", "eval.score_branch": "a"},
    {"model.temporal": "gcn", "model.branches": "c", "eval.score_branch": "c"},
    "paper",  # every paper-text switch: overlapping windows (masked attention), Eq. 1 GCN, softmax kernel, ...
    "weights",  # CLIP from a file: the text tower is shared by the seeds (unbatched), not stacked
])
def test_one_fused_step_equals_each_seed_alone(tiny, tmp_path, overrides):
    cfg, data = tiny
    if overrides == "paper":
        cfg = preset("synthetic", "paper", {**TINY, "data.cache_dir": cfg.data.cache_dir})
    elif overrides == "weights":
        weights = tmp_path / "clip.pt"
        torch.save(create_clip("vadclip-tiny", None, embed_dim=32).state_dict(), weights)
        cfg = apply_overrides(cfg, {"clip.weights": str(weights)})
    else:
        cfg = apply_overrides(cfg, overrides)
    alone, fused = _models(cfg, data), _models(cfg, data)
    stack = SeedStack(fused, cfg.loss)
    text = "prompt.encoder.transformer.resblocks.0.mlp.c_fc.weight"
    if cfg.model.branches != "c":  # a random tower differs per seed (stacked); a loaded one is shared
        assert (text in stack.shared) == (overrides == "weights") and (text in stack.stacked) != (text in stack.shared)
    batches = _batches(cfg, data)
    terms = stack.losses(*(torch.stack(parts) for parts in zip(*batches)))
    terms["loss"].sum().backward()
    for i, (model, (x, n, y)) in enumerate(zip(alone, batches)):
        model.train()
        own = total_loss(model(x, n), n, y, cfg.loss)
        own["loss"].backward()
        assert set(own) == set(terms)
        for key, value in own.items():
            torch.testing.assert_close(terms[key][i], value, rtol=LOSS_RTOL, atol=1e-7)
        for name, p in model.named_parameters():
            if p.requires_grad:
                grad = stack.stacked[name].grad[i]
                scale = p.grad.abs().max().clamp_min(1e-12)
                assert (grad - p.grad).abs().max() / scale < GRAD_RTOL, name


def test_member_models_are_views_of_their_slices(tiny):
    cfg, data = tiny
    models = _models(cfg, data, SEEDS[:2])
    before = models[1].c_branch.fc.weight.detach().clone()
    stack = SeedStack(models, cfg.loss)
    stacked = stack.stacked["c_branch.fc.weight"]
    assert torch.equal(stacked[1], before)
    with torch.no_grad():
        stacked[1].add_(1.0)  # what the optimiser's in-place update does
    assert torch.equal(models[1].c_branch.fc.weight, before + 1.0)
    models[0].load_state_dict({"c_branch.fc.weight": torch.zeros_like(before)}, strict=False)  # reload-best
    assert torch.equal(stacked[0], torch.zeros_like(before))


def test_stacked_adamw_equals_one_adamw_per_seed():
    """AdamW is elementwise: one AdamW over (k, ...) tensors takes the same steps as k AdamWs, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    k, shapes = 3, [(5, 4), (7,), (2, 3, 3)]
    stacked = [torch.randn(k, *s, generator=gen).requires_grad_() for s in shapes]
    apart = [[t.detach()[i].clone().requires_grad_() for t in stacked] for i in range(k)]
    fused_opt = torch.optim.AdamW(stacked, lr=3e-3, weight_decay=0.01)
    opts = [torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01) for params in apart]
    for _ in range(5):
        grads = [torch.randn(k, *s, generator=gen) for s in shapes]
        for t, g in zip(stacked, grads):
            t.grad = g.clone()
        for i, params in enumerate(apart):
            for p, g in zip(params, grads):
                p.grad = g[i].clone()
        fused_opt.step()
        for opt in opts:
            opt.step()
    for i in range(k):
        for t, p in zip(stacked, apart[i]):
            assert torch.equal(t.detach()[i], p.detach())
        state = fused_opt.state[stacked[0]]
        assert torch.equal(state["exp_avg_sq"][i], opts[i].state[apart[i][0]]["exp_avg_sq"])


def test_fit_fused_resumes_exactly_and_each_seed_folder_is_a_fit_checkpoint(tiny, tmp_path):
    cfg, data = tiny
    cfgs = [apply_overrides(cfg, {"seed": s}) for s in SEEDS[:2]]
    whole = fit_fused(cfgs, data, out_dir=tmp_path / "whole", progress=False)
    one = [apply_overrides(c, {"optim.epochs": 1}) for c in cfgs]
    fit_fused(one, data, out_dir=tmp_path / "part", progress=False)
    seen = []
    resumed = fit_fused(cfgs, data, out_dir=tmp_path / "part", resume=tmp_path / "part", progress=False,
                        callbacks=[seen.append])
    assert [[r.epoch for r in records] for records in seen] == [[2, 2]]
    for a, b in zip(whole, resumed):
        assert [h["epoch"] for h in b.history] == [1, 2]
        assert a.history[-1]["train/loss"] == b.history[-1]["train/loss"]
        assert a.metrics["test"] == b.metrics["test"]
    for c, result in zip(cfgs, whole):
        folder = seed_folder(tmp_path / "whole", c.seed)
        assert result.out_dir == folder and (folder / "metrics.json").is_file()
        ckpt = load_checkpoint(folder)  # the seed's slice of the optimiser, as a lone seed's checkpoint holds it
        assert ckpt["config"]["seed"] == c.seed and ckpt["epoch"] == 2
        shapes = [p.shape for p in result.model.parameters() if p.requires_grad]
        assert [ckpt["optimizer"]["state"][i]["exp_avg"].shape for i in range(len(shapes))] == shapes
    lone = fit(apply_overrides(cfgs[0], {"optim.epochs": 2}), data, out_dir=tmp_path / "lone", progress=False,
               resume=seed_folder(tmp_path / "whole", cfgs[0].seed))
    assert lone.metrics["test"] == whole[0].metrics["test"]  # nothing left to train: the same best checkpoint


def test_fit_fused_tracks_each_seed_alone_within_rounding_drift(tiny, tmp_path):
    """Full fused runs follow the lone runs: the first epoch's mean loss to 1e-4 (rounding only), later epochs
    drift apart as any change of summation order makes them (docs/speed.md)."""
    cfg, data = tiny
    cfgs = [apply_overrides(cfg, {"seed": s}) for s in SEEDS]
    fused = fit_fused(cfgs, data, out_dir=tmp_path / "fused", progress=False)
    for c, result in zip(cfgs, fused):
        alone = fit(c, data, out_dir=tmp_path / f"alone{c.seed}", progress=False)
        assert result.history[0]["train/loss"] == pytest.approx(alone.history[0]["train/loss"], rel=1e-4)
        assert result.history[-1]["train/loss"] == pytest.approx(alone.history[-1]["train/loss"], rel=1e-2)


def test_fit_fused_refuses_configs_that_differ_beyond_the_seed(tiny, tmp_path):
    cfg, data = tiny
    with pytest.raises(ConfigError, match="model.window"):
        fit_fused([cfg, apply_overrides(cfg, {"seed": 9, "model.window": 8})], data, out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="repeat"):
        fit_fused([cfg, cfg], data, out_dir=tmp_path, progress=False)
    recompute = apply_overrides(cfg, {"optim.recompute_activations": True})
    with pytest.raises(ConfigError, match="recompute_activations.*vmap"):
        fit_fused([recompute, apply_overrides(recompute, {"seed": 9})], data, out_dir=tmp_path, progress=False)


def test_fused_step_wise_evaluations_and_balanced_batches_stay_per_seed(tiny, tmp_path):
    cfg, data = tiny
    cfg = apply_overrides(cfg, {"eval.eval_every_steps": 1, "optim.sampler": "balanced", "optim.batch_size": 2,
                                "optim.epochs": 1})
    results = fit_fused([apply_overrides(cfg, {"seed": s}) for s in SEEDS[:2]], data, out_dir=tmp_path,
                        progress=False)
    steps = int(results[0].history[-1]["step"])
    for result in results:  # every step but the last (the epoch's own evaluation follows it)
        assert [e["step"] for e in result.evaluations] == list(range(1, steps))
    assert results[0].evaluations[0]["val/ap"] != results[1].evaluations[0]["val/ap"]
