"""KronA: the vec trick over random shapes, factor shapes and their errors, parity with peft's LoKr,
and KronAB beside the feed-forward block of Llama, GPT-2 and BERT."""
import copy

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pefttutor import KronABlock, KronALinear, LoRALinear, adapter_layers, inject, load_adapter, merge, save_adapter
from pefttutor.krona import divisor_pair, kron_apply, kron_shapes


@settings(max_examples=60, deadline=None)
@given(a1=st.integers(1, 6), a2=st.integers(1, 6), b1=st.integers(1, 6), b2=st.integers(1, 6),
       lead=st.lists(st.integers(1, 3), min_size=0, max_size=3), seed=st.integers(0, 2**16))
def test_vec_trick_equals_kron_on_random_shapes(a1, a2, b1, b2, lead, seed):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(a1, a2, generator=g), torch.randn(b1, b2, generator=g)
    x = torch.randn(*lead, a2 * b2, generator=g)
    y = kron_apply(A, B, x)
    assert y.shape == (*lead, a1 * b1)
    torch.testing.assert_close(y, x @ torch.kron(A, B).T, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000))
def test_divisor_pair_matches_lokr(n):
    p, q = divisor_pair(n)
    assert p * q == n and p <= q
    assert (p, q) == peft.tuners.lokr.layer.factorization(n)


def test_rank_is_product_of_ranks():
    torch.manual_seed(0)
    A = torch.randn(4, 2) @ torch.randn(2, 6)            # rank 2
    B = torch.randn(8, 3) @ torch.randn(3, 5)            # rank 3
    assert torch.linalg.matrix_rank(torch.kron(A, B)) == 6


def test_automatic_and_given_shapes():
    assert kron_shapes(768, 3072) == ((24, 48), (32, 64))
    layer = KronALinear(nn.Linear(12, 10), a_shape=(5, 3))
    assert layer.A.shape == (5, 3) and layer.B.shape == (2, 4)
    assert KronALinear(nn.Linear(13, 7)).A.shape == (1, 1)      # primes: A is 1x1, B the whole layer


@pytest.mark.parametrize("a_shape, message", [
    ((4, 5), "a_shape=(4, 5) does not divide a layer with out_features=10 and in_features=12"),
    ((3, 3), "a1 must divide 10 (one of [1, 2, 5, 10])"),
    ((5, 5), "a2 must divide 12 (one of [1, 2, 3, 4, 6, 12])"),
    ((0, 2), "a_shape=None picks (2, 3)"),
    ("big", "a_shape='big'"),
])
def test_shape_errors_list_valid_factorisations(a_shape, message):
    with pytest.raises(ValueError) as err:
        KronALinear(nn.Linear(12, 10), a_shape=a_shape)
    assert message in str(err.value)


def test_scale_error():
    with pytest.raises(ValueError, match="KronALinear scale=0 must be a nonzero number"):
        KronALinear(nn.Linear(4, 4), scale=0)


@pytest.mark.parametrize("size", [(64, 48), (30, 21)])
def test_parity_with_peft_lokr(size):
    """LoKr with full factors: ΔW = kron(w1, w2) * alpha / r; w1 is our A (the small factor)."""
    torch.manual_seed(0)
    k, d = size
    base = nn.Linear(k, d)
    r, alpha = max(d, k), 3.0 * max(d, k)                 # r large enough that w2 is a full matrix
    config = peft.LoKrConfig(r=r, alpha=alpha, init_weights=False)
    ref = peft.tuners.lokr.layer.Linear(copy.deepcopy(base), "default", config=config, r=r, alpha=alpha)
    assert "default" in ref.lokr_w1 and "default" in ref.lokr_w2
    ours = KronALinear(copy.deepcopy(base), scale=alpha / r)
    assert ours.A.shape == ref.lokr_w1["default"].shape and ours.B.shape == ref.lokr_w2["default"].shape
    with torch.no_grad():
        ours.A.copy_(ref.lokr_w1["default"])
        ours.B.copy_(ref.lokr_w2["default"])
    x = torch.randn(4, 7, k)
    assert (ours(x) - ref(x)).abs().max() <= 1e-5
    assert (ours.delta_weight() - ref.get_delta_weight("default")).abs().max() <= 1e-6


# ---- KronAB: beside the whole FFN --------------------------------------------------------------

def randomize(model):
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for n, p in layer.named_parameters():
                if not n.startswith("base."):
                    p.normal_(std=0.1)
    return model


@pytest.mark.parametrize("fixture, block", [("tiny_llama", "model.layers.0.mlp"),
                                            ("tiny_gpt2", "transformer.h.0.mlp"),
                                            ("tiny_bert", "bert.encoder.layer.0.output")])
@pytest.mark.parametrize("residual", [False, True])
def test_kronab_identity_then_parallel_term(fixture, block, residual, request, ids):
    model = request.getfixturevalue(fixture)
    with torch.no_grad():
        before = model(ids).logits
    inject(model, KronABlock, "ffn", residual=residual)
    assert len(adapter_layers(model)) == 2 and block in adapter_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)      # identity at init
    wrapped = model.get_submodule(block)
    assert isinstance(wrapped, KronABlock) and wrapped.residual == residual
    assert all(not p.requires_grad for p in wrapped.base.parameters())
    randomize(model)
    x = torch.randn(2, 5, wrapped.d_model)
    extra = wrapped.scale * x @ wrapped.delta_weight().T + (wrapped.res_scale * x if residual else 0)
    if wrapped.style == "bert":                    # BertOutput(h, x) = LayerNorm(dense(h) + x)
        h = torch.randn(2, 5, wrapped.base.dense.in_features)
        torch.testing.assert_close(wrapped(h, x), wrapped.base(h, x + extra))
    else:
        torch.testing.assert_close(wrapped(x), wrapped.base(x) + extra)
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() > 1e-4


def test_kronab_save_load_and_no_merge(tiny_llama, ids, tmp_path):
    model = randomize(inject(copy.deepcopy(tiny_llama), KronABlock, "ffn", residual=True))
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "kronab.safetensors")
    fresh = load_adapter(copy.deepcopy(tiny_llama), tmp_path / "kronab.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected)
    with pytest.raises(ValueError, match="cannot merge: KronABlock at .* is not a weight update"):
        merge(fresh)


def test_kronab_with_lora_inside(tiny_llama, ids):
    model = inject(tiny_llama, KronABlock, "ffn")
    inject(model, LoRALinear, ["q_proj", "down_proj"], r=2)
    names = sorted(adapter_layers(model))
    assert "model.layers.0.mlp" in names and "model.layers.0.mlp.base.down_proj" in names


def test_kronab_errors(tiny_llama):
    with pytest.raises(ValueError, match=r"no feed-forward block of LlamaForCausalLM matches targets=\['attn'\]"):
        inject(tiny_llama, KronABlock, ["attn"])
    with pytest.raises(TypeError, match="KronABlock wraps a feed-forward block"):
        KronABlock(nn.Linear(4, 4))
