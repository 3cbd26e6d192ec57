"""Feature extraction: crops, snippets, layout, list CSV, resume, corrupt videos, CLI exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import av
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

from vadclip import extract as ex
from vadclip.config import preset
from vadclip.data import load_dataset, write_ground_truth
from vadclip.extract import ExtractError, crop_frames, extract_videos
from vadclip.train import main as train_main

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]
TINY = {"clip_model": "vadclip-tiny", "device": "cpu", "progress": False}


# ------------------------------------------------------------------------------------------ helpers


def asym_frames(n: int, width: int = 340, height: int = 256, seed: int = 0) -> np.ndarray:
    """Frames with a random left third and a moving gradient: no symmetry, every frame different."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    for i in range(n):
        frames[i] = ((ramp + 9 * i) % 256).astype(np.uint8)
        frames[i, :, : width // 3] = rng.integers(0, 256, (height, width // 3, 3))
    return frames


def write_video(path: Path, frames: np.ndarray, lossless: bool = False) -> Path:
    """MPEG-4 (small, lossy) or FFV1 in .mkv (lossless RGB: decoded pixels equal the input)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1" if lossless else "mpeg4", rate=25)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "bgr0" if lossless else "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def small_video(path: Path, n: int, seed: int = 0) -> Path:
    return write_video(path, asym_frames(n, width=64, height=48, seed=seed))


def indexed_video(path: Path, n: int, keep: float = 1.0) -> Path:
    """MPEG-4 video cut to the first `keep` of its bytes. An .mp4 is written faststart (index at the front)
    and an .mkv holds its duration in the header, so a cut one still opens and advertises all `n` frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if path.suffix == ".mp4" else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        for frame in asym_frames(n, width=64, height=48):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def corrupt_video(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return path


def run(videos: Path, out: Path, **kw) -> ex.ExtractSummary:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights banner is expected here
        return extract_videos(videos, out, **{**TINY, **kw})


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# -------------------------------------------------------------------------------------- crops, units


def test_crop_geometry_and_order() -> None:
    img = asym_frames(1)[0]  # already 340×256: no resize, crops are exact slices
    crops = crop_frames(img, 10)
    assert len(crops) == 10 and all(c.shape == (224, 224, 3) and c.dtype == np.uint8 for c in crops)
    np.testing.assert_array_equal(crops[0], img[16:240, 58:282])  # centre, as crop.py
    np.testing.assert_array_equal(crops[1], img[:224, :224])
    np.testing.assert_array_equal(crops[2], img[:224, 116:])
    np.testing.assert_array_equal(crops[3], img[32:, :224])
    np.testing.assert_array_equal(crops[4], img[32:, 116:])
    for k in range(5):
        np.testing.assert_array_equal(crops[5 + k], crops[k][:, ::-1])
    flipped = crop_frames(np.ascontiguousarray(img[:, ::-1]), 10)
    np.testing.assert_array_equal(crops[5], flipped[0])  # flipped centre = centre of the flipped frame
    np.testing.assert_array_equal(crops[6], flipped[2])  # flipped top-left = top-right of the flipped frame
    assert not np.array_equal(crops[0], crops[5])
    assert [c.tobytes() for c in crop_frames(img, 5)] == [c.tobytes() for c in crops[:5]]
    np.testing.assert_array_equal(crop_frames(img, 1)[0], crops[0])


def test_crop_frames_resizes_and_rejects() -> None:
    crops = crop_frames(asym_frames(1, width=64, height=48)[0], 10)
    assert len(crops) == 10 and crops[0].shape == (224, 224, 3)
    with pytest.raises(ValueError, match="crops"):
        crop_frames(asym_frames(1)[0], 3)
    with pytest.raises(ValueError, match="uint8"):
        crop_frames(np.zeros((256, 340, 3), dtype=np.float32), 10)


def test_snippets_keep_the_last_partial_one() -> None:
    groups = list(ex.snippets(range(33)))
    assert [len(g) for g in groups] == [16, 16, 1]  # T = ceil(33 / 16)
    assert [len(g) for g in ex.snippets(range(32))] == [16, 16]
    assert list(ex.snippets([])) == []
    assert ex.snippet_frames(list(range(16)), "middle") == [8]
    assert ex.snippet_frames([32, 33, 34, 35], "middle") == [34]
    assert list(ex.snippet_frames(list(range(5)), "mean")) == list(range(5))


def test_preprocess_matches_open_clip_eval_transform() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ex.load_clip("vadclip-tiny", None, torch.device("cpu"))
    prep = ex.Preprocess(model, torch.device("cpu"))
    assert prep.fast
    assert tuple(prep.mean.tolist()) == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert tuple(prep.std.tolist()) == pytest.approx(open_clip.OPENAI_DATASET_STD)
    crops = np.stack(crop_frames(asym_frames(1)[0], 10))
    reference = torch.stack([open_clip.image_transform(224, is_train=False)(Image.fromarray(c)) for c in crops])
    assert torch.equal(prep(crops), reference)


def test_label_file_and_names(tmp_path: Path) -> None:
    assert ex.video_key("Abuse/Abuse001_x264.MP4") == "Abuse001_x264"
    xd = "Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6"
    assert ex.video_key(xd) == xd and ex.video_key(xd + ".mp4") == xd  # dots in XD names are not extensions
    txt = tmp_path / "labels.txt"
    txt.write_text("# video label\nv1.mp4 Abuse\nv2\tNormal\n")
    assert ex.read_label_file(txt) == {"v1": "Abuse", "v2": "Normal"}
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("video,label\nsub/v1.avi,B1-0-0\nv2,A\n")
    assert ex.read_label_file(csv_file) == {"v1": "B1-0-0", "v2": "A"}


# ------------------------------------------------------------------------------- one full extraction


LENGTHS = {"Abuse/a16.mp4": 16, "Abuse/a21.mp4": 21, "Normal/n35.mp4": 35}  # T = 1, 2, 3
ASYM_FRAMES = 18  # T = 2, the last snippet has 2 frames


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ex.ExtractSummary]:
    root = tmp_path_factory.mktemp("extract")
    videos, out = root / "videos", root / "out"
    for i, (rel, n) in enumerate(LENGTHS.items()):
        small_video(videos / rel, n, seed=i)
    frames = asym_frames(ASYM_FRAMES)
    write_video(videos / "Abuse/asym.mkv", frames, lossless=True)
    write_video(videos / "Abuse/asym_flip.mkv", np.ascontiguousarray(frames[:, :, ::-1]), lossless=True)
    corrupt_video(videos / "Normal/broken.mp4")
    summary = run(videos, out, crops=10, snippet="mean", batch_size=64)  # 6 frames per batch: many batches
    return videos, out, summary


def test_layout_shapes_and_summary(extracted) -> None:
    _, out, summary = extracted
    assert summary.failed.keys() == {"Normal/broken.mp4"} and not summary.ok
    assert sorted(summary.extracted) == sorted([*LENGTHS, "Abuse/asym.mkv", "Abuse/asym_flip.mkv"])
    assert summary.frames == 16 + 21 + 35 + 2 * ASYM_FRAMES and summary.snippets == 1 + 2 + 3 + 2 + 2
    t_of = {"Abuse/a16": 1, "Abuse/a21": 2, "Normal/n35": 3, "Abuse/asym": 2, "Abuse/asym_flip": 2}
    expected = {f"{v}__{k}.npy" for v in t_of for k in range(10)} | {"CLIP_rgb.csv", ex.MANIFEST_NAME}
    assert files_under(out) == expected  # no temp files, nothing for the corrupt video
    for video, t in t_of.items():
        for k in range(10):
            feat = np.load(out / f"{video}__{k}.npy")
            assert feat.shape == (t, 512) and feat.dtype == np.float32 and np.isfinite(feat).all()
    crops = np.stack([np.load(out / f"Abuse/a21__{k}.npy") for k in range(10)])
    assert len({c.tobytes() for c in crops}) == 10  # ten different crops


def test_list_csv(extracted) -> None:
    _, out, _ = extracted
    df = pd.read_csv(out / "CLIP_rgb.csv")
    assert list(df.columns) == ["path", "label"] and len(df) == 5 * 10
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df.path)
    assert all(Path(p).parent.name == label for p, label in zip(df.path, df.label))
    assert list(df.label) == ["Abuse"] * 40 + ["Normal"] * 10  # normal videos last, as the authors' lists
    assert [Path(p).name for p in df.path[:10]] == [f"a16__{k}.npy" for k in range(10)]
    assert not df.path.str.contains("broken").any()


def test_flipped_crop_feature_equals_centre_of_flipped_video(extracted) -> None:
    _, out, _ = extracted
    feat = {k: np.load(out / f"Abuse/asym__{k}.npy") for k in range(10)}
    flip = {k: np.load(out / f"Abuse/asym_flip__{k}.npy") for k in range(10)}
    np.testing.assert_allclose(feat[5], flip[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feat[6], flip[2], rtol=1e-4, atol=1e-5)  # flipped top-left ↔ top-right
    np.testing.assert_allclose(feat[0], flip[5], rtol=1e-4, atol=1e-5)
    assert not np.allclose(feat[0], flip[0], atol=1e-3)  # the test video really is asymmetric


def test_mean_is_over_the_frames_of_each_snippet(extracted) -> None:
    videos, out, _ = extracted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ex.load_clip("vadclip-tiny", None, torch.device("cpu"))  # seeded: the same random weights
    prep = ex.Preprocess(model, torch.device("cpu"))
    frames = [ex.frame_to_rgb(f) for f in ex.iter_frames(videos / "Abuse/asym.mkv")]
    np.testing.assert_array_equal(frames[3], asym_frames(ASYM_FRAMES)[3])  # lossless round trip
    with torch.inference_mode():
        emb = torch.stack([model.encode_image(prep(ex.crop_stack(f, 10))) for f in frames]).numpy()
    want = np.stack([emb[:16].mean(0), emb[16:].mean(0)])  # second snippet: the 2 frames it has
    for k in (0, 7):
        np.testing.assert_allclose(np.load(out / f"Abuse/asym__{k}.npy"), want[:, k], rtol=1e-4, atol=1e-5)


def test_middle_frame_snippets(extracted, tmp_path: Path) -> None:
    videos, _, _ = extracted
    sub = tmp_path / "v"
    sub.mkdir()
    os.link(videos / "Abuse/asym.mkv", sub / "asym.mkv")
    out = tmp_path / "out"
    run(sub, out, crops=1, snippet="middle")
    feat = np.load(out / "v/asym__0.npy")  # label = parent folder name of a top-level video
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ex.load_clip("vadclip-tiny", None, torch.device("cpu"))
    prep = ex.Preprocess(model, torch.device("cpu"))
    frames = asym_frames(ASYM_FRAMES)
    with torch.inference_mode():
        want = model.encode_image(prep(np.stack([ex.crop_stack(frames[i], 1)[0] for i in (8, 17)]))).numpy()
    np.testing.assert_allclose(feat, want, rtol=1e-4, atol=1e-5)  # frames 8 and 16 + 2 // 2


# ---------------------------------------------------------------------------------- resume and crash


def test_resume_redoes_only_the_incomplete_video(tmp_path: Path) -> None:
    videos, out = tmp_path / "videos", tmp_path / "out"
    small_video(videos / "Abuse/a.mp4", 20, seed=1)
    small_video(videos / "Normal/b.mp4", 20, seed=2)
    first = run(videos, out, crops=5, snippet="middle")
    assert sorted(first.extracted) == ["Abuse/a.mp4", "Normal/b.mp4"]
    before = {p: np.load(out / p) for p in files_under(out) if p.endswith(".npy")}
    mtimes = {p: (out / p).stat().st_mtime_ns for p in before}
    (out / "Abuse/a__3.npy").unlink()  # interrupted after crop 2 of video a
    (out / "Abuse/.a__3.npy.4242.tmp").write_bytes(b"half written")
    (out / "Normal/.b__0.npy.4242.tmp").write_bytes(b"half written")

    second = run(videos, out, crops=5, snippet="middle")
    assert second.extracted == ["Abuse/a.mp4"] and second.skipped == ["Normal/b.mp4"] and second.ok
    assert not [p for p in files_under(out) if p.endswith(".tmp")]
    for p, arr in before.items():
        np.testing.assert_array_equal(np.load(out / p), arr)  # seeded random weights: same features
        if p.startswith("Normal/"):
            assert (out / p).stat().st_mtime_ns == mtimes[p]  # not rewritten
    assert len(pd.read_csv(out / "CLIP_rgb.csv")) == 2 * 5

    third = run(videos, out, crops=5, snippet="middle")
    assert third.extracted == [] and len(third.skipped) == 2 and third.load_seconds == 0.0


def test_crash_while_writing_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    videos, out = tmp_path / "videos", tmp_path / "out"
    small_video(videos / "Abuse/a.mp4", 16)
    real_save = np.save

    def crash(f, arr, *args, **kwargs):
        f.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        run(videos, out, crops=1, snippet="middle")
    assert not (out / "Abuse/a__0.npy").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(np, "save", real_save)
    summary = run(videos, out, crops=1, snippet="middle")
    assert summary.extracted == ["Abuse/a.mp4"] and np.load(out / "Abuse/a__0.npy").shape == (1, 512)


def test_settings_change_is_refused(tmp_path: Path) -> None:
    videos, out = tmp_path / "videos", tmp_path / "out"
    small_video(videos / "Abuse/a.mp4", 16)
    run(videos, out, crops=1, snippet="middle")
    with pytest.raises(ExtractError, match="crops=1"):
        run(videos, out, crops=5, snippet="middle")
    assert run(videos, out, crops=5, snippet="middle", overwrite=True).extracted == ["Abuse/a.mp4"]


# ------------------------------------------------------------------------------- labels, bad input


def test_label_file_labels_flat_folder(tmp_path: Path) -> None:
    videos, out = tmp_path / "videos", tmp_path / "out"
    small_video(videos / "x.mp4", 16)
    small_video(videos / "y.mp4", 17)
    labels = tmp_path / "labels.csv"
    labels.write_text("video,label\ny.mp4,Normal\nx,Abuse\n")
    summary = run(videos, out, crops=1, snippet="middle", label_file=labels, list_name="ucf_CLIP_rgb")
    assert summary.list_path == out / "ucf_CLIP_rgb.csv"
    df = pd.read_csv(summary.list_path)
    assert list(df.label) == ["Abuse", "Normal"]
    assert np.load(out / "Normal/y__0.npy").shape == (2, 512)
    labels.write_text("x,Abuse\n")
    with pytest.raises(ExtractError, match="no label for 1 video"):
        run(videos, tmp_path / "out2", crops=1, label_file=labels)
    small_video(videos / "sub/x.avi", 16)
    with pytest.raises(ExtractError, match="same name 'x'"):
        run(videos, tmp_path / "out2", crops=1)


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing", "{tmp}/out"], "is not a directory"),
    (["{tmp}/empty", "{tmp}/out"], "no video files"),
    (["{tmp}/videos", "{tmp}/out", "--clip-model", "ViT-Nope"], "unknown CLIP model 'ViT-Nope'"),
    (["{tmp}/videos", "{tmp}/out", "--batch-size", "0"], "batch_size"),
    (["{tmp}/videos", "{tmp}/out", "--label-file", "{tmp}/nolabels.csv"], "--label-file"),
    (["{tmp}/videos", "{tmp}/out", "--clip-weights", "{tmp}/none.pt"], "--clip-weights"),
    (["{tmp}/videos", "{tmp}/out", "--device", "tpu9"], "device"),
    (["{tmp}/videos", "{tmp}/out", "--list-name", "a/b"], "list_name"),
])
def test_bad_input_one_message_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, argv, message) -> None:
    (tmp_path / "empty").mkdir()
    corrupt_video(tmp_path / "videos/Abuse/a.mp4")  # never opened: options are checked first
    assert ex.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", [["--crops", "3"], ["--snippet", "first"]])
def test_unknown_choice_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture, option: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ex.main([str(tmp_path), str(tmp_path / "out"), *option])
    assert exc.value.code == 2 and option[0] in capsys.readouterr().err


def test_api_rejects_unknown_values(tmp_path: Path) -> None:
    small_video(tmp_path / "v/a.mp4", 16)
    with pytest.raises(ExtractError, match="crops"):
        run(tmp_path / "v", tmp_path / "out", crops=3)
    with pytest.raises(ExtractError, match="snippet"):
        run(tmp_path / "v", tmp_path / "out", snippet="first")


# --------------------------------------------------------------------------------------------- CLI


def test_cli_skips_corrupt_video_and_exits_1(tmp_path: Path) -> None:
    videos, out = tmp_path / "videos", tmp_path / "out"
    small_video(videos / "Abuse/good.mp4", 24)
    corrupt_video(videos / "Abuse/corrupt.mp4")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "vadclip.extract", str(videos), str(out), "--clip-model",
                           "vadclip-tiny", "--crops", "1", "--snippet", "middle", "--device", "cpu",
                           "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "FAILED Abuse/corrupt.mp4" in proc.stderr and "failed 1" in proc.stderr
    assert "RANDOM weights" in proc.stderr  # the loud warning survives
    assert np.load(out / "Abuse/good__0.npy").shape == (2, 512)
    assert list(pd.read_csv(out / "CLIP_rgb.csv").path) == [str(out / "Abuse/good__0.npy")]


@pytest.mark.parametrize("name", ["cut.mp4", "cut.mkv"])  # frame count from the index / from the duration
def test_truncated_video_fails_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture, name) -> None:
    videos, out = tmp_path / "videos", tmp_path / "out"
    small_video(videos / "Abuse/good.mp4", 24)
    cut = indexed_video(videos / f"Abuse/{name}", 120, keep=0.6)
    with av.open(str(cut)) as container:  # the damage is invisible to the container
        stream = container.streams.video[0]
        assert stream.frames == 120 or container.duration == 4_800_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights banner is expected here
        code = ex.main([str(videos), str(out), "--clip-model", "vadclip-tiny", "--crops", "1", "--snippet",
                        "middle", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and f"FAILED Abuse/{name}" in err and "failed 1" in err
    assert "decoded" in err and "of 120 frames" in err  # says why: the file ends early
    assert files_under(out) == {"Abuse/good__0.npy", "CLIP_rgb.csv", ex.MANIFEST_NAME}  # no partial features
    assert list(pd.read_csv(out / "CLIP_rgb.csv").path) == [str(out / "Abuse/good__0.npy")]


def test_edit_list_trim_is_not_a_truncation(tmp_path: Path) -> None:
    """An edit list (a stream-copy cut) hides frames that the index still counts: no failure for that."""
    full, trimmed = indexed_video(tmp_path / "full.mp4", 120), tmp_path / "trimmed.mp4"
    with av.open(str(full)) as src, av.open(str(trimmed), "w", options={"use_editlist": "1",
                                                                       "avoid_negative_ts": "disabled"}) as dst:
        ist = src.streams.video[0]
        ost = dst.add_stream_from_template(ist)
        shift = round(40 / (ist.average_rate * ist.time_base))  # the first 40 frames before time 0: dropped
        for packet in src.demux(ist):
            if packet.dts is not None:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, ost
                dst.mux(packet)
    with av.open(str(trimmed)) as container:
        assert container.streams.video[0].frames == 120  # what a count-only check would expect
    assert sum(1 for _ in ex.iter_frames(trimmed)) == 80


# ------------------------------------------------------------------------------------ into the trainer


def test_trainer_trains_on_extracted_features(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Extract a UCF-style train and test folder, add ground truth, and run `python -m vadclip.train`
    on the result with the official list names (--lists / --features), as a user would."""
    videos, out, lists = tmp_path / "videos", tmp_path / "features", tmp_path / "list"
    for i in range(3):
        small_video(videos / f"train/Abuse/Abuse{i:03d}_x264.mp4", 40 + 9 * i, seed=i)
        small_video(videos / f"train/Normal/Normal_Videos{i:03d}_x264.mp4", 36 + 7 * i, seed=10 + i)
    small_video(videos / "test/Abuse/Abuse100_x264.mp4", 80, seed=20)  # T = 5
    small_video(videos / "test/Normal/Normal_Videos_100_x264.mp4", 50, seed=21)  # T = 4
    assert run(videos / "train", out / "train", crops=1, snippet="middle", list_name="ucf_CLIP_rgb").ok
    assert run(videos / "test", out / "test", crops=10, snippet="middle", list_name="ucf_CLIP_rgbtest").ok
    lists.mkdir()
    for name, split in (("ucf_CLIP_rgb.csv", "train"), ("ucf_CLIP_rgbtest.csv", "test")):
        (lists / name).write_bytes((out / split / name).read_bytes())
    write_ground_truth(lists, "ucf", [(5, [(16, 48, "Abuse")]), (4, [])])  # test list order: abnormal first

    args = ["--preset", "ucf", "--lists", str(lists), "--features", str(out), "--out", str(tmp_path / "run"),
            "--no-progress", "--epochs", "2", "--device", "cpu", "--set", "clip.model=vadclip-tiny",
            "model.visual_length=16", "optim.batch_size=2", "data.val_fraction=0",
            "eval.selection=test", "eval.eval_every_steps=0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(args) == 0
    assert "map_avg" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert 0 <= metrics["test"]["auc"] <= 1 and np.isfinite(metrics["test"]["map_avg"])
    last = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert [h["epoch"] for h in last["history"]] == [1, 2]
    assert all(np.isfinite(h["train/loss"]) for h in last["history"])
    cfg = preset("ucf", overrides={"clip.model": "vadclip-tiny", "data.lists": str(lists),
                                   "data.features": str(out), "data.val_fraction": 0})
    data = load_dataset(cfg)
    assert len(data.train) == 6 and list(data.test.features.lengths) == [5, 4]  # 10 crops listed, crop 5 read
    np.testing.assert_array_equal(data.test.features[1], np.load(out / "test/Normal/Normal_Videos_100_x264__5.npy"))
    assert data.train_labels[:, 0].sum() == 3  # three normal training videos
