"""Frames per second of `vadclip.extract` (decode + crops + CLIP encode) on this machine.

    python bench/bench_extract.py [--devices cpu,cuda] [--batch-size 200] [--ray]

Runs the tiny random CLIP (`vadclip-tiny`) and ViT-B-16 with random weights (same cost as real weights)
on a synthetic 320×240 MPEG-4 video. Model building and one warm-up batch are not timed. CPU runs use
few frames so the whole bench ends in under 2 minutes on 2 cores; cuda runs only when available.

`--ray` then compares, in the same run, one local process (all cores) with 2 Ray workers of 1 CPU each on a local
Ray instance (`extract_videos(..., address="local")`) over the same 4 videos: frames/s over the whole call, CLIP
building included on both sides (and the workers' start on Ray's; Ray itself is started before the clock).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vadclip.data.conventions import SNIPPET_FRAMES  # noqa: E402
from vadclip.extract import Preprocess, encode_video, extract_videos, load_clip  # noqa: E402

# (model, crops, snippet, frames on cpu, frames on cuda); None: not run there. ViT-B-16 encodes ~2 images/s
# on 2 CPU cores, so its CPU rows encode 16-20 images; 10 crops × mean costs 10× the 1-crop mean row.
CASES = [
    ("vadclip-tiny", 10, "mean", 64, 1024),
    ("vadclip-tiny", 10, "middle", 64, 1024),
    ("vadclip-tiny", 1, "mean", 64, 1024),
    ("ViT-B-16", 10, "middle", 32, 2048),
    ("ViT-B-16", 1, "mean", 16, 2048),
    ("ViT-B-16", 10, "mean", None, 512),
]


@dataclass
class Row:
    model: str
    device: str
    crops: int
    snippet: str
    frames: int
    images: int
    seconds: float

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    @property
    def ips(self) -> float:
        return self.images / self.seconds


def write_video(path: Path, n_frames: int, width: int = 320, height: int = 240) -> None:
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            frame = np.roll(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), i, axis=1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def images_encoded(frames: int, crops: int, snippet: str) -> int:
    per_snippet = SNIPPET_FRAMES if snippet == "mean" else 1
    full, rest = divmod(frames, SNIPPET_FRAMES)
    return crops * (full * per_snippet + (min(rest, per_snippet) if rest else 0))


def run_case(video: Path, model: torch.nn.Module, device: torch.device, name: str, crops: int, snippet: str,
             frames: int, batch_size: int) -> Row:
    prep = Preprocess(model, device)
    with torch.inference_mode():  # warm-up: first-call allocations, cuDNN/cuBLAS setup
        model.encode_image(prep(np.zeros((2, 224, 224, 3), dtype=np.uint8)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    feats = encode_video(video, model, prep, crops=crops, snippet=snippet, batch_size=batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert feats.shape[:2] == (crops, -(-frames // SNIPPET_FRAMES)), feats.shape
    return Row(name, device.type, crops, snippet, frames, images_encoded(frames, crops, snippet), seconds)


RAY_CASES = [("vadclip-tiny", 10, "mean", 96), ("ViT-B-16", 1, "mean", 32)]  # model, crops, snippet, frames/video


def ray_comparison(tmp: Path, batch_size: int) -> None:
    """Local (1 process) vs Ray (2 workers × 1 CPU), frames/s of the whole extraction, one row per case."""
    from vadclip.extract.cluster import start_ray

    start_ray("local")
    print(f"\n{'model':<13} {'crops':>5} {'videos':>6} {'frames':>6} {'local f/s':>10} {'ray 2x1 f/s':>12} "
          f"{'ratio':>6}")
    for name, crops, snippet, frames in RAY_CASES:
        videos = tmp / f"videos_{frames}"
        for i in range(4):
            path = videos / "Abuse" / f"v{i}.mp4"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_video(path, frames)
        fps = []
        for address in (None, "local"):
            t0 = time.perf_counter()
            out = extract_videos(videos, tmp / f"out_{name}_{address}", crops=crops, snippet=snippet,
                                 batch_size=batch_size, clip_model=name, device="cpu", progress=False,
                                 address=address, workers=2 if address else None)
            assert out.ok and len(out.extracted) == 4, out.report()
            fps.append(out.frames / (time.perf_counter() - t0))
        print(f"{name:<13} {crops:>5} {4:>6} {4 * frames:>6} {fps[0]:>10.1f} {fps[1]:>12.1f} {fps[1] / fps[0]:>6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when unavailable")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--ray", action="store_true", help="also compare 1 local process with 2 Ray workers")
    args = p.parse_args()
    logging.disable(logging.WARNING)  # the random-weights banner, once per model, is expected here
    warnings.simplefilter("ignore")
    devices = [torch.device(d) for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            models: dict[str, torch.nn.Module] = {}
            for name, crops, snippet, cpu_frames, gpu_frames in CASES:
                frames = cpu_frames if device.type == "cpu" else gpu_frames
                if frames is None:
                    continue
                video = Path(tmp) / f"bench_{frames}.mp4"
                if not video.exists():
                    write_video(video, frames)
                if name not in models:
                    models = {name: load_clip(name, None, device)}  # one model in memory at a time
                rows.append(run_case(video, models[name], device, name, crops, snippet, frames, args.batch_size))
                print(f"  done {name} {device.type} crops={crops} {snippet}: {rows[-1].seconds:.1f} s", flush=True)
    header = f"{'model':<13} {'device':<6} {'crops':>5} {'snippet':<7} {'frames':>6} {'images':>6} " \
             f"{'seconds':>8} {'frames/s':>9} {'images/s':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r.model:<13} {r.device:<6} {r.crops:>5} {r.snippet:<7} {r.frames:>6} {r.images:>6} "
              f"{r.seconds:>8.2f} {r.fps:>9.1f} {r.ips:>9.1f}")
    if args.ray:
        with tempfile.TemporaryDirectory() as tmp:
            ray_comparison(Path(tmp), args.batch_size)


if __name__ == "__main__":
    main()
