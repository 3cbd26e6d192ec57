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
    enc = ClipTextEncoder(tiny_clip)
    prompt = LearnablePrompt(XD_NAMES, enc, prefix=10, postfix=10, tokenizer=tok)
    truncated = prompt()
    enc.truncate = False
    full = prompt()
    assert int(prompt.eot.max()) + 1 < 77
    assert torch.allclose(truncated, full, atol=1e-5)
    hand = HandcraftedPrompt(XD_NAMES, enc, "a video frame of {}.", tok)
    full_hand = hand()
    enc.truncate = True
    hand.use_cache = False
    assert torch.allclose(hand(), full_hand, atol=1e-5)


def test_gradients_reach_the_prompt_not_clip(tiny_clip, tok):
    enc = ClipTextEncoder(tiny_clip)
    prompt = LearnablePrompt(XD_NAMES, enc, prefix=4, postfix=4, tokenizer=tok)
    prompt().sum().backward()
    assert prompt.table.weight.grad is not None and prompt.table.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())
