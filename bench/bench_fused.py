"""Fused seeds (vadclip.fused) against one trial per seed, in one run: (a) a training step, per seed, of the LGT row
alone and fused k = 3 and 5, beside one model on a k-times larger batch (what batching can win on this device at
all); (b) `ablation_lgt` end to end on the embedded default: trials (seeds) per hour unfused, fused k = 3 (3
seeds), fused k = 5 (5 seeds), each in a fresh project folder, and how far the fused rows' means land from the
unfused ones.

    python bench/bench_fused.py [--steps 20] [--skip-study]                    # CPU: (a) and (b)
    python bench/bench_fused.py --device cuda --preset xd --skip-study        # a GPU: (a) at the xd preset

On a GPU, (a) also runs 2 and 4 unfused trials packed on the GPU (separate processes, as Tune packs fractional-GPU
trials) and prints GPU memory per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vadclip.config import apply_overrides, preset
from vadclip.data import collate, load_dataset
from vadclip.fused import SeedStack
from vadclip.losses import total_loss
from vadclip.model.clip import ClipWeightsWarning
from vadclip.train import make_model, seed_everything

SEED = 234


def _setup(preset_name: str, device: str, cache: str):
    cfg = preset(preset_name, overrides={"data.dataset": "synthetic", "data.cache_dir": cache, "device": device}
                 if preset_name != "synthetic" else {"data.cache_dir": cache, "device": device})
    return cfg, load_dataset(cfg)


def _models(cfg, data, k: int, device: torch.device) -> list:
    out = []
    for i in range(k):
        seed_everything(SEED + i)
        out.append(make_model(apply_overrides(cfg, {"seed": SEED + i}), data, device))
    return out


def _batch(cfg, data, seed: int, step: int, device: torch.device, scale: int = 1):
    """A full batch (`scale` × the preset's) of training samples, drawn for (seed, step)."""
    size, n = cfg.optim.batch_size * scale, len(data.train_labels)
    idx = np.random.default_rng([seed, step]).choice(n, size, replace=n < size)
    feats, lengths = collate(data.train, idx, cfg.model.visual_length)
    return (torch.from_numpy(feats).to(device), torch.from_numpy(lengths).to(device),
            torch.from_numpy(data.train_labels[idx]).to(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_seconds(cfg, data, k: int, steps: int, device: torch.device, mode: str,
                 ready: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Seconds per step and peak GPU memory (GiB, 0 on a CPU) of: `alone` (one model), `fused` (k models in a
    SeedStack) or `batch` (one model on a k-times larger batch). `ready`: called after the warm-up, before timing."""
    models = _models(cfg, data, 1 if mode != "fused" else k, device)
    if mode == "fused":
        stack = SeedStack(models, cfg.loss)
        params = stack.trainable
    else:
        params = [p for p in models[0].parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr)

    def one(step: int) -> None:
        if mode == "fused":
            parts = [_batch(cfg, data, SEED + i, step, device) for i in range(k)]
            loss = stack.losses(*(torch.stack(p) for p in zip(*parts)))["loss"].sum()
        else:
            x, n, y = _batch(cfg, data, SEED, step, device, k if mode == "batch" else 1)
            models[0].train()
            loss = total_loss(models[0](x, n), n, y, cfg.loss)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for s in range(2):  # warm-up
        one(s)
    ready()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    for s in range(steps):
        one(s)
    _sync(device)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return (time.perf_counter() - t0) / steps, memory


def packed_seconds(args, n: int) -> float:
    """n unfused trials at once on the device (separate processes, timed together once all are warm): seconds per
    step of each, the slowest."""
    with tempfile.TemporaryDirectory(prefix="bench-fused-barrier-") as barrier:
        cmd = [sys.executable, __file__, "--worker", "--preset", args.preset, "--device", args.device,
               "--steps", str(args.steps), "--cache", args.cache, "--barrier", barrier, "--workers", str(n)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(json.loads(p.communicate()[0].strip().splitlines()[-1])["seconds"] for p in procs)


def barrier(folder: str, n: int) -> Callable[[], None]:
    """Wait until n processes have arrived in `folder`."""
    def wait() -> None:
        Path(folder, str(os.getpid())).touch()
        while len(list(Path(folder).iterdir())) < n:
            time.sleep(0.01)
    return wait


def bench_steps(args) -> None:
    device = torch.device(args.device)
    torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
    cfg, data = _setup(args.preset, args.device, args.cache)
    cfg = apply_overrides(cfg, {"model.temporal": "local+gcn"})
    alone, mem1 = step_seconds(cfg, data, 1, args.steps, device, "alone")
    print(f"(a) training step of the LGT row, preset {args.preset}, d={cfg.model.embed_dim}, "
          f"L={cfg.model.visual_length}, batch {cfg.optim.batch_size}, {device}"
          f"{', 1 thread' if device.type == 'cpu' else ''}")
    print(f"{'':34}{'ms/step':>9}{'ms/seed':>9}{'seeds/s':>9}{'vs alone':>10}{'GiB/seed':>10}")
    print(f"{'one seed alone':34}{alone * 1e3:9.1f}{alone * 1e3:9.1f}{1 / alone:9.1f}{1.0:9.2f}x{mem1:10.2f}")
    for k in (3, 5):
        fused, mem = step_seconds(cfg, data, k, args.steps, device, "fused")
        print(f"{f'fused k={k}':34}{fused * 1e3:9.1f}{fused / k * 1e3:9.1f}{k / fused:9.1f}{alone * k / fused:9.2f}x"
              f"{mem / k:10.2f}")
        batch, _ = step_seconds(cfg, data, k, args.steps, device, "batch")
        print(f"{f'one model, batch x{k} (the ceiling)':34}{batch * 1e3:9.1f}{batch / k * 1e3:9.1f}{k / batch:9.1f}"
              f"{alone * k / batch:9.2f}x")
    if device.type == "cuda" or args.packed:
        for n in (2, 4):
            packed = packed_seconds(args, n)
            print(f"{f'{n} unfused trials packed':34}{packed * 1e3:9.1f}{packed * 1e3:9.1f}{n / packed:9.1f}"
                  f"{alone * n / packed:9.2f}x")


# ---------------------------------------------------------------- (b) the study


def run_study(project: Path, fuse: int, seeds: int) -> float:
    project.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(project / "log.txt", "w") as log:
        subprocess.run([sys.executable, "-m", "study.run", "ablation_lgt", "--no-reuse", "--fuse-seeds", str(fuse),
                        "--seeds", str(seeds)], cwd=project, env=env, check=True, stdout=log,
                       stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def study_rows(project: Path) -> dict:
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    runs = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id], max_results=10_000)
            if "mlflow.parentRunId" in r.data.tags]
    start = min(r.info.start_time for r in runs) / 1000
    end = max(r.info.end_time for r in runs) / 1000
    ap: dict[str, list[float]] = {}
    for r in runs:
        if int(r.data.tags["seed"]) < SEED + 3:  # the rows over the first 3 seeds, comparable in every run
            ap.setdefault(r.data.tags["variant"], []).append(100 * r.data.metrics["final/ap"])
    return {"trials": len(runs), "phase": end - start, "ap": {v: float(np.mean(a)) for v, a in ap.items()}}


def bench_study() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fused-") as tmp:
        for label, fuse, seeds in (("unfused, 3 seeds", 1, 3), ("fused k=3, 3 seeds", 3, 3),
                                   ("fused k=5, 5 seeds", 5, 5)):
            project = Path(tmp) / f"k{fuse}"
            wall = run_study(project, fuse, seeds)
            rows.append((label, wall, study_rows(project)))
    base = rows[0][2]["trials"] / rows[0][1]
    print("\n(b) ablation_lgt on the embedded default (7 rows; a trial = a seed of a row), 2 CPU slots")
    print(f"{'':22}{'wall s':>8}{'trial phase s':>15}{'seeds':>7}{'seeds/h':>9}{'vs unfused':>12}{'max |ΔAP|':>11}")
    for label, wall, r in rows:
        delta = max(abs(r["ap"][v] - rows[0][2]["ap"][v]) for v in r["ap"])
        print(f"{label:22}{wall:8.1f}{r['phase']:15.1f}{r['trials']:7d}{r['trials'] / wall * 3600:9.0f}"
              f"{r['trials'] / wall / base:11.2f}x{delta:11.2f}")
    print("max |ΔAP|: the largest difference of a row's mean test AP (points, first 3 seeds) from the unfused run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="synthetic", help="synthetic (default) | xd | ucf: model and batch "
                        "sizes of that preset, on synthetic data of its shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-study", action="store_true")
    parser.add_argument("--packed", action="store_true", help="also 2 and 4 unfused trials at once (default on a GPU)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bench-fused-data"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ClipWeightsWarning)  # the synthetic preset's random tower
    if args.worker:  # one unfused trial of the packed measurement
        device = torch.device(args.device)
        if device.type == "cpu":
            torch.set_num_threads(1)
        cfg, data = _setup(args.preset, args.device, args.cache)
        cfg = apply_overrides(cfg, {"model.temporal": "local+gcn"})
        seconds = step_seconds(cfg, data, 1, args.steps, device, "alone", barrier(args.barrier, args.workers))[0]
        print(json.dumps({"seconds": seconds}))
        return
    bench_steps(args)
    if not args.skip_study:
        bench_study()


if __name__ == "__main__":
    main()
