import math

import torch

from tests.reference import distance_adjacency_scipy
from vadclip.model.gcn import GlobalGCN, GraphConvolution, distance_adjacency, similarity_adjacency


def test_distance_adjacency_code_kernel_by_hand():
    h = distance_adjacency(4, math.e, "exp")
    assert torch.isclose(h[0, 0], torch.tensor(1.0))
    assert torch.isclose(h[0, 1], torch.tensor(math.exp(-1 / math.e)))
    assert torch.isclose(h[3, 0], torch.tensor(math.exp(-3 / math.e)))
    assert not torch.allclose(h.sum(1), torch.ones(4))  # not normalised (code)
    assert torch.allclose(h, distance_adjacency_scipy(4, math.e))


def test_distance_adjacency_paper_softmax_by_hand():
    h = distance_adjacency(4, 1.0, "softmax", lengths=torch.tensor([3, 4]))
    row = torch.tensor([1.0, math.exp(-1), math.exp(-2)])
    assert torch.allclose(h[0, 0, :3], row / row.sum())
    assert torch.all(h[0, 3] == 0) and torch.all(h[0, :, 3] == 0)  # padded frame
    assert torch.allclose(h[1].sum(1), torch.ones(4))


def test_similarity_adjacency_threshold_by_hand():
    x = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [5.0, 5.0]]])
    lengths = torch.tensor([3])
    c = 1 / math.sqrt(2)  # cos(x0, x1) = 0.7071 > 0.7 is kept; cos(x0, x2) = 0 <= 0.7 -> 0
    h = similarity_adjacency(x, lengths, 0.7, "zero")
    row0 = torch.tensor([math.e, math.exp(c), 1.0])  # exp(1), exp(0.707), exp(0)
    assert torch.allclose(h[0, 0, :3], row0 / row0.sum(), atol=1e-6)
    assert torch.all(h[0, 3] == 0) and torch.all(h[0, :, 3] == 0)
    dropped = similarity_adjacency(x, lengths, 0.7, "drop")
    row0 = torch.tensor([math.e, math.exp(c)])
    assert torch.allclose(dropped[0, 0, :2], row0 / row0.sum(), atol=1e-6)
    assert dropped[0, 0, 2] == 0
    high = similarity_adjacency(x, lengths, 0.75, "zero")  # now cos 0.707 is filtered too
    assert torch.isclose(high[0, 0, 1], high[0, 0, 2])


def test_graph_convolution_formula():
    torch.manual_seed(0)
    gc = GraphConvolution(4, 4)
    x, adj = torch.randn(1, 3, 4), torch.rand(3, 3)
    assert torch.allclose(gc(x, adj), adj @ (x @ gc.weight) + x)
    gc2 = GraphConvolution(4, 2)
    conv = gc2.residual(x.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(gc2(x, adj), adj @ (x @ gc2.weight) + conv)


def test_fixed_distance_adjacency_equals_per_forward_rebuild():
    torch.manual_seed(0)
    gcn = GlobalGCN(8, 16, "two_stack", 0.7, "zero", "exp", math.e)
    rebuilt = GlobalGCN(8, 16, "two_stack", 0.7, "zero", "exp", math.e, rebuild_distance=True)
    rebuilt.load_state_dict(gcn.state_dict())
    x, n = torch.randn(2, 16, 8), torch.tensor([16, 9])
    fast = gcn(x, n)
    assert torch.allclose(fast, rebuilt(x, n), atol=1e-6)
    authors = gcn.gcn(x, similarity_adjacency(x, n, 0.7, "zero"), distance_adjacency_scipy(16, math.e))
    assert torch.allclose(fast, authors, atol=1e-6)
