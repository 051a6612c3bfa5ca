"""QLoRA pieces against bitsandbytes, transformers and peft on CPU: NF4Linear equals Linear4bit, LoRA on
top, gradients only on the factors, whole models quantized (Llama and GPT-2's Conv1D), the Hub path through
BitsAndBytesConfig, save / load, merging through dequantize_model; OffloadedAdamW equals AdamW."""
import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from pefttutor import LoRALinear, adapter_layers, inject, load_adapter, merge, save_adapter
from pefttutor.quant import NF4Linear, OffloadedAdamW, dequantize_model, dequantize_nf4, quantize_model, quantize_nf4


def bnb_linear(linear, double_quant, compute_dtype):
    """bitsandbytes' Linear4bit (NF4) holding the same weights; moving it to a device quantizes it."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_nf4_linear_equals_bitsandbytes_linear4bit(double_quant, compute_dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    ref = bnb_linear(linear, double_quant, compute_dtype)
    ours = NF4Linear.from_linear(linear, double_quant=double_quant, compute_dtype=compute_dtype, lookup_table=True)
    assert torch.equal(ours.packed, ref.weight.data)
    x = torch.randn(5, 7, 96, requires_grad=True)
    y, y_ref = ours(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.float32 and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    (grad_ref,) = torch.autograd.grad(y_ref, x, g)
    assert torch.equal(grad, grad_ref)


def test_lora_on_nf4_equals_bitsandbytes_plus_lora_term():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = LoRALinear(NF4Linear.from_linear(linear, lookup_table=True), r=4, alpha=8)
    nn.init.normal_(layer.B)
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    expected = bnb_linear(linear, True, torch.float32)(x) + x @ layer.A.T @ layer.B.T * 2.0
    assert (y - expected).abs().max() <= 1e-5
    y.sum().backward()
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == {"A", "B"}
    assert x.grad is not None and layer.A.dtype == torch.float32


def test_nf4_linear_keeps_no_float_weight_and_saves_no_weight_for_backward():
    linear = nn.Linear(256, 128)
    q = NF4Linear.from_linear(linear)
    assert {n for n, _ in q.named_buffers()} == {"packed", "absmax", "offset", "absmax_scale"}
    assert q.nbytes() == 128 * 256 // 2 + 512 + 2 * 4 + 4          # codes + 8-bit constants + scale + offset
    saved = []
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x)
    assert sum(t.numel() for t in saved) == 0                       # W is rebuilt in backward instead


def test_quantize_model_llama_then_lora(tiny_llama, ids, tmp_path):
    ref = tiny_llama(ids).logits
    model = quantize_model(tiny_llama)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, NF4Linear) and isinstance(model.lm_head, nn.Linear)      # heads stay as they are
    assert not any(p.requires_grad for p in model.parameters())
    close = model(ids).logits
    assert 0 < (close - ref).abs().max() < 0.5 * ref.abs().max()
    inject(model, LoRALinear, "all-linear", r=4)
    assert len(adapter_layers(model)) == 2 * 7
    assert torch.equal(model(ids).logits, close)                  # B = 0: the quantized model at init
    for layer in adapter_layers(model).values():
        nn.init.normal_(layer.B, std=0.02)
    tuned = model(ids).logits
    path = tmp_path / "qlora.safetensors"
    save_adapter(model, path)
    assert not any(".base." in k for k in __import__("safetensors.torch").torch.load_file(str(path)))
    with pytest.raises(ValueError, match="dequantize_model"):
        merge(model)
    dequantize_model(model)
    assert torch.allclose(model(ids).logits, tuned, atol=1e-5)
    merge(model)
    assert torch.allclose(model(ids).logits, tuned, atol=1e-5)


def test_load_adapter_into_fresh_quantized_model(tiny_llama, ids, tmp_path):
    import copy
    fresh = copy.deepcopy(tiny_llama)
    model = inject(quantize_model(tiny_llama), LoRALinear, ["q_proj", "v_proj"], r=2)
    for layer in adapter_layers(model).values():
        nn.init.normal_(layer.B)
    save_adapter(model, tmp_path / "a.safetensors")
    other = load_adapter(quantize_model(fresh), tmp_path / "a.safetensors")
    assert torch.equal(other(ids).logits, model(ids).logits)


def test_quantize_gpt2_conv1d(tiny_gpt2, ids):
    c_attn = tiny_gpt2.transformer.h[0].attn.c_attn
    W = c_attn.weight.T.clone()                                     # Conv1D stores (in, out)
    model = quantize_model(tiny_gpt2, ["c_attn", "c_fc"])
    q = model.transformer.h[0].attn.c_attn
    assert isinstance(q, NF4Linear) and (q.out_features, q.in_features) == tuple(W.shape)
    assert torch.equal(q.dequantized_weight(), dequantize_nf4(*quantize_nf4(W, 64, double_quant=True)))
    inject(model, LoRALinear, ["c_attn"], r=2)
    model(ids).logits.sum().backward()


def test_hub_path_bitsandbytes_config_matches_ours(tmp_path, tiny_llama, ids):
    """The reader's Hub path: a model saved to a folder, loaded through transformers in 4 bits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    tiny_llama.save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    ours = quantize_model(tiny_llama, lookup_table=True)            # the CPU kernel's rounding
    assert torch.equal(ours.model.layers[1].mlp.down_proj.packed, hf.model.layers[1].mlp.down_proj.weight.data)
    assert torch.equal(ours(ids).logits, hf(ids).logits)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    inject(ours, LoRALinear, "all-linear", r=4, alpha=8)
    theirs = dict(peft_model.named_parameters())
    for name, layer in adapter_layers(ours).items():
        nn.init.normal_(layer.B, std=0.05)
        with torch.no_grad():
            theirs[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.A)
            theirs[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.B)
    assert (ours(ids).logits - peft_model(ids).logits).abs().max() <= 1e-5


def test_quantize_errors(tiny_llama):
    with pytest.raises(ValueError, match="no linear module of LlamaForCausalLM matches"):
        quantize_model(tiny_llama, ["qproj"])
    with pytest.raises(ValueError, match="blocksize=48"):
        quantize_model(tiny_llama, blocksize=48)
    inject(tiny_llama, LoRALinear, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="quantize the model before injecting"):
        quantize_model(tiny_llama)
    with pytest.raises(ValueError, match="2-D weight"):
        NF4Linear(torch.randn(4, 4, 4))


def test_offloaded_adamw_equals_adamw():
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(30, 20)), nn.Parameter(torch.randn(7))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = OffloadedAdamW(ours, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, foreach=False)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert all(opt.state[p]["exp_avg"].device.type == "cpu" for p in ours)
    assert torch.equal(opt.state[ours[0]]["exp_avg_sq"], ref.state[theirs[0]]["exp_avg_sq"])
    assert opt.max_state_bytes_on_device == 2 * 4 * 600              # one parameter's two moments


def test_offloaded_adamw_trains_a_lora_and_rejects_bad_arguments(tiny_llama, ids):
    model = inject(quantize_model(tiny_llama), LoRALinear, "all-linear", r=2)
    opt = OffloadedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="lr > 0"):
        OffloadedAdamW(model.parameters(), lr=0)
