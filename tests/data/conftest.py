"""Shared fixtures of the data tests: small synthetic configs and written layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vadclip.config import SyntheticConfig, VadClipConfig, preset
from vadclip.data import ensure_synthetic, write_synthetic

DIM = 32
SMALL = {"train_normal": 6, "train_abnormal": 6, "test_normal": 4, "test_abnormal": 5, "crops": 2,
         "min_length": 20, "max_length": 300}


def small_synthetic(style: str, **kw) -> SyntheticConfig:
    return SyntheticConfig(style=style, **{**SMALL, **kw})


def small_config(style: str, cache_dir: Path, **overrides) -> VadClipConfig:
    values = {"model.embed_dim": DIM, "data.cache_dir": str(cache_dir), "data.synthetic.style": style,
              **{f"data.synthetic.{k}": v for k, v in SMALL.items()}, "data.val_fraction": 0.25, **overrides}
    return preset("synthetic", overrides=values)


@pytest.fixture(name="small_synthetic")
def _small_synthetic_fixture():
    return small_synthetic


@pytest.fixture(name="small_config")
def _small_config_fixture():
    return small_config


@pytest.fixture
def real(tmp_path, small_config):
    """A copy of a small synthetic layout read as the real dataset: (config maker, lists dir, features dir)."""
    made = small_config("xd", tmp_path / "syn")
    lists, _ = ensure_synthetic(made.data.synthetic, DIM, made.seed, made.data.cache_dir)
    copy = shutil.copytree(lists.parent, tmp_path / "copy")

    def config(**overrides):
        return small_config("xd", tmp_path / "syn", **{"data.dataset": "xd", "data.lists": str(copy / "list"),
                                                       "data.features": str(copy / "features"), **overrides})

    return config, copy / "list", copy / "features"


@pytest.fixture(scope="session", params=["ucf", "xd"])
def written(request, tmp_path_factory) -> tuple[str, Path, Path, Path]:
    """(style, out_dir, lists_dir, features_dir) of a small synthetic layout, written once per style."""
    out = tmp_path_factory.mktemp(f"synthetic-{request.param}")
    lists, features = write_synthetic(out, small_synthetic(request.param), DIM, seed=7)
    return request.param, out, lists, features
