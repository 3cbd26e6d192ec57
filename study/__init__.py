"""Studies of VadCLIP on Ray Tune and MLflow.

Process defaults for every study module, set here because mlflow and ray read them when imported (the driver's
Ray workers inherit them): no usage statistics or telemetry, and no warning for Tune's by-design snapshot after
every trial checkpoint (with `CheckpointConfig(num_to_keep=2)` a resume never points at a deleted checkpoint; slow
snapshots still warn), and no progress bar per artifact a report downloads. MALLOC_ARENA_MAX=2 for the
processes a study starts (a local Ray and its workers): glibc gives threads their own malloc arenas, which keep
freed memory, and a Tune worker runs each trial in a new thread; at full scale a trial held 1.2 GiB more without it
(docs/speed.md). It takes effect in processes started after it is set, so the driver itself is unaffected.
numpy's BLAS core pinned (vadclip.portable), before anything imports numpy: the driver writes the synthetic data
with it, the same bytes on any x86-64 machine; a trial pins its own kernels (portable_kernels).
"""

import os

from vadclip.portable import data_env

for _key, _value in (("RAY_USAGE_STATS_ENABLED", "0"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                     ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0"),
                     ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"), ("MALLOC_ARENA_MAX", "2")):
    os.environ.setdefault(_key, _value)
os.environ.update(data_env())  # not setdefault: the machine's own core is what must not decide
