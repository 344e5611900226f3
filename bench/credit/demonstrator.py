"""The varied demonstrator of bench/bench_credit.py: the prior of a policy trained from scratch on the credit world.

Unlike the protocol demonstrations of warmstart.py (the right thing, kept only when the search found the
answer), this demonstrator does not always do the right thing. It answers at once with a guess half the
time, searches with one of several queries (the right words, the question, a decoy's name), and picks one
of the names the result offers, the asked one only half the time; two-hop rows stop after one search half
the time, one-hop rows sometimes search a second time for nothing. Every such episode is kept, guesses and
wrong picks included, so the warm-started policy does each of these things some of the time and RL has
something to choose among (``VARIED`` holds the mix). Its turns quote what they copy in the words the source
uses ("the painting Henderson", "he was born in Princeton"), so every copied name is preceded by the same
tokens as where it was read: a small model copies by matching what came before.
"""
from __future__ import annotations

import random

import env
from config import EnvConfig
from credit.world import CREDIT_RELATIONS, credit_facts
from extensions.warmstart import answer_turn, search_turn
from policy import ScriptedPolicy

STYLES = ("protocol", "varied")
# The varied demonstrator's mix: P(search at all), P(each query | search), P(the asked one of the
# names a passage offers), and for the K-turn task P(stop after one search) on two-hop rows and
# P(a second, unneeded search) on one-hop rows.
VARIED = {"search": 0.5, "query": {"right": 0.5, "question": 0.25, "decoy": 0.25}, "right_pick": 0.5,
          "two_hop_stops_early": 0.5, "one_hop_searches_again": 0.4}


def says(key: str, name: str) -> str:
    """A result's fact in the passage's own words: "he was born in X", "the river X", ..."""
    words = {"river": "on the banks of the river", "province": "in the province of"}.get(key)
    return f"The result says {words or 'he ' + CREDIT_RELATIONS[key][0]} {name}."


def pick(facts: dict[str, str], asked: str, rng: random.Random) -> str:
    """The asked key of ``facts`` with probability VARIED["right_pick"], else another of its keys."""
    others = sorted(k for k in facts if k != asked)
    return asked if rng.random() < VARIED["right_pick"] or not others else rng.choice(others)


def top_facts(index, query: str, passages: int) -> dict[str, str]:
    """data.credit_facts of the first passage the search tool returns for ``query``."""
    hits = index.search(query, passages)
    return credit_facts(hits[0]["text"]) if hits else {}


def credit_turns(question: dict, index, passages: int, rng: random.Random, guesses: list[str]) -> list[str]:
    """A varied demonstration (VARIED) for a row of data.generate_credit_world: a credit row, or a hops
    row (with ``hops``). Each search is run here with the environment's own index and top-k, so the
    next turn picks among the names of the passage the episode will really see, as a demonstrator
    reading the result would."""
    if rng.random() >= VARIED["search"]:
        return [answer_turn(rng.choice(guesses), "I think I know it.")]
    kind = rng.choices(list(VARIED["query"]), weights=list(VARIED["query"].values()))[0]
    query = {"right": question["query"], "question": question["question"],
             "decoy": question.get("decoy") or question["question"]}[kind]
    turns = [search_turn(query)]
    facts = top_facts(index, query, passages)
    asked = question.get("relation", "born")  # a hops row asks for (or through) the town of birth
    if asked not in facts:  # not a person's passage: nothing to read a town off
        return turns + [answer_turn(rng.choice(guesses), "The result does not say.")]
    key = pick(facts, asked, rng)
    town, hops = facts[key], question.get("hops")  # hops None: a credit row, one search
    if hops is None or (hops == 2 and rng.random() < VARIED["two_hop_stops_early"]) or \
            (hops == 1 and rng.random() >= VARIED["one_hop_searches_again"]):
        return turns + [answer_turn(f"the town of {town}", says(key, town))]  # (on a two-hop row: wrong)
    turns.append(search_turn(f"the town {town}", f"{says(key, town)} I will search for the town."))
    if hops == 1:  # a search it did not need: the town is still the answer
        return turns + [answer_turn(f"the town of {town}", says(key, town))]
    facts = top_facts(index, f"the town {town}", passages)
    if "river" not in facts:
        return turns + [answer_turn(rng.choice(guesses), "The result does not say.")]
    key = pick({k: facts[k] for k in ("river", "province")}, "river", rng)
    answer = f"river {facts[key]}" if key == "river" else f"the province of {facts[key]}"
    return turns + [answer_turn(answer, says(key, facts[key]))]


def varied_demonstrations(tokenizer, index, questions: list[dict], env_cfg: EnvConfig,
                          seed: int = 0) -> list[env.Trajectory]:
    """Episodes of the varied demonstrator through the real environment, one per row of ``questions``
    (repeats get their own draw), every one kept unless the budget cut it. A guess is the answer of
    another question of the same kind (a town, or a river for a two-hop row)."""
    rng = random.Random(seed)
    guesses: dict[int, set] = {}
    for q in questions:
        hops = q.get("hops", 1)
        guesses.setdefault(hops, set()).add(f"river {q['answer']}" if hops == 2 else f"the town of {q['answer']}")
    guesses = {k: sorted(v) for k, v in guesses.items()}
    turns = [credit_turns(q, index, env_cfg.passages, rng, guesses[q.get("hops", 1)]) for q in questions]
    policy = ScriptedPolicy(tokenizer, turns)
    trajectories = env.rollout(policy, tokenizer, [q["question"] for q in questions], 1, index, env_cfg)
    return [t for t in trajectories if not t.truncated]


def warm_start_demos(tokenizer, index, questions: list[dict], env_cfg: EnvConfig, steps: int, batch: int,
                     seed: int) -> list[env.Trajectory]:
    """The demonstrations of a varied warm start of ``steps`` x ``batch`` rows (warmstart.run's ``demos``): a
    fresh episode per row, on a seeded draw of the questions."""
    return varied_demonstrations(tokenizer, index, random.Random(seed).choices(questions, k=steps * batch), env_cfg,
                                 seed)
