import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4)).eval()


@pytest.fixture
def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    max_position_embeddings=64)).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def bnb_kernel():
    """``bnb_kernel(dispatched, reference, what)``: pass when the kernel bitsandbytes dispatches to on
    this CPU returns its own reference semantics bit for bit; otherwise record an expected, named
    failure of bitsandbytes (xfail with the measurement), never a skip. Call it only after the test has
    asserted pefttutor's results against the reference, so a kernel bug cannot hide a bug of ours."""
    import bitsandbytes

    from pefttutor.quant.kernels import cpu_description

    def check(dispatched, reference, what: str, model=None):
        if torch.equal(dispatched, reference):
            return
        diff = (dispatched.float() - reference.float()).abs().max().item()
        note = "" if model is None else f"; equal to the row-indexed model of its AVX-512 kernel: {torch.equal(dispatched, model)}"
        pytest.xfail(f"bitsandbytes {bitsandbytes.__version__} bug on this CPU ({cpu_description()}): {what} "
                     f"differs from bitsandbytes' own reference semantics, max |diff| {diff:.3g}{note}. "
                     f"pefttutor equals the reference bit for bit (asserted above).")
    return check
