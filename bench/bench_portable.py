"""Portable CPU kernels (vadclip.portable), in one run: (a) the bits, native vs portable, under every instruction-set
level this machine can be forced to; (b) the cost of a synthetic fit, native vs portable, alternated; (c) with
--study, `ablation_lgt` end to end, native vs portable.

    python bench/bench_portable.py [--epochs 1] [--rounds 5] [--skip-bits] [--study]

(a) One synthetic fit (the preset, --epochs, 1 thread as a study trial, fresh synthetic data) per child process,
native kernels (the code before portable kernels) or portable ones, under each simulated CPU: every dispatch that
a machine decides is forced down to one level at a time:

    sse4.2  ATEN_CPU_CAPABILITY=default, numpy's OpenBLAS core Nehalem, oneDNN SSE4.1, numpy's SIMD without
            X86_V3/X86_V4, glibc's libm variants without AVX, AVX2, FMA, AVX-512 (GLIBC_TUNABLES)
    avx2    ATEN_CPU_CAPABILITY=avx2, OpenBLAS Haswell, oneDNN AVX2, numpy without X86_V4, glibc without AVX-512
    avx512  this machine as it is (ATEN_CPU_CAPABILITY=avx512)

plus, natively, MKL's branch COMPATIBLE vs the default (on AMD the only other branch MKL takes: its AVX2/AVX512
branches fall back to AUTO there) and 2 threads vs 1, and, portably, an environment asking for MKL AUTO and 2
threads. Prints the sha256 of the synthetic data, of metrics.json and of the trained weights. Portable kernels
override what a machine (or its environment) says, so portable rows that agree under every level are the proof;
the native rows show what they fix.

(b) Training time of a synthetic fit (Σ the epochs' train/seconds), the fit (training and evaluation) and the
process's CPU seconds over the fit: native, native with each costly pin alone (MKL COMPATIBLE; oneDNN and NNPACK
off), portable, and portable at ATen's default level (what a CPU without AVX2 runs), alternated over --rounds in
separate processes on the same data; median ratios to native.

(c) --study: `python -m study.run ablation_lgt --no-reuse` in two fresh project folders, `--set
portable_kernels=false` and the preset's portable kernels: wall, Σ trial fit seconds (final/time/fit_seconds)
and their ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vadclip import portable

REPO = Path(__file__).resolve().parents[1]
FIT_SECONDS = "final/time/fit_seconds"
LEVELS = {
    "sse4.2": {"ATEN_CPU_CAPABILITY": "default", "OPENBLAS_CORETYPE": "Nehalem", "ONEDNN_MAX_CPU_ISA": "SSE41",
               "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL",
               "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX,-AVX2,-FMA,-AVX512F"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "OPENBLAS_CORETYPE": "Haswell", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
}
EXTRA = {"MKL COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"}, "2 threads": {"BENCH_THREADS": "2"},
         "env AUTO, 2 thr": {"MKL_CBWR": "AUTO", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}}
# (mode, level, extra) rows of (a); the portable extra is an environment that portable kernels override
BITS_ROWS = ([("native", level, "") for level in LEVELS] + [("native", "avx512", "MKL COMPATIBLE"),
             ("native", "avx512", "2 threads")] + [("portable", level, "") for level in LEVELS]
             + [("portable", "avx512", "env AUTO, 2 thr")])
# (b): native, each costly pin alone, portable, portable at ATen's default level (a CPU without AVX2)
COST_MODES = {"native": {}, "native, MKL COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"}, "native, oneDNN+NNPACK off": {},
              "portable": {}, "portable-default": {}}


def child(mode: str, epochs: int, cache: str) -> None:
    """One fit; prints a JSON line. Runs before torch is imported: portable pins must come first."""
    if mode == "portable-default":  # portable, but ATen's default kernels (a CPU without AVX2)
        portable.aten_level = lambda flags=None: "default"
    import torch

    threads = int(os.environ.get("BENCH_THREADS", "1"))
    if mode.startswith("portable"):
        portable.configure(threads)
    else:
        torch.set_num_threads(threads)
    if mode == "native, oneDNN+NNPACK off":
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
        torch.backends.nnpack.set_flags(False)
    kernels = portable.state()

    from vadclip.config import preset
    from vadclip.data import load_dataset
    from vadclip.train import fit

    cfg = preset("synthetic", overrides={"optim.epochs": epochs, "data.cache_dir": cache,
                                         "portable_kernels": mode.startswith("portable")})
    data = load_dataset(cfg)
    with tempfile.TemporaryDirectory(prefix="bench-portable-") as tmp:
        out = Path(tmp)
        cpu = time.process_time()
        result = fit(cfg, data, out_dir=out, progress=False)
        cpu = time.process_time() - cpu
        metrics = hashlib.sha256((out / "metrics.json").read_bytes()).hexdigest()
        state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["model"]
    data_sha, weights = hashlib.sha256(), hashlib.sha256()
    for path in sorted(Path(cache).rglob("*.npy")):
        data_sha.update(path.read_bytes())
    for key in sorted(state):
        weights.update(key.encode())
        weights.update(state[key].detach().contiguous().numpy().tobytes())
    print(json.dumps({"data": data_sha.hexdigest(), "metrics": metrics, "weights": weights.hexdigest(),
                      "ap": result.metrics["test"]["ap"], "kernels": kernels.describe(),
                      "train": sum(h["train/seconds"] for h in result.history), "fit": result.seconds, "cpu": cpu}))


def run_child(mode: str, env: dict[str, str], epochs: int, cache: str) -> dict:
    """A child process as a study's would start: portable modes get the BLAS core at process start."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env, **(portable.data_env() if mode.startswith("portable") else {})}
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--epochs", str(epochs), "--cache", cache],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bits(epochs: int) -> None:
    print(f"(a) bits of a synthetic fit ({epochs} epoch(s), fresh data per run), sha256 (first 12 hex digits)")
    print(f"{'kernels':10}{'forced level':16}{'':16}{'data':>14}{'metrics.json':>14}{'weights':>14}{'test AP':>10}"
          "  ran with")
    seen: dict[str, set[tuple[str, str, str]]] = {"native": set(), "portable": set()}
    for mode, level, extra in BITS_ROWS:
        with tempfile.TemporaryDirectory(prefix="bench-portable-data-") as cache:
            r = run_child(mode, {**LEVELS[level], **EXTRA.get(extra, {})}, epochs, cache)
        seen[mode].add((r["data"], r["metrics"], r["weights"]))
        print(f"{mode:10}{level:16}{extra:16}{r['data'][:12]:>14}{r['metrics'][:12]:>14}{r['weights'][:12]:>14}"
              f"{r['ap']:10.4f}  {r['kernels']}", flush=True)
    for mode, hashes in seen.items():
        print(f"{mode}: {len(hashes)} distinct result(s) over {sum(m == mode for m, _, _ in BITS_ROWS)} runs")


def cost(epochs: int, rounds: int) -> None:
    print(f"\n(b) cost of a synthetic fit ({epochs} epoch(s), 1 thread), {rounds} alternated rounds, medians")
    times: dict[str, list[dict]] = {m: [] for m in COST_MODES}
    with tempfile.TemporaryDirectory(prefix="bench-portable-cost-") as tmp:
        caches = {m: str(Path(tmp) / m.split(",")[0]) for m in COST_MODES}  # native or portable data
        for mode in ("native", "portable"):  # writes each data layout once, untimed
            run_child(mode, {}, 1, caches[mode])
        for _ in range(rounds):
            for mode, env in COST_MODES.items():
                times[mode].append(run_child(mode, env, epochs, caches[mode]))
    base = {k: statistics.median(r[k] for r in times["native"]) for k in ("train", "fit", "cpu")}
    print(f"{'':28}{'train s':>9}{'fit s':>9}{'CPU s':>9}{'train ×':>9}{'fit ×':>8}{'CPU ×':>8}  kernels")
    for mode in COST_MODES:
        med = {k: statistics.median(r[k] for r in times[mode]) for k in ("train", "fit", "cpu")}
        print(f"{mode:28}{med['train']:9.2f}{med['fit']:9.2f}{med['cpu']:9.2f}{med['train'] / base['train']:9.2f}"
              f"{med['fit'] / base['fit']:8.2f}{med['cpu'] / base['cpu']:8.2f}  {times[mode][0]['kernels']}")


def study(name: str) -> None:
    from mlflow import MlflowClient

    print(f"\n(c) {name}, whole study (--no-reuse), each in a fresh project folder")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-portable-study-") as tmp:
        for label, flags in (("native", ["--set", "portable_kernels=false"]), ("portable", [])):
            project = Path(tmp) / label
            project.mkdir()
            env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
            t0 = time.perf_counter()
            with open(project / "log.txt", "w") as log:
                subprocess.run([sys.executable, "-m", "study.run", name, "--no-reuse",
                                "--set", f"data.cache_dir={project / 'cache'}", *flags],
                               cwd=project, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
            wall = time.perf_counter() - t0
            c = MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
            runs = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id], max_results=10_000)
                    if "mlflow.parentRunId" in r.data.tags]
            table = (project / "reports" / f"{name}.csv").read_bytes()
            results[label] = {"wall": wall, "fit": sum(r.data.metrics.get(FIT_SECONDS, 0.0) for r in runs),
                              "trials": len(runs), "csv": hashlib.sha256(table).hexdigest(),
                              "kernels": sorted({r.data.tags.get("cpu_capability", "-") for r in runs})}
    native = results["native"]
    print(f"{'':10}{'wall s':>9}{'Σ fit s':>9}{'trials':>8}{'wall ×':>8}{'fit ×':>8}  report csv    CPU capability")
    for label, r in results.items():
        print(f"{label:10}{r['wall']:9.1f}{r['fit']:9.1f}{r['trials']:8d}{r['wall'] / native['wall']:8.2f}"
              f"{r['fit'] / native['fit']:8.2f}  {r['csv'][:12]}  {', '.join(r['kernels'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--study", action="store_true", help="also ablation_lgt end to end (minutes)")
    parser.add_argument("--skip-bits", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.epochs, args.cache)
        return
    flags = sorted(portable.cpu_flags() & {"avx2", "fma", "avx512f"})
    print(f"this CPU has {', '.join(flags) or 'none of avx2, fma, avx512f'}; portable kernels pin ATen to "
          f"{portable.aten_level()}, MKL to {portable.MKL_BRANCH}, numpy's OpenBLAS to {portable.BLAS_CORE}")
    if not args.skip_bits:
        bits(args.epochs)
    cost(args.epochs, args.rounds)
    if args.study:
        study("ablation_lgt")


if __name__ == "__main__":
    main()
