"""The task suite: each task means what its docstring says, and maps to its Hub counterpart."""
import collections
import itertools
import re

import pytest
from datasets import Dataset, DatasetDict

from pefttutor import data

WORLD = data.make_world()


@pytest.mark.parametrize("name", data.SUITE)
def test_suite_tasks_have_labels_in_range_and_a_few_shot_split(name):
    info = data.task_info(name)
    dd = data.load_task(name, k=4)
    assert {s: len(dd[s]) for s in ("train", "validation", "test")} == info.sizes
    if info.kind == "generation":
        assert len(dd["few_shot"]) == 4
        return
    counts = collections.Counter(dd["few_shot"]["label"])
    assert counts == {y: 4 for y in range(info.num_labels)}
    labels = set(dd["test"]["label"])
    assert labels <= set(range(info.num_labels))
    if name != "knowledge":              # its 80 test people need not cover all 20 jobs
        assert labels == set(range(info.num_labels))
    train_rows = {tuple(r.values()) for r in dd["train"]}
    assert all(tuple(r.values()) in train_rows for r in dd["few_shot"])


def test_sizes_name_only_real_splits():
    with pytest.raises(ValueError, match="no split named 'few_shot'"):
        data.load_task("nli", sizes={"few_shot": 4})


def test_few_shot_refuses_a_k_the_split_cannot_give():
    split = data.load_task("jobs", sizes={"train": 40})["train"]
    with pytest.raises(ValueError, match="k=30 but label .* has only .* use a smaller k"):
        data.few_shot(split, 30)


def test_job_clues_are_a_projective_plane():
    clues = data.job_clues()
    assert len(clues) == 20 and all(len(set(c)) == 5 for c in clues.values())
    for a, b in itertools.combinations(clues.values(), 2):
        assert len(set(a) & set(b)) == 1          # two clues name exactly one job
    per_clue = collections.Counter(c for cs in clues.values() for c in cs)
    assert max(per_clue.values()) == 5 and min(per_clue.values()) >= 4   # one clue never decides


def test_jobs_clues_decide_the_label():
    clues = data.job_clues()
    for row in data.load_task("jobs")["test"]:
        given = {w for w in row["text"].replace(".", " ").split() if w in data.CLUES}
        fits = [j for j, c in clues.items() if given <= set(c)]
        assert len(given) >= 2 and fits == [data.JOBS[row["label"]]]


def _premise_facts(premise):
    return {s.strip() + " ." for s in premise.split(" .") if s.strip()}


def test_nli_labels_follow_the_premise():
    for row in data.load_task("nli")["validation"]:
        p, h, y = row["premise"], row["hypothesis"], data.NLI_LABELS[row["label"]]
        person = h.split()[0] if not h.startswith("every day") else h.split()[2]
        facts = WORLD["people"][person]
        region = re.fullmatch(rf"{person} (lives|does not live) in the (\w+) \.", h)
        if region:
            true = WORLD["towns"][facts["town"]]["region"] == region.group(2)
            assert y == ("entailment" if true == (region.group(1) == "lives") else "contradiction")
            assert facts["town"] in p
        elif y == "entailment" and " not " not in h and " never " not in h:
            assert h in _premise_facts(p)
        elif y == "neutral":
            said = {rel for rel, v in facts.items() if rel in data._RELATIONS
                    and data._fact(rel, person, v) in _premise_facts(p)}
            assert not any(re.search(pattern, h) for pattern in
                           [r" lives in | live in " if "town" in said else "^$",
                            r" work as " if "job" in said else "^$",
                            r" works as " if "job" in said else "^$",
                            r" has | have " if "pet" in said else "^$",
                            r" eats | never eats " if "dish" in said else "^$"])


def _parse_hypothesis(h):
    """(person, relation, value, negated) from a hypothesis made by data._fact."""
    for rel, templates in data._RELATIONS.items():
        for negated, template in enumerate(templates):
            pattern = re.escape(template).replace(r"\{p\}", r"(?P<p>\w+)").replace(r"\{v\}", r"(?P<v>\w+)")
            pattern = pattern.replace(r"\{a\}", r"an?")
            m = re.fullmatch(pattern, h)
            if m:
                return m["p"], rel, m["v"], bool(negated)
    return None


def test_nli_entailment_and_contradiction_are_true_and_false_of_the_world():
    checked = 0
    for row in data.load_task("nli")["test"]:
        parsed = _parse_hypothesis(row["hypothesis"])
        if parsed is None or row["label"] == 1:          # region hypotheses: tested above
            continue
        person, rel, value, negated = parsed
        holds = (WORLD["people"][person][rel] == value) != negated
        assert holds == (row["label"] == 0)
        checked += 1
    assert checked > 200


def test_knowledge_asks_about_people_the_training_split_never_mentions():
    dd = data.load_task("knowledge")
    people = {s: {t.split()[0] for t in dd[s]["text"]} for s in ("train", "validation", "test")}
    assert not people["train"] & people["test"] and not people["train"] & people["validation"]
    for text, label in zip(dd["test"]["text"], dd["test"]["label"]):
        person = text.split()[0]
        assert text == f"{person} works as a" and WORLD["people"][person]["job"] == data.JOBS[label]
    corpus = " ".join(data.make_corpus(3000))
    assert " works as a " in corpus                  # the prompt's continuation is in pretraining


def test_sentiment_is_balanced_and_has_every_form():
    train = data.load_task("sentiment")["train"]
    assert 0.45 < sum(train["label"]) / len(train) < 0.55
    text = " ".join(train["text"])
    for form in (", but ", "although ", ", even though ", "anything but", "far from", " and "):
        assert form in text


def test_main_clause_first_decides():
    """'B , although A': B (first) decides; the label is not the last clause's polarity."""
    rows = [r for r in data.load_task("sentiment")["train"] if re.search(r" , (although|even though|while) ", r["text"])
            and not r["text"].startswith(("although", "even though", "while"))]
    assert len(rows) > 100
    for r in rows[:50]:
        main = r["text"].split(" , ")[0]
        words = main.split()
        positive_word = any(w in data.POSITIVE for w in words)
        negated = any(n in main for n in ("not", "never", "hardly", "far from", "anything but"))
        if " and " not in main:
            assert (positive_word != negated) == bool(r["label"])


def _fake(columns: dict, n: int) -> Dataset:
    return Dataset.from_dict({k: [v] * n for k, v in columns.items()})


def test_hub_mapping_mnli_banking77_boolq():
    mnli = DatasetDict(train=_fake({"premise": "a", "hypothesis": "b", "label": 2, "idx": 0}, 3000),
                       validation_matched=_fake({"premise": "c", "hypothesis": "d", "label": 0, "idx": 0}, 7),
                       validation_mismatched=_fake({"premise": "e", "hypothesis": "f", "label": 1, "idx": 0}, 5))
    out = data.standardize_hub("mnli", mnli)
    assert list(out) == ["train", "validation", "test"]
    assert out["test"].column_names == ["premise", "hypothesis", "label"] and len(out["test"]) == 7
    bank = DatasetDict(train=_fake({"text": "card lost", "label": 5}, 1500), test=_fake({"text": "x", "label": 1}, 9))
    out = data.standardize_hub("banking77", bank)
    assert out["train"].column_names == ["text", "label"] and len(out["validation"]) == 1000
    boolq = DatasetDict(train=_fake({"question": "is the sky blue", "answer": True, "passage": "p"}, 1200),
                        validation=_fake({"question": "q", "answer": False, "passage": "p"}, 4))
    out = data.standardize_hub("boolq", boolq)
    assert out["train"][0] == {"text": "is the sky blue ?", "label": 1}
    assert out["test"][0] == {"text": "q ?", "label": 0}
    for hub, offline in data.HUB_TASKS.items():
        assert data.task_info(hub).kind == data.TASKS[offline].kind
    assert data.task_info("banking77").num_labels == 77 and data.task_info("boolq").num_labels == 2
    assert data.task_info("mnli") is data.TASKS["nli"]


def test_encode_classification_pairs():
    from pefttutor import zoo
    _, tok = zoo.load_encoder()
    split = data.load_task("nli")["test"].select(range(2))
    enc = data.encode_classification(split, tok)
    tokens = tok.convert_ids_to_tokens(enc[0]["input_ids"])
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2
