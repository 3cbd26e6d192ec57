"""cluster.yaml: valid for the installed Ray's own validator (offline), and safe/complete for our studies.

Nothing here starts Ray or talks to AWS: Ray's `prepare_config` (merge with the AWS defaults.yaml) and
`validate_config` (jsonschema against the wheel's ray-schema.json) are the offline part of `ray up`.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
LAB_YAML = ROOT / "cluster-lab.yaml"
NODE_SH = ROOT / "cluster" / "node.sh"
DOC = ROOT / "docs" / "cluster.md"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """What `ray up` validates: the file merged with Ray's AWS defaults (node types filled, setup merged)."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def ray_validate(config: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))


def node_env(config: dict) -> dict[str, str]:
    """The settings the config's first setup command writes to ~/.vadclip_env for cluster/node.sh."""
    line = next(c for c in config["setup_commands"] if "~/.vadclip_env" in c and "printf" in c)
    return dict(re.findall(r"'export (\w+)=(\"[^\"]*\"|[^']*)'", line))


def node_step(step: str, env: dict[str, str]) -> str:
    """What `bash cluster/node.sh STEP` runs, rendered with the config's settings: the script's preamble (its
    functions) and the step's `case` branch, each $VADCLIP_* / $PORT / $PROJECT replaced by its value."""
    text = NODE_SH.read_text()
    preamble, branches = text.split('case "${1:-}" in', 1)
    branch = re.search(rf"^{re.escape(step)}\)\n(.*?)^  ;;", branches, re.MULTILINE | re.DOTALL)
    assert branch, f"cluster/node.sh has no step {step!r}"
    values = {**{k: v.strip('"') for k, v in env.items()}, "PROJECT": "~/vadclip-studies",
              "PORT": env.get("VADCLIP_MLFLOW_PORT", "5000")}
    rendered = "\n".join(f"export {k}={v}" for k, v in env.items()) + "\n" + preamble + branch.group(1)
    for key, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        rendered = re.sub(rf'"?\$\{{?{key}(:-[^}}]*)?\}}?"?', value, rendered)
    return rendered


def commands(config: dict, *keys: str) -> list[str]:
    """The config's commands, a `bash ~/vadclip-studies/cluster/node.sh STEP` rendered as what it runs."""
    env = node_env(config)
    out = []
    for key in keys or COMMAND_KEYS:
        for command in config.get(key) or []:
            step = re.fullmatch(r"bash ~/vadclip-studies/cluster/node\.sh ([\w-]+)", command.strip())
            out.append(node_step(step.group(1), env) if step else command)
    return out


def worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def mlflow_server_command(config: dict) -> str:
    found = [c for c in commands(config) if "mlflow server" in c]
    assert len(found) == 1, f"expected one `mlflow server` command, got {found}"
    joined = found[0].replace("\\\n", " ")  # a rendered node.sh step: its continued lines as one
    return next(line for line in joined.splitlines() if "mlflow server" in line)


def option(command: str, name: str) -> str | None:
    m = re.search(rf"{re.escape(name)}[ =][\"']?([^\s\"']+)", command)
    return m.group(1) if m else None


# --- Ray's own validation -------------------------------------------------------------------------------------


def test_ray_schema_accepts_the_cluster_yaml(prepared):
    assert prepared["head_node_type"] in prepared["available_node_types"]


def set_at(config: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


@pytest.mark.parametrize("path,value,message", [
    (("max_workers",), "four", "'four' is not of type 'integer'"),
    (("max_worker",), 4, "Additional properties are not allowed ('max_worker' was unexpected)"),
    (("available_node_types", "worker.gpu", "resources", "GPU"), 0.5, "0.5 is not of type 'integer'"),
    (("available_node_types", "worker.gpu", "setup_commands"), [],
     "Additional properties are not allowed ('setup_commands' was unexpected)"),
])
def test_ray_schema_rejects_a_broken_copy(raw, path, value, message):
    broken = copy.deepcopy(raw)
    set_at(broken, path, value)
    with pytest.raises(jsonschema.ValidationError) as err:
        ray_validate(broken)
    assert err.value.message == message


# --- our own checks -------------------------------------------------------------------------------------------


def test_gpu_workers_are_spot_declare_gpus_and_autoscale(raw):
    workers = worker_types(raw)
    assert workers, "no worker node type"
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu, f"no worker type declares resources {{'GPU': n}}: {workers}"
    for name, node in gpu.items():
        assert node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot", name
        assert 0 <= node["min_workers"] <= node["max_workers"] <= raw["max_workers"], name
        assert node["max_workers"] > 0, name
    assert raw["idle_timeout_minutes"] > 0


def test_head_is_on_demand(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "a spot head would take the study down with it"


def test_setup_installs_this_working_copy_on_every_node(raw, prepared):
    mounts = {remote: (ROOT / Path(local).expanduser()).resolve() for remote, local in raw["file_mounts"].items()}
    remote = next((r for r, local in mounts.items() if local == ROOT), None)
    assert remote is not None, f"no file mount ships the repository root: {raw['file_mounts']}"
    assert 'name = "vadclip-studies"' in (ROOT / "pyproject.toml").read_text()
    for key in ("head_setup_commands", "worker_setup_commands"):  # as Ray merges setup_commands into both
        installs = [c for c in commands(prepared, key) if "pip install" in c]
        assert any(re.search(rf"(^|\s)-e\s+{re.escape(remote)}(\s|$)", c) for c in installs), (key, installs)
    assert ".gitignore" in raw.get("rsync_filter", []), "local results (mlruns.db, ray_results/) would be shipped"


def test_features_reach_every_node(prepared):
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("aws s3 sync" in c and "~/data" in c for c in commands(prepared, key)), key


def test_mlflow_server_binds_loopback_with_sqlite_and_s3_artifacts(raw):
    server = mlflow_server_command(raw)
    head = "".join(commands(raw, "head_setup_commands", "head_start_ray_commands")).replace("\\\n", " ")
    assert server in head, "MLflow runs on the head"
    assert option(server, "--host") in ("127.0.0.1", "localhost"), server
    assert (option(server, "--backend-store-uri") or "").startswith("sqlite:///"), server
    artifacts = option(server, "--artifacts-destination") or option(server, "--default-artifact-root") or ""
    assert artifacts.startswith(("s3://", "$VADCLIP_S3")), server
    assert "s3://" in next(c for c in commands(raw, "setup_commands") if "VADCLIP_S3=" in c)


def test_nothing_listens_on_all_interfaces(raw):
    for command in commands(raw):
        assert "0.0.0.0" not in command and "--host ::" not in command, command
        if "ray start --head" in command:
            assert option(command, "--dashboard-host") in ("127.0.0.1", "localhost"), command


def test_workers_reach_mlflow_on_their_own_loopback(raw):
    port = option(mlflow_server_command(raw), "--port") or "5000"
    forward = f"-L 127.0.0.1:{port}:127.0.0.1:{port}"
    assert any(forward in c for c in commands(raw, "worker_start_ray_commands")), forward
    grant = next(c for c in commands(raw, "head_setup_commands") if "authorized_keys" in c)
    assert "restrict" in grant and f'permitopen=\\"127.0.0.1:{port}\\"' in grant, grant
    assert 'command=\\"/bin/false\\"' in grant, "without a forced command the key could run any command"


def test_token_authentication_stays_on(raw):
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"RAY_AUTH_MODE\s*=\s*['\"]?disabled", text, re.IGNORECASE)
    starts = [c for c in commands(raw) if "ray start" in c]
    assert any("--head" in c for c in starts) and any("--address" in c for c in starts), starts
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command, command
    assert "~/.ray/auth_token" in raw["file_mounts"], "workers need the head's token to join"


def test_no_credentials_in_the_file(raw):
    text = CLUSTER_YAML.read_text()
    for pattern in (r"aws_access_key_id", r"aws_secret_access_key", r"aws_session_token", r"\bA[KS]IA[0-9A-Z]{16}\b",
                    r"PRIVATE KEY-----", r"ssh_private_key\s*:"):
        assert not re.search(pattern, text, re.IGNORECASE), pattern
    for remote, local in raw["file_mounts"].items():
        assert ".aws" not in Path(local).parts and ".aws" not in Path(remote).parts, (remote, local)


def test_region_is_the_same_everywhere(raw):
    env = next(c for c in commands(raw, "setup_commands") if "AWS_DEFAULT_REGION=" in c)
    assert option(env, "AWS_DEFAULT_REGION") == raw["provider"]["region"]
    assert all(z.startswith(raw["provider"]["region"]) for z in raw["provider"]["availability_zone"].split(","))


def test_every_command_is_valid_bash(raw):
    for command in [c for key in COMMAND_KEYS for c in raw.get(key) or []] + [NODE_SH.read_text()]:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


# --- cluster-lab.yaml: the same node steps, on machines over SSH ------------------------------------------------


@pytest.fixture(scope="module")
def lab() -> dict:
    return yaml.safe_load(LAB_YAML.read_text())


def test_ray_schema_accepts_the_lab_yaml(lab):
    ray_validate(lab)
    assert lab["provider"]["type"] == "local"


def test_lab_and_aws_share_the_node_steps(raw, lab):
    for key in ("head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert raw[key] == lab[key], key
    assert [c for c in raw["setup_commands"] if "node.sh" in c] == [c for c in lab["setup_commands"] if "node.sh" in c]
    assert set(node_env(raw)) >= set(node_env(lab)) - {"RAY_enable_autoscaler_v2"}, "a setting only the lab sets"
    assert node_env(lab)["RAY_enable_autoscaler_v2"] == "0", "autoscaler v2 does not launch on-premise workers"


def test_lab_placeholders_and_no_secrets(lab):
    text = LAB_YAML.read_text()
    for placeholder in ("REPLACE-HEAD-ADDRESS", "REPLACE-WORKER-ADDRESS-1", "YOUR-USER", "~/.ssh/YOUR-KEY"):
        assert placeholder in text, placeholder
    assert not re.search(r"PRIVATE KEY-----", text)
    server = mlflow_server_command(lab)
    assert option(server, "--host") == "127.0.0.1" and "-L 127.0.0.1:5000:127.0.0.1:5000" in "".join(
        commands(lab, "worker_start_ray_commands"))


# --- docs/cluster.md stays true to the code --------------------------------------------------------------------


def test_doc_study_run_flags_exist():
    from study.run import build_parser
    from study.slurm import build_parser as slurm_parser

    known = {s for p in (build_parser(), slurm_parser()) for a in p._actions for s in a.option_strings}
    known |= {"--requeue", "--signal", "--exclusive"}  # sbatch's own, named where the Slurm job is explained
    text = DOC.read_text().replace("\\\n", " ")
    # what follows `python -m study.run|slurm` up to the end of its shell word list (a closing quote or backtick)
    invocations = [m.group(1) for m in re.finditer(r"python -m study\.(?:run|slurm)([^'`\n]*)", text)]
    invocations += re.findall(r"`(--[^`]*)`", text)  # flags named in the prose are study.run's too
    used = {flag for args in invocations for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", args)}
    assert "--resume" in used and "--address" in used, "docs/cluster.md shows no full `python -m study.run` command"
    assert used <= known, f"flags in docs/cluster.md that study.run/slurm do not have: {sorted(used - known)}"


def test_doc_fractional_gpu_resources_parse():
    from study.spec import load, parse

    snippet = re.search(r"^resources: (\{.*\})$", DOC.read_text(), re.MULTILINE)
    assert snippet, "docs/cluster.md shows no `resources: {...}` line"
    spec = load("search_joint")
    raw = {**yaml.safe_load(spec.text()), "resources": yaml.safe_load(snippet.group(1))}
    parsed = parse(raw, spec.path)
    assert 0 < parsed.resources["gpu"] < 1 and parsed.resources["cpu"] >= 1, parsed.resources


def test_doc_commands_are_shell_parsable():
    text = DOC.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    assert blocks
    for block in blocks:
        result = subprocess.run(["bash", "-n", "-c", block], capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, f"{block}\n{result.stderr}"
