"""`python -m study.slurm NAME [study flags] --nodes N --gpus-per-node G --time HH:MM:SS`: a study as one Slurm job.

The job starts a Ray cluster over its nodes (the head on the first node, a worker on every other one, each in its
own `srun` step with the CPUs and GPUs Slurm gave that node), an MLflow server on the first node, runs
`python -m study.run NAME ... --address HEAD:PORT` against both, then stops them. Near its time limit (or when
preempted) it stops the study as Ctrl-C would (finished trials kept), saves the MLflow store and requeues itself;
the restarted job continues with `--resume`."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from study import spec as specs
from study.run import STATE_DIR
from study.run import build_parser as run_parser
from vadclip.errors import Parser, VadClipError

EXIT_BAD_INPUT = 2
LOG_DIR = "slurm-logs"  # in the project folder: the job's stdout and stderr, one file per job (all its restarts)
# flags the job sets itself: the cluster's address, the storage beside the project, the job's MLflow server
OWN_FLAGS = ("--address", "--storage", "--tracking-uri", "--num-cpus", "--dry-run")
TIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")

# The batch script. @NAME@ fields are filled in (shell-quoted) by job_script(); everything else is bash.
JOB_SCRIPT = r"""#!/bin/bash
# Written by `python -m study.slurm` for study @STUDY@; submitted with: sbatch @SBATCH_ARGS@
set -u
PY=@PYTHON@
PROJECT=@PROJECT@
STUDY_ARGS=(@STUDY_ARGS@)
STATE=@STATE_FILE@  # study.run's pointer to the invocation --resume continues
TRACKING_URI=@TRACKING_URI@  # '' = this job's own MLflow server
NODES=@NODES@
JOB=$SLURM_JOB_ID
RESTARTS=${SLURM_RESTART_COUNT:-0}
cd "$PROJECT" || exit 1
export PY JOB
log() { echo "[$(date '+%F %T') study.slurm] $*"; }

# Ports: a block of 12 derived from the job id, so that jobs sharing a node (other users' or our own) never meet on
# Ray's fixed defaults (6379, 8265, 10001, 52365 ...); jobs whose ids differ by a multiple of 1000 could, and do
# not run at the same time in practice. The blocks lie in 20000-31999: above Ray's worker ports (10002-19999) and
# below the kernel's ephemeral range (32768-60999), where any outgoing connection may hold a port already.
BASE=$((20000 + (JOB % 1000) * 12))
RAY_PORT=$BASE
MLFLOW_PORT=$((BASE + 11))
export RAY_PORT BASE
# Node-local scratch: Ray's sessions (its sockets need a short path) and the MLflow database while the job runs
RAY_TMP=/tmp/ray-vadclip-$JOB
LOCAL=${SLURM_TMPDIR:-/tmp}/vadclip-$JOB
export RAY_TMP
# Ray's token authentication with a token of this job's own: nobody else on the nodes can join its cluster or run
# code in it through its ports. The steps and the driver get it from the environment (readable by its owner only).
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_MODE RAY_AUTH_TOKEN

node_ip() {  # the address Slurm reaches a node at (its NodeAddr), as an IPv4 address for Ray
  local addr
  addr=$(scontrol show node "$1" | grep -oE 'NodeAddr=[^ ]+' | cut -d= -f2)
  getent ahostsv4 "${addr:-$1}" | awk 'NR == 1 {print $1}'
}

start_node() {  # in one srun step per node: Ray with this node's CPUs and the GPUs Slurm gave the step
  local ip gpus=0 role=$1
  ip=$(node_ip "$SLURMD_NODENAME")
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then gpus=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"); fi
  mkdir -p "$RAY_TMP"
  local ports=(--node-ip-address="$ip" --num-cpus="$SLURM_CPUS_ON_NODE" --num-gpus="$gpus" --temp-dir="$RAY_TMP"
    --node-manager-port=$((BASE + 1)) --object-manager-port=$((BASE + 2)) --metrics-export-port=$((BASE + 3))
    --dashboard-agent-listen-port=$((BASE + 4)) --dashboard-agent-grpc-port=$((BASE + 5))
    --runtime-env-agent-port=$((BASE + 6)))
  if [ "$role" = head ]; then
    # Ray Client's server (default port 10001) runs only where ray[client] is installed; Ray refuses its port without
    if "$PY" -c 'from ray._private.utils import get_ray_client_dependency_error as e; exit(e() is not None)'; then
      ports+=(--ray-client-server-port=$((BASE + 8)))
    fi
    "$PY" -m ray.scripts.scripts start --block --head --port="$RAY_PORT" --include-dashboard=false \
      --dashboard-port=$((BASE + 7)) "${ports[@]}" &
  else
    local i
    for i in $(seq 1 150); do (exec 3<>"/dev/tcp/$HEAD_IP/$RAY_PORT") 2>/dev/null && break; sleep 2; done
    "$PY" -m ray.scripts.scripts start --block --address="$HEAD_IP:$RAY_PORT" "${ports[@]}" &
  fi
  echo $! >"$RAY_TMP/ray-start.pid"  # stop_node signals it
  wait $!
  [ -f "$RAY_TMP/stopping" ]  # ended by stop_node: a clean exit; otherwise Ray failed on this node
}

stop_node() {  # "ray stop" for this job only: `ray stop` would end every Ray of the user on the node, other jobs'
  # too. SIGTERM to `ray start --block` makes it end the node's Ray processes (its reaper); wait for them to go.
  local pidfile=$RAY_TMP/ray-start.pid pid i
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  : >"$RAY_TMP/stopping"
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 1 60); do
    pgrep -f -- "$RAY_TMP" >/dev/null || break
    sleep 1
  done
  pkill -KILL -f -- "$RAY_TMP" 2>/dev/null  # whatever ignored SIGTERM for a minute
  for i in $(seq 1 10); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
}
export -f node_ip start_node stop_node

STOP=0
DRIVER=
on_term() {  # --signal=B:TERM@secs before the time limit, or preemption: stop the study as Ctrl-C would
  STOP=1
  log "SIGTERM: stopping the study (finished trials are kept), then requeueing the job"
  if [ -n "$DRIVER" ]; then kill -INT "$DRIVER" 2>/dev/null; fi
}
trap on_term TERM

MLFLOW_PID=
save_store() {  # the server's SQLite database to the project folder, copied consistently (SQLite's backup API)
  [ -n "$MLFLOW_PID" ] || return 0
  kill -TERM -- "-$MLFLOW_PID" 2>/dev/null  # its own process group: the server and its workers
  wait "$MLFLOW_PID" 2>/dev/null
  MLFLOW_PID=
  "$PY" - "$LOCAL/mlruns.db" "$PROJECT/mlruns.db" <<'EOF' && log "MLflow store saved to $PROJECT/mlruns.db"
import os, sqlite3, sys
source, target = sys.argv[1], sys.argv[2]
partial = f"{target}.{os.getpid()}.part"
with sqlite3.connect(source) as src, sqlite3.connect(partial) as dst:
    src.backup(dst)
os.replace(partial, target)  # never half a database in the project folder
EOF
}

STEPS=()
cleanup() {
  log "stopping Ray on every node"
  srun --overlap --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 bash -c stop_node
  for pid in "${STEPS[@]}"; do wait "$pid" 2>/dev/null; done
  srun --overlap --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 rm -rf "$RAY_TMP"
  save_store
  rm -rf "$LOCAL"
}

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_IP=$(node_ip "$HEAD_NODE")
export HEAD_IP
log "job $JOB (restart $RESTARTS) on $SLURM_JOB_NODELIST: Ray head $HEAD_IP:$RAY_PORT"
mkdir -p "$LOCAL"

URI=$TRACKING_URI
if [ -z "$URI" ]; then
  # MLflow: SQLite on a network file system is unsafe (its locking is unreliable there), so the store lives on
  # this node's local disk behind a server the trials log to; it is copied to the project folder at the end and
  # copied back from there when the job restarts. Artifacts go straight to the project folder.
  if [ -f "$PROJECT/mlruns.db" ]; then cp "$PROJECT/mlruns.db" "$LOCAL/mlruns.db"; fi
  set -m  # a process group of its own: stopping it stops its workers
  "$PY" -m mlflow server --backend-store-uri "sqlite:///$LOCAL/mlruns.db" \
    --artifacts-destination "$PROJECT/mlartifacts" --host "$HEAD_IP" --port "$MLFLOW_PORT" --workers 2 \
    --allowed-hosts "$HEAD_IP,$HEAD_IP:$MLFLOW_PORT,localhost,localhost:$MLFLOW_PORT" \
    >>"$PROJECT/@LOG_DIR@/@STUDY@-$JOB-mlflow.log" 2>&1 &
  MLFLOW_PID=$!
  set +m
  URI=http://$HEAD_IP:$MLFLOW_PORT
fi

srun --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --cpus-per-task="$SLURM_CPUS_ON_NODE" bash -c "start_node head" &
STEPS+=($!)
if [ "$NODES" -gt 1 ]; then
  srun --nodes=$((NODES - 1)) --ntasks=$((NODES - 1)) --ntasks-per-node=1 --exclude="$HEAD_NODE" \
    --cpus-per-task="$SLURM_CPUS_ON_NODE" bash -c "start_node worker" &
  STEPS+=($!)
fi

# Wait until every node has joined Ray and the MLflow server answers (at most 5 minutes).
"$PY" - "$HEAD_IP:$RAY_PORT" "$NODES" "$URI" <<'EOF' &
import socket, sys, time, urllib.request
address, nodes, uri = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.time() + 300
def up(test):
    while time.time() < deadline:
        try:
            if test():
                return True
        except Exception:
            pass
        time.sleep(2)
    return False
host, port = address.rsplit(":", 1)
if not up(lambda: socket.create_connection((host, int(port)), timeout=5).close() is None):
    sys.exit(f"no Ray head answers on {address}")
import ray
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
if not up(lambda: sum(n["Alive"] for n in ray.nodes()) >= nodes):
    sys.exit(f"{sum(n['Alive'] for n in ray.nodes())} of {nodes} nodes joined Ray at {address}")
ray.shutdown()
if uri.startswith("http") and not up(lambda: urllib.request.urlopen(f"{uri}/health", timeout=5).status == 200):
    sys.exit(f"the MLflow server {uri} does not answer")
print(f"{nodes} node(s) in Ray at {address}; MLflow at {uri}")
EOF
WAITER=$!
while kill -0 "$WAITER" 2>/dev/null; do  # a node whose Ray failed to start ends the wait
  for pid in "${STEPS[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then log "Ray failed to start on a node (see above)"; kill "$WAITER"; fi
  done
  sleep 1
done
wait "$WAITER"; READY=$?

RC=1
if [ "$READY" -ne 0 ]; then
  log "the cluster did not come up (see above)"
elif [ "$STOP" -eq 0 ]; then
  # A restarted job continues the invocation its first run started (study.run --resume), if that run got as far as
  # recording one: the pointer differs from the one saved before the job's first start.
  BEFORE=$PROJECT/@STATE_DIR@/slurm-$JOB.before
  RESUME=()
  if [ "$RESTARTS" -eq 0 ]; then
    mkdir -p "$(dirname "$BEFORE")"
    if [ -f "$STATE" ]; then cp "$STATE" "$BEFORE"; else : >"$BEFORE"; fi
  elif [ -f "$STATE" ] && ! cmp -s "$STATE" "$BEFORE" && [[ " ${STUDY_ARGS[*]} " != *" --resume "* ]]; then
    RESUME=(--resume)
  fi
  log "python -m study.run ${STUDY_ARGS[*]} ${RESUME[*]} --address $HEAD_IP:$RAY_PORT"
  set -m  # not in the script's process group: Slurm's signals reach the driver only through on_term
  "$PY" -m study.run "${STUDY_ARGS[@]}" "${RESUME[@]}" --address "$HEAD_IP:$RAY_PORT" \
    --storage "$PROJECT/ray_results" --tracking-uri "$URI" &
  DRIVER=$!
  set +m
  wait "$DRIVER"; RC=$?
  while kill -0 "$DRIVER" 2>/dev/null; do wait "$DRIVER"; RC=$?; done  # a trapped signal ends `wait` early
  log "study.run exited with $RC"
fi

cleanup
if [ "$STOP" -eq 1 ] && scontrol show job "$JOB" | grep -q 'JobState=CANCELLED'; then
  log "job $JOB was cancelled (scancel): not requeued; continue later with python -m study.slurm ... --resume"
elif [ "$STOP" -eq 1 ] && [ "$RC" -ne 0 ]; then
  log "requeueing job $JOB: it restarts with --resume once Slurm starts it again"
  if scontrol requeue "$JOB"; then exit 0; fi  # Slurm ends this instance; the next starts from the top
  log "scontrol requeue failed: continue with python -m study.slurm ... --resume"
fi
if [ "$RC" -eq 0 ]; then rm -f "$PROJECT/@STATE_DIR@/slurm-$JOB.before"; fi
log "report: $PROJECT/reports/@STUDY@.md"
exit "$RC"
"""


class SlurmError(VadClipError, RuntimeError):
    """Bad input found before anything is submitted; printed as one line."""


def parse_time(text: str) -> int:
    """Slurm's `[D-]HH:MM:SS` time limit in seconds."""
    match = TIME.match(text)
    if match is None:
        raise SlurmError(f"--time {text!r}: expected HH:MM:SS or D-HH:MM:SS")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise SlurmError(f"--time {text!r}: must be longer than 0")
    return total


def signal_lead(limit: int) -> int:
    """Seconds before the time limit the job is told to stop: trials end gracefully, the store is saved, Ray
    stopped. A fifth of the limit, between 1 and 5 minutes (Slurm sends the signal up to a minute late)."""
    return max(60, min(300, limit // 5))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m study.slurm", description=(__doc__ or "").splitlines()[0], allow_abbrev=False,
               epilog="Every other flag is a study flag, passed on to python -m study.run (see its -h).")
    p.add_argument("name", help="study name (a YAML in search_spaces/) or a path to a study YAML")
    p.add_argument("--nodes", type=int, required=True, help="nodes of the job (the Ray cluster)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: CPU only)")
    p.add_argument("--time", required=True, help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    p.add_argument("--cpus-per-node", type=int,
                   help="CPUs per node (default: whole nodes, sbatch --exclusive)")
    p.add_argument("--tracking-uri", help="an MLflow server you run (http://HOST:PORT); default: the job runs one, "
                   "its store saved to ./mlruns.db")
    p.add_argument("--python", default=sys.executable, help="the Python on the nodes (default: this one, %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script and the sbatch command; submit "
                   "nothing")
    return p


def study_args(name: str, flags: Sequence[str]) -> list[str]:
    """The study and its flags as the job passes them to study.run: checked here with study.run's own parser, a
    YAML path made absolute (the job runs in the project folder, maybe on another machine's mount)."""
    for flag in flags:
        if flag.split("=", 1)[0] in OWN_FLAGS:
            raise SlurmError(f"{flag.split('=', 1)[0]}: set by the job itself; leave it out")
    parser = run_parser()
    parser.prog = "python -m study.slurm"
    parser.parse_args([name, *flags])  # exits 2 with one line on a bad study flag
    target = str(Path(name).resolve()) if name.endswith(".yaml") else name
    return [target, *flags]


def load_spec(name: str) -> specs.StudySpec:
    if not name.endswith(".yaml") and name not in specs.available():
        raise SlurmError(f"unknown study {name!r}; available: {', '.join(specs.available())}")
    if name.endswith(".yaml") and not Path(name).is_file():
        raise SlurmError(f"study file {name}: no such file")
    return specs.load(name)


def sbatch_args(args: argparse.Namespace, spec: specs.StudySpec, limit: int, log: Path) -> list[str]:
    out = [f"--job-name=vadclip-{spec.name}", f"--nodes={args.nodes}", "--ntasks-per-node=1", f"--time={args.time}",
           f"--output={log}", "--open-mode=append",  # a restart appends to the same log
           "--requeue", f"--signal=B:TERM@{signal_lead(limit)}", f"--chdir={Path.cwd()}"]
    out.append(f"--cpus-per-task={args.cpus_per_node}" if args.cpus_per_node else "--exclusive")
    if args.gpus_per_node:
        out.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.partition:
        out.append(f"--partition={args.partition}")
    return out


def job_script(args: argparse.Namespace, spec: specs.StudySpec, run_args: Sequence[str], sbatch: Sequence[str]) -> str:
    project = Path.cwd()
    fields = {"STUDY": spec.name, "PYTHON": args.python, "PROJECT": str(project), "NODES": str(args.nodes),
              "STUDY_ARGS": " ".join(shlex.quote(a) for a in run_args), "TRACKING_URI": args.tracking_uri or "",
              "STATE_FILE": str(project / STATE_DIR / f"{spec.name}.json"), "STATE_DIR": STATE_DIR,
              "SBATCH_ARGS": " ".join(sbatch), "LOG_DIR": LOG_DIR}
    raw = {"STUDY_ARGS", "SBATCH_ARGS", "STATE_DIR", "STUDY", "LOG_DIR"}  # quoted already, a comment, or a name
    text = JOB_SCRIPT
    for key, value in fields.items():
        text = text.replace(f"@{key}@", value if key in raw else shlex.quote(value))
    return text


def submit(sbatch: Sequence[str], script: str) -> str:
    """sbatch the script (on stdin); returns the job id."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch: not found on PATH; run this on a Slurm login node")
    proc = subprocess.run(["sbatch", "--parsable", *sbatch], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {' '.join(sbatch)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]  # "JOBID" or "JOBID;CLUSTER"


def main(argv: Sequence[str] | None = None) -> int:
    args, flags = build_parser().parse_known_args(argv)
    try:
        for flag, value in (("--nodes", args.nodes), ("--cpus-per-node", args.cpus_per_node)):
            if value is not None and value < 1:
                raise SlurmError(f"{flag} {value}: must be >= 1")
        if args.gpus_per_node < 0:
            raise SlurmError(f"--gpus-per-node {args.gpus_per_node}: must be >= 0")
        if args.tracking_uri and not args.tracking_uri.startswith(("http://", "https://")):
            raise SlurmError(f"--tracking-uri {args.tracking_uri}: the job's nodes need a server (http://HOST:PORT); "
                             f"SQLite on a shared file system is unsafe. Leave it out for the job's own server")
        limit = parse_time(args.time)
        spec = load_spec(args.name)
        run_args = study_args(args.name, flags)
        project = Path.cwd()
        log = project / LOG_DIR / f"{spec.name}-%j.out"
        sbatch = sbatch_args(args, spec, limit, log)
        script = job_script(args, spec, run_args, sbatch)
        if args.dry_run:
            print(script, end="")
            print(f"# sbatch {' '.join(shlex.quote(a) for a in sbatch)}", file=sys.stderr)
            return 0
        (project / LOG_DIR).mkdir(exist_ok=True)
        job = submit(sbatch, script)
    except VadClipError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"submitted job {job} ({args.nodes} node(s), {args.gpus_per_node} GPU(s) per node, time {args.time})")
    print(f"log: {str(log).replace('%j', job)}")
    print(f"report: {project / 'reports' / f'{spec.name}.md'} (when the job completes)")
    store = args.tracking_uri or f"sqlite:///{project / 'mlruns.db'} (saved when the job ends; " \
        "`mlflow ui --backend-store-uri sqlite:///mlruns.db` here)"
    print(f"mlflow: {store}")
    print(f"watch: squeue -j {job}; a requeued job shows PD (BeginTime) for a while, then restarts with --resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
