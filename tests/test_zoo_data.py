"""The generated world, the tasks, the zoo models and the Hub path (tested offline, by local folder)."""
import hashlib

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast,
                          RobertaConfig, RobertaForMaskedLM)

from pefttutor import data, zoo


def test_world_and_corpus_are_deterministic():
    assert data.make_world() == data.make_world()
    assert data.make_corpus(200) == data.make_corpus(200)
    assert data.make_corpus(200, seed=1) != data.make_corpus(200)


@pytest.mark.parametrize("name, columns", [
    ("reviews", ["text", "label"]), ("sentiment", ["text", "label"]), ("jobs", ["text", "label"]),
    ("knowledge", ["text", "label"]), ("nli", ["premise", "hypothesis", "label"]),
    ("restaurants", ["mr", "text"])])
def test_tasks_are_deterministic(name, columns):
    a, b = data.load_task(name), data.load_task(name)
    assert list(a) == ["train", "validation", "test", "few_shot"]
    for split in a:
        assert a[split].column_names == columns
        assert a[split].to_list() == b[split].to_list()
    assert a["train"][0] != a["test"][0]


def test_reviews_are_balanced_and_need_more_than_words():
    train = data.load_task("reviews")["train"]
    assert 0.45 < sum(train["label"]) / len(train) < 0.55
    assert any(", but " in t for t in train["text"]) and any(" not " in t for t in train["text"])


def test_slot_score():
    mr = "name[the red fox] , price[moderate] , family[yes] , area[city centre]"
    good = "the red fox is a moderately priced place in the city centre . it is family friendly ."
    assert data.slot_score(mr, good) == (4, 4)
    assert data.slot_score(mr, "the red fox is not family friendly .") == (1, 4)
    assert data.slot_score("name[x] , family[no]", "x is a pub . it is not family friendly .") == (2, 2)
    assert data.slot_score("name[x] , familyfriendly[yes]", "x is family friendly .") == (2, 2)   # E2E


def test_restaurant_texts_realise_every_slot():
    split = data.load_task("restaurants")["validation"]
    assert all(data.slot_score(m, t)[0] == data.slot_score(m, t)[1] for m, t in zip(split["mr"], split["text"]))


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'sst'"):
        data.load_task("sst")


def test_hub_mapping_sst2_and_e2e():
    sst = DatasetDict(train=Dataset.from_dict({"sentence": ["good film"] * 1000, "label": [1] * 1000,
                                               "idx": list(range(1000))}),
                      validation=Dataset.from_dict({"sentence": ["bad"] * 5, "label": [0] * 5, "idx": list(range(5))}))
    out = data.standardize_hub("sst2", sst, sizes={"train": 50})
    assert out["train"].column_names == ["text", "label"] and len(out["train"]) == 50
    assert len(out["validation"]) == 872 and len(out["test"]) == 5
    e2e = DatasetDict(train=Dataset.from_dict({
        "meaning_representation": ["name[The Eagle], eatType[pub], priceRange[£20-25], familyFriendly[yes]"],
        "human_reference": ["The Eagle is a family friendly pub, £20-25."]}))
    row = data.standardize_hub("e2e_nlg", e2e)["train"][0]
    assert row["mr"] == "name[The Eagle] , eattype[pub] , price[£20-25] , family[yes]"
    assert data.parse_mr(row["mr"]) == {"name": "The Eagle", "eattype": "pub", "price": "£20-25",
                                        "family": "yes"}
    assert data.slot_score(row["mr"], row["text"]) == (4, 4)


def test_encode_generation_masks_the_prompt():
    _, tok = zoo.load_decoder()
    split = data.load_task("restaurants")["train"].select(range(3))
    enc = data.encode_generation(split, tok)
    prompt = tok(data.PROMPT.format(mr=split[0]["mr"]))["input_ids"]
    assert enc[0]["labels"][:len(prompt)] == [-100] * len(prompt)
    assert enc[0]["labels"][-1] == tok.eos_token_id
    assert tok.decode(enc[0]["labels"][len(prompt):-1]).strip() == split[0]["text"]
    batch = data.collate(enc, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_zoo_models_load_and_know_their_world():
    model, tok = zoo.load_decoder()
    assert isinstance(model, LlamaForCausalLM) and model.config.num_hidden_layers == 3
    text = "the wild crown is an expensive restaurant in the city centre ."
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    ids = tok([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 2.0                     # a random model scores about ln(1024) = 6.9
    enc, etok = zoo.load_encoder(num_labels=3)
    assert enc.config.num_labels == 3 and enc.classifier.out_features == 3
    assert etok.convert_ids_to_tokens(etok("the soup")["input_ids"])[0] == "[CLS]"


def test_zoo_weights_are_small():
    size = sum(p.stat().st_size for p in zoo.ZOO_DIR.rglob("*") if p.is_file())
    assert size <= 16 * 2**20            # the encoder and the decoder at three sizes


def test_decoder_sizes_share_the_recipe():
    """zoo-decoder-s, zoo-decoder and zoo-decoder-l: the configurations of DECODER_SIZES, one
    tokenizer, growing parameter counts, and all three pretrained (they know the world's text)."""
    base_tok = zoo.load_tokenizer("zoo-decoder")
    text = "the wild crown is an expensive restaurant in the city centre ."
    counts = []
    for name, overrides in zoo.DECODER_SIZES.items():
        model, tok = zoo.load_decoder(name)
        expected = zoo.decoder_config(tok, **overrides)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            assert getattr(model.config, key) == getattr(expected, key)
        assert tok.get_vocab() == base_tok.get_vocab()
        ids = tok([text], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert model(ids, labels=ids).loss.item() < 2.5
        counts.append(sum(p.numel() for p in model.parameters()))
    assert counts == sorted(counts) and counts[-1] > 2 * counts[1] > 4 * counts[0]


def test_recipe_is_deterministic(tmp_path):
    digests = []
    for run in ("a", "b"):
        zoo.build(tmp_path / run, steps=3, n_docs=300, log=lambda *_: None)
        digests.append([hashlib.sha256((tmp_path / run / kind / "model.safetensors").read_bytes()).hexdigest()
                        for kind in ("decoder", "encoder")])
    assert digests[0] == digests[1]
    assert not torch.are_deterministic_algorithms_enabled()
    # the encoder alone, from the decoder in the folder: the same encoder as the full recipe's
    zoo.build(tmp_path / "a", steps=3, n_docs=300, log=lambda *_: None, kinds=("encoder",))
    again = hashlib.sha256((tmp_path / "a" / "encoder" / "model.safetensors").read_bytes()).hexdigest()
    assert again == digests[0][1]


def _polarity_gap(model, tok) -> float:
    """Mean cosine of the sentiment words' embeddings within a polarity minus across the two."""
    within, across = zoo.polarity(model, tok)
    return within - across


def test_encoder_starts_from_the_decoders_word_embeddings():
    """The recipe's encoder starts from the decoder's word embeddings, which tell "lovely" from
    "awful"; masked-LM keeps the difference (the encoder pretrained from random did not have it)."""
    decoder, dtok = zoo.load_decoder()
    encoder, etok = zoo.load_encoder()
    assert etok.get_vocab() == dtok.get_vocab()
    assert _polarity_gap(decoder, dtok) > 0.2
    assert _polarity_gap(encoder, etok) > 0.1
    assert encoder.config.hidden_dropout_prob == encoder.config.attention_probs_dropout_prob == 0.0
    corpus = data.make_corpus(40)
    with pytest.raises(ValueError, match="vocabulary x hidden size"):
        zoo.pretrain("encoder", etok, corpus, steps=1, word_embeddings=torch.zeros(5, 128), log=lambda *_: None)
    table = decoder.get_input_embeddings().weight.detach()
    model = zoo.pretrain("encoder", etok, corpus, steps=1, lr=1e-12, word_embeddings=table, log=lambda *_: None)
    assert (model.get_input_embeddings().weight - table).abs().max() < 1e-6


def test_hub_path_by_local_folder(tmp_path):
    """The Hub path is the same code with another name: a tiny GPT-2 and RoBERTa saved to folders."""
    base_tok = zoo.load_tokenizer("zoo-decoder")
    tok = PreTrainedTokenizerFast(tokenizer_object=base_tok.backend_tokenizer, eos_token="</s>")
    assert tok.pad_token is None                          # like GPT-2 on the Hub
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    model, loaded = zoo.load_decoder(str(tmp_path / "gpt2"))
    assert loaded.pad_token == "</s>" and model.config.pad_token_id == loaded.eos_token_id
    RobertaForMaskedLM(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)).save_pretrained(tmp_path / "roberta")
    tok.save_pretrained(tmp_path / "roberta")
    clf, _ = zoo.load_encoder(str(tmp_path / "roberta"), num_labels=2)
    assert zoo.head_names(clf) == ["classifier"]
