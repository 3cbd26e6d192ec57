"""Frame folders (a folder of images is one video, as ShanghaiTech's `testing/frames/01_0014/000.jpg ...`): found
next to video files, frames in natural order, the same features as a lossless video of the same frames, bad
frames reported per video, and the job a cluster worker receives."""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.test_extract import asym_frames, files_under, run, small_video
from vadclip import extract as ex
from vadclip.extract.jobs import frame_sort_key, is_frame_folder, list_frames, make_jobs

N_FRAMES = 21  # T = 2, the second snippet has 5 frames
H, W = 90, 130  # not 340×256: FFmpeg's resize runs on both sides


def frame_folder(folder: Path, frames: np.ndarray, names: list[str] | None = None) -> Path:
    """One image per frame, written with PIL (the format from each name's extension; default `000.png ...`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in zip(names or [f"{i:03d}.png" for i in range(len(frames))], frames):
        Image.fromarray(frame).save(folder / name)
    return folder


def lossless_video(path: Path, frames: np.ndarray, codec: str) -> Path:
    """FFV1 (bgr0) or x264's RGB encoder at qp 0: lossless, decoded as bgr0 / gbrp (not the images' rgb24)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pix_fmt, options = {"ffv1": ("bgr0", {}), "libx264rgb": ("rgb24", {"qp": "0"})}[codec]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25, options=options)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def tiny_model() -> tuple[torch.nn.Module, ex.Preprocess]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ex.load_clip("vadclip-tiny", None, torch.device("cpu"))  # seeded: the extractor's random weights
    return model, ex.Preprocess(model, torch.device("cpu"))


# -------------------------------------------------------------------------------------- finding them


def test_frames_in_natural_order() -> None:
    names = ["10.jpg", "2.jpg", "1.jpg", "100.jpg", "9.JPG"]
    assert sorted(names, key=frame_sort_key) == ["1.jpg", "2.jpg", "9.JPG", "10.jpg", "100.jpg"]
    assert sorted(["img_10.png", "IMG_9.png", "img_9b.png"], key=frame_sort_key) == \
        ["IMG_9.png", "img_9b.png", "img_10.png"]
    padded = [f"{i:05d}.jpg" for i in (3, 1, 2, 10)]
    assert sorted(padded, key=frame_sort_key) == sorted(padded)  # zero-padded names: plain order
    assert sorted(["1.jpg", "01.jpg"], key=frame_sort_key) == ["01.jpg", "1.jpg"]  # a tie: by name


def test_what_counts_as_a_frame_folder(tmp_path: Path) -> None:
    frames = asym_frames(3, width=16, height=12)
    a = frame_folder(tmp_path / "a", frames, ["2.JPG", "10.jpeg", "1.bmp"])
    (a / "Thumbs.db").write_bytes(b"x")  # other files are ignored
    (a / ".hidden.png").write_bytes(b"x")
    assert is_frame_folder(a) and list_frames(a) == ("1.bmp", "2.JPG", "10.jpeg")
    b = frame_folder(tmp_path / "b", frames[:1])
    (b / "clip.mp4").write_bytes(b"x")
    c = frame_folder(tmp_path / "c", frames[:1])
    (c / "sub").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d/notes.txt").write_text("no images")
    assert not any(is_frame_folder(p) for p in (b, c, tmp_path / "d"))  # with a video, a subfolder, no image


def test_videos_and_frame_folders_together(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Frame folders next to video files: each folder is one video named after it, labelled by its parent
    folder; the video files' outputs are byte for byte those of a run without the folders."""
    videos = tmp_path / "videos"
    small_video(videos / "Abuse/a.mp4", 20)
    frame_folder(videos / "frames/01_0014", asym_frames(20, width=64, height=48, seed=3),
                 [f"{i:03d}.jpg" for i in range(20)])  # JPEG, as ShanghaiTech's
    Image.fromarray(asym_frames(1, width=8, height=8)[0]).save(videos / "Abuse/cover.jpg")  # next to a video
    alone = tmp_path / "alone"
    small_video(alone / "Abuse/a.mp4", 20)
    with caplog.at_level(logging.WARNING, logger="vadclip.extract"):
        summary = run(videos, tmp_path / "out", crops=5, snippet="mean")
    assert "ignoring 1 image file(s) not in a frame folder" in caplog.text and "Abuse/cover.jpg" in caplog.text
    assert sorted(summary.extracted) == ["Abuse/a.mp4", "frames/01_0014"] and summary.ok
    assert summary.frames == 40 and summary.snippets == 4
    out = tmp_path / "out"
    assert files_under(out) == ({f"Abuse/a__{k}.npy" for k in range(5)} | {f"frames/01_0014__{k}.npy" for k in range(5)}
                                | {"CLIP_rgb.csv", ex.MANIFEST_NAME})
    assert np.load(out / "frames/01_0014__0.npy").shape == (2, 512)
    df = pd.read_csv(out / "CLIP_rgb.csv")
    assert list(df.label) == ["Abuse"] * 5 + ["frames"] * 5
    run(alone, tmp_path / "out_alone", crops=5, snippet="mean")
    for k in range(5):
        assert (out / f"Abuse/a__{k}.npy").read_bytes() == (tmp_path / f"out_alone/Abuse/a__{k}.npy").read_bytes()
    labels = tmp_path / "labels.csv"
    labels.write_text("video,label\na.mp4,Abuse\n01_0014,Normal\n")
    relabelled = run(videos, tmp_path / "out_labels", crops=1, snippet="middle", label_file=labels)
    assert relabelled.ok and (tmp_path / "out_labels/Normal/01_0014__0.npy").is_file()


def test_videos_folder_of_images_itself_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = frame_folder(tmp_path / "01_0014", asym_frames(2, width=16, height=12))
    assert ex.main([str(folder), str(tmp_path / "out"), "--clip-model", "vadclip-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no video files" in err and "VIDEOS itself holds images" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- the same features as a video


@pytest.mark.parametrize("codec, snippet, crops", [("ffv1", "mean", 10), ("libx264rgb", "mean", 10),
                                                   ("ffv1", "middle", 5)])
def test_frame_folder_equals_lossless_video(tmp_path: Path, codec: str, snippet: str, crops: int) -> None:
    frames = asym_frames(N_FRAMES, width=W, height=H, seed=7)
    names = [f"{i + 1}.png" for i in range(N_FRAMES)]  # 1.png ... 21.png: widths differ, natural order needed
    folder = frame_folder(tmp_path / "frames/Abuse/v01", frames, names)
    assert list_frames(folder) == tuple(names) != tuple(sorted(names))  # plain sorting would mix the snippets
    video = lossless_video(tmp_path / f"video/Abuse/v01.{'mkv' if codec == 'ffv1' else 'mp4'}", frames, codec)

    decoded = [f.to_ndarray(format="rgb24") for f in ex.iter_frames(video)]  # the video really is lossless
    read = [f.to_ndarray() for f in ex.iter_frames(ex.FrameFolder(folder, tuple(names)))]
    assert len(decoded) == len(read) == N_FRAMES
    assert all(np.array_equal(a, f) and np.array_equal(b, f) for a, b, f in zip(decoded, read, frames))

    a = run(tmp_path / "frames", tmp_path / "out_frames", crops=crops, snippet=snippet, batch_size=64)
    b = run(tmp_path / "video", tmp_path / "out_video", crops=crops, snippet=snippet, batch_size=64)
    assert a.ok and b.ok and a.frames == b.frames == N_FRAMES and a.snippets == b.snippets == 2
    assert files_under(tmp_path / "out_frames") == files_under(tmp_path / "out_video")
    for k in range(crops):
        fa = np.load(tmp_path / f"out_frames/Abuse/v01__{k}.npy")
        fb = np.load(tmp_path / f"out_video/Abuse/v01__{k}.npy")
        assert fa.dtype == fb.dtype == np.float32 and fa.shape == (2, 512) and np.array_equal(fa, fb), k
    csv_a = (tmp_path / "out_frames/CLIP_rgb.csv").read_text().replace(str(tmp_path / "out_frames"), "OUT")
    assert csv_a == (tmp_path / "out_video/CLIP_rgb.csv").read_text().replace(str(tmp_path / "out_video"), "OUT")
    manifest = ex.MANIFEST_NAME
    assert (tmp_path / "out_frames" / manifest).read_text() == (tmp_path / "out_video" / manifest).read_text()


# --------------------------------------------------------------------------------------- bad frames


def test_bad_frames_fail_their_video_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An unreadable, truncated or differently sized frame: that folder is reported (one line naming the frame),
    gets no features, and the run goes on (exit 1), as an undecodable video file."""
    videos, out = tmp_path / "videos", tmp_path / "out"
    small_video(videos / "Abuse/good.mp4", 24)
    frames = asym_frames(20, width=64, height=48)
    frame_folder(videos / "Abuse/f_ok", frames)
    corrupt = frame_folder(videos / "Abuse/f_corrupt", frames)
    (corrupt / "005.png").write_bytes(np.random.default_rng(1).bytes(4096))
    cut = frame_folder(videos / "Abuse/f_cut", frames, [f"{i:03d}.jpg" for i in range(20)])
    (cut / "017.jpg").write_bytes((cut / "017.jpg").read_bytes()[:300])
    sized = frame_folder(videos / "Abuse/f_size", frames)
    Image.fromarray(asym_frames(1, width=32, height=48)[0]).save(sized / "007.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights banner
        code = ex.main([str(videos), str(out), "--clip-model", "vadclip-tiny", "--crops", "1", "--snippet", "mean",
                        "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "failed 3" in err
    failed = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in err.splitlines() if "  FAILED " in line}
    assert failed.keys() == {"  FAILED Abuse/f_corrupt", "  FAILED Abuse/f_cut", "  FAILED Abuse/f_size"}
    assert failed["  FAILED Abuse/f_corrupt"].startswith("frame 005.png is not a readable image "
                                                         "(UnidentifiedImageError: cannot identify image file")
    assert failed["  FAILED Abuse/f_cut"].startswith("frame 017.jpg is not a readable image (OSError:")
    assert failed["  FAILED Abuse/f_size"] == ("frame 007.png is 32x48 pixels, expected 64x48 like the folder's "
                                               "first frame 000.png")
    assert files_under(out) == {"Abuse/good__0.npy", "Abuse/f_ok__0.npy", "CLIP_rgb.csv", ex.MANIFEST_NAME}
    assert len(pd.read_csv(out / "CLIP_rgb.csv")) == 2


# ------------------------------------------------------------------------------------- on a cluster


def test_frame_folder_job_travels_to_a_cluster_worker(tmp_path: Path) -> None:
    """What `run_on_cluster` ships: the job pickled (frame names listed by the driver included), read by the worker's
    `extract`, which gives the local run's features; the largest-first order counts a folder's images."""
    from vadclip.extract.cluster import ExtractWorker, Settings  # Ray: only the cluster module imports it

    videos = tmp_path / "videos"
    frames = asym_frames(N_FRAMES, width=W, height=H, seed=5)
    frame_folder(videos / "Abuse/v01", frames, [f"{i + 1}.png" for i in range(N_FRAMES)])
    small_video(videos / "Abuse/small.mp4", 16)
    jobs = {j.name: j for j in make_jobs(videos, None)}
    job = pickle.loads(pickle.dumps(jobs["v01"]))
    assert job == jobs["v01"] and job.frames == tuple(f"{i + 1}.png" for i in range(N_FRAMES))
    assert job.source == ex.FrameFolder(videos / "Abuse/v01", job.frames)
    assert job.size() == sum(p.stat().st_size for p in (videos / "Abuse/v01").iterdir()) > jobs["small"].size()

    worker = ExtractWorker.__new__(ExtractWorker)  # the actor's state without Ray: its model, its settings
    worker.s = Settings(crops=5, snippet="mean", batch_size=64, clip_model="vadclip-tiny", clip_weights=None,
                        device="cpu", threads=1)
    worker.model, worker.preprocess = tiny_model()
    n, feats, error = worker.extract(job)
    assert error is None and n == N_FRAMES and feats is not None
    run(videos, tmp_path / "out", crops=5, snippet="mean", batch_size=64)
    for k in range(5):
        assert np.array_equal(feats[k], np.load(tmp_path / f"out/Abuse/v01__{k}.npy"))
    (videos / "Abuse/v01/3.png").unlink()  # the shared copy lost a frame the driver listed
    n, feats, error = worker.extract(job)
    assert feats is None and error is not None and error.startswith("frame 3.png is not a readable image "
                                                                     "(FileNotFoundError:")
