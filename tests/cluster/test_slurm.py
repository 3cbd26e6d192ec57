"""`python -m study.slurm` against a real Slurm on loopback (munged, slurmctld and one slurmd started here, one node
of 2 CPUs): a tiny study submitted as a user would, run to the end; then the same study sent SIGTERM mid-study
(as Slurm does before a time limit), requeued by the job itself and continued with --resume to the same table.

Needs the Debian packages slurm-wlm and munge (skipped without them, a failure under CI)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.cluster.ports import free_port
from tests.study.test_run_e2e import TINY

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.cluster  # real daemons: `python -m pytest -q -m cluster`
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun", "scancel")
NAME = "tiny_slurm"
TRIALS = 4  # 2 rows x 2 seeds
# the daemons' ports: above the jobs' Ray/MLflow blocks (study.slurm: 20000-31999; this test's jobs 20000-20023)
DAEMON_PORTS = (30000, 32700)

CONF = """ClusterName=vadtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long (default 120 s) before it may start again; 10 s keeps the test short
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
FirstJobId={first_job}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname={host} CPUs=2 State=UNKNOWN
PartitionName=main Nodes=n1 Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A Slurm cluster of one node on loopback; yields the environment its commands need."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI: Slurm binaries missing: {', '.join(missing)} (apt-get install slurm-wlm munge)")
        pytest.skip(f"Slurm binaries missing: {', '.join(missing)} (apt-get install slurm-wlm munge)")
    root = Path(tempfile.mkdtemp(prefix="vadclip-slurm-", dir="/tmp"))
    root.chmod(0o755)  # munged wants its socket's folder traversable by all
    (root / "state").mkdir()
    (root / "spool").mkdir()
    key_dir = root / "munge"
    key_dir.mkdir(mode=0o700)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"), "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(ROOT)}
    (root / "slurm.conf").write_text(CONF.format(
        host=socket.gethostname(), ctld_port=free_port(*DAEMON_PORTS), d_port=free_port(*DAEMON_PORTS),
        munge_socket=root / "munge.socket",
        root=root, first_job=random.randrange(100_000, 900_000, 1000)))
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(["mungekey", "--create", "--keyfile", str(key_dir / "munge.key")], check=True)
        for cmd in (["munged", "--foreground", "--key-file", str(key_dir / "munge.key"),
                     "--socket", str(root / "munge.socket"), "--pid-file", str(root / "munged.pid"),
                     "--log-file", str(root / "munged.log"), "--seed-file", str(key_dir / "munged.seed")],
                    ["slurmctld", "-D", "-i", "-f", str(root / "slurm.conf")],
                    ["slurmd", "-D", "-N", "n1", "-f", str(root / "slurm.conf")]):
            # its own process group: teardown ends it and what it started, nothing else
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=open(root / f"{cmd[0]}.out", "w")))
            time.sleep(1)
        deadline = time.time() + 60
        while "idle" not in sinfo(env):
            assert time.time() < deadline, f"the Slurm node never became idle: {sinfo(env)!r}"
            assert all(p.poll() is None for p in procs), (root / "slurmctld.log").read_text()[-2000:]
            time.sleep(1)
        yield env
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True,
                                  timeout=10).stdout.split()
            if jobs:
                subprocess.run(["scancel", *jobs], env=env, timeout=10)
                time.sleep(3)
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(root, ignore_errors=True)


def sinfo(env: dict[str, str]) -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()


def job_field(env: dict[str, str], job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    return match[1] if match else ""


def tiny_study(project: Path) -> Path:
    """Two rows x two seeds of a tiny model, one trial at a time (so that SIGTERM can land between trials)."""
    raw = {"name": NAME, "kind": "ablation", "description": "two rows of Table 5", "preset": "synthetic",
           "metric": "ap", "seeds": 2, "full": "LGT", "resources": {"cpu": 1, "gpu": 0}, "max_failures": 1,
           "max_concurrent": 1, "base": {"eval.score_branch": "a", **TINY},
           "variants": [{"name": "none", "set": {"model.temporal": "none"}},
                        {"name": "LGT", "set": {"model.temporal": "local+gcn"}}]}
    path = project / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def submit(env: dict[str, str], project: Path) -> tuple[str, subprocess.CompletedProcess]:
    project.mkdir(parents=True)
    spec = tiny_study(project)
    proc = subprocess.run([sys.executable, "-m", "study.slurm", spec.name, "--nodes", "1", "--gpus-per-node", "0",
                           "--time", "00:10:00", "--max-epochs", "2"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"^submitted job (\d+)", proc.stdout, re.M)
    assert match, proc.stdout
    return match[1], proc


def wait_done(env: dict[str, str], job: str, log: Path, timeout: float = 200) -> list[str]:
    """Every job state seen (deduplicated, in order) until the job ends."""
    seen: list[str] = []
    deadline = time.time() + timeout
    while True:
        state = f"{job_field(env, job, 'JobState')} {job_field(env, job, 'Reason')}"
        if not seen or seen[-1] != state:
            seen.append(state)
        if state.split()[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return seen
        assert time.time() < deadline, f"job {job} still {state}; log:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def leftovers(job: str) -> dict[int, str]:
    """Live processes of the job's Ray or MLflow server (they name the job's scratch folders)."""
    pattern = re.compile(rf"(ray-vadclip-{job}|vadclip-{job}/mlruns\.db)\b")
    found = {}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and "\nState:\tZ" not in (proc / "status").read_text():
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if pattern.search(cmd):
                    found[int(proc.name)] = cmd[:150]
    return found


def check_store(project: Path) -> pd.DataFrame:
    """One FINISHED parent and one FINISHED child per trial in the job's saved store; the report's table."""
    store = project / "mlruns.db"
    assert store.is_file()
    c = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = c.get_experiment_by_name(NAME)
    parents = c.search_runs([exp.experiment_id], "tags.`vadclip.role` = 'parent'")
    assert [p.info.status for p in parents] == ["FINISHED"]
    trials = c.search_runs([exp.experiment_id], "tags.`vadclip.role` = 'trial'")
    assert len(trials) == TRIALS and len({t.data.tags["trial_id"] for t in trials}) == TRIALS
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parents[0].info.run_id}
    assert (project / "reports" / f"{NAME}.md").is_file()
    return pd.read_csv(project / "reports" / f"{NAME}.csv")


@pytest.fixture(scope="module")
def first_run(slurm: dict[str, str]) -> dict:
    project = Path(tempfile.mkdtemp(prefix="vadclip-slurm-project-", dir="/tmp")) / "project"
    t0 = time.time()
    job, proc = submit(slurm, project)
    log = project / "slurm-logs" / f"{NAME}-{job}.out"
    states = wait_done(slurm, job, log)
    yield {"job": job, "project": project, "stdout": proc.stdout, "states": states, "log": log,
           "seconds": time.time() - t0}
    shutil.rmtree(project.parent, ignore_errors=True)


def test_study_runs_to_the_end_as_one_slurm_job(first_run, slurm):
    job, project, log = first_run["job"], first_run["project"], first_run["log"]
    out = first_run["stdout"]
    assert f"log: {log}" in out
    assert f"report: {project / 'reports' / NAME}.md" in out
    assert first_run["states"][-1].startswith("COMPLETED"), (first_run["states"], log.read_text()[-3000:])
    assert job_field(slurm, job, "ExitCode") == "0:0"
    text = log.read_text()
    assert "1 node(s) in Ray at" in text and "study.run exited with 0" in text
    assert "MLflow store saved to" in text and "--resume" not in text
    check_store(project)
    assert leftovers(job) == {}
    assert not Path(f"/tmp/ray-vadclip-{job}").exists() and not Path(f"/tmp/vadclip-{job}").exists()


def test_sigterm_requeues_and_the_restart_resumes_to_the_same_table(first_run, slurm, tmp_path):
    project = tmp_path / "project"
    job, _ = submit(slurm, project)
    log = project / "slurm-logs" / f"{NAME}-{job}.out"
    deadline = time.time() + 150
    while not (log.is_file() and re.search(rf"\[{NAME}\] [1-3]/{TRIALS} trials ended", log.read_text())):
        assert time.time() < deadline and f"{TRIALS}/{TRIALS} trials ended" not in (
            log.read_text() if log.is_file() else ""), f"no trial ended in time:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)
    # what Slurm sends before the time limit (sbatch --signal=B:TERM@...): to the batch script only
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=slurm, check=True)
    states = wait_done(slurm, job, log, timeout=240)
    text = log.read_text()
    assert states[-1].startswith("COMPLETED"), (states, text[-4000:])
    # the user sees the requeued job pending (Reason BeginTime) until Slurm lets it start again
    assert any(s.startswith("PENDING") for s in states), states
    assert job_field(slurm, job, "Restarts") == "1"
    assert "SIGTERM: stopping the study" in text and f"requeueing job {job}" in text
    assert "(restart 1)" in text and "--resume --address" in text, text[-4000:]
    assert "interrupted" in text  # study.run's own message: finished trials kept, how to continue
    table = check_store(project)
    baseline = pd.read_csv(first_run["project"] / "reports" / f"{NAME}.csv")
    metrics = [c for c in baseline.columns if baseline[c].dtype.kind == "f"]
    assert metrics
    pd.testing.assert_frame_equal(table[metrics], baseline[metrics])
    assert leftovers(job) == {}
