import numpy as np
import pytest

from vadclip.data import CLASS_CODES, CLASS_PROMPTS, DataError, multi_hot, parse_label


def test_codes_and_prompts_are_aligned_with_normal_first():
    assert CLASS_CODES["ucf"][0] == "Normal" and CLASS_PROMPTS["ucf"][0] == "normal"
    assert CLASS_CODES["xd"] == ["A", "B1", "B2", "B4", "B5", "B6", "G"]
    assert CLASS_PROMPTS["xd"] == ["normal", "fighting", "shooting", "riot", "abuse", "car accident", "explosion"]
    assert len(CLASS_CODES["ucf"]) == len(CLASS_PROMPTS["ucf"]) == 14
    assert CLASS_PROMPTS["ucf"][CLASS_CODES["ucf"].index("RoadAccidents")] == "roadAccidents"
    for code, prompt in zip(CLASS_CODES["ucf"], CLASS_PROMPTS["ucf"]):
        assert code.lower() == prompt.lower()


@pytest.mark.parametrize("style,label,expected", [
    ("ucf", "Normal", (0,)),
    ("ucf", "Abuse", (1,)),
    ("ucf", "Vandalism", (13,)),
    ("xd", "A", (0,)),
    ("xd", "B1-0-0", (1,)),
    ("xd", "B2-G-B6", (2, 5, 6)),
    ("xd", "G", (6,)),
    ("xd", "B4-B5-0", (3, 4)),
])
def test_parse_label(style, label, expected):
    assert parse_label(style, label, "list.csv:2") == expected


@pytest.mark.parametrize("style,label,needles", [
    ("ucf", "Riot", ["list.csv:5", "'Riot'", "Vandalism"]),
    ("ucf", "normal", ["list.csv:5", "'normal'"]),
    ("xd", "B3-0-0", ["list.csv:5", "'B3'", "B6"]),
    ("xd", "0-0-0", ["list.csv:5", "no class code"]),
    ("xd", "A-B1-0", ["list.csv:5", "normal code"]),
])
def test_unknown_labels_raise_data_error_naming_the_row(style, label, needles):
    with pytest.raises(DataError) as err:
        parse_label(style, label, "list.csv:5")
    for needle in needles:
        assert needle in str(err.value)


def test_multi_hot():
    v = multi_hot((2, 5), 7)
    assert v.dtype == np.float32 and v.tolist() == [0, 0, 1, 0, 0, 1, 0]
    assert multi_hot((0,), 14)[0] == 1 and multi_hot((0,), 14).sum() == 1
