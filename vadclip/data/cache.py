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

Integrity: `meta.json` holds the size and a CRC-32 per 64 MiB block of every `.feat` / `.offsets` file, computed
from the written files at build. The first open of a cache in a process checks sizes and CRCs (blocks read in
threads; 3-4 s for UCF's 6 GiB on 2 busy cores with the pages cached, measured in `docs/real-data.md`). A
damaged, truncated or unreadable cache (or one from before checksums) is rebuilt in place, with one warning line
naming the folder and what was wrong. Later opens in the same process, and a Ray trial unpickling a bank the
driver verified, skip the CRCs while the files' stat (size, mtime, ctime, inode) is what the verifying process
saw: any write through the filesystem changes ctime, and stats younger than 2 s are not trusted (coarse file
clocks). A build only ever stores finite values (NaN / inf in a feature file is an error naming it), so a
verified cache is finite.

Pickling (Ray's object store): a `MappedFeatureBank` pickles as its recipe (key, feature folder, file
names, the stat of the verified files), a few MB at full scale instead of the arrays; unpickling maps the cache
again, building it first where it is missing (another node that holds the features at the same path).
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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np

from vadclip.config import VadClipConfig
from vadclip.data.banks import DiskFeatureBank, FeatureBank, disk_offsets, pack, parallel_map
from vadclip.data.errors import DataError
from vadclip.data.split import Layout, read_layout

if sys.platform != "win32":
    import fcntl  # no build lock on Windows: concurrent builds race, os.replace keeps the winner whole

__all__ = ["CacheError", "CacheSpec", "MappedFeatureBank", "cache_key", "cache_location", "cache_spec",
           "ensure_cache", "open_banks"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the folder's format changes
POOL_VERSION = 1  # bump when pool_to_length (the authors' process_feat) changes its values
CACHE_DIR_NAME = ".vadclip-cache"
COMPLETE, META = "complete", "meta.json"
DATA_SUFFIX, OFFSETS_SUFFIX = ".feat", ".offsets"
CRC_BLOCK = 64 << 20  # bytes per stored CRC: blocks are checked in parallel threads
READ_CHUNK = 4 << 20  # bytes per read while checking: stays in the CPU cache between the copy and the CRC
SETTLED_NS = 2_000_000_000  # a stat younger than this may miss a write in the same clock tick: not trusted

Stamp = dict[str, tuple[int, ...]]  # file name -> (size, mtime_ns, ctime_ns, inode, device)
_verified: dict[str, Stamp] = {}  # folder -> stamp of its files when this process last checked their CRCs


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


class _Damaged(Exception):
    """A cache folder that is not what its build wrote; the message says what (never leaves this module)."""


class MappedFeatureBank(FeatureBank):
    """A `FeatureBank` whose `data` is a read-only memory map of one part of a cache, in the cache's dtype.
    Items are float32: views of the map (float32 cache) or converted copies (float16 cache)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, spec: CacheSpec, part: str,
                 stamp: Stamp | None = None) -> None:
        # no FeatureBank.__init__: it would convert (read) a float16 map into memory
        self.data = data.view(np.ndarray)  # plain ndarray slices, still backed by the map
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.spec, self.part = spec, part
        self.stamp = stamp  # the verified files' stat: an unpickling process trusts an unchanged stat

    def __getitem__(self, i: int) -> np.ndarray:
        x = super().__getitem__(i)
        return x if x.dtype == np.float32 else x.astype(np.float32)

    def __reduce__(self) -> tuple[object, tuple[CacheSpec, str, Stamp | None]]:
        return _reopen, (self.spec, self.part, self.stamp)


def _reopen(spec: CacheSpec, part: str, stamp: Stamp | None = None) -> MappedFeatureBank:
    folder = ensure_cache(spec, trusted=stamp)
    return _open(folder, spec, part)


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
        if not np.isfinite(y).all():  # float32 items are finite (_read_item checks)
            raise CacheError(f"{bank.files[i][0]}: feature value {float(np.abs(x).max())!r} is beyond float16's "
                             f"range; use data.cache_dtype=float32")
        return y

    pack(bank, out, offsets, None if out.dtype == np.float32 else to_float16)
    out.flush()  # msync: the data is on disk before its checksums are read back and `complete` is written


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
                "checksums": _checksums(tmp, _file_names(spec)),  # of the bytes on disk, read back
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.perf_counter() - start, 3)}
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
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


# ---------------------------------------------------------------- integrity


def _file_names(spec: CacheSpec) -> list[str]:
    return [f"{part}{suffix}" for part in spec.files for suffix in (DATA_SUFFIX, OFFSETS_SUFFIX)]


def _blocks(size: int) -> list[tuple[int, int]]:
    """(offset, length) of each CRC block of a file of `size` bytes (one empty block for an empty file)."""
    return [(start, min(CRC_BLOCK, size - start)) for start in range(0, size, CRC_BLOCK)] or [(0, 0)]


def _crc(path: Path, start: int, length: int) -> int:
    """CRC-32 of `length` bytes of `path` from `start`, read in small chunks (no memory map: the checking process
    does not take the file's pages into its own memory); a short file gives a short read, hence another CRC."""
    crc, buf = 0, memoryview(bytearray(min(max(length, 1), READ_CHUNK)))
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while length > 0:
            n = f.readinto(buf[:min(length, len(buf))])
            if not n:
                break
            crc = zlib.crc32(buf[:n], crc)  # releases the GIL: the blocks run in parallel threads
            length -= n
    return crc


def _checksums(folder: Path, names: list[str]) -> dict[str, object]:
    """What `meta.json` stores: per file its size and the CRC-32 of each CRC_BLOCK bytes."""
    sizes = {name: (folder / name).stat().st_size for name in names}
    jobs = [(name, start, length) for name in names for start, length in _blocks(sizes[name])]
    crcs = parallel_map(lambda job: _crc(folder / job[0], job[1], job[2]), jobs)
    per_file: dict[str, list[int]] = {name: [] for name in names}
    for (name, _, _), crc in zip(jobs, crcs):
        per_file[name].append(crc)
    return {"algorithm": "crc32", "block_bytes": CRC_BLOCK,
            "files": {name: {"size": sizes[name], "crc32": per_file[name]} for name in names}}


def _stamp(folder: Path, names: list[str]) -> Stamp:
    stamp: Stamp = {}
    for name in names:
        try:
            st = os.stat(folder / name)
        except FileNotFoundError:
            raise _Damaged(f"{name} is missing") from None
        stamp[name] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    return stamp


def _settled(stamp: Stamp) -> bool:
    """True when no file changed within SETTLED_NS: a later write then surely changes its ctime."""
    newest = max(s[2] for s in stamp.values())
    return newest < time.time_ns() - SETTLED_NS


def _recorded(folder: Path, spec: CacheSpec) -> dict[str, tuple[int, list[int]]]:
    """The size and the block CRCs that `meta.json` recorded for each file of `spec`."""
    try:
        meta = json.loads((folder / META).read_text())
        sums = meta["checksums"]
        ok = sums["block_bytes"] == CRC_BLOCK and meta["key"] == spec.key
        recorded = {name: (int(f["size"]), [int(c) for c in f["crc32"]]) for name, f in sums["files"].items()}
    except FileNotFoundError:
        raise _Damaged(f"{META} is missing") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise _Damaged(f"{META} is unreadable or has no checksums (built by an older version)") from None
    missing = [name for name in _file_names(spec) if name not in recorded]
    if not ok or missing:
        raise _Damaged(f"{META} does not describe this cache ({', '.join(missing) or 'key / block size'})")
    return recorded


def _verify(folder: Path, spec: CacheSpec, trusted: Stamp | None) -> Stamp:
    """The stat of the cache's files, checked against the sizes and CRCs of `meta.json` unless their stat equals
    `trusted` or the stat this process last verified; raises _Damaged saying what differs."""
    names = _file_names(spec)
    stamp = _stamp(folder, names)
    if stamp in (trusted, _verified.get(str(folder))):
        _verified[str(folder)] = stamp  # a trusted stamp is settled: the verifying process only passes those on
        return stamp
    recorded = _recorded(folder, spec)
    for name in names:
        size, expected = stamp[name][0], recorded[name][0]
        if size != expected:
            raise _Damaged(f"{name} is {'truncated' if size < expected else 'longer'}: {size} bytes, expected "
                           f"{expected}")
    jobs = [(name, start, length) for name in names for start, length in _blocks(stamp[name][0])]
    crcs = parallel_map(lambda job: _crc(folder / job[0], job[1], job[2]), jobs)
    expected_crcs = [crc for name in names for crc in recorded[name][1]]
    if crcs != expected_crcs:
        bad = next(i for i, (a, b) in enumerate(zip_longest(crcs, expected_crcs)) if a != b)
        name, start, length = jobs[min(bad, len(jobs) - 1)]
        raise _Damaged(f"checksum mismatch in {name} (bytes {start}-{start + length})")
    if _stamp(folder, names) != stamp:
        raise _Damaged("its files changed while they were checked")
    for part in spec.files:
        _load_part(folder, spec, part)
    if _settled(stamp):
        _verified[str(folder)] = stamp
    return stamp


def _damage(folder: Path, spec: CacheSpec, trusted: Stamp | None) -> str | None:
    """What is wrong with the complete cache in `folder`, or None when it is as built."""
    try:
        _verify(folder, spec, trusted)
    except _Damaged as e:
        return str(e)
    except OSError as e:
        return f"unreadable ({e})"
    return None


def _discard(folder: Path) -> None:
    """Remove a damaged cache folder: renamed away first (one atomic step, so no other process maps half of it;
    processes that mapped its files keep their pages), then deleted."""
    _verified.pop(str(folder), None)
    trash = folder.with_name(f".{folder.name}.damaged-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(trash, ignore_errors=True)


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


def ensure_cache(spec: CacheSpec, trusted: Stamp | None = None) -> Path:
    """The folder of the complete, verified cache of `spec`: built first if missing, rebuilt if damaged (saying
    so in one warning line). `trusted`: the stat of its files when another process verified them."""
    folder = locate(spec)
    if (folder / COMPLETE).is_file():
        start = time.perf_counter()
        damage = _damage(folder, spec, trusted)
        if damage is None:
            log.info("feature cache %s: mapped, %s %s, checked in %.2f s", folder, _human(_size(folder)), spec.dtype,
                     time.perf_counter() - start)
            return folder
        log.warning("feature cache %s: %s; rebuilding", folder, damage)
    with _locked(folder.parent / f".{spec.key}.lock") as locked:
        if (folder / COMPLETE).is_file():
            if _damage(folder, spec, None) is None:  # (re)built by another process while this one waited
                return folder
            _discard(folder)
        if locked:  # nobody else is building this key: anything there is a crashed build's
            for stale in folder.parent.glob(f".{spec.key}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if folder.exists():
                shutil.rmtree(folder)
        _build(folder, spec)
    return folder


# ---------------------------------------------------------------- loading


def _load_part(folder: Path, spec: CacheSpec, part: str) -> tuple[np.ndarray, np.ndarray]:
    """The memory-mapped data and the offsets of `part`, checked against `spec`; raises _Damaged."""
    data_path, offsets_path = folder / f"{part}{DATA_SUFFIX}", folder / f"{part}{OFFSETS_SUFFIX}"
    try:
        data = np.load(data_path, mmap_mode="r", allow_pickle=False)
        offsets = np.load(offsets_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise _Damaged(f"{data_path.name} is unreadable ({e})") from e
    n = len(spec.files[part])
    if (data.dtype != np.dtype(spec.dtype) or data.ndim != 2 or data.shape[1] != spec.dim
            or offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(data)
            or (np.diff(offsets) < 0).any()):
        raise _Damaged(f"{data_path.name} holds a {data.dtype} array of shape {data.shape} with {len(offsets) - 1} "
                       f"items; expected {spec.dtype} (sum T, {spec.dim}) with {n} items")
    return data, offsets


def _open(folder: Path, spec: CacheSpec, part: str) -> MappedFeatureBank:
    try:
        data, offsets = _load_part(folder, spec, part)
    except _Damaged as e:  # verified a moment ago: changed since, by someone else
        raise CacheError(f"{folder}: {e}; delete the folder to rebuild it") from None
    return MappedFeatureBank(data, offsets, spec, part, _verified.get(str(folder)))


def open_banks(cfg: VadClipConfig, layout: Layout) -> dict[str, MappedFeatureBank]:
    """One mapped bank per part of `layout`, from its verified cache (built first if missing, rebuilt if damaged)."""
    spec = cache_spec(cfg, layout)
    folder = ensure_cache(spec)
    return {part: _open(folder, spec, part) for part in spec.files}
