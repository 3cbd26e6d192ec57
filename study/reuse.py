"""No trial trained twice: a trial whose resolved config, data and code equal those of a FINISHED run anywhere in
the tracking store copies that run's results instead of training again.

A trial's identity is `trial_fingerprint(cfg, data_fingerprint(cfg), code_digest())`, stored on its run as the
tag `vadclip.fingerprint`; a copy records the run it came from as `reused_from` (always the original, never a
copy of a copy).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy
import torch
from mlflow.entities import Metric, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import vadclip
from study import record
from study.tracking import client, retry
from vadclip.config import VadClipConfig, flatten
from vadclip.errors import VadClipError

# result tags of a trial run (not its identity: params and tags it sets itself); the kernels that computed them
COPIED_TAGS = (record.TEST_BRANCH, *record.KERNEL_TAGS)
# config keys that change no result: folders (the data fingerprint stands for their content), a plot-only
# setting, and the synthetic cache folder (its content is keyed by the synthetic config, dim and seed)
IGNORED_KEYS = ("data.lists", "data.features", "data.cache_dir", "eval.max_plot_videos",
                "data.feature_cache")  # the packed cache holds the very same float32 values
_BATCH = 1000  # MLflow's cap on metrics per log_batch


class ReuseError(VadClipError, ValueError):
    """A trial's data cannot be fingerprinted; the message names the key or folder."""


# ---------------------------------------------------------------- fingerprints


def _code_digest(root: Path, pattern: str = "*.py") -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob(pattern), key=lambda p: p.relative_to(root).as_posix()):
        data = path.read_bytes()
        # lengths delimit the fields, so no two different trees hash the same stream
        for part in (path.relative_to(root).as_posix().encode(), data):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    # the same code gives other numbers on another torch or numpy
    h.update(f"torch={torch.__version__};numpy={numpy.__version__}".encode())
    return h.hexdigest()[:16]


def source_digest() -> str:
    """sha256 (16 hex) of everything a report's numbers and text come from: the `vadclip` and `study` packages'
    *.py files, the study YAMLs, and the torch and numpy versions. A report names it in its provenance; the
    committed example reports are held to the tree's by a test."""
    import study
    from study.spec import SPEC_DIR

    h = hashlib.sha256()
    for root, pattern in ((Path(vadclip.__file__).resolve().parent, "*.py"),
                          (Path(study.__file__).resolve().parent, "*.py"), (SPEC_DIR, "*.yaml")):
        h.update(_code_digest(root, pattern=pattern).encode())
    return h.hexdigest()[:16]


@functools.cache
def _installed_code_digest() -> str:
    return _code_digest(Path(vadclip.__file__).resolve().parent)


def code_digest(root: Path | None = None) -> str:
    """sha256 (16 hex) of the `vadclip` package's *.py files (relative path + bytes) and the torch and numpy
    versions. `root`: another package folder (tests); the installed package's digest is computed once."""
    return _installed_code_digest() if root is None else _code_digest(Path(root))


def _scan(folder: Path, recursive: bool, suffix: str | None) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of the regular files; os.scandir reuses the directory entries, which
    keeps ~36,000 feature files fast. Symlinked folders are followed once (data is often linked in)."""
    out: list[tuple[str, int, int]] = []
    seen: set[tuple[int, int]] = set()

    def walk(path: str, prefix: str) -> None:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(path) as entries:
            for entry in entries:
                name = prefix + entry.name
                if entry.is_dir():
                    if recursive:
                        walk(entry.path, name + "/")
                elif entry.is_file() and (suffix is None or entry.name.endswith(suffix)):
                    info = entry.stat()
                    out.append((name, info.st_size, info.st_mtime_ns))

    walk(str(folder), "")
    return out


def _folder(value: str | None, key: str, dataset: str) -> Path:
    if value is None:
        raise ReuseError(f"{key} is not set; data.dataset={dataset!r} needs it to fingerprint the data")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ReuseError(f"{path}: {key} folder does not exist (needed to fingerprint the data)")
    return path


PACKAGES = ("torch", "numpy", "open_clip_torch", "scikit-learn", "scipy", "statsmodels", "pandas", "ray", "optuna",
            "mlflow")


def package_versions() -> str:
    """`torch==2.14.1 numpy==...`: the installed versions of the packages a study's numbers and report depend on."""
    from importlib.metadata import PackageNotFoundError, version

    def one(name: str) -> str:
        try:
            return f"{name}=={version(name)}"
        except PackageNotFoundError:
            return f"{name} (absent)"

    return " ".join(one(name) for name in PACKAGES)


def data_fingerprint(cfg: VadClipConfig) -> str:
    """"synthetic" for generated data (a pure function of the config, which the config part covers); else
    sha256 (16 hex) of every regular file in `data.lists` and every *.npy under `data.features` (recursively):
    relative name, size and mtime_ns. Contents are not read: a rewritten file changes its mtime."""
    d = cfg.data
    if d.dataset == "synthetic":
        return "synthetic"
    lists = _folder(d.lists, "data.lists", d.dataset)
    features = _folder(d.features, "data.features", d.dataset)
    h = hashlib.sha256()
    for kind, files in (("lists", _scan(lists, False, None)), ("features", _scan(features, True, ".npy"))):
        h.update(f"[{kind}]\n".encode())
        for name, size, mtime in sorted(files):
            h.update(f"{name}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def config_key(cfg: VadClipConfig) -> dict[str, Any]:
    """`flatten(cfg)` with 'auto' resolved (auto and its value train the same) and without IGNORED_KEYS.
    `device` stays: CPU and CUDA round differently."""
    key = flatten(cfg)
    key["eval.score_branch"] = cfg.score_branch
    key["eval.selection_metric"] = cfg.selection_metric
    for name in IGNORED_KEYS:
        key.pop(name, None)
    return key


def trial_fingerprint(cfg: VadClipConfig, data_fp: str, code_fp: str, fused: Sequence[int] = ()) -> str:
    """A trial's identity. `fused`: the seeds it was trained with in one vectorised model (their batched kernels
    round differently from a lone seed's), so a fused seed and a lone one are different computations."""
    identity: dict[str, Any] = {"config": config_key(cfg), "data": data_fp, "code": code_fp}
    if len(fused) > 1:
        identity["fused"] = sorted(fused)
    blob = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------- finding and copying runs


def _get_run(c: MlflowClient, run_id: str) -> Run | None:
    try:
        return retry(c.get_run, run_id)
    except MlflowException as err:
        if "locked" in str(err).lower():
            raise
        return None  # deleted for good (gc) or never existed


def _original(c: MlflowClient, run: Run) -> Run:
    """The run a copy came from (following a chain of copies), or `run` itself."""
    seen = {run.info.run_id}
    while (source_id := record.get(run.data.tags, record.REUSED_FROM)) and source_id not in seen:
        source = _get_run(c, source_id)
        if source is None:
            break
        seen.add(source_id)
        run = source
    return run


def _usable(c: MlflowClient, run: Run | None) -> bool:
    """FINISHED, not deleted, in an experiment that is not deleted."""
    if run is None or run.info.status != "FINISHED" or run.info.lifecycle_stage != "active":
        return False
    return retry(c.get_experiment, run.info.experiment_id).lifecycle_stage == "active"


def _active_experiments(c: MlflowClient) -> list[str]:
    ids: list[str] = []
    token = None
    while True:
        page = retry(c.search_experiments, view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def _runs_with(c: MlflowClient, fingerprint: str) -> list[Run]:
    found: list[Run] = []
    ids = _active_experiments(c)
    query = record.fingerprint_filter(fingerprint)
    for i in range(0, len(ids), 100):  # keep the SQL IN (...) list short
        token = None
        while True:
            page = retry(c.search_runs, ids[i:i + 100], filter_string=query, run_view_type=ViewType.ACTIVE_ONLY,
                         max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
            found += page
            token = page.token
            if not token:
                break
    return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def find_reusable(uri: str, fingerprint: str, exclude_run_id: str | None = None) -> str | None:
    """The id of a FINISHED run tagged `vadclip.fingerprint = fingerprint` in an active experiment, or None.
    Originals win over copies (the earliest-started original); a copy found alone gives its original when that
    is still FINISHED and not deleted, else the copy itself."""
    c = client(uri)
    runs = [r for r in _runs_with(c, fingerprint) if r.info.run_id != exclude_run_id]
    originals = [r for r in runs if record.REUSED_FROM not in r.data.tags]
    if originals:
        return originals[0].info.run_id
    if not runs:
        return None
    copy = runs[0]
    original = _original(c, copy)
    if original is not copy and original.info.run_id != exclude_run_id and _usable(c, original):
        return original.info.run_id
    return copy.info.run_id


def _artifact_files(c: MlflowClient, run_id: str, path: str | None = None) -> dict[str, int | None]:
    files: dict[str, int | None] = {}
    for info in retry(c.list_artifacts, run_id, path):
        if info.is_dir:
            files.update(_artifact_files(c, run_id, info.path))
        else:
            files[info.path] = info.file_size
    return files


def _point(m: Metric) -> tuple[int, int, str]:
    return m.step, m.timestamp, repr(m.value)  # repr: NaN == NaN here


def copy_results(uri: str, source_run_id: str, target_run_id: str) -> None:
    """Copy a finished trial's results into `target_run_id` (which has its own params and tags): every metric's
    full history (same values, steps and timestamps), every artifact (same folders) and COPIED_TAGS; then tag
    `reused_from=<original id>` (last, so a tagged run is a complete copy). Idempotent: a key whose target
    history has as many points as the source's is skipped, and artifacts already there are not sent again."""
    c = client(uri)
    source = retry(c.get_run, source_run_id)
    original = _original(c, source)

    points: list[Metric] = []
    for key in source.data.metrics:
        history = retry(c.get_metric_history, source_run_id, key)
        have = retry(c.get_metric_history, target_run_id, key)
        if len(have) == len(history):
            continue
        present = Counter(_point(m) for m in have)  # a copy cut short before: send only the missing points
        for m in history:
            if present[_point(m)] > 0:
                present[_point(m)] -= 1
            else:
                points.append(Metric(key, m.value, m.timestamp, m.step))
    for i in range(0, len(points), _BATCH):
        retry(c.log_batch, target_run_id, metrics=points[i:i + _BATCH])

    wanted = _artifact_files(c, source_run_id)
    there = _artifact_files(c, target_run_id)
    missing = sorted(p for p, size in wanted.items() if p not in there or there[p] != size)
    if missing:
        with tempfile.TemporaryDirectory(prefix="vadclip-reuse-") as tmp:
            local = Path(retry(c.download_artifacts, source_run_id, "", tmp))
            for path in missing:
                folder = os.path.dirname(path) or None
                retry(c.log_artifact, target_run_id, str(local / path), folder)

    tags = [RunTag(k, source.data.tags[k]) for k in COPIED_TAGS if k in source.data.tags]
    tags.append(RunTag(record.REUSED_FROM, original.info.run_id))
    retry(c.log_batch, target_run_id, tags=tags)
