"""FedPara: rank r² from a Hadamard product, the Khatri-Rao forward, parity with peft's LoHa,
HadamardLinear from scratch and pFedPara's global / local split, argument errors."""
import copy

import peft
import pytest
import torch
from torch import nn

from pefttutor import FedParaLinear, HadamardLinear
from pefttutor.fedpara import hadamard_apply, khatri_rao


def test_hadamard_of_two_rank_r_reaches_rank_r_squared():
    torch.manual_seed(0)
    for r in (1, 2, 3, 5):
        W1 = torch.randn(40, r) @ torch.randn(r, 30)
        W2 = torch.randn(40, r) @ torch.randn(r, 30)
        assert torch.linalg.matrix_rank(W1) == r
        assert torch.linalg.matrix_rank(W1 * W2) == min(r * r, 30)


@pytest.mark.parametrize("d, k, r", [(64, 48, 3), (8, 6, 4), (5, 9, 1)])
def test_khatri_rao_factors_and_both_forward_paths(d, k, r):
    torch.manual_seed(0)
    X1, X2, Y1, Y2 = torch.randn(d, r), torch.randn(d, r), torch.randn(r, k), torch.randn(r, k)
    P, Q = khatri_rao(X1, Y1, X2, Y2)
    assert P.shape == (d, r * r) and Q.shape == (r * r, k)
    torch.testing.assert_close(P @ Q, (X1 @ Y1) * (X2 @ Y2), atol=1e-4, rtol=1e-5)
    x = torch.randn(3, 2, k)
    torch.testing.assert_close(hadamard_apply(X1, Y1, X2, Y2, x), x @ ((X1 @ Y1) * (X2 @ Y2)).T,
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("r", [2, 8])
def test_parity_with_peft_loha(r):
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    config = peft.LoHaConfig(r=r, alpha=2 * r, init_weights=False)
    ref = peft.tuners.loha.layer.Linear(copy.deepcopy(base), "default", config=config, r=r, alpha=2 * r)
    ours = FedParaLinear(copy.deepcopy(base), r=r, alpha=2 * r)
    with torch.no_grad():
        for mine, theirs in [("X1", "hada_w1_a"), ("Y1", "hada_w1_b"), ("X2", "hada_w2_a"), ("Y2", "hada_w2_b")]:
            getattr(ours, mine).copy_(getattr(ref, theirs)["default"])
    x = torch.randn(4, 7, 64)
    assert (ours(x) - ref(x)).abs().max() <= 1e-5
    assert (ours.delta_weight() - ref.get_delta_weight("default")).abs().max() <= 1e-6


def test_parameter_count_equals_lora_of_rank_2r():
    layer = FedParaLinear(nn.Linear(64, 48), r=4)
    assert sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base.")) == 2 * 4 * (64 + 48)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "FedPara rank r=0 does not fit a layer with out_features=8 and in_features=16"),
    (dict(r=9), "choose an integer 1 <= r <= 8"),
    (dict(r=True), "FedPara rank r=True"),
    (dict(alpha=-1), "FedPara alpha=-1 must be a positive number"),
])
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        FedParaLinear(nn.Linear(16, 8), **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("personal", [False, True])
def test_hadamard_linear_from_scratch(personal):
    torch.manual_seed(0)
    layer = HadamardLinear(256, 128, r=8, personal=personal)
    W = layer.weight
    x = torch.randn(5, 256)
    torch.testing.assert_close(layer(x), x @ W.T + layer.bias, atol=1e-5, rtol=1e-5)
    # He initialisation of the whole weight: Var(W) = 2 / fan_in, within sampling error of heavy tails
    assert 0.5 < W.var().item() * 256 / 2 < 2.0
    assert torch.linalg.matrix_rank(W) == 64 if not personal else torch.linalg.matrix_rank(W) == 72
    assert sum(p.numel() for p in layer.parameters()) == 2 * 8 * (256 + 128) + 128


def test_pfedpara_weight_and_global_names():
    layer = HadamardLinear(6, 4, r=2, personal=True)
    W1, W2 = layer.X1 @ layer.Y1, layer.X2 @ layer.Y2
    torch.testing.assert_close(layer.weight, W1 * (W2 + 1))
    assert layer.global_names() == ["X1", "Y1", "bias"]
    assert HadamardLinear(6, 4, r=2).global_names() == ["X1", "Y1", "X2", "Y2", "bias"]
    with pytest.raises(ValueError, match="HadamardLinear rank r=5 does not fit"):
        HadamardLinear(6, 4, r=5)
