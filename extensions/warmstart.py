"""Cold start: a short supervised warm-up on demonstrations of the protocol, before RL.

RL can only reinforce what the policy already does sometimes. SmolLM2-135M-Instruct almost never writes a
well-formed tool call unaided, so most groups would start with no signal at all. DeepSeek-R1 and most agentic
RL recipes fix this with a small supervised "cold start" on demonstrations; we do the same, briefly, and let
RL do the rest (the seed has none: see DEVIATIONS.md, item 12).

A demonstration is an episode played through the real environment by a scripted policy: turn 1
reasons and searches with the question as the query, the environment answers with the real search
result, turn 2 writes the dataset's answer (it is not read from the result). Because it is produced
by ``env.rollout``, its token ids, turn indices and chat markers are exactly those the RL loop
trains on. We keep only demonstrations whose search result really contains the answer (a
demonstration must never teach guessing) and train on the model's own tokens (turn index > 0) with
the usual next-token loss.
"""
from __future__ import annotations

import random

import torch

import env
import rewards
from config import EnvConfig
from data import DataError
from infra import lora
from policy import ScriptedPolicy, pack, token_logprobs

BATCH = 8          # demonstrations per step: the CPU default's 7 steps train on 56
GRAD_CLIP = 1.0    # a supervised step's gradient is not the RL update's (whose clip is the seed's 0.1)
# AdamW keeps torch's default betas (0.9, 0.999): a few steps of supervised learning, not the RL update


def search_turn(query: str, why: str = "I will look it up.") -> str:
    """A demonstrator's search message: its reasoning, then the tool call (the seed's parser's layout)."""
    return f"<reasoning>\n{why}\n</reasoning>\n<tool>\n{env.tool_command(query)}\n</tool>"


def answer_turn(answer: str, why: str) -> str:
    """A demonstrator's answer message: its reasoning, then the answer."""
    return f"<reasoning>\n{why}\n</reasoning>\n<answer>\n{answer}\n</answer>"


def demonstration_turns(question: dict) -> list[str]:
    """The turns a demonstrator writes for one question (the answer is the dataset's). A two-hop
    question (with ``support``, data.generate_two_hop) gets a second search for the bridge entity
    the first result names."""
    turns = [search_turn(question["question"], "I need to look this up, so I will search for the question.")]
    for aliases in question.get("support", []):
        bridge = aliases[0]
        turns.append(search_turn(bridge, f"The result names {bridge}. I will search for {bridge}."))
    return turns + [answer_turn(question["answer"], "The search result gives the answer.")]


def demonstrations(tokenizer, index, questions: list[dict], env_cfg: EnvConfig) -> list[env.Trajectory]:
    """Scripted episodes through the real environment, kept only where every search brought new
    evidence (rewards.call_rewards: it ran and found the bridge or the answer), so the answer was found."""
    policy = ScriptedPolicy(tokenizer, [demonstration_turns(q) for q in questions])
    trajectories = env.rollout(policy, tokenizer, [q["question"] for q in questions], 1, index, env_cfg)
    keep = []
    for t, q in zip(trajectories, questions):
        calls = rewards.call_rewards(t.messages, q["aliases"], q.get("support", ()))
        # one call per evidence item, each finding a new one: so the answer was found too
        if len(calls) == 1 + len(q.get("support", ())) and all(r >= 0.7 for r in calls) and not t.truncated:
            keep.append(t)
    return keep


def token_loss(model, ids, attn, turn, bf16: bool, n_tokens: int | None = None, logprobs=token_logprobs) -> torch.Tensor:
    """Next-token loss over the model-written tokens (turn > 0) of a packed batch: their summed -log pi
    divided by ``n_tokens`` (default: their count, the mean; a micro-batch passes its whole batch's count).
    ``logprobs``: token_logprobs, or a function with its result (train.py's speed path passes one)."""
    ids, attn, turn = (x.to(model.device) for x in (ids, attn, turn))
    written = turn[:, 1:] > 0
    logp = logprobs(model, ids, attn, turn, bf16)
    return -(logp * written).sum() / (written.sum() if n_tokens is None else n_tokens)


def run(model, tokenizer, index, questions: list[dict], env_cfg: EnvConfig, steps: int,
        lr: float = 5e-5, batch: int = BATCH, seed: int = 0, bf16: bool = True, micro_batch: int = 4,
        logprobs=token_logprobs, demos: list[env.Trajectory] | None = None, extra=None) -> dict:
    """``steps`` AdamW steps of next-token loss (mean over the batch's model tokens) on demonstrations, in
    micro-batches to bound memory; returns first and last loss. ``demos``: the episodes to learn from (default:
    ``demonstrations`` of a seeded sample of ``questions``); ``extra``: optional ``step -> (ids, attn, turn)``, a
    packed batch whose loss (over turn > 0) is added at every step. ``logprobs``: as in token_loss."""
    if demos is None:
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
            part = token_loss(model, *pack(chunk[j:j + micro_batch], tokenizer.pad_token_id), bf16, n_tokens, logprobs)
            part.backward()
            loss += part.item()
        if extra is not None:
            token_loss(model, *extra(s), bf16, logprobs=logprobs).backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
    return {"first_loss": losses[0], "last_loss": losses[-1], "demonstrations": len(demos)}
