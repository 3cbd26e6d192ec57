import numpy as np
import pytest

from vadclip.data import (
    DataError,
    list_files,
    load_features,
    read_ground_truth,
    read_list,
    resolve_feature_path,
    write_ground_truth,
)
from vadclip.data.conventions import crop_file_name, crop_glob, crop_index, split_crop
from vadclip.data.layout import crop_files

AUTHORS = "/home/xbgydx/Desktop/UCFClipFeatures"


def _features(root, rel, t=5, d=8):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ones((t, d), np.float32))
    return path


def _csv(path, rows, header="path,label"):
    path.write_text("\n".join([header, *[f"{p},{lab}" for p, lab in rows]]) + "\n")
    return path


def test_official_file_names():
    assert list_files("ucf") == {"train": "ucf_CLIP_rgb.csv", "test": "ucf_CLIP_rgbtest.csv",
                                 "frame_gt": "gt_ucf.npy", "segments": "gt_segment_ucf.npy",
                                 "segment_labels": "gt_label_ucf.npy"}
    assert list_files("xd") == {"train": "xd_CLIP_rgb.csv", "test": "xd_CLIP_rgbtest.csv", "frame_gt": "gt.npy",
                                "segments": "gt_segment.npy", "segment_labels": "gt_label.npy"}


def test_split_crop_uses_the_last_suffix_only():
    assert split_crop("Abuse001_x264__3") == ("Abuse001_x264", 3)
    assert split_crop("Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6__0") == (
        "Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6", 0)


def test_crop_file_names_round_trip():
    xd = "Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6"
    assert crop_file_name("Abuse001_x264", 3) == "Abuse001_x264__3.npy"
    assert split_crop(crop_file_name(xd, 0)[:-len(".npy")]) == (xd, 0)
    assert crop_index(crop_file_name(xd, 12), xd) == 12
    for other in ("Abuse001_x264.npy", "Abuse001_x264__.npy", "Abuse001_x264__x.npy", "Abuse001_x264__3__4.npy",
                  "Abuse001_x264__3.npz", "Abuse002_x264__3.npy"):
        assert crop_index(other, "Abuse001_x264") is None, other
    assert crop_glob("x[1]") == "x[[]1]__*.npy"


def test_crop_files_finds_every_crop_of_a_video(tmp_path):
    for name in ("v__0.npy", "v__12.npy", "v.npy", "v__x.npy", "v__3__4.npy", "w__1.npy", "v__2.npz"):
        (tmp_path / name).write_bytes(b"")
    assert crop_files(tmp_path / "v__0.npy", "v") == {0: tmp_path / "v__0.npy", 12: tmp_path / "v__12.npy"}


def test_rerooting_takes_the_shortest_existing_suffix(tmp_path):
    target = _features(tmp_path / "feats", "Abuse/Abuse001_x264__0.npy")
    csv_path = f"{AUTHORS}/Abuse/Abuse001_x264__0.npy"
    found, tried = resolve_feature_path(csv_path, tmp_path / "feats")
    assert found == target and tried[0] == tmp_path / "feats" / "Abuse001_x264__0.npy"
    # --features may also point at the class folder itself, or at an ancestor mirroring more folders
    assert resolve_feature_path(csv_path, tmp_path / "feats" / "Abuse")[0] == target
    deep = _features(tmp_path / "deep", "UCFClipFeatures/Abuse/Abuse001_x264__0.npy")
    assert resolve_feature_path(csv_path, tmp_path / "deep")[0] == deep


def test_rerooting_accepts_existing_paths_as_is(tmp_path):
    target = _features(tmp_path, "x/Video__0.npy")
    assert resolve_feature_path(str(target), None)[0] == target
    assert resolve_feature_path(str(target), tmp_path / "elsewhere")[0] == target
    assert resolve_feature_path("/nowhere/Video__0.npy", tmp_path)[0] is None


def test_read_list(tmp_path):
    _features(tmp_path / "f", "Abuse/Abuse001_x264__0.npy")
    _features(tmp_path / "f", "Abuse/Abuse001_x264__1.npy")
    _features(tmp_path / "f", "Training_Normal_Videos_Anomaly/Normal_Videos003_x264__0.npy")
    csv = _csv(tmp_path / "ucf_CLIP_rgb.csv", [(f"{AUTHORS}/Abuse/Abuse001_x264__0.npy", "Abuse"),
                                              (f"{AUTHORS}/Abuse/Abuse001_x264__1.npy", "Abuse"),
                                              (f"{AUTHORS}/Training_Normal_Videos_Anomaly/"
                                               "Normal_Videos003_x264__0.npy", "Normal")])
    rows = read_list(csv, tmp_path / "f", "ucf")
    assert [(r.video, r.crop, r.classes) for r in rows] == [
        ("Abuse001_x264", 0, (1,)), ("Abuse001_x264", 1, (1,)), ("Normal_Videos003_x264", 0, (0,))]
    assert rows[0].path == tmp_path / "f" / "Abuse" / "Abuse001_x264__0.npy" and rows[0].label == "Abuse"


def test_read_list_errors_name_the_file(tmp_path):
    _features(tmp_path / "f", "Abuse/Abuse001_x264__0.npy")
    good = f"{AUTHORS}/Abuse/Abuse001_x264__0.npy"
    with pytest.raises(DataError, match="missing.csv"):
        read_list(tmp_path / "missing.csv", tmp_path / "f", "ucf")
    with pytest.raises(DataError, match=r"empty\.csv.*empty"):
        read_list(_csv(tmp_path / "empty.csv", []), tmp_path / "f", "ucf")
    with pytest.raises(DataError, match=r"nolabel\.csv.*label"):
        read_list(_csv(tmp_path / "nolabel.csv", [(good, "Abuse")], header="path,class"), tmp_path / "f", "ucf")
    with pytest.raises(DataError, match=r"badlabel\.csv:3.*'Riot'"):
        read_list(_csv(tmp_path / "badlabel.csv", [(good, "Abuse"), (good, "Riot")]), tmp_path / "f", "ucf")
    with pytest.raises(DataError, match=r"badcode\.csv:2.*'B7'"):
        read_list(_csv(tmp_path / "badcode.csv", [(good, "B7-0-0")]), tmp_path / "f", "xd")
    missing = f"{AUTHORS}/Abuse/Abuse002_x264__0.npy"
    with pytest.raises(DataError) as err:
        read_list(_csv(tmp_path / "gone.csv", [(good, "Abuse"), (missing, "Abuse")]), tmp_path / "f", "ucf")
    msg = str(err.value)
    assert "gone.csv:3" in msg and "Abuse002_x264__0.npy" in msg and str(tmp_path / "f") in msg


@pytest.mark.parametrize("array,needle", [
    (np.ones((4, 8, 1), np.float32), "3 dimension"),
    (np.ones(8, np.float32), "1 dimension"),
    (np.ones((4, 7), np.float32), "width 7"),
    (np.ones((0, 8), np.float32), "T = 0"),
    (np.array(["a", "b"]), "dtype"),
])
def test_load_features_errors_name_the_file(tmp_path, array, needle):
    path = tmp_path / "bad_video__0.npy"
    np.save(path, array)
    with pytest.raises(DataError) as err:
        load_features(path, 8)
    assert "bad_video__0.npy" in str(err.value) and needle in str(err.value)


def test_load_features_unreadable_and_ok(tmp_path):
    path = tmp_path / "garbage__0.npy"
    path.write_bytes(b"not a numpy file")
    with pytest.raises(DataError, match="garbage__0.npy"):
        load_features(path, 8)
    np.save(tmp_path / "ok__0.npy", np.ones((3, 8), np.float64))
    x = load_features(tmp_path / "ok__0.npy", 8)
    assert x.dtype == np.float32 and x.shape == (3, 8)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])  # 1e300: inf once cast to float32
def test_load_features_rejects_non_finite_rows(tmp_path, bad):
    arr = np.ones((6, 8), np.float64)
    arr[4, 2] = arr[5, 0] = bad
    path = tmp_path / "nan_video__0.npy"
    np.save(path, arr)
    with pytest.raises(DataError) as err:
        load_features(path, 8)
    msg = str(err.value)
    assert "nan_video__0.npy" in msg and "snippet 4" in msg and "2 of 6 snippets" in msg and "finite" in msg


def _object_array(items):
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    return arr


def test_read_ground_truth_converts_string_coordinates(tmp_path):
    np.save(tmp_path / "gt.npy", np.zeros(48, np.float32))
    np.save(tmp_path / "gt_segment.npy", _object_array([[["16.0", "32"], ["40", "48"]], [[0, 160]]]),
            allow_pickle=True)
    np.save(tmp_path / "gt_label.npy", _object_array([["B1", "G"], ["A"]]), allow_pickle=True)
    frame_gt, segments, labels = read_ground_truth(tmp_path, "xd")
    assert frame_gt.dtype == np.float32 and len(frame_gt) == 48
    assert segments == [[(16, 32), (40, 48)], [(0, 160)]] and labels == [["B1", "G"], ["A"]]


def test_read_ground_truth_errors(tmp_path):
    with pytest.raises(DataError, match="gt_ucf.npy"):
        read_ground_truth(tmp_path, "ucf")
    np.save(tmp_path / "gt.npy", np.zeros(48, np.float32))
    np.save(tmp_path / "gt_segment.npy", _object_array([[[0, 16], [20, 30]]]), allow_pickle=True)
    np.save(tmp_path / "gt_label.npy", _object_array([["B1"]]), allow_pickle=True)
    with pytest.raises(DataError, match=r"gt_segment\.npy.*2 segments but 1 labels"):
        read_ground_truth(tmp_path, "xd")
    np.save(tmp_path / "gt_label.npy", _object_array([["B1", "Shooting"]]), allow_pickle=True)
    with pytest.raises(DataError, match=r"gt_label\.npy.*Shooting"):
        read_ground_truth(tmp_path, "xd")


def test_write_ground_truth_round_trips_and_rejects_bad_segments(tmp_path):
    write_ground_truth(tmp_path, "xd", [(3, [(16, 40, "B1"), (0, 8, "G")]), (2, [])])
    frame_gt, segments, labels = read_ground_truth(tmp_path, "xd")
    assert frame_gt.tolist() == [1.0] * 8 + [0.0] * 8 + [1.0] * 24 + [0.0] * 8 + [0.0] * 32
    assert segments == [[(0, 8), (16, 40)], [(0, 32)]] and labels == [["G", "B1"], ["A"]]
    with pytest.raises(DataError, match="test video 0: unknown class 'Fighting'"):
        write_ground_truth(tmp_path, "xd", [(3, [(0, 16, "Fighting")])])
    with pytest.raises(DataError, match=r"segment \[0, 64\) is outside its 48 frames"):
        write_ground_truth(tmp_path, "ucf", [(3, [(0, 64, "Abuse")])])


@pytest.mark.parametrize("values,index,shown", [
    ([0, 1, 7, 7], 2, "7.0"),
    ([0, 1, 0.5, 1], 2, "0.5"),
    ([1, np.nan, 0, 0], 1, "nan"),
])
def test_read_ground_truth_rejects_non_binary_frames(tmp_path, values, index, shown):
    np.save(tmp_path / "gt.npy", np.asarray(values * 4, np.float32))
    np.save(tmp_path / "gt_segment.npy", _object_array([[[0, 16]]]), allow_pickle=True)
    np.save(tmp_path / "gt_label.npy", _object_array([["A"]]), allow_pickle=True)
    with pytest.raises(DataError) as err:
        read_ground_truth(tmp_path, "xd")
    msg = str(err.value)
    assert "gt.npy" in msg and f"frame {index}" in msg and shown in msg and "0/1" in msg
