"""Full-scale data on one machine: the feature cache's first build and later loads, and a smoke study's peak
memory (the whole process tree, shared pages counted once) against the cache's size.

    python -m vadclip.data.fullscale --scale ucf-full /data/ucf-full          # once: ~17 GB, under a minute
    python bench/bench_scale.py --layout /data/ucf-full --dataset ucf [--study [--set KEY=VALUE ...]]

Each load runs in a fresh process (as a trial would). The first load is timed after the layout's cache folder
was removed; "later" loads map it. `--study` then runs `python -m study.run ablation_lgt` on the layout with one
seed, 2 steps per epoch and 1 epoch (2 concurrent trials), sampling the proportional set size (PSS, from
/proc/PID/smaps_rollup: a page shared by n processes counts 1/n in each) of every process of the study's session
every half second, and greps Ray's logs for object spilling.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = """
import json, sys, time
from vadclip.config import preset
from vadclip.data import load_dataset
from vadclip.data.cache import cache_location
cfg = preset(sys.argv[1], overrides={"data.lists": sys.argv[2], "data.features": sys.argv[3], "clip.weights": None})
t0 = time.perf_counter()
data = load_dataset(cfg)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "cache": str(cache_location(cfg)), "train_items": len(data.train)}))
"""


def _load(dataset: str, lists: Path, features: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, dataset, str(lists), str(features)], check=True,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _bytes(folder: Path, suffix: str = ".npy") -> int:
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}") if ".vadclip-cache" not in p.parts)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _session(pid: int) -> list[int]:
    """Processes of the study: its process group (Ray's daemons stay in the driver's session)."""
    sid = os.getsid(pid)
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def _pss_kib(pid: int) -> dict[str, int]:
    """Pss and its parts (Pss_Anon: the process's own memory; Pss_File: mapped files, e.g. the cache), in KiB."""
    out = {"Pss": 0, "Pss_Anon": 0, "Pss_File": 0, "Pss_Shmem": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key = line.split(":")[0]
            if key in out:
                out[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:60].strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return "?"


def _study(dataset: str, lists: Path, features: Path, project: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "study.run", "ablation_lgt", "--dataset", dataset, "--lists", str(lists),
           "--features", str(features), "--seeds", "1", "--set", "optim.max_steps_per_epoch=2", *overrides,
           "--max-epochs", "1", "--num-cpus", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    peak, peak_procs, at_peak = 0, 0, []
    while proc.poll() is None:
        pss = {p: _pss_kib(p) for p in _session(proc.pid)}
        total = sum(v["Pss"] for v in pss.values())
        if total > peak:
            peak, peak_procs = total, len(pss)
            at_peak = sorted(((v["Pss"], v["Pss_Anon"], v["Pss_File"], v["Pss_Shmem"], _name(p))
                              for p, v in pss.items()), reverse=True)[:4]
        time.sleep(0.5)
    out = proc.stdout.read() if proc.stdout else ""
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    # Ray logs "Spilled N MiB, M objects" when it spills; its state dumps report "num bytes currently spilled"
    spilled = [line for f in logs.glob("raylet*.out") for line in f.read_text(errors="replace").splitlines()
               if re.search(r"Spilled \d+ MiB", line)
               or (m := re.search(r"num bytes currently spilled: (\d+)", line)) and int(m.group(1)) > 0]
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - t0, "peak_pss_gib": peak / 2**20,
            "processes_at_peak": peak_procs, "largest_at_peak": at_peak, "spill_lines": spilled[:5],
            "tail": out.strip().splitlines()[-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", type=Path, required=True, help="a folder written by vadclip.data.fullscale")
    parser.add_argument("--dataset", choices=("ucf", "xd"), required=True)
    parser.add_argument("--later", type=int, default=3, help="later loads to time")
    parser.add_argument("--study", action="store_true", help="also run the smoke study and measure its memory")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", action="extend",
                        help="more config overrides of the study, e.g. optim.recompute_activations=true")
    args = parser.parse_args()
    lists, features = args.layout / "list", args.layout / "features"
    files = _bytes(features)
    probe = _load(args.dataset, lists, features)  # finds where the cache lives (and builds it)
    cache = Path(probe["cache"])
    shutil.rmtree(cache, ignore_errors=True)
    os.sync()
    first = _load(args.dataset, lists, features)
    later = [_load(args.dataset, lists, features)["seconds"] for _ in range(args.later)]
    size = _folder_bytes(cache)
    print(f"layout {args.layout}: {files / 2**30:.2f} GiB of feature files; cache {size / 2**30:.2f} GiB at {cache}")
    print(f"first load (cache build): {first['seconds']:.1f} s = {files / 2**30 / first['seconds']:.2f} GiB/s of "
          f"feature files read; {first['train_items']} training items")
    print(f"later loads: {', '.join(f'{s:.2f}' for s in later)} s (max {max(later):.2f} s)")
    if args.study:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as project:
            result = _study(args.dataset, lists, features, Path(project), [x for o in args.set for x in ("--set", o)])
        print(f"study: exit {result['returncode']}, {result['seconds']:.0f} s; peak PSS of the process tree "
              f"{result['peak_pss_gib']:.2f} GiB ({result['processes_at_peak']} processes) = "
              f"{result['peak_pss_gib'] * 2**30 / size:.2f} x the cache; spilling: "
              f"{'none' if not result['spill_lines'] else result['spill_lines']}")
        print("largest processes at the peak (PSS = anonymous + mapped files + shared memory):")
        for kib, anon, file, shmem, name in result["largest_at_peak"]:
            print(f"  {kib / 2**20:.2f} GiB = {anon / 2**20:.2f} + {file / 2**20:.2f} + {shmem / 2**20:.2f}  {name}")
        print("\n".join(result["tail"]))


if __name__ == "__main__":
    main()
