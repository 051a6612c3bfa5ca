"""Offline corpora and downstream tasks, and the same interface for Hub datasets.

Defined in the chapter "The base models" (book/base_models.ipynb).

The default path needs no download. A small *world* is generated from a seed: people who live in
towns, have jobs and pets, and restaurants with E2E-style attributes (name, type, food, price,
rating, area, family friendly, near). From it come

* a pretraining corpus of short documents (facts, descriptions, reviews, stories), and
* the task suite (``SUITE``), as ``datasets.DatasetDict`` with train / validation / test splits
  and a few-shot split: ``"sentiment"``, ``"nli"``, ``"jobs"``, ``"knowledge"`` (classification)
  and ``"restaurants"`` (data-to-text, after the E2E challenge); plus ``"reviews"``, the first
  chapters' one-sentence sentiment task. Each has a Hub counterpart with the same columns.

Everything is a pure function of its seed, so two calls give identical data.
"""
from __future__ import annotations

import collections
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


def _town_doc(rng, name, t, world):
    lines = [f"{name} is {_a(t['size'])} {t['size']} town in the {t['region']} .",
             f"the river {t['river']} runs through {name} .",
             f"{name} lies in the {t['region']} ."]
    rng.shuffle(lines)
    return " ".join(lines[: rng.randint(1, 3)])


def _work_doc(rng, name, p, world):
    """What a person works with: the clue words of the ``jobs`` task, next to the job's name."""
    clues = job_clues()[p["job"]]
    lines = [f"{name} works as a {p['job']} ."]
    lines += [rng.choice(_DAY).format(p=name, a=_a(c), c=c) for c in rng.sample(clues, rng.randint(1, 3))]
    return " ".join(lines)


def make_corpus(n_docs: int = 30000, seed: int = 0, world: dict | None = None) -> list[str]:
    """The pretraining corpus: ``n_docs`` short documents drawn from the world: facts about
    people, towns and restaurants, stories, what people work with, and reviews."""
    world = world or make_world()
    rng = random.Random(seed)
    people, rests, towns = sorted(world["people"]), sorted(world["restaurants"]), sorted(world["towns"])
    docs = []
    for _ in range(n_docs):
        u = rng.random()
        if u < 0.2:
            name = rng.choice(people)
            docs.append(_person_doc(rng, name, world["people"][name], world))
        elif u < 0.3:
            name = rng.choice(people)
            docs.append(_story_doc(rng, name, world["people"][name], world))
        elif u < 0.4:
            name = rng.choice(towns)
            docs.append(_town_doc(rng, name, world["towns"][name], world))
        elif u < 0.5:
            name = rng.choice(people)
            docs.append(_work_doc(rng, name, world["people"][name], world))
        elif u < 0.75:
            name = rng.choice(rests)
            docs.append(_restaurant_doc(rng, name, world["restaurants"][name], world))
        elif u < 0.9:
            docs.append(_review_doc(rng, world))
        else:
            docs.append(make_hard_review(rng, world, negation=0.4, forms=(0.35, 0.6, 0.85),
                                         chains=(2, 3))[0])
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


# ---------------------------------------------------------------------------------------------
# The suite: harder tasks over the same world


def _polar_clause(rng, positive: bool, negation: float = 0.3) -> str:
    """A clause of the requested polarity: 'the soup was lovely', 'the soup was far from awful'."""
    negate = rng.random() < negation
    words = NEGATIVE if positive == negate else POSITIVE
    if negate:
        verb = rng.choice(["was not", "was never", "was hardly", "was far from", "was anything but"])
    else:
        verb = rng.choice(["was", "was really", "seemed", "felt", "was quite"])
    return f"the {rng.choice(ASPECTS)} {verb} {rng.choice(words)}"


def make_hard_review(rng: random.Random, world: dict, negation: float = 0.3,
                     forms=(0.45, 0.7, 0.85), chains=(2, 2, 3)) -> tuple[str, int]:
    """A review of two to four clauses; the label is the polarity of the clause group that decides.

    Clauses joined by "and" share a polarity. In "A but B" (also "yet", "still") the last group
    decides; in "although A , B" and in "B , although A" the main clause B decides, wherever it
    stands. Negations ("hardly", "far from", "anything but") flip a word's polarity.

    ``negation`` is the share of negated clauses; ``forms`` the cumulative shares of the "but"
    chains, "although A , B" and "B , although A" (the rest: one group); ``chains`` the group
    counts a "but" chain draws from. The pretraining corpus uses a harder mix than the task.
    """
    label = rng.randint(0, 1)
    place = rng.choice(sorted(world["restaurants"]))

    def group(positive):
        return " and ".join(_polar_clause(rng, positive, negation) for _ in range(rng.choice([1, 1, 2])))

    form = rng.random()
    if form < forms[0]:                               # "A but B (but C)": the last group decides
        n = rng.choice(chains)
        polarity = bool(label) if n % 2 else not label
        parts = []
        for g in range(n):
            parts.append(group(polarity) if g == 0 else f"{rng.choice(['but', 'yet', 'still'])} {group(polarity)}")
            polarity = not polarity
        text = f"at {place} " + " , ".join(parts) + " ."
    elif form < forms[1]:                             # "although A , B"
        conj = rng.choice(["although", "even though", "while"])
        text = f"{conj} {group(not label)} , {group(bool(label))} at {place} ."
    elif form < forms[2]:                             # "B , although A": the main clause first
        conj = rng.choice(["although", "even though", "while"])
        text = f"at {place} {group(bool(label))} , {conj} {group(not label)} ."
    else:                                             # one group
        text = f"at {place} {group(bool(label))} ."
    return text, label


def _sentiment(seed, sizes, world):
    def make(rng):
        text, label = make_hard_review(rng, world)
        return {"text": text, "label": label}
    return _split(make, sizes, seed)


# Natural-language inference over facts about people: entailment / neutral / contradiction,
# in GLUE MNLI's label order.
NLI_LABELS = ["entailment", "neutral", "contradiction"]
_RELATIONS = {
    "town": ("{p} lives in {v} .", "{p} does not live in {v} ."),
    "job": ("{p} works as a {v} .", "{p} does not work as a {v} ."),
    "pet": ("{p} has {a} {v} .", "{p} does not have {a} {v} ."),
    "dish": ("every day {p} eats {v} .", "{p} never eats {v} ."),
}
_VALUES = {"job": JOBS, "pet": PETS, "dish": DISHES}


def _fact(rel, person, value, negated=False):
    return _RELATIONS[rel][negated].format(p=person, v=value, a=_a(value))


def make_nli(rng: random.Random, world: dict) -> dict:
    """A premise of two or three facts about a person and a hypothesis about the same person.

    The hypothesis restates a premise fact (entailment), gives that relation another value
    (contradiction), or speaks of a relation the premise does not mention (neutral); a negated
    hypothesis swaps entailment and contradiction. A fifth of the premises place the person in a
    town and the hypothesis names the town's region, which only the pretraining corpus tells.
    """
    person = rng.choice(sorted(world["people"]))
    facts = world["people"][person]
    towns = sorted(world["towns"])
    said = rng.sample(sorted(_RELATIONS), rng.randint(2, 3))
    premise = " ".join(_fact(r, person, facts[r]) for r in said)
    label = rng.randrange(3)
    if label == 1:                               # neutral: a relation the premise leaves out
        rel = rng.choice([r for r in _RELATIONS if r not in said])
        values = towns if rel == "town" else _VALUES[rel]
        return {"premise": premise, "hypothesis": _fact(rel, person, rng.choice(values),
                                                        rng.random() < 0.3), "label": 1}
    negated = rng.random() < 0.3
    truth = (label == 0) != negated              # should the stated value be the true one?
    if "town" in said and rng.random() < 0.2:    # the region of the town: world knowledge
        region = world["towns"][facts["town"]]["region"]
        value = region if truth else rng.choice([r for r in REGIONS if r != region])
        verb = "does not live" if negated else "lives"
        return {"premise": premise, "hypothesis": f"{person} {verb} in the {value} .", "label": label}
    rel = rng.choice(said)
    values = towns if rel == "town" else _VALUES[rel]
    value = facts[rel] if truth else rng.choice([v for v in values if v != facts[rel]])
    return {"premise": premise, "hypothesis": _fact(rel, person, value, negated), "label": label}


def _nli(seed, sizes, world):
    return _split(lambda rng: make_nli(rng, world), sizes, seed)


# Many labels: a person's job from what they work with. The clue sets are 20 of the 21 translates
# of the perfect difference set {3, 6, 7, 12, 14} mod 21 (lines of a projective plane of order 4):
# every clue belongs to four or five jobs, so one clue never decides, and two clues of one job
# belong together to no other job, so two or three clues always do. The task is to intersect.
CLUES = ("oven sieve knife needle thread boat net hammer brush easel ladder plough spade bucket "
         "chisel loom spindle cart rope lamp bandage").split()
_DIFFERENCE_SET = (3, 6, 7, 12, 14)
_DAY = ["{p} spent the day with {a} {c} .", "{p} needs {a} {c} for work .",
        "at work {p} uses {a} {c} .", "{p} bought {a} new {c} for the job ."]


def job_clues() -> dict:
    """job -> its five clue words; two jobs share exactly one clue."""
    n = len(CLUES)
    return {job: [CLUES[(i + d) % n] for d in _DIFFERENCE_SET] for i, job in enumerate(JOBS)}


def make_job(rng: random.Random, world: dict, clues: dict) -> dict:
    job = rng.choice(JOBS)
    person = rng.choice(sorted(world["people"]))
    picked = rng.sample(clues[job], rng.choice([2, 3]))
    text = " ".join(rng.choice(_DAY).format(p=person, a=_a(c), c=c) for c in picked)
    return {"text": text, "label": JOBS.index(job)}


def _jobs(seed, sizes, world):
    clues = job_clues()
    return _split(lambda rng: make_job(rng, world, clues), sizes, seed)


# Knowledge: what does a person do? "bacasus works as a" -> baker. The prompt stops where the
# pretraining corpus continues with the job, and the test split asks about people the training
# split never mentions: only what pretraining taught can answer (chance is 1 in 20).
def _knowledge(seed, sizes, world):
    people = sorted(world["people"])
    random.Random(WORLD_SEED).shuffle(people)     # the same partition for every seed
    n_test, n_val = len(people) // 5, len(people) // 10
    pools = {"test": people[:n_test], "validation": people[n_test:n_test + n_val],
             "train": people[n_test + n_val:]}
    out = {}
    for i, (split, n) in enumerate(sizes.items()):
        rng = random.Random(seed * 1000 + i)
        rows = []
        for _ in range(n):
            person = rng.choice(pools[split])
            rows.append({"text": f"{person} works as a", "label": JOBS.index(world["people"][person]["job"])})
        out[split] = Dataset.from_list(rows)
    return DatasetDict(out)


class Task:
    """A task of the suite: how to make it, its default split sizes, its kind and labels, and the
    Hub dataset that has the same columns after :func:`standardize_hub`."""

    def __init__(self, make, sizes, kind, labels=None, hub=None, about=""):
        self.make, self.sizes, self.kind = make, sizes, kind
        self.labels, self.hub, self.about = labels, hub, about

    @property
    def num_labels(self):
        return len(self.labels) if self.labels else None


_CLS_SIZES = {"train": 2000, "validation": 300, "test": 500}
TASKS = {
    "reviews": Task(_reviews, _CLS_SIZES, "classification", ["negative", "positive"], "sst2",
                    "one-sentence sentiment with negation and contrast (the first chapters' task)"),
    "sentiment": Task(_sentiment, _CLS_SIZES, "classification", ["negative", "positive"], "sst2",
                      "sentiment of two to four clauses: negations and the last contrast decide"),
    "nli": Task(_nli, _CLS_SIZES, "pair", NLI_LABELS, "mnli",
                "does the premise entail, contradict or say nothing about the hypothesis?"),
    "jobs": Task(_jobs, _CLS_SIZES, "classification", JOBS, "banking77",
                 "which of 20 jobs? one clue fits four or five jobs; two or three clues are given"),
    "knowledge": Task(_knowledge, _CLS_SIZES, "classification", JOBS, "boolq",
                      "what does this person do? only pretraining knows (people unseen in training)"),
    "restaurants": Task(_restaurants, {"train": 1500, "validation": 200, "test": 200}, "generation",
                        None, "e2e_nlg", "data-to-text: describe a restaurant from its attributes"),
}
SUITE = ["sentiment", "nli", "jobs", "knowledge", "restaurants"]
HUB_TASKS = {"sst2": "sentiment", "mnli": "nli", "banking77": "jobs", "boolq": "knowledge",
             "e2e_nlg": "restaurants"}


def _check_sizes(sizes, default: dict) -> dict:
    if sizes is None:
        return {}
    if not isinstance(sizes, dict):
        raise TypeError(f"sizes={sizes!r} must be a dict such as {{'train': 1000}}")
    unknown = sorted(set(sizes) - set(default))
    if unknown:
        raise ValueError(f"sizes: no split named {unknown[0]!r}; the splits are {sorted(default)}")
    return {k: checks.integer(f"sizes[{k!r}]", v, low=1) for k, v in sizes.items()}


def few_shot(split: Dataset, k: int, seed: int = 0) -> Dataset:
    """``k`` examples of every label (or ``k`` examples for a generation task), drawn from ``split``."""
    k = checks.integer("k", k, low=1, who="few_shot ")
    if "label" not in split.column_names:
        return split.shuffle(seed=seed).select(range(min(k, len(split))))
    rng = random.Random(seed)
    by_label: dict = {}
    for i, y in enumerate(split["label"]):
        by_label.setdefault(y, []).append(i)
    short = sorted(y for y, idx in by_label.items() if len(idx) < k)
    if short:
        raise ValueError(f"few_shot: k={k} but label {short[0]} has only {len(by_label[short[0]])} "
                         f"examples in the split; use a smaller k")
    picked = [i for y in sorted(by_label) for i in rng.sample(by_label[y], k)]
    rng.shuffle(picked)
    return split.select(picked)


def load_task(name: str = "reviews", seed: int = 0, sizes: dict | None = None,
              k: int | None = None) -> DatasetDict:
    """A task as a ``DatasetDict`` with train / validation / test splits and a ``few_shot`` split
    (``k`` training examples per label; by default 16, or fewer where a small train split has
    fewer examples of some label).

    Offline (see ``TASKS``): ``"sentiment"``, ``"nli"``, ``"jobs"``, ``"knowledge"`` and
    ``"restaurants"`` (the suite), and ``"reviews"``. Columns: ``text`` and ``label``;
    ``premise``, ``hypothesis`` and ``label`` (``nli``); ``mr`` and ``text`` (``restaurants``).
    Hub (needs the network): ``"sst2"``, ``"mnli"``, ``"banking77"``, ``"boolq"`` and
    ``"e2e_nlg"``, mapped to the same columns as their offline counterparts; sizes cap each split.
    """
    if name in TASKS:
        task = TASKS[name]
        dd = task.make(seed, {**task.sizes, **_check_sizes(sizes, task.sizes)}, make_world())
    elif name in HUB_TASKS:
        dd = from_hub(name, sizes, seed)
    else:
        raise ValueError(f"unknown task {name!r}: use one of {sorted(TASKS)} (offline) "
                         f"or {sorted(HUB_TASKS)} (from the Hub)")
    if k is None:
        labels = dd["train"]["label"] if "label" in dd["train"].column_names else [0] * len(dd["train"])
        k = min(16, min(collections.Counter(labels).values()))
    dd["few_shot"] = few_shot(dd["train"], k, seed)
    return dd


# A Hub counterpart with other labels than its offline task.
HUB_LABELS = {"banking77": [str(i) for i in range(77)], "boolq": ["false", "true"]}


def task_info(name: str) -> Task:
    """The :class:`Task` behind an offline name, or a Hub name's (its offline counterpart's, with
    the Hub dataset's own labels)."""
    if name in HUB_TASKS:
        task = TASKS[HUB_TASKS[name]]
        if name in HUB_LABELS:
            task = Task(task.make, task.sizes, task.kind, HUB_LABELS[name], name, task.about)
        return task
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: use one of {sorted(TASKS)} or {sorted(HUB_TASKS)}")
    return TASKS[name]


_HUB_SOURCES = {"sst2": ("glue", "sst2"), "mnli": ("glue", "mnli"), "banking77": ("PolyAI/banking77",),
                "boolq": ("google/boolq",), "e2e_nlg": ("e2e_nlg",)}


def standardize_hub(name: str, dd: DatasetDict, sizes: dict | None = None, seed: int = 0) -> DatasetDict:
    """Map a Hub dataset to the offline task's columns and train / validation / test splits.

    GLUE hides its test labels, so SST-2's and MNLI's validation split (matched, for MNLI) becomes
    the test split and a slice of train becomes validation; the same for BoolQ and banking77,
    which have no validation split. BoolQ is asked closed-book: the question without its passage,
    as the offline ``knowledge`` task asks what pretraining taught.
    """
    def keep(d, cols):
        return d.remove_columns([c for c in d.column_names if c not in cols])

    def carve(train, test, n_val):
        parts = train.train_test_split(test_size=n_val, seed=seed)
        return DatasetDict(train=parts["train"], validation=parts["test"], test=test)

    if name == "sst2":
        dd = DatasetDict({k: keep(v, ("sentence", "label")).rename_column("sentence", "text")
                          for k, v in dd.items()})
        dd = carve(dd["train"], dd["validation"], 872)
    elif name == "mnli":
        dd = DatasetDict({k: keep(v, ("premise", "hypothesis", "label")) for k, v in dd.items()})
        dd = carve(dd["train"], dd["validation_matched"], 2000)
    elif name == "banking77":
        dd = carve(keep(dd["train"], ("text", "label")), keep(dd["test"], ("text", "label")), 1000)
    elif name == "boolq":
        dd = DatasetDict({k: keep(v, ("question", "answer")) for k, v in dd.items()})
        dd = DatasetDict({k: v.map(lambda e: {"text": e["question"] + " ?", "label": int(e["answer"])},
                                   remove_columns=["question", "answer"]) for k, v in dd.items()})
        dd = carve(dd["train"], dd["validation"], 1000)
    elif name == "e2e_nlg":
        dd = dd.rename_columns({"meaning_representation": "mr", "human_reference": "text"})
        dd = DatasetDict({k: v.map(lambda e: {"mr": _e2e_mr(e["mr"])}) for k, v in dd.items()})
    else:
        raise ValueError(f"no Hub mapping for {name!r}: use one of {sorted(HUB_TASKS)}")
    sizes = sizes or {}
    return DatasetDict({k: v.select(range(min(len(v), sizes.get(k, len(v))))) for k, v in dd.items()})


_E2E_SLOTS = {"eattype": "eattype", "pricerange": "price", "customer rating": "rating",
              "familyfriendly": "family"}


def _e2e_mr(mr: str) -> str:
    """'name[The Eagle], eatType[pub], priceRange[cheap]' -> 'name[The Eagle] , eattype[pub] ,
    price[cheap]': the offline slot names, the values as written (the references keep their case)."""
    parts = []
    for part in mr.split("],"):
        key, _, value = part.strip().rstrip("]").partition("[")
        key = key.strip().lower()
        parts.append(f"{_E2E_SLOTS.get(key, key)}[{value}]")
    return " , ".join(parts)


def from_hub(name: str, sizes: dict | None = None, seed: int = 0) -> DatasetDict:
    from datasets import load_dataset
    return standardize_hub(name, load_dataset(*_HUB_SOURCES[name]), sizes, seed)


def parse_mr(mr: str) -> dict:
    """'name[the red fox] , food[greek]' -> {'name': 'the red fox', 'food': 'greek'}."""
    return dict(re.findall(r"(\w+)\[([^\]]*)\]", mr))




# ---------------------------------------------------------------------------------------------
# Encoding for training

PROMPT = "{mr} =>"


def encode_classification(split, tok, max_length: int = 128) -> list[dict]:
    """Token ids and the label of each example (``text`` and ``label``, or ``premise``,
    ``hypothesis`` and ``label`` for a sentence pair)."""
    if "premise" in split.column_names:          # a sentence pair: premise, then hypothesis
        ids = tok(list(split["premise"]), list(split["hypothesis"]), truncation=True,
                  max_length=max_length)["input_ids"]
    else:
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


def encode_text_to_text(split, tok, labels: list[str], max_length: int = 128,
                        task_id: int | None = None) -> list[dict]:
    """A classification split as language modelling, the way T5 sees every task: ``"<text> =>"``
    (a pair: ``"<premise> <hypothesis> =>"``) then the label's name and EOS, the loss on the name
    only. ``task_id`` tags every example (multitask prompt tuning's ``task_ids``)."""
    if "label" not in split.column_names:
        raise ValueError("encode_text_to_text takes a classification split (with a label column); a "
                         "generation split is already text to text: use encode_generation")
    texts = ([f"{p} {h}" for p, h in zip(split["premise"], split["hypothesis"])]
             if "premise" in split.column_names else list(split["text"]))
    words = [tok(" " + w, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for w in labels]
    out = []
    for text, y in zip(texts, split["label"]):
        prompt = tok(PROMPT.format(mr=text))["input_ids"]
        if len(prompt) + len(words[y]) > max_length:     # shorten the text, keep " =>" and the label
            arrow = tok(PROMPT.format(mr=""), add_special_tokens=False)["input_ids"]
            prompt = prompt[:max_length - len(words[y]) - len(arrow)] + arrow
        out.append({"input_ids": prompt + words[y], "labels": [-100] * len(prompt) + words[y]})
        if task_id is not None:
            out[-1]["task_ids"] = task_id
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
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "task_ids" in examples[0]:             # multitask prompt tuning: each row's task
        batch["task_ids"] = torch.tensor([e["task_ids"] for e in examples])
    return batch


def slot_score(mr: str, text: str) -> tuple[int, int]:
    """(slots the text states correctly, slots in the meaning representation).

    A value counts when its words appear in the text; "family[yes]" needs "family friendly"
    without "not family friendly", "family[no]" needs "not family friendly".
    """
    slots = parse_mr(mr)
    text = " " + re.sub(r"([.,;!?])", r" \1 ", text) + " "   # "pub," reads as "pub ,"
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
