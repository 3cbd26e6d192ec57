"""The speed options (docs/speed.md): compiled float32 equals eager to rounding, the AdamW kernels give the same
update, bf16/fp16 train and resume, the fallbacks warn once, fused seeds refuse what they cannot run, and the
resident batches equal `collate`'s."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.test_train import TINY
from vadclip import compiled
from vadclip.config import ConfigError, apply_overrides, preset
from vadclip.data import collate, load_dataset
from vadclip.data.resident import batch_source, resident
from vadclip.losses import total_loss
from vadclip.precision import apply_tf32, autocast, loss_scaler
from vadclip.train import adamw, fit, fit_fused, load_checkpoint, make_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = preset("synthetic", overrides={**TINY, "data.cache_dir": str(tmp_path_factory.mktemp("cache"))})
    return cfg, load_dataset(cfg)


def one_step(cfg, data, forward=None):
    """Loss and every learnable gradient of one training step from the seed's initial weights."""
    idx = np.arange(8)
    feats, lengths = collate(data.train, idx, cfg.model.visual_length)
    x, n, y = torch.from_numpy(feats), torch.from_numpy(lengths), torch.from_numpy(data.train_labels[idx])
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, data, CPU)
    model.train()
    with autocast(cfg.optim, CPU):
        loss = total_loss((forward or (lambda m: m))(model)(x, n), n, y, cfg.loss)["loss"]
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("recompute", [False, True])
def test_compiled_float32_step_equals_eager_to_rounding(tiny, recompute):
    cfg, data = tiny
    loss, grads = one_step(cfg, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled.CompileWarning)  # the backend runs here: no fallback
        c_cfg = apply_overrides(cfg, {"optim.recompute_activations": recompute})  # composes with recomputation
        c_loss, c_grads = one_step(c_cfg, data, lambda m: compiled.compiled_forward(m, CPU))
    torch.testing.assert_close(c_loss, loss)
    assert c_grads.keys() == grads.keys()
    for k, g in grads.items():  # float32 rounding: within 1e-5 of the gradient's own scale (seen: about 1e-6)
        torch.testing.assert_close(c_grads[k], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()), msg=k)


def test_compile_without_a_backend_runs_eager_with_one_warning(tiny, monkeypatch):
    cfg, data = tiny
    monkeypatch.setattr(compiled.shutil, "which", lambda _: None)
    monkeypatch.setattr(compiled, "_warned", set())
    model = make_model(cfg, data, CPU)
    with pytest.warns(compiled.CompileWarning, match="no C\\+\\+ compiler") as caught:
        assert compiled.compiled_forward(model, CPU) is model
        compiled.compiled_forward(model, CPU)
    assert [w.category for w in caught] == [compiled.CompileWarning]  # once per process


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_adamw_kernels_give_the_default_update(tiny, kernel):
    cfg, data = tiny
    states = []
    for name in ("default", kernel):
        optim = apply_overrides(cfg, {"optim.adamw": name}).optim
        torch.manual_seed(cfg.seed)
        model = make_model(cfg, data, CPU)
        opt = adamw([p for p in model.parameters() if p.requires_grad], optim, CPU)
        idx = np.arange(8)
        feats, lengths = collate(data.train, idx, cfg.model.visual_length)
        x, n, y = torch.from_numpy(feats), torch.from_numpy(lengths), torch.from_numpy(data.train_labels[idx])
        for _ in range(2):
            opt.zero_grad()
            total_loss(model(x, n), n, y, cfg.loss)["loss"].backward()
            opt.step()
        states.append(model.trainable_state_dict())
    for k, v in states[0].items():
        if k.endswith("attn.in_proj_bias"):
            # the key bias: softmax ignores it, so its gradient is rounding noise around 0, which Adam scales up
            # to steps of about lr either way; any change of summation order moves it. The query and value parts:
            d = len(v) // 3
            v, states[1][k] = torch.cat([v[:d], v[2 * d:]]), torch.cat([states[1][k][:d], states[1][k][2 * d:]])
        torch.testing.assert_close(states[1][k], v, msg=k)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_evaluates_and_resumes(tiny, tmp_path, precision):
    cfg, data = tiny
    low = apply_overrides(cfg, {"optim.precision": precision})
    result = fit(low, data, out_dir=tmp_path / "a", progress=False)
    assert all(np.isfinite(v) for v in result.metrics["test"].values() if isinstance(v, float))
    plain = fit(cfg, data, out_dir=tmp_path / "f32", progress=False)
    assert result.history[0]["train/loss"] != plain.history[0]["train/loss"]  # autocast did run
    # one step from the same weights: the loss within 1 %, every gradient pointing the same way
    loss, grads = one_step(cfg, data)
    low_loss, low_grads = one_step(low, data)
    assert low_loss.item() == pytest.approx(loss.item(), rel=0.01)
    for k, g in grads.items():
        assert torch.nn.functional.cosine_similarity(low_grads[k].flatten(), g.flatten(), dim=0) > 0.98, k
    scaler = load_checkpoint(tmp_path / "a")["scaler"]
    assert (scaler["scale"] > 0) if precision == "fp16" else scaler == {}
    one = fit(apply_overrides(low, {"optim.epochs": 1}), data, out_dir=tmp_path / "b", progress=False)
    assert one.history[0]["epoch"] == 1
    resumed = fit(low, data, out_dir=tmp_path / "b", progress=False, resume=tmp_path / "b")
    assert resumed.history[-1]["train/loss"] == pytest.approx(result.history[-1]["train/loss"], rel=1e-4)


def test_fp16_loss_scaler_scales_and_the_others_do_not():
    fp16 = preset("synthetic", overrides={"optim.precision": "fp16"}).optim
    loss = torch.tensor(2.0)
    assert loss_scaler(fp16, CPU).scale(loss).item() == 2.0 * 2**16  # torch's initial scale
    assert loss_scaler(preset("synthetic").optim, CPU).scale(loss) is loss


def test_fused_seeds_refuse_compile_and_run_at_bf16_with_fused_adamw(tiny, tmp_path):
    cfg, data = tiny
    seeds = [apply_overrides(cfg, {"seed": s, "optim.epochs": 1}) for s in (1, 2)]
    with pytest.raises(ConfigError, match="optim.compile=true cannot train fused seeds"):
        fit_fused([apply_overrides(c, {"optim.compile": True}) for c in seeds], data, out_dir=tmp_path / "c",
                  progress=False)
    results = fit_fused([apply_overrides(c, {"optim.precision": "bf16", "optim.adamw": "fused"}) for c in seeds], data,
                        out_dir=tmp_path / "b", progress=False)
    assert len(results) == 2 and results[0].history[0]["train/loss"] != results[1].history[0]["train/loss"]


def test_resident_batches_equal_collate(tiny):
    cfg, data = tiny
    length = cfg.model.visual_length
    feats, lengths = resident(data.train, length, CPU, key=cfg.data)
    assert resident(data.train, length, CPU, key=cfg.data)[0] is feats  # one copy per device and data
    idx = np.array([3, 0, 7, 7, 1])
    expected = collate(data.train, idx, length)
    got = (feats.index_select(0, torch.from_numpy(idx)), lengths.index_select(0, torch.from_numpy(idx)))
    assert np.array_equal(got[0].numpy(), expected[0]) and np.array_equal(got[1].numpy(), expected[1])
    host = batch_source(data.train, length, CPU, True, cfg.data)(idx)  # a CPU run collates on the host
    assert np.array_equal(host[0].numpy(), expected[0])


def test_tf32_flags_follow_the_config_on_cuda_only():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        on = preset("synthetic", overrides={"optim.tf32": True}).optim
        apply_tf32(on, CPU)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (matmul, cudnn)
        apply_tf32(on, torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_tf32(preset("synthetic").optim, torch.device("cuda"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
