"""Study efficiency, old way vs new, in one run: how much of the machine a study spends training.

    python bench/bench_study.py [--study ablation_lgt] [--old 831ce90]

Runs `python -m study.run STUDY --no-reuse` on the embedded default twice, each in a fresh project folder: once
with the code of commit `--old` (a git worktree put first on PYTHONPATH, which Ray's workers inherit) and once
with this working tree. Per run it reads the run's own MLflow store and Tune folder and prints:

- wall: the whole invocation (process start to exit), and the trial phase (first trial's run start to last
  trial's run end, from MLflow);
- trials/hour over the whole invocation; worker processes that ran trials (distinct pids in Tune's results);
- efficiency = Σ trial training time ÷ (wall × concurrent trial slots), for the whole invocation and the trial
  phase. Σ is the same work in both runs (the same trials; the bench checks that every trial's test AP is
  equal): each trial's `fit` seconds, training and evaluation without model building or callbacks, as the new
  code logs them (`final/time/fit_seconds`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
OLD = "831ce90"  # main before worker reuse and the vectorised bootstrap
FIT_SECONDS = "final/time/fit_seconds"


def run_study(code: Path, project: Path, study: str) -> float:
    """One invocation with `code` first on the import path; returns its wall seconds."""
    project.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import study; print(study.__file__)"], cwd=project, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(code)):
        raise SystemExit(f"{code}: python imports study from {where}")
    t0 = time.perf_counter()
    with open(project / "log.txt", "w") as log:
        subprocess.run([sys.executable, "-m", "study.run", study, "--no-reuse"], cwd=project, env=env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def measure(project: Path, wall: float) -> dict:
    c = MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    experiments = c.search_experiments()
    runs = [r for e in experiments for r in c.search_runs([e.experiment_id], max_results=10_000)
            if "mlflow.parentRunId" in r.data.tags]
    pids = {json.loads(f.read_text().splitlines()[0])["pid"] for f in project.glob("ray_results/*/*/result.json")}
    start = min(r.info.start_time for r in runs) / 1000
    end = max(r.info.end_time for r in runs) / 1000
    return {"wall": wall, "phase": end - start, "trials": len(runs), "processes": len(pids),
            "ap": {(r.data.tags["variant"], r.data.tags["seed"]): r.data.metrics["final/ap"] for r in runs},
            "fit": {(r.data.tags["variant"], r.data.tags["seed"]): r.data.metrics.get(FIT_SECONDS) for r in runs}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="ablation_lgt")
    parser.add_argument("--old", default=OLD, help="commit of the old way (default: %(default)s)")
    parser.add_argument("--slots", type=int, default=os.cpu_count(), help="concurrent trials (1 CPU each)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        old_code = Path(tmp) / "old-code"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(old_code), args.old],
                       check=True)
        try:
            results = {}
            for label, code in (("old", old_code), ("new", REPO)):
                project = Path(tmp) / label
                results[label] = measure(project, run_study(code, project, args.study))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_code)], check=True)
    old, new = results["old"], results["new"]
    if old["ap"] != new["ap"]:
        differ = sorted(k for k in new["ap"] if old["ap"].get(k) != new["ap"][k])
        raise SystemExit(f"old and new trials differ in final/ap: {differ[:5]}")
    work = sum(new["fit"].values())
    print(f"{args.study}: {new['trials']} trials on {args.slots} slots; Σ trial training time {work:.1f} s "
          f"(each trial's fit: training + evaluation); every trial's test AP equal in both runs")
    print(f"{'':22}{'wall s':>8}{'trial phase s':>15}{'trials/h':>10}{'processes':>11}"
          f"{'efficiency':>12}{'(trial phase)':>15}")
    for label, r in (("old " + args.old, old), ("new (this tree)", new)):
        print(f"{label:22}{r['wall']:8.1f}{r['phase']:15.1f}{r['trials'] / r['wall'] * 3600:10.0f}"
              f"{r['processes']:11d}{work / (r['wall'] * args.slots):12.2f}"
              f"{work / (r['phase'] * args.slots):15.2f}")
    print(f"new / old: {old['wall'] / new['wall']:.2f}x trials/hour")


if __name__ == "__main__":
    main()
