"""pefttutor.memory: the exact measurement (tensor walk, saved-tensor hooks) and the analytic model
agree on Llama-style models for full fine-tuning, LoRA and QLoRA in fp32 and bf16; at-scale anchors."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pefttutor import LoRALinear, inject
from pefttutor.memory import (MemoryBreakdown, cuda_peak, measure, meta_model, predict, record_snapshot,
                              saved_activations, storage_bytes)
from pefttutor.quant import OffloadedAdamW, quantize_model


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)    # grouped-query attention too
    return LlamaForCausalLM(config)


def build(llama, method, dtype, targets):
    model = copy.deepcopy(llama).to(dtype).train()
    if method == "qlora":
        quantize_model(model)
    if method != "full":
        inject(model, LoRALinear, targets, r=4)
    return model


@pytest.mark.parametrize("method, targets", [("full", None), ("lora", "all-linear"), ("lora", ["q_proj", "v_proj"]),
                                             ("lora", ["o_proj", "down_proj"]), ("qlora", "all-linear"),
                                             ("qlora", ["v_proj"])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prediction_matches_measurement(llama, method, targets, dtype):
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    model = build(llama, method, dtype, targets)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    got = measure(model, {"input_ids": ids, "labels": ids}, opt)
    pred = predict(copy.deepcopy(llama), method=method, batch_size=3, seq_len=20, r=4,
                   targets=targets or "all-linear", dtype=dtype)
    assert pred.gradients == got.gradients and pred.optimizer == got.optimizer
    assert abs(pred.weights - got.weights) <= 64 * 4                 # RoPE's inv_freq buffer is not a weight
    assert abs(pred.activations - got.activations) <= 0.02 * got.activations


def test_measure_counts_each_storage_once_and_skips_parameters():
    x = torch.randn(10, 10)
    assert storage_bytes([x, x[0], x.T, None]) == 400
    lin = torch.nn.Linear(10, 10)
    inp = torch.randn(4, 10)
    with saved_activations(lin) as saved:
        lin(inp).sum()
    assert sum(saved.values()) == inp.numel() * 4                     # the input, not the weight


def test_offloaded_optimizer_state_is_counted(llama):
    model = build(llama, "lora", torch.float32, "all-linear")
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 256, (2, 8))
    got = measure(model, {"input_ids": ids, "labels": ids}, OffloadedAdamW(params))
    assert got.optimizer == 8 * sum(p.numel() for p in params)


def test_checkpointing_and_batch_size_in_the_model(llama):
    kw = dict(method="lora", seq_len=64, r=4)
    one, four = predict(llama, batch_size=1, **kw), predict(llama, batch_size=4, **kw)
    assert four.activations == pytest.approx(4 * one.activations, rel=0.01)
    assert four.weights == one.weights and four.optimizer == one.optimizer
    assert predict(llama, batch_size=4, checkpointing=True, **kw).activations < 0.6 * four.activations


def test_meta_models_and_the_qlora_paper_anchor():
    seven, sixty_five = meta_model("llama-7b"), meta_model("llama-65b")
    assert next(seven.parameters()).device.type == "meta"
    assert sum(p.numel() for p in seven.parameters()) == 6_738_415_616
    full = predict(sixty_five, method="full", optimizer="adamw-fp32", batch_size=1, seq_len=512)
    assert full.total > 780e9                                          # "more than 780 GB"
    qlora = predict(sixty_five, method="qlora", r=64, batch_size=1, seq_len=512, checkpointing=True,
                    lora_dtype=torch.bfloat16)
    assert qlora.total < 48e9                                          # "less than 48 GB"
    assert qlora.weights == pytest.approx(36.06e9, rel=0.01)


def test_breakdown_and_errors():
    b = MemoryBreakdown(1, 2, 3, 4)
    assert b.total == 10 and b.as_dict()["total"] == 10 and "total" in str(b)
    llama = meta_model("llama-7b")
    with pytest.raises(ValueError, match="method='prefix'"):
        predict(llama, method="prefix")
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        predict(llama, optimizer="sgd")
    from transformers import GPT2Config
    with pytest.raises(ValueError, match="Llama-style decoders"):
        predict(meta_model(GPT2Config(n_layer=1)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_tools_say_what_to_use_without_a_gpu(tmp_path):
    with pytest.raises(RuntimeError, match="use measure"):
        cuda_peak(lambda: None)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        record_snapshot(lambda: None, tmp_path / "s.pickle")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prediction_against_the_cuda_allocator(llama, tmp_path):
    model = build(llama, "lora", torch.float32, "all-linear").cuda()
    ids = torch.randint(0, 256, (8, 128), device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    step()
    opt.zero_grad(set_to_none=True)
    counters = cuda_peak(step)
    pred = predict(llama, method="lora", batch_size=8, seq_len=128, r=4, dtype=torch.float32)
    assert counters["peak"] >= pred.weights + pred.activations
    assert record_snapshot(step, tmp_path / "s.pickle").exists()
