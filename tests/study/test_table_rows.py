"""Every row of every ablation study YAML builds a model that trains: a finite loss and non-zero gradients."""

import pytest
import torch

from study import spec as specs
from vadclip.config import preset
from vadclip.losses import total_loss


def _table_rows():
    for name in ("ablation_lgt", "ablation_branch", "ablation_prompt", "ablation_deviations"):
        spec = specs.load(name)
        for variant in spec.variants:
            yield pytest.param(spec, variant, id=f"{name}:{variant.name}")


@pytest.mark.parametrize("spec,variant", list(_table_rows()))
def test_forward_backward_of_every_table_row(spec, variant, tiny_clip, tok):
    from tests.conftest import XD_NAMES
    from vadclip.model import build_model

    cfg = preset("synthetic", overrides={**spec.base, **variant.overrides, "model.embed_dim": 32,
                                         "model.visual_length": 64})
    torch.manual_seed(0)
    model = build_model(cfg.model, XD_NAMES, tiny_clip, tok)
    x, n = torch.randn(3, 64, 32), torch.tensor([64, 20, 5])
    y = torch.zeros(3, 7)
    y[0, 0] = y[1, 2] = y[2, 3] = y[2, 5] = 1
    out = model(x, n)
    terms = total_loss(out, n, y, cfg.loss)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
