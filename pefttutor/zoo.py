"""Small pretrained base models that ship with the package, and the Hub path with the same interface.

Defined in the chapter "The base models" (book/base_models.ipynb).

Two real ``transformers`` architectures, pretrained by the recipe below on the generated corpus of
:mod:`pefttutor.data`:

* ``"zoo-decoder"``: a ``LlamaForCausalLM`` (3 layers, hidden size 128), next-token prediction;
* ``"zoo-decoder-s"`` (2 layers, hidden size 64) and ``"zoo-decoder-l"`` (4 layers, hidden size 192):
  the same decoder recipe at two more sizes, for experiments on scale;
* ``"zoo-encoder"``: a ``BertForMaskedLM`` (3 layers, hidden size 128), masked-language modelling
  without next-sentence prediction, as RoBERTa was pretrained, plus the masked words predicted a
  second time from [CLS] (:class:`EncoderPretraining`), starting from the decoder's word embeddings
  (see the chapter for why);

both with a byte-pair-encoding tokenizer trained with the ``tokenizers`` library. They are stored as
safetensors under ``pefttutor/zoo_models`` and load with ``from_pretrained(path)`` like any Hub model.
Rebuild them with ``python -m pefttutor.zoo build`` and ``python -m pefttutor.zoo build-sizes``
(deterministic on a given machine).

Any other name (``"gpt2"``, ``"roberta-base"``, a local folder) goes to ``transformers``' Auto classes.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import random
import re
from types import SimpleNamespace

import torch
import transformers
from torch.nn import functional as F
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from .data import NEGATIVE, POSITIVE, make_corpus, pad_rows

ZOO_DIR = pathlib.Path(__file__).parent / "zoo_models"
ZOO = {"zoo-decoder": ZOO_DIR / "decoder", "zoo-encoder": ZOO_DIR / "encoder",
       "zoo-decoder-s": ZOO_DIR / "decoder-s", "zoo-decoder-l": ZOO_DIR / "decoder-l"}
# The decoder at three sizes, same recipe, corpus and tokenizer (the scale experiments of the soft-prompt
# chapters): the configuration overrides of each size (hidden size, FFN width, layers).
DECODER_SIZES = {"zoo-decoder-s": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
                 "zoo-decoder": {},
                 "zoo-decoder-l": dict(hidden_size=192, intermediate_size=384, num_hidden_layers=4)}
VOCAB_SIZE = 1024
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()[]{}<>=+-*/&%$#@|_~"  # tasks use [ ] = >
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def train_tokenizer(corpus: list[str], vocab_size: int = VOCAB_SIZE):
    """A BPE tokenizer (``tokenizers`` library). Words keep their leading-space marker (Metaspace) so
    decoding round-trips; punctuation is split off, and every character in ``ALPHABET`` is in the
    vocabulary, so the tasks' ``name[...]`` and ``=>`` are known symbols even though the corpus has none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=list(ALPHABET))
    tok.train_from_iterator(corpus, trainer)
    return tok


def _wrap(tok, kind: str) -> PreTrainedTokenizerFast:
    """The same BPE model as a decoder (``<s> text``) or an encoder (``[CLS] text [SEP]``) tokenizer."""
    from tokenizers import Tokenizer, processors
    tok = Tokenizer.from_str(tok.to_str())
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    if kind == "decoder":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", ids["<s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="[PAD]", unk_token="[UNK]", model_max_length=128)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]",
                                   model_max_length=128)


def decoder_config(tok, **overrides) -> LlamaConfig:
    kw = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
              tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    return LlamaConfig(**{**kw, **overrides})


def encoder_config(tok, **overrides) -> BertConfig:
    """BERT at the decoder's width, without dropout (a model this small, fine-tuned for a few hundred
    steps, learned `reviews` in one seed of three with BERT's 0.1 and in every seed without)."""
    kw = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**{**kw, **overrides})


def _sentences(doc: str) -> list[str]:
    return [s for s in re.split(r"(?<= \.) ", doc) if s]


def _mask_tokens(x: torch.Tensor, tok, gen: torch.Generator):
    """BERT's masking: 15% of real tokens are predicted; of those 80% [MASK], 10% random, 10% kept."""
    labels = x.clone()
    special = (x == tok.pad_token_id) | (x == tok.cls_token_id) | (x == tok.sep_token_id)
    chosen = (torch.rand(x.shape, generator=gen) < 0.15) & ~special
    labels[~chosen] = -100
    u = torch.rand(x.shape, generator=gen)
    x = x.clone()
    x[chosen & (u < 0.8)] = tok.mask_token_id
    rand = chosen & (u >= 0.8) & (u < 0.9)
    x[rand] = torch.randint(len(SPECIAL), len(tok), x.shape, generator=gen)[rand]
    return x, labels


def _encoder_batch(examples, tok, gen):
    ids = pad_rows(examples, tok.pad_token_id)
    masked, labels = _mask_tokens(ids, tok, gen)
    return {"input_ids": masked, "attention_mask": (ids != tok.pad_token_id).long(), "labels": labels}


class EncoderPretraining(torch.nn.Module):
    """Masked language modelling, plus the masked words predicted a second time from [CLS].

    A linear probe on the last hidden state of [CLS] must say which words were masked (a softmax
    over the vocabulary, averaged over the masked words). Masked-LM alone never asks [CLS] for
    anything, and in a model this small, fine-tuned for a few hundred steps, a classifier on
    [CLS] then waits at chance while the model learns to gather the sentence there. To guess the
    hidden words from one vector, [CLS] must carry what the sentence is about, sentiment
    included (a review's sentences agree). The probe is thrown away; BERT's pooler is not
    trained here, so a classifier starts from a fresh, unsaturated one."""

    def __init__(self, config):
        super().__init__()
        self.mlm = BertForMaskedLM(config)
        self.probe = torch.nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids, attention_mask, labels):
        out = self.mlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                       output_hidden_states=True)
        log_p = F.log_softmax(self.probe(out.hidden_states[-1][:, 0]), dim=-1)   # (batch, vocab)
        hidden = labels != -100                                                   # (batch, seq)
        picked = log_p.gather(1, labels.clamp(min=0)) * hidden                    # (batch, seq)
        cls_loss = -picked.sum() / hidden.sum().clamp(min=1)
        return SimpleNamespace(loss=out.loss + cls_loss, mlm=out.loss, cls=cls_loss)


def _decoder_batch(examples, tok, gen):
    ids = pad_rows(examples, tok.pad_token_id)
    mask = (ids != tok.pad_token_id).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# Pretraining learning rates; the encoder's is lower, one of its recipe's changes (see build).
LEARNING_RATES = {"decoder": 3e-3, "encoder": 1e-3}


def pretrain(kind: str, tok, corpus: list[str], steps: int = 2000, batch_size: int = 32,
             lr: float | None = None, seed: int = 0, log=print, history: list | None = None,
             word_embeddings: torch.Tensor | None = None, **overrides):
    """Pretrain a zoo model from scratch: next-token prediction (decoder, as GPT), or masked
    language modelling without next-sentence prediction (encoder, as RoBERTa) plus the masked
    words predicted from [CLS] (:class:`EncoderPretraining`).

    ``lr`` defaults to the kind's entry in :data:`LEARNING_RATES`.
    ``word_embeddings`` (vocabulary x hidden) start the model's token embeddings from trained ones
    instead of random: the recipe starts the encoder from the decoder's (see :func:`build`). The loss
    of every step is appended to ``history`` when one is given; ``overrides`` change the model's
    configuration (the decoder's size)."""
    torch.manual_seed(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    if kind == "decoder":
        model = LlamaForCausalLM(decoder_config(tok, **overrides))
        examples = [tok(d + " </s>", truncation=True, max_length=128)["input_ids"] for d in corpus]
        make_batch = _decoder_batch
    else:
        model = EncoderPretraining(encoder_config(tok, **overrides))
        examples = [tok(d, truncation=True, max_length=128)["input_ids"] for d in corpus]
        make_batch = _encoder_batch
    lr = LEARNING_RATES[kind] if lr is None else lr
    if word_embeddings is not None:
        table = model.get_input_embeddings() if kind == "decoder" else model.mlm.get_input_embeddings()
        if tuple(word_embeddings.shape) != tuple(table.weight.shape):
            raise ValueError(f"pretrain: word_embeddings has shape {tuple(word_embeddings.shape)}, the "
                             f"{kind} needs {tuple(table.weight.shape)} (vocabulary x hidden size): "
                             f"take them from a model with the same tokenizer and width")
        with torch.no_grad():
            table.weight.copy_(word_embeddings)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps))))
    order: list[int] = []
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            order = list(range(len(examples)))
            rng.shuffle(order)
        batch = make_batch([examples[order.pop()] for _ in range(batch_size)], tok, gen)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if history is not None:
            history.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"{kind} step {step:5d} loss {loss.item():.3f}")
    return (model.mlm if kind == "encoder" else model).eval()


def build(out_dir: pathlib.Path = ZOO_DIR, steps: int = 2000, n_docs: int = 30000, log=print,
          kinds=("decoder", "encoder")):
    """The recipe: generate the corpus, train the tokenizer, pretrain both models, save them.

    The encoder starts from the decoder's trained word embeddings (same tokenizer, same width): on
    its own, masked-LM did not teach this small encoder that "lovely" and "awful" differ, which
    next-token prediction teaches the decoder (the chapter "The base models" measures both).
    ``kinds=("encoder",)`` rebuilds the encoder alone from the decoder already in ``out_dir``."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        corpus = make_corpus(n_docs=n_docs)
        bpe = train_tokenizer(corpus)
        for kind in kinds:
            tok = _wrap(bpe, kind)
            embeddings = None
            if kind == "encoder":
                decoder = LlamaForCausalLM.from_pretrained(pathlib.Path(out_dir) / "decoder")
                embeddings = decoder.get_input_embeddings().weight.detach()
            model = pretrain(kind, tok, corpus, steps=steps, log=log, word_embeddings=embeddings)
            path = pathlib.Path(out_dir) / kind
            model.save_pretrained(path)
            tok.save_pretrained(path)
            log(f"saved {path}")
    finally:
        torch.use_deterministic_algorithms(was)


def build_sizes(out_dir: pathlib.Path = ZOO_DIR, steps: int = 2000, n_docs: int = 30000, log=print,
                names=("zoo-decoder-s", "zoo-decoder-l")):
    """The same recipe as :func:`build` for the decoder's other sizes (:data:`DECODER_SIZES`), with the
    tokenizer ``build`` made (the recipe trains the same one; reading it saves the time)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        corpus = make_corpus(n_docs=n_docs)
        tok = AutoTokenizer.from_pretrained(pathlib.Path(out_dir) / "decoder")
        for name in names:
            model = pretrain("decoder", tok, corpus, steps=steps, log=log, **DECODER_SIZES[name])
            path = pathlib.Path(out_dir) / ZOO[name].name
            model.save_pretrained(path)
            tok.save_pretrained(path)
            log(f"saved {path}")
    finally:
        torch.use_deterministic_algorithms(was)


@torch.no_grad()
def polarity(model, tok) -> tuple[float, float]:
    """How far a model's word embeddings separate the sentiment words of :mod:`pefttutor.data`: the
    mean cosine similarity between two words of the same polarity (positive with positive, negative
    with negative; the two averaged) and between a positive and a negative word. Each word is taken
    by its first token."""
    table = model.get_input_embeddings().weight

    def unit(words):
        ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
        return F.normalize(table[ids].float(), dim=-1)

    def within(x):
        return ((x @ x.T).sum() - len(x)) / (len(x) * (len(x) - 1))

    pos, neg = unit(POSITIVE), unit(NEGATIVE)
    return float((within(pos) + within(neg)) / 2), float((pos @ neg.T).mean())


def resolve(name: str) -> str:
    """A zoo name to its folder; anything else (a Hub name, a local path) is returned unchanged."""
    return str(ZOO[name]) if name in ZOO else name


def load_tokenizer(name: str):
    tok = AutoTokenizer.from_pretrained(resolve(name))
    if tok.pad_token is None:          # GPT-2 and Llama ship without one
        tok.pad_token = tok.eos_token
    return tok


def load_decoder(name: str = "zoo-decoder", dtype=None):
    """A causal LM and its tokenizer: the zoo decoder by default, or a Hub name / local folder."""
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype)
    tok = load_tokenizer(name)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def load_classifier(name: str = "zoo-encoder", num_labels: int = 2, dtype=None):
    """Any model as a sequence classifier, with its tokenizer; the classification head is new.

    An encoder classifies from its first token ([CLS], through BERT's pooler); a decoder such as
    ``"zoo-decoder"`` from its last real token (``LlamaForSequenceClassification``)."""
    with _quiet():
        model = AutoModelForSequenceClassification.from_pretrained(resolve(name), num_labels=num_labels,
                                                                   dtype=dtype)
    tok = load_tokenizer(name)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def load_encoder(name: str = "zoo-encoder", num_labels: int = 2, dtype=None):
    """The zoo encoder (or a Hub encoder such as ``"roberta-base"``) as a sequence classifier."""
    return load_classifier(name, num_labels, dtype)


class _quiet:
    """Silence transformers' 'newly initialized weights' report and loading bar while loading."""
    def __enter__(self):
        self.level = transformers.logging.get_verbosity()
        self.bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

    def __exit__(self, *exc):
        transformers.logging.set_verbosity(self.level)
        if self.bars:
            transformers.utils.logging.enable_progress_bar()


def head_names(model) -> list[str]:
    """The task head a classifier adds on top of its pretrained body (kept trainable by PEFT methods)."""
    heads = ["classifier", "score", "pooler"]
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return [h for h in heads if h in names]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rebuild the zoo models from the generated corpus.")
    parser.add_argument("command", choices=["build", "build-sizes"])
    parser.add_argument("--out", default=str(ZOO_DIR))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--only", choices=["decoder", "encoder"],
                        help="build: rebuild one model (the encoder reads the decoder in --out)")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(pathlib.Path(args.out), steps=args.steps, kinds=(args.only,) if args.only else ("decoder", "encoder"))
    else:
        build_sizes(pathlib.Path(args.out), steps=args.steps)


if __name__ == "__main__":
    main()
