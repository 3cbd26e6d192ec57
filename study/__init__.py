"""Studies of VadCLIP on Ray Tune and MLflow.

Process defaults for every study module, set here because mlflow and ray read them when imported (the driver's
Ray workers inherit them): no usage statistics or telemetry, and no warning for Tune's by-design snapshot after
every trial checkpoint (`CheckpointConfig(num_to_keep=1)`, so a resume never points at a deleted checkpoint;
slow snapshots still warn), and no progress bar per artifact a report downloads.
"""

import os

for _key, _value in (("RAY_USAGE_STATS_ENABLED", "0"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                     ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0"),
                     ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")):
    os.environ.setdefault(_key, _value)
