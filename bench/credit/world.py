"""The credit world: the task of bench/bench_credit.py, a world where a turn-level reward can tell a good first turn
from a good outcome. It is a benchmark's instrument, not a task to train the CPU default on (data.py holds those).
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from data import _OCCUPATIONS, _WORKS, CACHE_DIR, DataError, _river_aliases, embedded_model_dir, write_jsonl_atomic

# A task where turn-level credit can matter (bench/bench_credit.py). Each person has one passage that
# names three towns, each with its own relation (born in, studied in, worked in), and one unique work;
# each town has a passage naming its river and its province. A question names its subject only by the
# work, and most questions also name another person (the decoy). So:
#   - the question as the query finds the decoy's passage whenever a decoy is named (two rare name
#     words beat one rare work word under BM25): turn 1 must learn to search for the work
#     ("the epic Carthage"), which finds the subject's passage every time;
#   - the right passage names three towns: after a perfect search turn 2 must still pick the town of
#     the asked relation, and R^O is 0 when it picks another one. A good first turn does not guarantee
#     the outcome, which a turn-level reward can tell apart and R^O cannot.
# Every name (person, work, town, river, province) is one token of the embedded model's vocabulary: a
# small policy trained from scratch copies one-token names long before it can copy the invented
# multi-token names of the demo world. The same world holds the K-turn task (the ``hops`` questions):
# one-hop questions (the town of birth, one search) and two-hop ones (that town's river: search the
# person, then the town), so a second search is needed for some questions and not for others.
# Each question row carries what the demonstrator needs (credit.demonstrator.credit_turns).

CREDIT_RELATIONS = {  # relation -> (the passage's clause, the question's ending)
    "born": ("was born in", "In which town was the {job} born?"),
    "studied": ("studied in", "In which town has the {job} studied?"),
    "worked": ("worked in", "In which town has the {job} worked?"),
}
_CREDIT_LINKS = ("friend", "rival", "pupil", "neighbour")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def one_token_names(tokenizer=None) -> list[str]:
    """Capitalised words that are one token of the tokenizer's vocabulary with a leading space (" Carthage")
    and whose lower-case form is no token (so a name, not a common word such as "About"), by token id.
    Default: the embedded model's tokenizer."""
    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    vocab = tokenizer.get_vocab()
    space = "\u0120"  # how byte-level BPE writes a leading space
    words = [(i, t[1:]) for t, i in vocab.items() if re.fullmatch(space + r"[A-Z][a-z]{3,9}", t)
             and space + t[1:].lower() not in vocab and t[1:].lower() not in vocab]
    return [w for _, w in sorted(words)]


# Variants of the world (``variant``): the same people, towns, works and questions' draws, another passage text.
#   "ordered":  the three clauses always in one order (born, studied, worked): where a town stands says which
#               relation it is, so the second turn's pick can be learnt by position as well as by the words
#               before the town; R^O still scores a right search 0 until the pick is learnt.
#   "one_town": a person's passage names the town of birth only, and only the town-of-birth questions are
#               asked: after a right search the answer is the one town the result offers, so R^O already pays
#               for a good first turn, the regime where outcome-only credit needs no help.
WORLD_VARIANTS = ("ordered", "one_town")


def generate_credit_world(seed: int = 0, names: list[str] | None = None, n_people: int = 300, n_towns: int = 60,
                          variants: int = 4, decoy_share: float = 0.7, variant: str | None = None) -> dict[str, list]:
    """Deterministically generate the credit world from ``seed`` (and the name list, one_token_names()).

    Returns ``corpus`` (one passage per person and per town), ``credit`` (per person and relation,
    ``variants`` questions that differ in their decoy: ``decoy_share`` name one) and ``hops`` (per
    person one one-hop and one two-hop question). A credit row: question, answer, aliases (as every
    row), plus ``pair`` ("person:relation", the unit of the train/eval split), ``person`` (index),
    ``query`` (words that find the subject's passage), ``decoy`` (the decoy's name, or None) and
    ``relation`` (a key of CREDIT_RELATIONS). A hops row: ``hops`` (1 or 2), ``person``, ``query``,
    ``town`` (the bridge) and, two-hop, ``support`` (the bridge's aliases, as data.generate_two_hop).
    ``variant`` (WORLD_VARIANTS) changes the person passages and the credit questions asked, nothing else.
    """
    if variant is not None and variant not in WORLD_VARIANTS:
        raise DataError(f"unknown credit-world variant {variant!r}; choose one of {', '.join(WORLD_VARIANTS)}")
    rng = random.Random(seed)
    pool = list(names if names is not None else one_token_names())
    rng.shuffle(pool)
    need = 3 * n_people + n_towns + n_towns // 2 + n_towns // 3
    if len(pool) < need:
        raise DataError(f"the credit world needs {need} one-token names, the vocabulary has {len(pool)}")
    take = iter(pool)
    works, lasts = [next(take) for _ in range(n_people)], [next(take) for _ in range(n_people)]
    firsts = [next(take) for _ in range(n_people)]
    rivers, provinces = [next(take) for _ in range(n_towns // 2)], [next(take) for _ in range(n_towns // 3)]
    towns = [{"name": next(take), "river": rng.choice(rivers), "province": rng.choice(provinces)} for _ in range(n_towns)]
    people = []
    for i in range(n_people):
        job = rng.choice(_OCCUPATIONS)
        people.append({"name": f"{rng.choice(firsts)} {lasts[i]}", "job": job, "kind": _WORKS[job], "work": works[i],
                       "towns": dict(zip(CREDIT_RELATIONS, rng.sample(towns, 3)))})
    corpus, credit, hops = [], [], []
    for t in towns:
        corpus.append({"id": f"town-{t['name']}", "title": t["name"], "text": (
            f"{t['name']} is a market town on the banks of the river {t['river']}, in the province of "
            f"{t['province']}.")})
    for i, p in enumerate(people):
        last = p["name"].split()[1]
        clauses = [f"{CREDIT_RELATIONS[r][0]} {t['name']}" for r, t in p["towns"].items()]
        shuffled = list(clauses)
        rng.shuffle(shuffled)  # where a town stands says nothing about its relation (drawn in every variant,
        # so that a variant's later draws, decoys included, are the base world's)
        towns_said = {None: f"{shuffled[0]}, {shuffled[1]} and {shuffled[2]}",
                      "ordered": f"{clauses[0]}, {clauses[1]} and {clauses[2]}", "one_town": clauses[0]}[variant]
        corpus.append({"id": f"person-{i}", "title": p["name"], "text": (
            f"{p['name']} is {_article(p['job'])} {p['job']} whose best-known {p['kind']} is {p['work']}. "
            f"{last} {towns_said}.")})
        subject = f"The {p['job']} who made the {p['kind']} {p['work']}"
        common = {"person": i, "query": f"the {p['kind']} {p['work']}"}
        for relation, (_, ending) in CREDIT_RELATIONS.items():
            town = p["towns"][relation]["name"]
            for _ in range(variants):
                decoy = None
                if rng.random() < decoy_share:
                    j = rng.randrange(n_people - 1)
                    decoy = people[j + (j >= i)]["name"]  # anyone but the subject
                lead = f"{subject} was a {rng.choice(_CREDIT_LINKS)} of {decoy}." if decoy else f"{subject} is famous."
                if variant == "one_town" and relation != "born":
                    continue  # (after the draws: the born questions are the base world's)
                credit.append({"question": f"{lead} {ending.format(job=p['job'])}", "answer": town,
                               "aliases": [town, f"the town of {town}"], "pair": f"{i}:{relation}", **common,
                               "decoy": decoy, "relation": relation})
        born = p["towns"]["born"]
        where = f"the {p['job']} who made the {p['kind']} {p['work']}"
        hop = {**common, "town": born["name"]}
        hops.append({"question": f"In which town was {where} born?", "answer": born["name"],
                     "aliases": [born["name"], f"the town of {born['name']}"], "hops": 1, **hop})
        hops.append({"question": f"On which river lies the town where {where} was born?", "answer": born["river"],
                     "aliases": _river_aliases(born["river"]),
                     "support": [[born["name"], f"the town of {born['name']}"]], "hops": 2, **hop})
    return {"corpus": corpus, "credit": credit, "hops": hops}


CREDIT_FACTS = {**{r: clause for r, (clause, _) in CREDIT_RELATIONS.items()}, "river": "the river",
                "province": "the province of"}


def credit_facts(passage_text: str) -> dict[str, str]:
    """What a credit-world passage names, read off its text: relation -> town for a person's passage,
    "river" and "province" for a town's (empty for any other passage)."""
    found = {}
    for key, words in CREDIT_FACTS.items():
        at = passage_text.find(words + " ")
        if at >= 0:
            found[key] = re.match(r"\w+", passage_text[at + len(words) + 1:]).group(0)
    return found


def credit_world(seed: int = 0, n_eval_people: int = 64, cache_dir: Path | None = None,
                 variant: str | None = None) -> dict[str, Path]:
    """The credit world, cached like demo_world: ``corpus``; ``train``/``eval`` (the credit task) and
    ``hops_train``/``hops_eval`` (the K-turn task). ``n_eval_people`` people are held out of both tasks'
    training questions (they may still be named as a decoy): ``eval`` holds one question per held-out
    (person, relation), ``hops_eval`` both hops questions of each, alternating one-hop and two-hop so
    that its first n rows hold both kinds equally. ``variant`` (WORLD_VARIANTS) holds out the same people;
    "one_town" asks one relation, so its ``eval`` holds every decoy variant of each held-out person's
    question, the first of each person's first, then their second, and so on."""
    folder = Path(cache_dir or CACHE_DIR) / (f"credit-world-v3-seed{seed}" + (f"-{variant}" if variant else ""))
    keys = ("corpus", "train", "eval", "hops_train", "hops_eval")
    paths = {k: folder / f"{k}.jsonl" for k in keys}
    if not all(p.is_file() for p in paths.values()):
        world = generate_credit_world(seed, variant=variant)
        people = sorted({q["person"] for q in world["hops"]})
        held = random.Random(seed + 1).sample(people, n_eval_people)
        by_pair = {}  # each held-out (person, relation): its questions, one per decoy variant
        for q in world["credit"]:
            if q["person"] in held:
                by_pair.setdefault(q["pair"], []).append(q)
        held_out = ([by_pair[f"{i}:born"][v] for v in range(len(by_pair[f"{held[0]}:born"])) for i in held]
                    if variant == "one_town" else [by_pair[f"{i}:{r}"][0] for i in held for r in CREDIT_RELATIONS])
        by_person = {(q["person"], q["hops"]): q for q in world["hops"]}
        rows = {"corpus": world["corpus"],
                "train": [q for q in world["credit"] if q["person"] not in held],
                "eval": held_out,
                "hops_train": [q for q in world["hops"] if q["person"] not in held],
                "hops_eval": [by_person[i, h] for i in held for h in (1, 2)]}
        for k, key in enumerate(("train", "hops_train")):
            random.Random(seed + 2 + k).shuffle(rows[key])
        for key in keys:
            write_jsonl_atomic(paths[key], rows[key])
    return paths
