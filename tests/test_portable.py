"""Portable CPU kernels (vadclip.portable): the trainer CLI's bits do not depend on the CPU's instruction-set level."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from study.report.notes import kernels_note, provenance
from vadclip import portable

STRONGEST = ("avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= portable.cpu_flags()
             else "avx2" if {"avx2", "fma"} <= portable.cpu_flags() else None)
# a machine at the lowest level: ATen's default kernels, numpy's OpenBLAS core and SIMD of an SSE4.2 CPU
LOWEST = {"ATEN_CPU_CAPABILITY": "default", "OPENBLAS_CORETYPE": "Nehalem",
          "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL"}


def _train(tmp: Path, name: str, env: dict[str, str], *flags: str) -> subprocess.Popen[str]:
    """`python -m vadclip.train` on the synthetic preset, 1 epoch of 6 steps, its own fresh synthetic data."""
    cmd = [sys.executable, "-m", "vadclip.train", "--preset", "synthetic", "--epochs", "1", "--no-progress",
           "--out", str(tmp / name), "--set", f"data.cache_dir={tmp / name}-data", "optim.max_steps_per_epoch=6",
           *flags]
    return subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _metrics(tmp: Path, runs: dict[str, subprocess.Popen[str]]) -> dict[str, tuple[bytes, str]]:
    out = {}
    for name, proc in runs.items():
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, log
        out[name] = ((tmp / name / "metrics.json").read_bytes(), log)
    return out


@pytest.mark.skipif(STRONGEST is None or portable.mkl_branch() in ("n/a", "unknown"),
                    reason="needs an x86-64 CPU with AVX2 and torch with MKL")
def test_cli_bits_are_the_same_at_every_cpu_level(tmp_path: Path) -> None:
    """Portable: the lowest level and this CPU's strongest give byte-identical metrics (the kernels, MKL branch,
    thread count and BLAS core are pinned whatever the environment says). Native: they differ (the test can fail)."""
    strongest = {"ATEN_CPU_CAPABILITY": str(STRONGEST), "MKL_CBWR": "AUTO", "OMP_NUM_THREADS": "2"}
    runs = {"portable-low": _train(tmp_path, "portable-low", LOWEST),
            "portable-high": _train(tmp_path, "portable-high", strongest)}
    got = _metrics(tmp_path, runs)
    assert got["portable-low"][0] == got["portable-high"][0]
    level = portable.aten_level().upper()
    expected = f"portable kernels: CPU capability {level} (forced), MKL CNR COMPATIBLE, 1 thread"
    assert all(expected in log for _, log in got.values())

    native = {"native-low": _train(tmp_path, "native-low", LOWEST, "--set", "portable_kernels=false"),
              "native-high": _train(tmp_path, "native-high", strongest, "--set", "portable_kernels=false")}
    got = _metrics(tmp_path, native)
    assert got["native-low"][0] != got["native-high"][0]
    assert "portable kernels:" not in got["native-low"][1]


@pytest.mark.skipif(portable.mkl_branch() in ("n/a", "unknown"), reason="needs torch with MKL")
def test_a_pin_after_the_first_kernel_call_warns() -> None:
    code = ("import warnings, torch; torch.ones(3).exp(); torch.ones(8, 8) @ torch.ones(8, 8)\n"
            "native = torch.backends.cpu.get_cpu_capability()\n"
            "from vadclip import portable\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); s = portable.configure(1)\n"
            "print(native, s.describe(), [str(x.message) for x in w])")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "MKL CNR OFF" in out and "MKL_CBWR came after" in out and "depend on the CPU" in out
    if not out.startswith(portable.aten_level().upper()):  # this CPU's own level is not the pinned one
        assert "ATEN_CPU_CAPABILITY and MKL_CBWR came after" in out


def test_pins_follow_the_cpu_and_the_device() -> None:
    assert portable.aten_level(frozenset({"avx2", "fma", "avx512f"})) == "avx2"
    assert portable.aten_level(frozenset({"avx", "sse4_2"})) == "default"  # no AVX2: ATen's default kernels
    assert portable.aten_level(frozenset()) == "default"  # flags unknown
    assert portable.wanted(True, "cpu") and not portable.wanted(True, "cuda:0") and not portable.wanted(False, "cpu")
    assert portable.kernel_env()["MKL_CBWR"] == "COMPATIBLE"


def test_provenance_names_the_kernels_of_the_trials() -> None:
    kernels = portable.KernelState("AVX2", True, "COMPATIBLE", 1)
    assert kernels.tags() == {"cpu_capability": "AVX2 (forced)", "mkl_cbwr": "COMPATIBLE", "threads": "1"}
    children = pd.DataFrame([{f"tags.{k}": v for k, v in kernels.tags().items()}] * 3)
    assert kernels_note(children) == "; trials on CPU capability AVX2 (forced), MKL CNR COMPATIBLE, 1 thread"
    mixed = pd.concat([children, pd.DataFrame([{"tags.cpu_capability": "AVX512", "tags.mkl_cbwr": "OFF",
                                                "tags.threads": "2"}])])
    assert kernels_note(mixed) == ("; trials on CPU capability AVX2 (forced) / AVX512, MKL CNR COMPATIBLE / OFF, "
                                   "1 / 2 threads")
    assert kernels_note(pd.DataFrame({"tags.variant": ["a"]})) == ""  # runs from before the tags: nothing said

    parent = pd.Series({"status": "FINISHED", "tags.code_version": "abc1234", "start_time": None})
    ctx = SimpleNamespace(parent=parent, children=children.assign(status="FINISHED"), uri="sqlite:///mlruns.db",
                          spec=SimpleNamespace(name="ablation_lgt"), parent_id="p1", date="2026-01-01")
    line = provenance(ctx)  # type: ignore[arg-type]
    assert "code version abc1234; trials on CPU capability AVX2 (forced), MKL CNR COMPATIBLE, 1 thread;" in line
