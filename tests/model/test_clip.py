import json
import warnings

import open_clip
import pytest
import torch

from vadclip.model.clip import (
    ClipActivationWarning,
    create_clip,
    is_openai_checkpoint,
    looks_like_openai_weights,
    uses_quick_gelu,
)

# Two tiny open_clip configs, alike but for the activation: exact GELU (as open_clip `ViT-B-16`) and
# QuickGELU (as `ViT-B-16-quickgelu`, OpenAI's). Registered with open_clip under test-only names.
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
GELU, QUICK = "vadclip-test-gelu", "vadclip-test-quickgelu"


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_configs")
    (folder / f"{GELU}.json").write_text(json.dumps({**TINY, "quick_gelu": False}))
    (folder / f"{QUICK}.json").write_text(json.dumps({**TINY, "quick_gelu": True}))
    open_clip.add_model_config(folder)
    return GELU, QUICK


def _random(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_clip(name, None)


def _our_warnings(record):
    return [w for w in record if issubclass(w.category, ClipActivationWarning)]


def test_openai_state_dict_into_gelu_tower_warns_loudly(tiny_configs, tmp_path):
    gelu, quick = tiny_configs
    assert not uses_quick_gelu(_random(gelu)) and uses_quick_gelu(_random(quick))
    ckpt = tmp_path / "openai-vit-b-16.pt"  # e.g. OpenAI's weights in open_clip's state-dict format
    torch.save(_random(quick).state_dict(), ckpt)
    assert not is_openai_checkpoint(ckpt) and looks_like_openai_weights(ckpt)

    with pytest.warns(ClipActivationWarning) as record:
        create_clip(gelu, str(ckpt))
    message = str(_our_warnings(record)[0].message)
    assert str(ckpt) in message and gelu in message and "ViT-B-16-quickgelu" in message

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        clip = create_clip(quick, str(ckpt))
    assert not _our_warnings(record) and uses_quick_gelu(clip)


def test_non_openai_state_dict_into_gelu_tower_is_quiet(tiny_configs, tmp_path):
    gelu, _ = tiny_configs
    ckpt = tmp_path / "laion2b-vit-b-16.pt"
    torch.save(_random(gelu).state_dict(), ckpt)
    assert not looks_like_openai_weights(ckpt)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        create_clip(gelu, str(ckpt))
    assert not _our_warnings(record)


def test_openai_detection_heuristic(tmp_path):
    scripted = tmp_path / "ViT-B-16.pt"  # OpenAI's release is a TorchScript archive: certain
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    assert is_openai_checkpoint(scripted) and looks_like_openai_weights(scripted)
    # open_clip's own download of the `openai` tag lands in the HF cache folder named after it
    cached = tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    (cached / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert looks_like_openai_weights(cached / "open_clip_pytorch_model.bin")
    (tmp_path / "OpenAI_ViT-B-16.safetensors").write_bytes(b"x")
    assert looks_like_openai_weights(tmp_path / "OpenAI_ViT-B-16.safetensors")
    (tmp_path / "openai_runs").mkdir()  # other folder names do not count (this test's tmp_path has one too)
    (tmp_path / "openai_runs" / "laion.bin").write_bytes(b"x")
    assert not looks_like_openai_weights(tmp_path / "openai_runs" / "laion.bin")


def test_cached_text_tower_equals_a_fresh_build_and_leaves_the_rng_alike(tmp_path):
    """frozen_text_tower (built once per process, then copied) gives what create_clip gives, random or loaded."""
    from vadclip.model.clip import _TEXT_TOWERS, frozen_text_tower

    _TEXT_TOWERS.clear()

    def build(cached: bool, seed: int):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tower = frozen_text_tower("vadclip-tiny", None, 32) if cached else create_clip("vadclip-tiny", None, 32)
        return tower.state_dict(), torch.random.get_rng_state()

    fresh, rng = build(False, 3)
    for _ in range(2):  # the first call builds, the second copies the cached one
        state, after = build(True, 3)
        assert torch.equal(after, rng)
        assert {k for k in state} == {k for k in fresh if not k.startswith("visual.")}
        assert all(torch.equal(state[k], fresh[k]) for k in state)
    other, _ = build(True, 4)  # another RNG state, other random weights
    assert not torch.equal(other["text_projection"], state["text_projection"])
    copy_a, copy_b = (frozen_text_tower("vadclip-tiny", None, 32) for _ in range(2))
    assert copy_a.text_projection.data_ptr() != copy_b.text_projection.data_ptr()  # never shared between trials
    weights = tmp_path / "tiny.pt"
    torch.save(_random("vadclip-tiny").state_dict(), weights)
    loaded = create_clip("vadclip-tiny", str(weights)).state_dict()
    for _ in range(2):
        state = frozen_text_tower("vadclip-tiny", str(weights)).state_dict()
        assert all(torch.equal(state[k], loaded[k]) for k in state)
