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
"""
from __future__ import annotations

import json
import random

import torch

import env
import lora
import rewards
from data import DataError
from policy import pack, token_logprobs


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


def run(model, tokenizer, index, questions: list[dict], env_cfg: env.EnvConfig, steps: int,
        lr: float = 5e-5, batch: int = 8, seed: int = 0, bf16: bool = True, micro_batch: int = 4) -> dict:
    """``steps`` AdamW steps of next-token loss (mean over the batch's model tokens) on
    demonstrations, in micro-batches to bound memory; returns first and last loss."""
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
            ids, attn, turn = (x.to(model.device) for x in pack(chunk[j:j + micro_batch], tokenizer.pad_token_id))
            logp = token_logprobs(model, ids, attn, turn, bf16)
            part = -(logp * (turn[:, 1:] > 0)).sum() / n_tokens
            part.backward()
            loss += part.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
    return {"first_loss": losses[0], "last_loss": losses[-1], "demonstrations": len(demos)}
