#!/usr/bin/env bash
# What every Ray node of a vadclip-studies cluster runs, whichever launcher config started it (cluster.yaml on AWS,
# cluster-lab.yaml on lab machines over SSH): `bash ~/vadclip-studies/cluster/node.sh STEP`.
# The settings come from ~/.vadclip_env, which each config's first setup command writes:
#   VADCLIP_PYTHON    interpreter the node's venv is made from (a Python 3.11)
#   VADCLIP_VENV      the venv (this project installed editable into it)
#   VADCLIP_PIP       extra requirements installed with the project (the launcher's Ray extras)
#   VADCLIP_MLFLOW_ARTIFACTS   where the head's MLflow server keeps artifacts (S3 URI or a head-local folder)
#   VADCLIP_MLFLOW_PORT        the MLflow server's port on the head's 127.0.0.1 (every node reaches it there)
#   VADCLIP_MLFLOW_WORKERS     its worker processes (trials log to it concurrently)
#   VADCLIP_TUNNEL_USER        the head's SSH user for the workers' MLflow tunnel
#   VADCLIP_RAY_ARGS  extra `ray start` arguments for this node type (e.g. fixed ports for a firewall)
#   RAY_AUTH_MODE     token: every node shares ~/.ray/auth_token
set -euo pipefail
. ~/.vadclip_env
PROJECT=~/vadclip-studies
PORT=${VADCLIP_MLFLOW_PORT:-5000}
# This node's address is the one the launcher (or the head) reached it at over SSH: the head_ip / worker_ips of the
# config. Ray's own guess (the interface of the default route) may be another of a machine's addresses.
NODE_IP=${SSH_CONNECTION:+--node-ip-address=$(echo "$SSH_CONNECTION" | cut -d' ' -f3)}

# Run "$@" in the background for as long as this node's Ray runs: `ray down` (which runs `ray stop` on every node)
# ends it too, so a lab machine keeps no server or tunnel of a cluster that is gone. $1 names its log.
while_ray_runs() {
  local log=$1; shift
  setsid nohup bash -c '
    "$@" & child=$!
    for _ in $(seq 60); do pgrep -u "$(id -u)" -x raylet > /dev/null && break; sleep 2; done
    while kill -0 "$child" 2> /dev/null && pgrep -u "$(id -u)" -x raylet > /dev/null; do sleep 5; done
    kill -- -$$' _ "$@" > "$log" 2>&1 < /dev/null &
}

wait_for_mlflow() {  # a node that cannot log fails here, visibly, instead of failing every trial placed on it
  timeout 120 bash -c "until curl -sf http://127.0.0.1:$PORT/health > /dev/null; do sleep 2; done"
}

case "${1:-}" in
install)
  # The same interpreter and the pinned packages on every node; --system-site-packages lets a node's own
  # (CUDA) build of a pinned package stand, pip installs what differs from constraints.txt into the venv.
  test -x "$VADCLIP_VENV/bin/python" || "$VADCLIP_PYTHON" -m venv --system-site-packages "$VADCLIP_VENV"
  # shellcheck disable=SC2086  # VADCLIP_PIP is a list of requirements
  "$VADCLIP_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$PROJECT/constraints.txt" \
    -e "$PROJECT" ${VADCLIP_PIP:-}
  chmod 600 ~/.ray/auth_token ~/.ssh/vadclip-mlflow-tunnel
  ;;
grant-tunnel)
  # Head: the tunnel key may only forward to MLflow's port: `restrict` drops pty/agent/X11/forwarding, the forced
  # command replaces any command or shell it asks for, permitopen allows this one forward (`ssh -N` runs none).
  mkdir -p ~/.ssh ~/mlflow && chmod 700 ~/.ssh
  grep -q 'vadclip-mlflow-tunnel' ~/.ssh/authorized_keys 2> /dev/null \
    || echo "restrict,port-forwarding,permitopen=\"127.0.0.1:$PORT\",command=\"/bin/false\" $(cat ~/.ssh/vadclip-mlflow-tunnel.pub)" \
      >> ~/.ssh/authorized_keys
  ;;
start-head)
  ray stop
  # MALLOC_ARENA_MAX=2: glibc's per-thread arenas keep a trial's freed memory (docs/speed.md, full-scale data)
  # shellcheck disable=SC2086
  (ulimit -n 65536 2> /dev/null || true
   MALLOC_ARENA_MAX=2 ray start --head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml \
     --dashboard-host=127.0.0.1 $NODE_IP ${VADCLIP_RAY_ARGS:-})
  # MLflow tracking server: SQLite on the head's own disk (never a network file system: its locks are unreliable
  # there), artifacts proxied, loopback only.
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null \
    || while_ray_runs ~/mlflow/server.log mlflow server --host 127.0.0.1 --port "$PORT" \
         --backend-store-uri "sqlite:///$HOME/mlflow/mlflow.db" --artifacts-destination "$VADCLIP_MLFLOW_ARTIFACTS" \
         --workers "${VADCLIP_MLFLOW_WORKERS:-4}"
  wait_for_mlflow
  ;;
start-worker)
  (test -f ~/.ray-worker-watch.pid && kill "$(cat ~/.ray-worker-watch.pid)" 2> /dev/null; true)  # a restart's
  ray stop
  # (Re)start the tunnel from this node's 127.0.0.1:PORT to the head's MLflow, and keep it up while Ray runs.
  (test -f ~/.mlflow-tunnel.pid && kill -- -"$(cat ~/.mlflow-tunnel.pid)" 2> /dev/null; true)
  while_ray_runs ~/mlflow-tunnel.log bash -c "echo \$PPID > ~/.mlflow-tunnel.pid; while true; do
    ssh -N -i ~/.ssh/vadclip-mlflow-tunnel -o StrictHostKeyChecking=accept-new -o ExitOnForwardFailure=yes \
      -o ServerAliveInterval=30 -o ServerAliveCountMax=3 -L 127.0.0.1:$PORT:127.0.0.1:$PORT \
      '$VADCLIP_TUNNEL_USER@$RAY_HEAD_IP'; sleep 5; done"
  wait_for_mlflow
  # shellcheck disable=SC2086
  (ulimit -n 65536 2> /dev/null || true
   MALLOC_ARENA_MAX=2 ray start --address="$RAY_HEAD_IP:6379" $NODE_IP ${VADCLIP_RAY_ARGS:-})
  # `ray down` stops the head only, on machines Ray does not own (lab servers): a worker's raylet ends by itself a
  # minute after the head is gone, and then this watch stops the rest of the node's Ray (its agents, log monitor).
  raylet=$(pgrep -n -u "$(id -u)" -x raylet)
  setsid nohup bash -c "echo \$\$ > ~/.ray-worker-watch.pid
    while kill -0 $raylet 2> /dev/null; do sleep 5; done
    pgrep -u \$(id -u) -x raylet > /dev/null || ray stop" > ~/ray-worker-watch.log 2>&1 < /dev/null &
  ;;
*)
  echo "usage: node.sh install | grant-tunnel | start-head | start-worker (got '${1:-}')" >&2
  exit 2
  ;;
esac
