import math

import pytest

from vadclip.config import (
    BRANCHES,
    TEMPORAL,
    ClipConfig,
    ConfigError,
    apply_overrides,
    choices,
    flatten,
    from_flat,
    preset,
)


def test_presets_and_variants():
    ucf, xd = preset("ucf"), preset("xd")
    assert (ucf.model.window, ucf.model.local_layers, ucf.optim.lr, ucf.loss.cts_weight) == (8, 2, 2e-5, 0.1)
    assert (xd.model.window, xd.model.local_layers, xd.optim.lr, xd.loss.cts_weight) == (64, 1, 1e-5, 1e-4)
    assert ucf.score_branch == "c" and xd.score_branch == "a"
    assert ucf.selection_metric == "auc" and xd.selection_metric == "ap"
    assert xd.model.sigma == math.e and xd.model.distance_kernel == "exp"
    paper = preset("xd", "paper")
    assert (paper.optim.lr, paper.optim.epochs, paper.model.sigma, paper.model.distance_kernel) == (
        2e-5, 20, 1.0, "softmax")
    assert preset("ucf", "paper").optim.lr == 1e-5
    assert preset("synthetic").data.dataset == "synthetic"


def test_flatten_round_trip():
    cfg = preset("ucf", overrides={"model.window": 16})
    assert from_flat(flatten(cfg)) == cfg
    assert flatten(cfg)["model.window"] == 16


@pytest.mark.parametrize("key,value,needle", [
    ("model.window", 0, "model.window must be >= 1"),
    ("model.temporal", "lstm", "allowed: none, local, global_tf, gcn, local+gcn"),
    ("model.branches", "b", "allowed: c, a, c+a"),
    ("model.prompt", "fancy", "allowed: learnable, handcrafted"),
    ("model.visual_prompt", "max", "allowed: anomaly_focus, average, none"),
    ("model.windw", 8, "unknown key 'model.windw'"),
    ("optim.lr", "fast", "optim.lr: expected float"),
    ("eval.selection", "train", "allowed: val, test"),
    ("data.test_crop", "12", "data.test_crop"),
])
def test_bad_values_name_the_key_and_allowed_values(key, value, needle):
    with pytest.raises(ConfigError) as err:
        preset("xd", overrides={key: value})
    assert needle in str(err.value)


def test_literal_fields_list_their_choices():
    assert TEMPORAL == ("none", "local", "global_tf", "gcn", "local+gcn", "global_tf+gcn", "local+global_tf")
    assert choices("model.temporal") == TEMPORAL and choices("model.branches") == BRANCHES == ("c", "a", "c+a")
    assert choices("eval.map_protocol") == ("official", "paper") and choices("model.window") is None


def test_cli_strings_are_coerced():
    cfg = apply_overrides(preset("xd"), {"model.window": "32", "model.window_overlap": "true",
                                         "optim.milestones": "[2, 5]", "clip.weights": "none"})
    assert cfg.model.window == 32 and cfg.model.window_overlap is True
    assert cfg.optim.milestones == (2, 5) and cfg.clip.weights is None


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="needs the C-branch"):
        preset("xd", overrides={"model.branches": "a"})
    with pytest.raises(ConfigError, match="must divide"):
        preset("xd", overrides={"model.window": 48})
    assert preset("xd", overrides={"model.window": 48, "model.window_overlap": True}).model.window == 48


def test_real_data_presets_default_to_openai_quickgelu_clip():
    # The authors' CLIP is OpenAI's ViT-B/16, which uses QuickGELU (open_clip `ViT-B-16` is exact GELU).
    assert ClipConfig().model == "ViT-B-16-quickgelu"
    for name in ("ucf", "xd"):
        for variant in ("official", "paper"):
            assert preset(name, variant).clip.model == "ViT-B-16-quickgelu"
    assert preset("synthetic").clip.model == "vadclip-tiny"


def test_binary_presets_are_the_ucf_official_hyper_parameters():
    # docs/decisions.md: sht/ubnormal take the ucf official preset; only the dataset (and ubnormal's own
    # validation split, so no held-out training videos) differ
    ucf = flatten(preset("ucf"))
    for name, differs in (("sht", {"data.dataset": "sht"}),
                          ("ubnormal", {"data.dataset": "ubnormal", "data.val_fraction": 0.0})):
        cfg = preset(name)
        flat = flatten(cfg)
        assert {k: v for k, v in flat.items() if ucf[k] != v} == {"preset": name, **differs}
        assert cfg.style == name and cfg.selection_metric == "auc" and cfg.score_branch == "c"
        assert cfg.objective_key == "val/auc" and cfg.clip.model == "ViT-B-16-quickgelu"
        # the paper has no settings for them: `paper` = UCF-Crime's paper values on this dataset
        ucf_paper = flatten(preset("ucf", "paper"))
        flat_paper = flatten(preset(name, "paper"))
        assert {k: v for k, v in flat_paper.items() if ucf_paper[k] != v} == {"preset": name, **differs}
    assert set(choices("data.dataset")) == {"ucf", "xd", "sht", "ubnormal", "synthetic"}
