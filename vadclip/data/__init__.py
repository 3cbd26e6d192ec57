"""Data layer: the benchmarks' conventions, the authors' list/feature layout, a synthetic twin, datasets
and batching."""

from vadclip.data.banks import DiskFeatureBank, FeatureBank, build_bank
from vadclip.data.batching import Bank, collate, epoch_batches, pad_to_length, pool_to_length, split_chunks
from vadclip.data.cache import CacheError, MappedFeatureBank, cache_location
from vadclip.data.classes import multi_hot, parse_label
from vadclip.data.conventions import (
    CLASS_CODES,
    CLASS_PROMPTS,
    DEFAULT_TEST_CROP,
    GT_NORMAL,
    SNIPPET_FRAMES,
    crop_file_name,
    list_files,
    split_crop,
)
from vadclip.data.dataset import EvalSet, VadDataset, load_dataset
from vadclip.data.errors import DataError
from vadclip.data.layout import (
    ListRow,
    load_features,
    read_ground_truth,
    read_list,
    resolve_feature_path,
    write_ground_truth,
)
from vadclip.data.split import Layout, read_layout, split_videos

__all__ = [
    "CLASS_CODES", "CLASS_PROMPTS", "DEFAULT_TEST_CROP", "GT_NORMAL", "SNIPPET_FRAMES", "Bank", "CacheError",
    "DataError", "DiskFeatureBank", "EvalSet", "FeatureBank", "Layout", "ListRow", "MappedFeatureBank", "VadDataset",
    "build_bank", "cache_location", "collate", "crop_file_name", "ensure_synthetic", "epoch_batches", "list_files",
    "load_dataset", "load_features", "multi_hot", "pad_to_length", "parse_label", "pool_to_length",
    "read_ground_truth", "read_layout", "read_list", "resolve_feature_path", "split_chunks", "split_crop",
    "split_videos", "synthetic_crops", "write_ground_truth", "write_synthetic",
]


def __getattr__(name: str) -> object:
    """The synthetic writer, imported on first use: `python -m vadclip.data.synthetic` imports this package
    first, and runpy warns when the module it is about to run is already imported."""
    if name in ("ensure_synthetic", "synthetic_crops", "write_synthetic"):
        from vadclip.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
