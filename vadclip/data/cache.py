"""Packed, memory-mapped feature cache: every feature file of a layout read once, later loads map it.

The first `load_dataset` of a layout (with `data.in_memory` and `data.feature_cache`) reads the feature
files of each part as today (training crops pooled to `model.visual_length`, validation and test videos
whole) into one contiguous array per part, in `data.cache_dtype`. Every later load, in any process,
memory-maps those arrays (`np.load(mmap_mode="r")`): nothing is read up front and the operating system's
page cache shares the pages between the study driver and its trials. Labels and ground truth are not
cached (cheap; read from the lists each time).

Location: `<data.features>/.vadclip-cache/<key>/` when that folder can be written, else
`~/.cache/vadclip/features/<key>/`; an existing complete cache in either place is used first
(`cache_location(cfg)`). Deleting either folder is always safe: the next load rebuilds.

Key: sha256 of the format and pooling-rule versions, `model.embed_dim`, `model.visual_length`,
`data.test_crop`, the dtype, the list files and every feature file used, part by part and in bank order
(name relative to its folder, size, mtime_ns: `os.stat` only, no content read). So touching, rewriting,
adding or re-splitting a listed file gives a new key and a rebuild; a file rewritten with the same
size AND mtime_ns is not noticed.

Folder: per part (`train`, `val` when videos are held out, `test`) `<part>.feat`, the (sum T, d) array,
and `<part>.offsets`, (n+1,) int64; both are .npy files NOT named *.npy, so that scans of the feature
files (`study.reuse.data_fingerprint` lists every *.npy under `data.features`) do not see the cache.
Then `meta.json`, then `complete`, which the loader requires. It is built in a temporary sibling folder
renamed into place with one `os.replace`, under an exclusive `flock` per key (concurrent loads build once;
a crashed build's leftovers are removed by the next one), so no incomplete folder ever carries the key.

Pickling (Ray's object store): a `MappedFeatureBank` pickles as its recipe (key, feature folder, file
names), a few MB at full scale instead of the arrays; unpickling maps the cache again, building it first
where it is missing (another node that holds the features at the same path).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vadclip.config import VadClipConfig
from vadclip.data.dataset import DiskFeatureBank, FeatureBank, Layout, disk_offsets, pack, read_layout
from vadclip.data.errors import DataError

if sys.platform != "win32":
    import fcntl  # no build lock on Windows: concurrent builds race, os.replace keeps the winner whole

__all__ = ["CacheError", "CacheSpec", "MappedFeatureBank", "cache_key", "cache_location", "cache_spec",
           "ensure_cache", "open_banks"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the folder's format changes
POOL_VERSION = 1  # bump when pool_to_length (the authors' process_feat) changes its values
CACHE_DIR_NAME = ".vadclip-cache"
COMPLETE = "complete"
DATA_SUFFIX, OFFSETS_SUFFIX = ".feat", ".offsets"


class CacheError(DataError):
    """A feature cache folder that cannot be written or read; the message names it."""


@dataclass(frozen=True)
class CacheSpec:
    """Everything needed to find, build or rebuild one cache: names and settings, no feature values."""

    key: str
    features_dir: str
    dim: int
    dtype: str  # "float32" | "float16"
    files: dict[str, tuple[tuple[str, ...], ...]]  # part -> feature file(s) of each item, in bank order
    pools: dict[str, int | None]  # part -> pooled length (train) or None (whole videos)


class MappedFeatureBank(FeatureBank):
    """A `FeatureBank` whose `data` is a read-only memory map of one part of a cache, in the cache's dtype.
    Items are float32: views of the map (float32 cache) or converted copies (float16 cache)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, spec: CacheSpec, part: str) -> None:
        # no FeatureBank.__init__: it would convert (read) a float16 map into memory
        self.data = data.view(np.ndarray)  # plain ndarray slices, still backed by the map
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.spec, self.part = spec, part

    def __getitem__(self, i: int) -> np.ndarray:
        x = super().__getitem__(i)
        return x if x.dtype == np.float32 else x.astype(np.float32)

    def __reduce__(self) -> tuple[object, tuple[CacheSpec, str]]:
        return _reopen, (self.spec, self.part)


def _reopen(spec: CacheSpec, part: str) -> MappedFeatureBank:
    return _open(ensure_cache(spec), spec, part)


# ---------------------------------------------------------------- key and location


def _stat_line(path: str, root: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot stat a listed file ({e}); expected it to exist") from e
    name = path[len(root):] if path.startswith(root) else path
    return f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n"


def cache_key(layout: Layout, dim: int, test_crop: str, dtype: str) -> str:
    """32 hex digits of sha256 over the settings and the stat fingerprint of every file used (module doc)."""
    h = hashlib.sha256()
    settings = {"cache": CACHE_VERSION, "pool": POOL_VERSION, "dim": dim, "visual_length": layout.pool_length,
                "test_crop": test_crop, "dtype": dtype}
    h.update(json.dumps(settings, sort_keys=True).encode())
    lists_root, features_root = str(layout.lists_dir) + os.sep, str(layout.features_dir) + os.sep
    for path in layout.list_paths:
        h.update(("list\0" + _stat_line(str(path), lists_root)).encode())
    pools = layout.pools()
    for part, items in layout.files.items():
        h.update(f"part\0{part}\0{len(items)}\0{pools[part]}\n".encode())
        for item in items:  # the item's file count delimits items (mean over crops)
            h.update(f"item\0{len(item)}\n".encode())
            for f in item:
                h.update(_stat_line(f, features_root).encode())
    return h.hexdigest()[:32]


def cache_spec(cfg: VadClipConfig, layout: Layout) -> CacheSpec:
    dtype = cfg.data.cache_dtype
    cwd = os.getcwd()

    def absolute(path: str) -> str:  # a Ray trial unpickles the spec in its own working folder
        return path if os.path.isabs(path) else os.path.join(cwd, path)

    return CacheSpec(key=cache_key(layout, cfg.model.embed_dim, cfg.data.test_crop, dtype),
                     features_dir=absolute(str(layout.features_dir)), dim=cfg.model.embed_dim, dtype=dtype,
                     files={part: tuple(tuple(absolute(f) for f in item) for item in items)
                            for part, items in layout.files.items()},
                     pools=layout.pools())


def _roots(features_dir: str) -> tuple[Path, Path]:
    return (Path(features_dir) / CACHE_DIR_NAME,
            Path(os.path.expanduser("~")) / ".cache" / "vadclip" / "features")


def _writable(root: Path) -> bool:
    if root.exists() and not root.is_dir():
        return False
    probe = root if root.exists() else root.parent  # os.access also reports a read-only mount
    return os.access(probe, os.W_OK | os.X_OK)


def locate(spec: CacheSpec) -> Path:
    """The complete cache of `spec` if one exists (beside the features first), else where to build it."""
    primary, fallback = (root / spec.key for root in _roots(spec.features_dir))
    for folder in (primary, fallback):
        if (folder / COMPLETE).is_file():
            return folder
    return primary if _writable(primary.parent) else fallback


def cache_location(cfg: VadClipConfig) -> Path | None:
    """Where the feature cache of `cfg` lives, or would be built; None when `cfg` reads no cache
    (`data.feature_cache` or `data.in_memory` false). Reads the lists (and makes synthetic data if missing)."""
    if not (cfg.data.in_memory and cfg.data.feature_cache):
        return None
    return locate(cache_spec(cfg, read_layout(cfg)))


# ---------------------------------------------------------------- building


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def _save_small(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append `.npy` to a plain name
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())  # durable before `complete` is written


def _write_part(folder: Path, part: str, bank: DiskFeatureBank, dtype: str) -> None:
    """`<part>.offsets` and `<part>.feat` filled item by item (threads; the array is a memory map, so the
    build needs no memory beyond the page cache)."""
    offsets = disk_offsets(bank)
    _save_small(folder / f"{part}{OFFSETS_SUFFIX}", offsets)
    out = np.lib.format.open_memmap(folder / f"{part}{DATA_SUFFIX}", mode="w+", dtype=np.dtype(dtype),
                                    shape=(int(offsets[-1]), bank.dim))

    def to_float16(i: int, x: np.ndarray) -> np.ndarray:
        y = x.astype(out.dtype)
        if not np.isfinite(y).all():  # float32 input is finite (load_features checks)
            raise CacheError(f"{bank.files[i][0]}: feature value {float(np.abs(x).max())!r} is beyond float16's "
                             f"range; use data.cache_dtype=float32")
        return y

    pack(bank, out, offsets, None if out.dtype == np.float32 else to_float16)
    out.flush()  # msync: the data is on disk before `complete` is written


def _build(folder: Path, spec: CacheSpec) -> None:
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key}.tmp-", dir=folder.parent))
    try:
        counts: dict[str, dict[str, int]] = {}
        for part, items in spec.files.items():
            bank = DiskFeatureBank(items, spec.dim, spec.pools[part])
            _write_part(tmp, part, bank, spec.dtype)
            counts[part] = {"items": len(bank), "snippets": int(bank.lengths.sum())}
        meta = {"cache_version": CACHE_VERSION, "pool_version": POOL_VERSION, "key": spec.key, "dim": spec.dim,
                "dtype": spec.dtype, "pools": spec.pools, "parts": counts, "features_dir": spec.features_dir,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.perf_counter() - start, 3)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        with open(tmp / COMPLETE, "w") as f:  # last: the loader requires it
            f.write(spec.key + "\n")
        os.replace(tmp, folder)
    except OSError as e:
        if (folder / COMPLETE).is_file():  # lost a race (no lock on this filesystem): theirs is whole
            return
        raise CacheError(f"{folder}: cannot write the feature cache ({e}); free space there, or set "
                         f"data.feature_cache=false") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after os.replace; a failed build's partial folder
    parts = ", ".join(f"{part} {c['items']} items / {c['snippets']} snippets" for part, c in counts.items())
    log.info("feature cache %s: built in %.1f s, %s %s (%s)", folder, time.perf_counter() - start,
             _human(_size(folder)), spec.dtype, parts)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """An exclusive flock on `path` while inside; yields False where the filesystem has no locks."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+b")  # closing the file releases the lock
    except OSError as e:
        raise CacheError(f"{path.parent}: cannot create the feature cache folder ({e}); make it writable, "
                         f"or set data.feature_cache=false") from e
    with f:
        if sys.platform == "win32":
            yield False
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            yield False
        else:
            yield True


def ensure_cache(spec: CacheSpec) -> Path:
    """The folder of the complete cache of `spec`, built first if missing."""
    folder = locate(spec)
    if (folder / COMPLETE).is_file():
        return folder
    with _locked(folder.parent / f".{spec.key}.lock") as locked:
        if (folder / COMPLETE).is_file():  # built by another process while this one waited
            return folder
        if locked:  # nobody else is building this key: anything there is a crashed build's
            for stale in folder.parent.glob(f".{spec.key}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if folder.exists():
                shutil.rmtree(folder)
        _build(folder, spec)
    return folder


# ---------------------------------------------------------------- loading


def _open(folder: Path, spec: CacheSpec, part: str) -> MappedFeatureBank:
    data_path, offsets_path = folder / f"{part}{DATA_SUFFIX}", folder / f"{part}{OFFSETS_SUFFIX}"
    try:
        data = np.load(data_path, mmap_mode="r", allow_pickle=False)
        offsets = np.load(offsets_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CacheError(f"{data_path}: cannot read the feature cache ({e}); delete {folder} to rebuild it") from e
    n = len(spec.files[part])
    if (data.dtype != np.dtype(spec.dtype) or data.ndim != 2 or data.shape[1] != spec.dim
            or offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(data)):
        raise CacheError(f"{data_path}: {data.dtype} array of shape {data.shape} with {len(offsets) - 1} items; "
                         f"expected {spec.dtype} (sum T, {spec.dim}) with {n} items; delete {folder} to rebuild it")
    return MappedFeatureBank(data, offsets, spec, part)


def open_banks(cfg: VadClipConfig, layout: Layout) -> dict[str, MappedFeatureBank]:
    """One mapped bank per part of `layout`, from its cache (built first if missing)."""
    spec = cache_spec(cfg, layout)
    folder = locate(spec)
    if (folder / COMPLETE).is_file():
        log.info("feature cache %s: mapped, %s %s", folder, _human(_size(folder)), spec.dtype)
    else:
        folder = ensure_cache(spec)
    return {part: _open(folder, spec, part) for part in spec.files}
