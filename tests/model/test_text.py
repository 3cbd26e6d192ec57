import torch

from tests.conftest import XD_NAMES
from vadclip.model.text import ClipTextEncoder, HandcraftedPrompt, LearnablePrompt


def test_learnable_prompt_layout(tiny_clip, tok):
    enc = ClipTextEncoder(tiny_clip)
    prompt = LearnablePrompt(XD_NAMES, enc, prefix=10, postfix=10, tokenizer=tok)
    words = tok.encode("car accident")  # 2 word tokens
    c = XD_NAMES.index("car accident")
    assert prompt.eot[c] == 1 + 10 + len(words) + 10
    assert prompt.ids[c, 0] == tok.sot_token_id and prompt.ids[c, prompt.eot[c]] == tok.eot_token_id
    assert prompt.ids[c, 11:13].tolist() == words
    assert not prompt.is_token[c, 1:11].any() and not prompt.is_token[c, 13:23].any()


def test_eot_truncation_equals_full_77_token_output(tiny_clip, tok):
    torch.manual_seed(0)
    enc, enc_full = ClipTextEncoder(tiny_clip), ClipTextEncoder(tiny_clip, truncate=False)  # CLIP's weights
    prompt = LearnablePrompt(XD_NAMES, enc, prefix=10, postfix=10, tokenizer=tok)
    prompt_full = LearnablePrompt(XD_NAMES, enc_full, prefix=10, postfix=10, tokenizer=tok)
    prompt_full.load_state_dict(prompt.state_dict())
    assert int(prompt.eot.max()) + 1 < 77
    assert torch.allclose(prompt(), prompt_full(), atol=1e-5)
    hand = HandcraftedPrompt(XD_NAMES, enc, "a video frame of {}.", tok)
    hand_full = HandcraftedPrompt(XD_NAMES, enc_full, "a video frame of {}.", tok, use_cache=False)
    assert hand() is hand() and hand_full() is not hand_full()  # cached / re-encoded every call
    assert torch.allclose(hand(), hand_full(), atol=1e-5)


def test_gradients_reach_the_prompt_not_clip(tiny_clip, tok):
    enc = ClipTextEncoder(tiny_clip)
    prompt = LearnablePrompt(XD_NAMES, enc, prefix=4, postfix=4, tokenizer=tok)
    prompt().sum().backward()
    assert prompt.table.weight.grad is not None and prompt.table.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())
