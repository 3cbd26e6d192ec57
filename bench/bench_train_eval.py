"""Time (a) one training step and (b) one evaluation pass over a test set, with the exact speed-ups
against the straightforward version (the authors' way), in one run; prints both ratios. (c): what
`optim.recompute_activations` costs a training step (the same step, activations recomputed). (d): the speed
options (`optim.compile`, `optim.precision`, `optim.adamw`), each a row against the default step through the
trainer's own step, and the best exact one against the straightforward step. (e) on a GPU only (skipped cleanly
without one): the same rows on CUDA with `optim.tf32` and `data.on_device` too, several trials packed on the GPU
and fused seeds (bench_fused.py's measurements), and trials per GPU-hour for the embedded default (a fit, timed)
and the `xd` preset (its steps per epoch at the real XD-Violence size times the measured step, plus the
evaluations). (f): the floor under the exact step: the matrix-product FLOPs of one step, ours and straightforward
(torch.utils.flop_counter), and the fastest float32 matrix product of the step's shapes on this machine; ours at
that rate with nothing else to do bounds the ratio any exact option can reach.

Straightforward = the text encoder over all 77 positions, class embeddings re-encoded for every test
video, one forward per test video, the distance adjacency rebuilt every forward, local
attention masked over the full length, every sample read from disk every step. Ours = EOT
truncation, class embeddings once per pass, chunks of many videos batched, a fixed adjacency,
non-overlapping windows run as a batch of short sequences (windows of pure padding once per
slot), features in memory. Fast and slow alternate, best of --repeats each. Both give the same
numbers (tests).

    python bench/bench_train_eval.py [--preset xd] [--batch 16] [--repeats 5] [--skip-options] [--skip-floor]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vadclip.config import VadClipConfig, apply_overrides, preset
from vadclip.data import VadDataset, collate, epoch_batches, load_dataset
from vadclip.evaluate import predict
from vadclip.losses import total_loss
from vadclip.train import _Trainer, fit, make_model

# (d)/(e): each option on top of the default configuration, and whether it is exact (float32 to rounding, tests)
OPTIONS: dict[str, tuple[dict[str, object], bool]] = {
    "optim.compile=true": ({"optim.compile": True}, True),
    "optim.adamw=foreach": ({"optim.adamw": "foreach"}, True),
    "optim.adamw=fused": ({"optim.adamw": "fused"}, True),
    "compile + adamw=fused": ({"optim.compile": True, "optim.adamw": "fused"}, True),
    "optim.precision=bf16": ({"optim.precision": "bf16"}, False),
    "optim.precision=fp16": ({"optim.precision": "fp16"}, False),
}
CUDA_OPTIONS: dict[str, tuple[dict[str, object], bool]] = {
    "optim.tf32=true": ({"optim.tf32": True}, False),
    "data.on_device=false": ({"data.on_device": False}, True),
    "bf16 + compile + fused": ({"optim.precision": "bf16", "optim.compile": True, "optim.adamw": "fused"}, False),
}
XD_TRAINING_SAMPLES = 39540  # xd_CLIP_rgb.csv: 3,954 training videos x 10 crops, each crop a sample
XD_EVAL_VIDEOS = 800 + 395  # the test list and our validation split (10 % of the training videos)


def interleaved_best(fast, slow, repeats: int) -> tuple[float, float]:
    """Best of `repeats` for each, alternating fast and slow so that drift in the machine's speed
    (shared CPUs) hits both alike; one warm-up each."""
    fast(), slow()
    times: dict[str, list[float]] = {"fast": [], "slow": []}
    for _ in range(repeats):
        for name, fn in (("fast", fast), ("slow", slow)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return min(times["fast"]), min(times["slow"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="xd", help="model settings of this preset (ViT-B-16 text tower, d=512)")
    p.add_argument("--batch", type=int, default=16, help="training samples per step")
    p.add_argument("--test-videos", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-options", action="store_true", help="without (d), the speed options on this CPU")
    p.add_argument("--skip-floor", action="store_true", help="without (f), the FLOP floor of the exact step")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    half = args.test_videos // 2
    common = {"data.dataset": "synthetic", "data.synthetic.train_normal": 16, "data.synthetic.train_abnormal": 16,
              "data.synthetic.test_normal": half, "data.synthetic.test_abnormal": half,
              "data.synthetic.max_length": 300, "optim.batch_size": args.batch, "optim.sampler": "mixed"}
    fast_cfg = preset(args.preset, overrides={**common, "data.in_memory": True})
    slow_cfg = preset(args.preset, overrides={**common, "data.in_memory": False})
    fast_data, slow_data = load_dataset(fast_cfg), load_dataset(slow_cfg)
    fast_model = make_model(fast_cfg, fast_data, torch.device("cpu"))
    slow_model = make_model(fast_cfg, fast_data, torch.device("cpu"), straightforward=True)
    slow_model.load_state_dict(fast_model.state_dict())
    idx = epoch_batches(fast_data.train_labels[:, 0] > 0.5, args.batch, "mixed", np.random.default_rng(0))[0]
    length = fast_cfg.model.visual_length

    def trainer(model, data):
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-6)

        def step() -> None:
            model.train()
            feats, lengths = collate(data.train, idx, length)
            x, n = torch.from_numpy(feats), torch.from_numpy(lengths)
            terms = total_loss(model(x, n), n, torch.from_numpy(data.train_labels[idx]), fast_cfg.loss)
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
        return step

    def evaluator(model, data, batched: bool):
        return lambda: predict(model, data.test, length, "cpu", batched=batched)

    train_fast, train_slow = interleaved_best(trainer(fast_model, fast_data), trainer(slow_model, slow_data),
                                              args.repeats)
    recompute_cfg = preset(args.preset, overrides={**common, "optim.recompute_activations": True})
    recompute_model = make_model(recompute_cfg, fast_data, torch.device("cpu"))
    recompute_model.load_state_dict(fast_model.state_dict())
    train_kept, train_recomputed = interleaved_best(trainer(fast_model, fast_data),
                                                    trainer(recompute_model, fast_data), args.repeats)
    eval_fast, eval_slow = interleaved_best(evaluator(fast_model, fast_data, True),
                                            evaluator(slow_model, slow_data, False), args.repeats)
    print(f"preset {args.preset}: CLIP {fast_cfg.clip.model} text tower, d={fast_cfg.model.embed_dim}, "
          f"L={length}, {len(fast_data.class_prompts)} classes, batch {args.batch}, "
          f"{len(fast_data.test)} test videos, {torch.get_num_threads()} threads")
    print(f"(a) training step:   straightforward {train_slow * 1e3:8.1f} ms   ours {train_fast * 1e3:8.1f} ms   "
          f"ratio {train_slow / train_fast:5.2f}x")
    print(f"(b) evaluation pass: straightforward {eval_slow * 1e3:8.1f} ms   ours {eval_fast * 1e3:8.1f} ms   "
          f"ratio {eval_slow / eval_fast:5.2f}x")
    print(f"(c) training step:   activations kept {train_kept * 1e3:8.1f} ms   "
          f"recomputed {train_recomputed * 1e3:8.1f} ms   cost {train_recomputed / train_kept:5.2f}x")
    if not args.skip_options:
        options_section(fast_cfg, fast_data, idx, torch.device("cpu"), args.repeats, OPTIONS, train_slow / train_fast)
    gpu_section(args, common)
    if not args.skip_floor:
        floor_section(trainer(fast_model, fast_data), trainer(slow_model, slow_data), len(idx) * length, fast_cfg,
                      train_slow, args.repeats)


def step_flops(step: Callable[[], None]) -> float:
    """The matrix-product and convolution FLOPs of one training step (forward and backward; `step` as timed)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def gemm_rate(shapes: list[tuple[int, int, int]], repeats: int) -> tuple[float, tuple[int, int, int]]:
    """The fastest float32 matrix product (FLOP/s, best of `repeats`) among (rows, in, out) linear shapes."""
    best = (0.0, shapes[0])
    for rows, d_in, d_out in shapes:
        x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
        seconds, _ = interleaved_best(lambda x=x, w=w: torch.nn.functional.linear(x, w), lambda: None, repeats)
        best = max(best, (2 * rows * d_in * d_out / seconds, (rows, d_in, d_out)))
    return best


def floor_section(fast_step: Callable[[], None], slow_step: Callable[[], None], rows: int, cfg: VadClipConfig,
                  train_slow: float, repeats: int) -> None:
    """(f): how far an exact step can go on this machine: ours' FLOPs at the fastest measured matrix product,
    with no other work, against the straightforward step measured in (a). `rows`: the batch's snippets."""
    ours, theirs = step_flops(fast_step), step_flops(slow_step)
    d, hidden = cfg.model.embed_dim, cfg.model.embed_dim * cfg.model.mlp_ratio
    rate, shape = gemm_rate([(rows, d, hidden), (rows, hidden, d), (rows, d, d)], repeats)
    floor = ours / rate
    print(f"(f) FLOPs per training step (matrix products and convolutions, forward and backward): straightforward "
          f"{theirs / 1e9:.1f} GFLOP, ours {ours / 1e9:.1f} GFLOP ({theirs / ours:.2f}x fewer)")
    print(f"    fastest float32 matrix product of the step's shapes here: {rate / 1e9:.0f} GFLOP/s (linear "
          f"{shape[0]}x{shape[1]} -> {shape[2]}); ours at that rate and nothing else: {floor * 1e3:.0f} ms = "
          f"{train_slow / floor:.2f}x the straightforward step, the ceiling of any exact option")


def trainer_step(cfg: VadClipConfig, data: VadDataset, idx: np.ndarray, device: torch.device,
                 folder: str) -> Callable[[], None]:
    """One optimisation step through the trainer's own step (batch source, autocast, loss scaler, compiled
    forward, AdamW kernel), always on the same batch, synchronised on CUDA."""
    trainer = _Trainer([cfg], data, device, [Path(folder)])

    def step() -> None:
        trainer.members[0].model.train()
        trainer._step([[idx]], 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def options_section(cfg: VadClipConfig, data: VadDataset, idx: np.ndarray, device: torch.device, repeats: int,
                    options: dict[str, tuple[dict[str, object], bool]], straightforward: float | None) -> None:
    """Each option's step against the default step (interleaved, one run); the best exact one against the
    straightforward step (`straightforward`: the default's ratio to it, row (a)) when measured on this device."""
    with tempfile.TemporaryDirectory(prefix="bench-options-") as folder:
        default = trainer_step(cfg, data, idx, device, folder)
        print(f"(d) speed options, training step on {device} (first call compiles; best of {repeats}):")
        best: tuple[float, str] | None = None
        for name, (overrides, exact) in options.items():
            option = trainer_step(apply_overrides(cfg, overrides), data, idx, device, folder)
            t_option, t_default = interleaved_best(option, default, repeats)
            speedup = t_default / t_option
            print(f"    {name:26s} default {t_default * 1e3:8.1f} ms   option {t_option * 1e3:8.1f} ms   "
                  f"{speedup:5.2f}x   {'exact' if exact else 'not exact'}")
            if exact and (best is None or speedup > best[0]):
                best = (speedup, name)
        if straightforward is not None and best is not None:
            print(f"    best exact option ({best[1]}) against the straightforward step: "
                  f"{straightforward * best[0]:5.2f}x (the default alone: {straightforward:5.2f}x)")


def gpu_section(args: argparse.Namespace, common: dict[str, object], device: torch.device | None = None) -> None:
    """(e): on CUDA only (`device`: another one to try the section's code on, e.g. cpu)."""
    if device is None:
        if not torch.cuda.is_available():
            print("(e) GPU section: skipped, no CUDA device here (torch.cuda.is_available() is False)")
            return
        device = torch.device("cuda")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"(e) GPU section on {where}")
    for name in ("synthetic", args.preset):
        cfg = preset(name, overrides={**common, "device": str(device)} if name != "synthetic"
                     else {"device": str(device)})
        data = load_dataset(cfg)
        idx = epoch_batches(data.train_labels[:, 0] > 0.5, cfg.optim.batch_size, cfg.optim.sampler,
                            np.random.default_rng(0))[0]
        print(f"  preset {name}: batch {cfg.optim.batch_size}, d={cfg.model.embed_dim}, L={cfg.model.visual_length}")
        options_section(cfg, data, idx, device, args.repeats, {**OPTIONS, **CUDA_OPTIONS}, None)
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
            step = trainer_step(cfg, data, idx, device, folder)
            step_s, _ = interleaved_best(step, step, args.repeats)
            if name == "synthetic":
                t0 = time.perf_counter()
                fit(cfg, data, out_dir=folder, progress=False)
                seconds = time.perf_counter() - t0
                print(f"    embedded default: a whole fit {seconds:.1f} s = {3600 / seconds:.0f} trials per GPU-hour "
                      "(one trial on the GPU)")
            else:
                steps = -(-XD_TRAINING_SAMPLES // cfg.optim.batch_size) * cfg.optim.epochs
                t0 = time.perf_counter()
                predict(make_model(cfg, data, device), data.test, cfg.model.visual_length, device)
                eval_s = time.perf_counter() - t0
                total = steps * step_s + cfg.optim.epochs * eval_s * XD_EVAL_VIDEOS / max(len(data.test), 1)
                print(f"    {name} at XD-Violence size (estimate): {steps} steps x {step_s * 1e3:.1f} ms + "
                      f"{cfg.optim.epochs} x (test + val) passes scaled to {XD_EVAL_VIDEOS} videos = "
                      f"{total / 60:.1f} min = {3600 / total:.1f} trials per GPU-hour")
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_fused  # the packed and fused measurements live there

    fused_args = argparse.Namespace(preset=args.preset, device=str(device), steps=10, cache=tempfile.mkdtemp(),
                                    packed=device.type == "cuda")
    bench_fused.bench_steps(fused_args)


if __name__ == "__main__":
    main()
