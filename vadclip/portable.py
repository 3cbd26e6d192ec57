"""Portable CPU kernels: a CPU run gives the same bits on any x86-64 machine (the synthetic preset's default).

Why: each float32 library picks its code path from the CPU it meets, and each path rounds differently: ATen's
vector kernels (default, AVX2, AVX-512), MKL's BLAS branch, oneDNN's and NNPACK's convolutions, numpy's OpenBLAS
core (which writes the synthetic features: QR and projections). The synthetic ablation rows are chaotic, so
last-bit differences grew into other checkpoints and the same pinned packages printed another table on another
machine (issue 22). Pinned here; docs/reproducibility.md has the proof, per instruction-set level, and the cost:

- ATen: AVX2 kernels where the CPU has AVX2 and FMA (x86-64-v3: Intel since 2013, AMD since 2015), else the
  default ones. Read at the first CPU kernel call, so pinned before it; `state()` reads what took effect.
- MKL: conditional numerical reproducibility, branch COMPATIBLE: the one branch MKL honours on AMD and Intel alike
  (AVX2 and the other branches fall back to AUTO off Intel); no dynamic threads. Read at MKL's first call.
- oneDNN and NNPACK off: their kernels are chosen by the CPU they meet; convolutions take ATen's im2col + MKL.
- numpy's OpenBLAS: the Prescott (SSE3) core, for the synthetic data whatever the kernels. numpy reads it when
  imported, so only a new process takes it: `study` sets it for a study's processes, and `python -m
  vadclip.train` re-executes itself with it when it has synthetic data to write.
- A fixed thread count (reductions are split by thread): a trial's `cpus_per_trial`, the trainer CLI's CLI_THREADS.

Deterministic algorithms stay off: the CPU kernels a run uses are deterministic already (no bit changes).
A GPU run keeps its kernels: only a CPU device asks for portable ones.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vadclip.config import VadClipConfig

KERNEL_TAGS = ("cpu_capability", "mkl_cbwr", "threads")  # a trial's MLflow tags naming its kernels
MKL_BRANCH = "COMPATIBLE"
BLAS_CORE = "Prescott"
CLI_THREADS = 1  # the trainer CLI's (a study trial's is its spec's cpus_per_trial): fixed, not the machine's
_MKL_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX",
                 10: "AVX2", 12: "AVX512", 14: "AVX512_E1"}  # mkl_cbwr.h; bit 0x10000: STRICT


class PortableKernelsWarning(UserWarning):
    """A pin that did not take effect (its library had started before): the run's bits depend on the CPU."""


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo has none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def aten_level(flags: frozenset[str] | None = None) -> str:
    """ATEN_CPU_CAPABILITY to pin: avx2 where the CPU runs it (ATen's own test: AVX2 and FMA), else default."""
    flags = cpu_flags() if flags is None else flags
    return "avx2" if {"avx2", "fma"} <= flags else "default"


def data_env() -> dict[str, str]:
    """numpy's BLAS core (x86-64 only: another architecture has no Prescott core)."""
    return {"OPENBLAS_CORETYPE": BLAS_CORE} if _x86_64() else {}


def kernel_env() -> dict[str, str]:
    return {"ATEN_CPU_CAPABILITY": aten_level(), "MKL_CBWR": MKL_BRANCH, "MKL_DYNAMIC": "FALSE"}


def wanted(portable_kernels: bool, device: object) -> bool:
    """Portable kernels for this run: asked for, and on the CPU (a GPU run keeps its fast kernels)."""
    return portable_kernels and str(device).split(":")[0] == "cpu"


def reexec_with(env: Mapping[str, str]) -> None:
    """Run this command again in a new process with `env` added (POSIX), unless the environment has it already:
    numpy reads its BLAS core when imported, before a CLI has parsed its flags. Returns when nothing had to change."""
    if os.name != "posix" or all(os.environ.get(k) == v for k, v in env.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), {**os.environ, **env})


def pin_cli(cfg: VadClipConfig) -> KernelState | None:
    """The trainer CLI's pins. Synthetic data not yet on disk are written by this command re-executed with numpy's
    BLAS core pinned (their cache serves every later run, a study's too); portable kernels, when the config asks
    for them on the CPU, are pinned in this process on CLI_THREADS threads. Returns those kernels, or None."""
    from vadclip.device import resolve_device

    if cfg.data.dataset == "synthetic" and not _synthetic_cached(cfg):
        reexec_with(data_env())
    return configure(CLI_THREADS) if wanted(cfg.portable_kernels, resolve_device(cfg.device)) else None


def _synthetic_cached(cfg: VadClipConfig) -> bool:
    """Whether the synthetic layout that vadclip.data.split.read_layout asks ensure_synthetic for is on disk."""
    from vadclip.data.synthetic import cache_key, default_cache_root

    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_root()
    return (root / cache_key(cfg.data.synthetic, cfg.model.embed_dim, cfg.seed)).is_dir()


def configure(threads: int) -> KernelState:
    """Pin this process's kernels (in time before its first CPU kernel call) on `threads` threads; returns what
    took effect, with a PortableKernelsWarning for a pin that did not."""
    import torch

    os.environ.update(kernel_env())
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a module property torch's stubs miss
    torch.backends.nnpack.set_flags(False)
    torch.set_num_threads(threads)
    now = state()
    late = [name for name, ok in (("ATEN_CPU_CAPABILITY", now.capability == aten_level().upper()),
                                  ("MKL_CBWR", now.mkl_branch in (MKL_BRANCH, "n/a", "unknown"))) if not ok]
    if late:
        warnings.warn(f"portable kernels: {' and '.join(late)} came after the library started, the run has "
                      f"{now.describe()}: its numbers depend on the CPU", PortableKernelsWarning, stacklevel=2)
    return now


@dataclass(frozen=True)
class KernelState:
    capability: str  # ATen's: DEFAULT, AVX2, AVX512 ...
    forced: bool  # by ATEN_CPU_CAPABILITY, not detected
    mkl_branch: str  # MKL's CNR branch (OFF: none); n/a without MKL, unknown where it cannot be read
    threads: int

    def tags(self) -> dict[str, str]:
        """A trial's MLflow tags (the report's provenance names them)."""
        values = (self.capability + (" (forced)" if self.forced else ""), self.mkl_branch, str(self.threads))
        return dict(zip(KERNEL_TAGS, values))

    def describe(self) -> str:
        tags = self.tags()
        mkl = f", MKL CNR {self.mkl_branch}" if self.mkl_branch != "n/a" else ""
        return f"CPU capability {tags['cpu_capability']}{mkl}, {self.threads} thread{'s' * (self.threads != 1)}"


def state() -> KernelState:
    """The kernels this process runs with (reading them fixes them for the process)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").upper() == capability
    return KernelState(capability, forced, mkl_branch(), torch.get_num_threads())


def mkl_branch() -> str:
    """MKL's CNR branch as MKL itself reports it (mkl_cbwr_get, exported by libtorch_cpu where MKL is linked in)."""
    import torch

    if not torch.backends.mkl.is_available():
        return "n/a"
    try:
        get = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return "unknown"
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    branch = get(1)  # MKL_CBWR_BRANCH
    return _MKL_BRANCHES.get(branch & 0xFFFF, str(branch)) + (",STRICT" if branch & 0x10000 else "")
