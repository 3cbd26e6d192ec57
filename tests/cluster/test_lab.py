"""Lab machines over SSH, started as a user starts them: `ray up cluster-lab.yaml` against two SSH hosts on loopback
(127.0.0.1 the head, 127.0.0.2 a worker), a tiny study through the head with trials on both nodes, its table equal to
the same study on the embedded default, and `ray down` leaving nothing of the cluster behind.

Each host is a real `sshd` in its own PID and mount namespace (`unshare`): its own /tmp/ray, so `ray stop` on one
host does not see the other's processes (nor this machine's), as on two machines; and a temporary folder mounted
over the home directory, shared by both hosts like an NFS home, so nothing is written to this machine's real home
(the interpreter's folder is mounted back into it where it lives there). They share the network namespace. The
SSH user is root (the test needs root for the namespaces). Needs `sshd`, `unshare`, `rsync`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study import record
from tests.cluster.ports import free_port
from tests.study.test_run_e2e import tiny_spec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.cluster  # real daemons: `python -m pytest -q -m cluster`
USER = "root"
HEAD, WORKER = "127.0.0.1", "127.0.0.2"
NEEDS = ("sshd", "unshare", "rsync", "ssh")
HOME = Path(os.path.expanduser("~root"))


def _missing() -> list[str]:
    found = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") for name in NEEDS}
    return [name for name, path in found.items() if not path]


if _missing() or os.geteuid() != 0:
    reason = f"lab-cluster test needs root and {', '.join(NEEDS)} (missing: {_missing()})"
    if os.environ.get("CI"):
        raise RuntimeError(reason + "; .ci/run installs them")
    pytest.skip(reason, allow_module_level=True)


def pid_namespace(pid: int | str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


class Host:
    """One SSH host: sshd on `address`:22 inside a new PID and mount namespace with a private /tmp/ray."""

    def __init__(self, name: str, address: str, work: Path, home: Path) -> None:
        self.name, self.address = name, address
        key = work / f"{name}-hostkey"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        config = work / f"{name}-sshd.conf"
        config.write_text("\n".join([
            f"ListenAddress {address}:22", f"HostKey {key}", f"PidFile {work / name}-sshd.pid",
            f"AuthorizedKeysFile {home}/.ssh/authorized_keys", f"AllowUsers {USER}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no",
            "AllowTcpForwarding yes", "PermitUserEnvironment no", "MaxStartups 50", "MaxSessions 50", ""]))
        Path("/run/sshd").mkdir(exist_ok=True)
        self.log = work / f"{name}-sshd.log"
        mounts = ["mkdir -p /tmp/ray", "mount -t tmpfs tmpfs /tmp/ray"]
        python_home = Path(sys.prefix).resolve()
        if python_home.is_relative_to(HOME):  # e.g. pyenv's ~/.pyenv: keep it where it is under the new home
            inside = home / python_home.relative_to(HOME).parts[0]
            mounts += [f"mkdir -p {inside}", f"mount --bind {HOME / inside.name} {inside}"]
        mounts.append(f"mount --rbind {home} {HOME}")  # with the interpreter mounted in it
        sshd = shutil.which("sshd", path="/usr/sbin")
        inner = " && ".join([*mounts, f"exec {sshd} -D -e -f {config}"])
        self.proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--propagation",
                                      "private", "sh", "-c", inner], stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 20
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((address, 22), timeout=1):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd on {address}:22 exited: {self.log.read_text()}")
            time.sleep(0.2)
        else:
            raise RuntimeError(f"sshd on {address}:22 did not listen: {self.log.read_text()}")
        self.namespace = self._namespace()

    def _namespace(self) -> str:
        # the namespace's init is unshare's forked child: the first process whose namespace differs from ours
        mine = pid_namespace(os.getpid())
        for _ in range(50):
            for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
                if (ns := pid_namespace(child)) and ns != mine:
                    return ns
            time.sleep(0.1)
        raise RuntimeError(f"no PID namespace under unshare ({self.proc.pid})")

    def processes(self) -> dict[int, str]:
        """pid -> command line of every process on this host but its sshd and the namespace's init."""
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and pid_namespace(entry.name) == self.namespace:
                with contextlib.suppress(OSError):
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                    if cmd and not cmd.startswith(("sh -c mkdir -p /tmp/ray", "sshd:", "/usr/sbin/sshd -D")):
                        found[int(entry.name)] = cmd
        return found

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the namespace's init: the kernel kills all in it
        self.proc.wait(timeout=30)


def cluster_config(work: Path, key: Path, mlflow_port: int) -> Path:
    """cluster-lab.yaml with its placeholders filled in for the two loopback hosts (what a user edits)."""
    raw = yaml.safe_load((ROOT / "cluster-lab.yaml").read_text())
    raw["cluster_name"] = f"vadclip-lab-test-{os.getpid()}"
    raw["provider"].update(head_ip=HEAD, worker_ips=[WORKER])
    raw["auth"] = {"ssh_user": USER, "ssh_private_key": str(key)}
    raw["min_workers"] = raw["max_workers"] = 1
    raw["setup_commands"][0] = _with_env(raw["setup_commands"][0], sys.executable, mlflow_port)
    path = work / "cluster-lab.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _with_env(command: str, python: str, mlflow_port: int) -> str:
    replace = {"/usr/bin/python3.11": python, "YOUR-USER": USER, "ray[default,tune]==2.60.0": "",
               "VADCLIP_MLFLOW_WORKERS=4": "VADCLIP_MLFLOW_WORKERS=1",
               "VADCLIP_MLFLOW_PORT=5000": f"VADCLIP_MLFLOW_PORT={mlflow_port}"}
    for old, new in replace.items():
        assert old in command, (old, command)
        command = command.replace(old, new)
    # the venv has none of the pinned packages' commands (they stay in the interpreter's bin/, as `ray` does)
    extra = (f"'export PATH=\"$PATH:{Path(python).parent}\"' 'export VADCLIP_RAY_ARGS=--num-cpus=1'"
             " 'export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true'")
    return command.replace(" > ~/.vadclip_env", f" {extra} > ~/.vadclip_env", 1)


def run(args: list[str], env: dict[str, str], timeout: float, log: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    with log.open("a") as f:
        f.write(f"$ {' '.join(args)}\n[rc {result.returncode}]\n{result.stdout}\n{result.stderr}\n")
    return result


def test_ray_up_lab_cluster_runs_a_study_on_both_nodes_and_ray_down_cleans_up(tmp_path):
    work = tmp_path
    home, launcher = work / "home", work / "launcher"
    for d in (home / ".ssh", launcher / ".ssh", launcher / ".ray"):
        d.mkdir(parents=True)
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    # the launcher's two secrets, as docs/cluster.md has the user make them
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vadclip-mlflow-tunnel", "-f",
                    str(launcher / ".ssh" / "vadclip-mlflow-tunnel")], check=True)
    env = {**os.environ, "HOME": str(launcher), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    log = work / "commands.log"
    assert run(["ray", "get-auth-token", "--generate"], env, 60, log).returncode == 0, log.read_text()
    # the head's authorized_keys is the home's (a grant for the tunnel key is appended there by node.sh)
    (home / ".ssh" / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    port = free_port(20000, 30000)  # MLflow's (the Slurm tests' blocks start at 20000 too: run one at a time)
    config = cluster_config(work, key, port)
    spec = tiny_spec(work, "tiny_lab")

    hosts: list[Host] = []
    try:
        hosts = [Host("head", HEAD, work, home), Host("worker", WORKER, work, home)]
        up = run(["ray", "up", "-y", "--no-config-cache", str(config)], env, 600, log)
        assert up.returncode == 0, log.read_text()[-6000:]
        # the head's autoscaler brings the worker up over SSH from the head
        alive = "python -c 'import ray; ray.init(address=\"auto\", log_to_driver=False); " \
                "print(\"alive:\", sum(n[\"Alive\"] for n in ray.nodes()))'"
        deadline = time.time() + 300
        while time.time() < deadline:
            if "alive: 2" in run(["ray", "exec", str(config), alive], env, 120, log).stdout:
                break
            time.sleep(5)
        else:
            raise AssertionError(f"the worker never joined:\n{log.read_text()[-6000:]}")

        study = run(["ray", "exec", str(config),
                     f"cd ~/vadclip-studies && python -m study.run {spec} --address auto --storage ~/ray_results"
                     f" --tracking-uri http://127.0.0.1:{port} --max-epochs 2"], env, 600, log)
        assert study.returncode == 0, log.read_text()[-6000:]

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("tiny_lab")
        runs = client.search_runs([experiment.experiment_id])
        children = [r for r in runs if record.PARENT_RUN in r.data.tags]
        nodes = {r.data.tags.get(record.RAY_NODE_ID) for r in children}
        assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children), children
        assert len(nodes) == 2, f"trials ran on {nodes}, not on both nodes"

        down = run(["ray", "down", "-y", str(config)], env, 300, log)
        assert down.returncode == 0, log.read_text()[-6000:]
        # `ray down` stops the head's Ray (and with it MLflow); a worker's raylet ends a minute after its head,
        # and node.sh's watch then stops the rest of that node's Ray and its tunnel
        deadline = time.time() + 150
        while time.time() < deadline and any(h.processes() for h in hosts):
            time.sleep(1)
        left = {h.name: h.processes() for h in hosts}
        assert not any(left.values()), f"left behind after ray down: {left}"
    finally:
        for host in hosts:
            host.stop()

    # the same study on the embedded default (local Ray, SQLite): the same table
    local = work / "local"
    local.mkdir()
    out = subprocess.run([sys.executable, "-m", "study.run", str(spec), "--max-epochs", "2"], cwd=local,
                         env={**env, "HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    # the table a reader sees, to the digit. (The raw floats of the best-on-test protocol may differ in the 6th
    # decimal: one trial's loss differed by 1e-7 between the two runs, same kernels and threads; not chased further)
    assert table(home / "vadclip-studies" / "reports" / "tiny_lab.md") == table(local / "reports" / "tiny_lab.md")
    cluster_csv, local_csv = (pd.read_csv(d / "reports" / "tiny_lab.csv") for d in (home / "vadclip-studies", local))
    headline = [c for c in local_csv.columns if c.endswith(("_mean", "_low", "_high")) and not c.startswith("ap_opt")]
    pd.testing.assert_frame_equal(cluster_csv[headline], local_csv[headline])


def table(report: Path) -> list[str]:
    return [line for line in report.read_text().splitlines() if line.startswith("|")]
