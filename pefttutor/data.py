"""Offline corpora and downstream tasks, and the same interface for Hub datasets.

Defined in the chapter "The base models" (book/base_models.ipynb).

The default path needs no download. A small *world* is generated from a seed: people who live in
towns, have jobs and pets, and restaurants with E2E-style attributes (name, type, food, price,
rating, area, family friendly, near). From it come

* a pretraining corpus of short documents (facts, descriptions, reviews, stories), and
* two downstream tasks, as `datasets.DatasetDict` with train / validation / test splits:
  ``"reviews"`` (sentiment with negation and contrast, for the encoder) and ``"restaurants"``
  (data-to-text from a meaning representation, for the decoder, after the E2E challenge).

Everything is a pure function of its seed, so two calls give identical data.
"""
from __future__ import annotations

import random
import re

from datasets import Dataset, DatasetDict

from . import checks

WORLD_SEED = 1234

_SYLLABLES = ("ba ko ri len mo sa tu vin del ra mi no pe lo dar fen gil ha jo ka lu mar ne or pi "
              "quin ros sel tor ul vo wen ya zel bri cas dun el fa gor ish kel").split()
_NAME_ENDS = ("a o in el is an en or ia us".split())
_TOWN_ENDS = ("ton ford by ham wick dale mouth field".split())
JOBS = ("baker teacher farmer doctor painter sailor builder singer writer nurse tailor miner "
        "fisher driver cook guard gardener potter weaver hunter").split()
PETS = "dog cat horse goat rabbit parrot duck pig sheep owl fox mouse".split()
COLORS = "red blue green yellow black white brown grey orange purple".split()
DISHES = ("soup bread cheese apples fish rice noodles pie cake stew salad beans eggs honey "
          "porridge curry pasta sausages dumplings pancakes").split()
REGIONS = "north south east west".split()
SIZES = "small large quiet busy old new".split()
# E2E-style restaurant attributes
EAT_TYPES = ["restaurant", "cafe", "pub", "coffee shop"]
CUISINES = "italian chinese indian french japanese english mexican greek".split()
PRICES = ["cheap", "moderate", "expensive"]
RATINGS = ["low", "average", "high"]
AREAS = ["city centre", "riverside"]
_REST_ADJ = ("golden silver red blue green old little happy lucky royal rusty sleepy "
             "wild brave quiet merry hidden crooked").split()
_REST_NOUN = ("spoon lion crown kettle anchor rose fox bell lantern oak barrel table "
              "wheel moon star bridge").split()
# review vocabulary
ASPECTS = ("food service staff music coffee soup bread prices room view wine dessert "
           "waiter menu beer tea").split()
POSITIVE = ("good great lovely excellent wonderful tasty friendly perfect fine delicious "
            "pleasant superb").split()
NEGATIVE = ("bad awful terrible poor rude cold bland slow dirty horrible dull nasty").split()


def _names(rng: random.Random, n: int, ends, used: set) -> list[str]:
    out = []
    while len(out) < n:
        name = rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(ends)
        if name not in used:
            used.add(name)
            out.append(name)
    return out


def make_world(seed: int = WORLD_SEED) -> dict:
    """People, towns and restaurants of the generated world, a pure function of ``seed``."""
    rng = random.Random(seed)
    used: set = set()
    towns = {t: {"region": rng.choice(REGIONS), "size": rng.choice(SIZES),
                 "river": _names(rng, 1, _NAME_ENDS, used)[0]}
             for t in _names(rng, 60, _TOWN_ENDS, used)}
    people = {p: {"town": rng.choice(sorted(towns)), "job": rng.choice(JOBS), "pet": rng.choice(PETS),
                  "color": rng.choice(COLORS), "dish": rng.choice(DISHES)}
              for p in _names(rng, 400, _NAME_ENDS, used)}
    names = sorted({f"the {a} {n}" for a in _REST_ADJ for n in _REST_NOUN})
    rng.shuffle(names)
    restaurants = {}
    for name in names[:150]:
        restaurants[name] = {"eattype": rng.choice(EAT_TYPES), "food": rng.choice(CUISINES),
                             "price": rng.choice(PRICES), "rating": rng.choice(RATINGS),
                             "area": rng.choice(AREAS), "family": rng.choice(["yes", "no"]),
                             "near": rng.choice(names[:150])}
    return {"towns": towns, "people": people, "restaurants": restaurants}


# ---------------------------------------------------------------------------------------------
# The pretraining corpus


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _person_doc(rng, name, p, world):
    t = world["towns"][p["town"]]
    facts = [f"{name} lives in {p['town']} .", f"{name} works as a {p['job']} .",
             f"{name} has {_a(p['color'])} {p['color']} {p['pet']} .", f"every day {name} eats {p['dish']} .",
             f"{p['town']} is a {t['size']} town in the {t['region']} ."]
    rng.shuffle(facts)
    return " ".join(facts[: rng.randint(2, 5)])


def _story_doc(rng, name, p, world):
    other = rng.choice(sorted(world["people"]))
    q = world["people"][other]
    lines = [f"one day {name} the {p['job']} went to {q['town']} with the {p['pet']} .",
             f"there {name} met {other} , who works as a {q['job']} .",
             f"{other} gave {name} some {q['dish']} and they talked about the river "
             f"{world['towns'][q['town']]['river']} .",
             f"in the evening {name} went back home to {p['town']} ."]
    return " ".join(lines[: rng.randint(2, 4)])


def describe_restaurant(name: str, r: dict, slots=None) -> str:
    """A natural description of a restaurant using ``slots`` (all of them by default)."""
    slots = list(r) if slots is None else list(slots)
    parts = []
    if "price" in slots:
        parts.append({"cheap": "cheap", "moderate": "moderately priced",
                      "expensive": "expensive"}[r["price"]])
    if "food" in slots:
        parts.append(r["food"])
    parts.append(r["eattype"] if "eattype" in slots else "place")
    if "area" in slots:
        parts.append(f"in the {r['area']}")
    if "near" in slots:
        parts.append(f"near {r['near']}")
    text = f"{name} is {_a(parts[0])} " + " ".join(parts) + " ."
    if "rating" in slots:
        text += f" it has {_a(r['rating'])} {r['rating']} customer rating ."
    if "family" in slots:
        text += " it is family friendly ." if r["family"] == "yes" else " it is not family friendly ."
    return text


def _restaurant_doc(rng, name, r, world):
    slots = [s for s in r if rng.random() < 0.7]
    return describe_restaurant(name, r, slots)


def _clause(rng, positive: bool) -> str:
    """'the soup was lovely' or 'the soup was not bad' (positive), and so on."""
    negate = rng.random() < 0.3
    words = NEGATIVE if positive == negate else POSITIVE
    verb = rng.choice(["was", "was really", "seemed", "felt"]) if not negate else \
        rng.choice(["was not", "was never", "did not seem"])
    if verb == "did not seem":
        return f"the {rng.choice(ASPECTS)} did not seem {rng.choice(words)}"
    return f"the {rng.choice(ASPECTS)} {verb} {rng.choice(words)}"


def make_review(rng: random.Random, world: dict) -> tuple[str, int]:
    """A one-sentence review and its label (1 positive, 0 negative).

    The label is the polarity of the last clause: negation flips a word's polarity and
    "but" / "although" make the second clause decide, so counting words is not enough.
    """
    label = rng.randint(0, 1)
    place = rng.choice(sorted(world["restaurants"]))
    last = _clause(rng, bool(label))
    form = rng.random()
    if form < 0.55:
        text = f"at {place} {last} ."
    elif form < 0.85:
        text = f"{_clause(rng, not label)} at {place} , but {last} ."
    else:
        text = f"although {_clause(rng, not label)} , {last} at {place} ."
    return text, label


_LIKED = {True: ["loved", "enjoyed", "liked"], False: ["hated", "disliked", "regretted"]}
_AFTER = {True: ["{p} will come back soon .", "{p} told every friend to go there .", "it was a happy evening ."],
          False: ["{p} will never come back .", "{p} told every friend to stay away .", "it was a sad evening ."]}


def _review_doc(rng, world):
    """A review whose sentences agree in polarity, mostly following the restaurant's rating: the
    context from which pretraining can learn that "lovely" and "awful" differ."""
    person = rng.choice(sorted(world["people"]))
    place = rng.choice(sorted(world["restaurants"]))
    rating = world["restaurants"][place]["rating"]
    positive = rng.random() < {"high": 0.85, "average": 0.5, "low": 0.15}[rating]
    lines = [f"{person} {rng.choice(_LIKED[positive])} {place} ."]
    lines += [_clause(rng, positive) + " ." for _ in range(rng.randint(1, 3))]
    lines.append(rng.choice(_AFTER[positive]).format(p=person))
    return " ".join(lines)


def make_corpus(n_docs: int = 30000, seed: int = 0, world: dict | None = None) -> list[str]:
    """The pretraining corpus: ``n_docs`` short documents drawn from the world."""
    world = world or make_world()
    rng = random.Random(seed)
    people, rests = sorted(world["people"]), sorted(world["restaurants"])
    docs = []
    for _ in range(n_docs):
        u = rng.random()
        if u < 0.3:
            name = rng.choice(people)
            docs.append(_person_doc(rng, name, world["people"][name], world))
        elif u < 0.5:
            name = rng.choice(people)
            docs.append(_story_doc(rng, name, world["people"][name], world))
        elif u < 0.75:
            name = rng.choice(rests)
            docs.append(_restaurant_doc(rng, name, world["restaurants"][name], world))
        elif u < 0.92:
            docs.append(_review_doc(rng, world))
        else:
            docs.append(make_review(rng, world)[0])
    return docs


# ---------------------------------------------------------------------------------------------
# Downstream tasks

SLOT_ORDER = ["eattype", "food", "price", "rating", "area", "family", "near"]


def _mr(name: str, r: dict, slots) -> str:
    return " , ".join([f"name[{name}]"] + [f"{s}[{r[s]}]" for s in SLOT_ORDER if s in slots])


def _restaurant_example(rng, world):
    name = rng.choice(sorted(world["restaurants"]))
    r = world["restaurants"][name]
    slots = rng.sample(SLOT_ORDER, rng.randint(2, 6))
    return {"mr": _mr(name, r, slots), "text": describe_restaurant(name, r, slots)}


def _split(make, sizes: dict, seed: int) -> DatasetDict:
    out = {}
    for i, (split, n) in enumerate(sizes.items()):
        rng = random.Random(seed * 1000 + i)
        out[split] = Dataset.from_list([make(rng) for _ in range(n)])
    return DatasetDict(out)


def _reviews(seed, sizes, world):
    def make(rng):
        text, label = make_review(rng, world)
        return {"text": text, "label": label}
    return _split(make, sizes, seed)


def _restaurants(seed, sizes, world):
    return _split(lambda rng: _restaurant_example(rng, world), sizes, seed)


TASKS = {"reviews": (_reviews, {"train": 2000, "validation": 300, "test": 500}),
         "restaurants": (_restaurants, {"train": 1500, "validation": 200, "test": 200})}
HUB_TASKS = {"sst2": "reviews", "e2e_nlg": "restaurants"}


def _check_sizes(sizes, default: dict) -> dict:
    if sizes is None:
        return {}
    if not isinstance(sizes, dict):
        raise TypeError(f"sizes={sizes!r} must be a dict such as {{'train': 1000}}")
    unknown = sorted(set(sizes) - set(default))
    if unknown:
        raise ValueError(f"sizes: no split named {unknown[0]!r}; the splits are {sorted(default)}")
    return {k: checks.integer(f"sizes[{k!r}]", v, low=1) for k, v in sizes.items()}


def load_task(name: str = "reviews", seed: int = 0, sizes: dict | None = None) -> DatasetDict:
    """A downstream task as a ``DatasetDict`` with train / validation / test splits.

    Offline: ``"reviews"`` (columns ``text``, ``label``) and ``"restaurants"`` (``mr``, ``text``).
    Hub (needs the network): ``"sst2"`` (GLUE SST-2) and ``"e2e_nlg"`` (E2E), mapped to the same
    columns as their offline counterparts; sizes cap each split.
    """
    if name in TASKS:
        make, default = TASKS[name]
        return make(seed, {**default, **_check_sizes(sizes, default)}, make_world())
    if name in HUB_TASKS:
        return from_hub(name, sizes)
    raise ValueError(f"unknown task {name!r}: use one of {sorted(TASKS)} (offline) "
                     f"or {sorted(HUB_TASKS)} (from the Hub)")


def standardize_hub(name: str, dd: DatasetDict, sizes: dict | None = None, seed: int = 0) -> DatasetDict:
    """Map a Hub dataset to the offline task's columns and train / validation / test splits.

    SST-2's test labels are hidden, so its validation split becomes the test split and a slice
    of train becomes validation.
    """
    if name == "sst2":
        dd = dd.rename_column("sentence", "text").remove_columns(
            [c for c in dd["train"].column_names if c not in ("sentence", "label")])
        parts = dd["train"].train_test_split(test_size=872, seed=seed)
        dd = DatasetDict(train=parts["train"], validation=parts["test"], test=dd["validation"])
    elif name == "e2e_nlg":
        dd = dd.rename_columns({"meaning_representation": "mr", "human_reference": "text"})
        dd = DatasetDict({k: v.map(lambda e: {"mr": _e2e_mr(e["mr"])}) for k, v in dd.items()})
    else:
        raise ValueError(f"no Hub mapping for {name!r}: use one of {sorted(HUB_TASKS)}")
    sizes = sizes or {}
    return DatasetDict({k: v.select(range(min(len(v), sizes.get(k, len(v))))) for k, v in dd.items()})


def _e2e_mr(mr: str) -> str:
    """'name[X], eatType[pub]' -> 'name[X] , eattype[pub]' to match the offline format."""
    return " , ".join(p.strip().lower() for p in mr.split(","))


def from_hub(name: str, sizes: dict | None = None) -> DatasetDict:
    from datasets import load_dataset
    raw = load_dataset("glue", "sst2") if name == "sst2" else load_dataset("e2e_nlg")
    return standardize_hub(name, raw, sizes)


def parse_mr(mr: str) -> dict:
    """'name[the red fox] , food[greek]' -> {'name': 'the red fox', 'food': 'greek'}."""
    return dict(re.findall(r"(\w+)\[([^\]]*)\]", mr))




# ---------------------------------------------------------------------------------------------
# Encoding for training

PROMPT = "{mr} =>"


def encode_classification(split, tok, max_length: int = 128) -> list[dict]:
    """Token ids and the label of each example (``text``, ``label`` columns)."""
    ids = tok(list(split["text"]), truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": i, "labels": int(y)} for i, y in zip(ids, split["label"])]


def encode_generation(split, tok, max_length: int = 128) -> list[dict]:
    """Prompt ``"<mr> =>"`` then the text and EOS; the loss is on the text only (prompt labels -100)."""
    out = []
    for mr, text in zip(split["mr"], split["text"]):
        prompt = tok(PROMPT.format(mr=mr))["input_ids"]
        target = tok(" " + text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (prompt + target)[:max_length]
        out.append({"input_ids": ids, "labels": ([-100] * len(prompt) + target)[:max_length]})
    return out


def pad_rows(rows: list[list[int]], value: int):
    """Right-pad lists of ids with ``value`` into one (len(rows), longest) tensor."""
    import torch
    x = torch.full((len(rows), max(map(len, rows))), value)
    for r, row in enumerate(rows):
        x[r, :len(row)] = torch.tensor(row)
    return x


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a list of encoded examples into a batch of tensors."""
    import torch
    ids = pad_rows([e["input_ids"] for e in examples], pad_id)
    mask = pad_rows([[1] * len(e["input_ids"]) for e in examples], 0)
    if isinstance(examples[0]["labels"], int):
        labels = torch.tensor([e["labels"] for e in examples])
    else:
        labels = pad_rows([e["labels"] for e in examples], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def slot_score(mr: str, text: str) -> tuple[int, int]:
    """(slots the text states correctly, slots in the meaning representation).

    A value counts when its words appear in the text; "family[yes]" needs "family friendly"
    without "not family friendly", "family[no]" needs "not family friendly".
    """
    slots = parse_mr(mr)
    text = f" {text} "
    correct = 0
    for slot, value in slots.items():
        if slot in ("family", "familyfriendly") and value in ("yes", "no"):   # offline / E2E name
            negated = "not family friendly" in text or "not kid friendly" in text
            ok = negated if value == "no" else ("family friendly" in text and not negated)
        elif slot == "price" and value == "moderate":
            ok = "moderate" in text
        else:
            ok = f" {value} " in text or f" {value}." in text or value in text.split(" , ")
        correct += ok
    return correct, len(slots)
