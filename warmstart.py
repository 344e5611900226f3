"""Cold start: a short supervised warm-up on demonstrations of the protocol, before RL.

RL can only reinforce what the policy already does sometimes. SmolLM2-135M-Instruct wrote a
well-formed tool call 0 times in 8 from a one-shot example in the system prompt (3/8 with the
example as a prior chat exchange), so most groups would start with no signal at all. DeepSeek-R1
and most agentic RL recipes fix this with a small supervised "cold start" on demonstrations;
we do the same, briefly, and let RL do the rest (the paper has none: see DEVIATIONS.md, item 12).

A demonstration is an episode played through the real environment by a scripted policy: turn 1
reasons and searches with the question as the query, the environment answers with the real search
result, turn 2 writes the dataset's answer (it is not read from the result). Because it is produced
by ``env.rollout``, its token ids, turn indices and chat markers are exactly those the RL loop
trains on. We keep only demonstrations whose search result really contains the answer (a
demonstration must never teach guessing) and train on the model's own tokens (turn index > 0) with
the usual next-token loss.

A second style, ``style="varied"``, is the prior of a policy trained from scratch (the small
instrument of bench/bench_credit.py, on data.credit_world's tasks): the demonstrator does not always
do the right thing. It answers at once with a guess half the time, searches with one of several
queries (the right words, the question, a decoy's name), and picks one of the names the result
offers, the asked one only half the time; two-hop rows stop after one search half the time, one-hop
rows sometimes search a second time for nothing. Every such episode is kept, guesses and wrong picks
included, so the warm-started policy does each of these things some of the time and RL has something
to choose among (``VARIED`` holds the mix). Its turns quote what they copy in the words the source
uses ("the painting Henderson", "he was born in Princeton"), so every copied name is preceded by the
same tokens as where it was read: a small model copies by matching what came before.
"""
from __future__ import annotations

import json
import random

import torch

import env
import lora
import rewards
from data import CREDIT_RELATIONS, DataError, credit_facts
from policy import common_head, logprobs, pack


def demonstration_turns(question: dict) -> list[str]:
    """The turns a demonstrator writes for one question (the answer is the dataset's). A two-hop
    question (with ``support``, data.generate_two_hop) gets a second search for the bridge entity
    the first result names."""
    def search(query):
        call = json.dumps({"name": "wiki_search", "args": {"query": query}})
        return f"<tool>\n{call}\n</tool>"

    turns = [f"<reasoning>\nI need to look this up, so I will search for the question.\n</reasoning>\n"
             f"{search(question['question'])}"]
    for aliases in question.get("support", []):
        bridge = aliases[0]
        turns.append(f"<reasoning>\nThe result names {bridge}. I will search for {bridge}.\n</reasoning>\n"
                     f"{search(bridge)}")
    turns.append(f"<reasoning>\nThe search result gives the answer.\n</reasoning>\n"
                 f"<answer>\n{question['answer']}\n</answer>")
    return turns


def demonstrations(tokenizer, index, questions: list[dict], env_cfg: env.EnvConfig) -> list[env.Trajectory]:
    """Scripted episodes through the real environment, kept only where every search brought new
    evidence (rewards.call_rewards: it ran and found the bridge or the answer), so the answer was found."""
    policy = env.ScriptedPolicy(tokenizer, [demonstration_turns(q) for q in questions])
    trajectories = env.rollout(policy, tokenizer, [q["question"] for q in questions], 1, index, env_cfg)
    keep = []
    for t, q in zip(trajectories, questions):
        calls = rewards.call_rewards(t.messages, q["aliases"], q.get("support", ()))
        # one call per evidence item, each finding a new one: so the answer was found too
        if len(calls) == 1 + len(q.get("support", ())) and all(r >= 0.7 for r in calls) and not t.truncated:
            keep.append(t)
    return keep


STYLES = ("protocol", "varied")
# The varied demonstrator's mix: P(search at all), P(each query | search), P(the asked one of the
# names a passage offers), and for the K-turn task P(stop after one search) on two-hop rows and
# P(a second, unneeded search) on one-hop rows.
VARIED = {"search": 0.5, "query": {"right": 0.5, "question": 0.25, "decoy": 0.25}, "right_pick": 0.5,
          "two_hop_stops_early": 0.5, "one_hop_searches_again": 0.4}


def search_turn(query: str, why: str = "I will look it up.") -> str:
    call = json.dumps({"name": "wiki_search", "args": {"query": query}})
    return f"<reasoning>\n{why}\n</reasoning>\n<tool>\n{call}\n</tool>"


def answer_turn(answer: str, why: str) -> str:
    return f"<reasoning>\n{why}\n</reasoning>\n<answer>\n{answer}\n</answer>"


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


def varied_demonstrations(tokenizer, index, questions: list[dict], env_cfg: env.EnvConfig,
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
    policy = env.ScriptedPolicy(tokenizer, turns)
    trajectories = env.rollout(policy, tokenizer, [q["question"] for q in questions], 1, index, env_cfg)
    return [t for t in trajectories if not t.truncated]


def token_loss(model, ids, attn, turn, bf16: bool, n_tokens: int | None = None) -> torch.Tensor:
    """Next-token loss over the model-written tokens (turn > 0) of a packed batch: their summed -log pi
    divided by ``n_tokens`` (default: their count, the mean; a micro-batch passes its whole batch's count)."""
    ids, attn, turn = (x.to(model.device) for x in (ids, attn, turn))
    written = turn[:, 1:] > 0
    # every row starts with the same system prompt: forwarded once for the micro-batch (the same numbers)
    head = common_head(ids, turn)
    logp = logprobs(model, ids, attn, turn, bf16, torch.full((len(ids),), head, device=ids.device) if head > 1 else None)
    return -(logp * written).sum() / (written.sum() if n_tokens is None else n_tokens)


def run(model, tokenizer, index, questions: list[dict], env_cfg: env.EnvConfig, steps: int,
        lr: float = 5e-5, batch: int = 8, seed: int = 0, bf16: bool = True, micro_batch: int = 4,
        style: str = "protocol", drill=None) -> dict:
    """``steps`` AdamW steps of next-token loss (mean over the batch's model tokens) on
    demonstrations, in micro-batches to bound memory; returns first and last loss. ``style``:
    "protocol" (the right thing, kept only when the search found the answer) or "varied" (VARIED,
    every episode kept, a fresh one per batch row). ``drill``: optional ``step -> (ids, attn, turn)``,
    a packed batch whose loss (over turn > 0) is added at every step (bench_credit's copy drill)."""
    if style not in STYLES:
        raise DataError(f"warm start style {style!r}: choose one of {', '.join(STYLES)}")
    if style == "varied":
        demos = varied_demonstrations(tokenizer, index, random.Random(seed).choices(questions, k=steps * batch),
                                      env_cfg, seed)
    else:
        pool = random.Random(seed).sample(questions, min(len(questions), 2 * steps * batch))
        demos = demonstrations(tokenizer, index, pool, env_cfg)
    if not demos:
        raise DataError("warm start: no question's answer was found by searching for the question; "
                        "check --corpus matches --questions, or pass --warmstart-steps 0")
    params = lora.trainable(model)  # under LoRA the adapter alone: the start model stays as loaded
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for s in range(steps):
        chunk = [demos[(s * batch + i) % len(demos)] for i in range(batch)]
        n_tokens = sum(sum(k > 0 for k in t.turn_idx) for t in chunk)
        loss = 0.0
        for j in range(0, batch, micro_batch):
            part = token_loss(model, *pack(chunk[j:j + micro_batch], tokenizer.pad_token_id), bf16, n_tokens)
            part.backward()
            loss += part.item()
        if drill is not None:
            token_loss(model, *drill(s), bf16).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
    return {"first_loss": losses[0], "last_loss": losses[-1], "demonstrations": len(demos)}
