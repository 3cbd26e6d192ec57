"""The command line: `python -m vadclip.extract VIDEOS OUT [options]` (`vadclip/extract/__main__.py`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from vadclip.data.conventions import SNIPPET_FRAMES
from vadclip.errors import Parser, VadClipError
from vadclip.extract.api import extract_videos
from vadclip.extract.options import (
    CROP_CHOICES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CLIP_MODEL,
    DEFAULT_CROPS,
    DEFAULT_LIST_NAME,
    DEFAULT_SNIPPET,
    SNIPPET_CHOICES,
)

DESCRIPTION = ("Frozen-CLIP feature extraction: videos → one `(T, D)` float32 `.npy` per video and crop, "
               "plus the list CSV. A folder of images (.jpg .jpeg .png .bmp, no videos or subfolders in it) is "
               "one video of those frames, in natural name order (2.jpg before 10.jpg), named after the folder.")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m vadclip.extract", description=DESCRIPTION)
    p.add_argument("videos", metavar="VIDEOS", help="folder of videos and/or frame folders (recursive); class "
                                                    "folders give labels")
    p.add_argument("out", metavar="OUT", help="output folder: OUT/<label>/<video>__<k>.npy and the list CSV")
    p.add_argument("--crops", type=int, choices=CROP_CHOICES, default=DEFAULT_CROPS,
                   help="10: centre, 4 corners and their flips; 5: no flips; 1: centre (default %(default)s)")
    p.add_argument("--snippet", choices=SNIPPET_CHOICES, default=DEFAULT_SNIPPET,
                   help=f"one vector per {SNIPPET_FRAMES} frames: mean of the frame embeddings or the middle "
                        "frame's (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images per CLIP forward pass (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="open_clip model name (default %(default)s)")
    p.add_argument("--clip-weights", metavar="PATH", default=None,
                   help="local CLIP checkpoint (OpenAI ViT-B-16.pt or open_clip); without it: RANDOM weights")
    p.add_argument("--label-file", metavar="PATH", default=None,
                   help="CSV/txt 'video,label' per line; default: label = the video's parent folder name")
    p.add_argument("--list-name", default=DEFAULT_LIST_NAME, help="list CSV written as OUT/NAME.csv "
                                                                  "(default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="re-extract videos whose outputs exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    ray = p.add_argument_group("on a Ray cluster (vadclip.extract.cluster)")
    ray.add_argument("--address", default=None,
                     help="encode on Ray workers: local (a Ray instance on this machine), auto (the cluster this "
                          "node belongs to) or HOST:PORT; VIDEOS at the same path on every node, OUT on this one")
    ray.add_argument("--workers", type=int, default=None,
                     help="workers (each builds CLIP once); default: as many as the cluster's CPUs or GPUs hold")
    ray.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker (default %(default)s)")
    ray.add_argument("--gpus-per-worker", type=float, default=0,
                     help="GPUs per worker, fractions share a GPU, e.g. 0.5 (default %(default)s: CPU workers)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0: all videos done; 1: some videos failed (listed); 2: bad input or options."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = extract_videos(args.videos, args.out, crops=args.crops, snippet=args.snippet,
                                 batch_size=args.batch_size, clip_model=args.clip_model,
                                 clip_weights=args.clip_weights, device=args.device, label_file=args.label_file,
                                 list_name=args.list_name, overwrite=args.overwrite,
                                 progress=not args.no_progress, address=args.address, workers=args.workers,
                                 cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker)
    except VadClipError as exc:  # ExtractError, DeviceError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.report(), file=sys.stderr if summary.failed else sys.stdout)
    return 0 if summary.ok else 1
