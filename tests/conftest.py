import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

XD_NAMES = ["normal", "fighting", "shooting", "riot", "abuse", "car accident", "explosion"]


@pytest.fixture(scope="session")
def tiny_clip():
    from vadclip.model import create_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_clip("vadclip-tiny", None, embed_dim=32)


@pytest.fixture(scope="session")
def tok():
    from vadclip.model import tokenizer

    return tokenizer()
