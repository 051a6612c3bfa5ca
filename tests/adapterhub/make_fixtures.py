"""Write parity fixtures with AdapterHub's `adapters` (run in its side environment: see build.sh).

`adapters` 1.3.0 needs transformers 4.57, which cannot share an environment with the book's
transformers 5, so this script runs apart and leaves only safetensors files behind: for each tiny
seeded base model its weights (`<arch>_base.safetensors`), and for each configuration the adapter
tensors under `adapters`' own names, the inputs and the output (`<arch>_<config>.safetensors`).
tests/test_adapters.py loads them into pefttutor's layers and compares the outputs.

Adapter weights are redrawn from normal(0, 0.3) after `add_adapter`, so that every adapter changes
the output by far more than the test's tolerance (`adapters`' own initialisations leave it near zero).
"""
import copy
import json
import pathlib
import sys

import adapters
import torch
import transformers
from adapters import DoubleSeqBnConfig, Fuse, ParBnConfig, SeqBnConfig
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

OUT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                   pathlib.Path(__file__).parents[2] / "pefttutor" / "adapterhub_fixtures")

BASES = {
    "bert": (BertModel, BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=32)),
    "llama": (LlamaModel, LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)),
    "gpt2": (GPT2Model, GPT2Config(vocab_size=120, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                                   bos_token_id=0, eos_token_id=0)),
}
# (architecture, name, adapters' configuration, extra setup)
CASES = [
    ("bert", "pfeiffer", SeqBnConfig(reduction_factor=4), None),
    ("bert", "houlsby", DoubleSeqBnConfig(reduction_factor=4), None),
    ("bert", "parallel", ParBnConfig(reduction_factor=4), None),
    ("bert", "fusion", SeqBnConfig(reduction_factor=4), "fuse"),
    ("bert", "drop", DoubleSeqBnConfig(reduction_factor=4), "skip"),
    ("llama", "pfeiffer", SeqBnConfig(reduction_factor=4), None),
    ("llama", "houlsby", DoubleSeqBnConfig(reduction_factor=4), None),
    ("gpt2", "pfeiffer", SeqBnConfig(reduction_factor=4), None),
    ("gpt2", "houlsby", DoubleSeqBnConfig(reduction_factor=4), None),
]
SKIP = [0, 1]          # AdapterDrop: the adapters of layers 0 and 1 are skipped


def redraw(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0                     # one padded row
    bases = {}
    for arch, (cls, config) in BASES.items():
        torch.manual_seed(0)
        config._attn_implementation = "eager"
        model = cls(config).eval()
        bases[arch] = model
        meta = {"config": config.to_json_string(), "class": cls.__name__}
        with torch.no_grad():
            base_out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        save_file({k: v.contiguous() for k, v in model.state_dict().items()} | {"output": base_out},
                  str(OUT / f"{arch}_base.safetensors"), metadata=meta)
    for arch, name, config, extra in CASES:
        model = copy.deepcopy(bases[arch])
        adapters.init(model)
        names = ["a", "b"] if extra == "fuse" else ["a"]
        for n in names:
            model.add_adapter(n, config=config)
        if extra == "fuse":
            model.add_adapter_fusion(Fuse(*names))
            model.set_active_adapters(Fuse(*names))
        else:
            model.set_active_adapters("a", skip_layers=SKIP if extra == "skip" else None)
        tensors = {k: v for k, v in model.state_dict().items() if "adapter" in k}
        redraw_gen = torch.Generator().manual_seed(1)
        for k in sorted(tensors):
            redraw(torch.nn.ParameterList([model.get_parameter(k)]), redraw_gen)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        tensors = {k: v.contiguous() for k, v in model.state_dict().items() if "adapter" in k}
        meta = {"arch": arch, "config": json.dumps(config.to_dict()), "extra": str(extra), "skip": json.dumps(SKIP),
                "names": json.dumps(names), "adapters": adapters.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__}
        save_file(tensors | {"input_ids": ids, "attention_mask": mask, "output": out},
                  str(OUT / f"{arch}_{name}.safetensors"), metadata=meta)
        print(f"{arch}_{name}: {len(tensors)} adapter tensors, output {tuple(out.shape)}")
    print(f"adapters {adapters.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
