"""From a batch's rewards to the advantage of every token it trains on: the one entry point, for every method and
turn reward. train.py, tools/viewer.py and extensions/trl_mt_grpo.py all call it.

    reward_levels     the six rewards (rewards.py) summed by level, as mt_grpo.Levels: R^T of turn 1 (or a
                      model's, --turn-reward), R^O; with --k-turn one R^T per tool call
    turn_advantages   the method's per-turn advantages (N, K): mt_grpo.py's three, or GiGPO's
    token_advantages  what the loss reads: this process's rows' turn advantages spread over their tokens; an
                      estimator that brings a model of its own (MT-PPO's critic) computes them itself
"""
from __future__ import annotations

import torch

import mt_grpo
import rewards
from config import Config


def reward_levels(cfg: Config, scores: dict[str, list[float]], trajectories, episodes: list[dict],
                  turn_reward=None) -> mt_grpo.Levels:
    """The batch's rewards by level (rewards.level_sums); ``episodes``: each rollout's question row. ``turn_reward``:
    a model that scores turn 1 in place of rewards.py, ``(trajectories, episodes) -> R^T`` (extensions/), or None."""
    R_T, R_O = rewards.level_sums(scores)
    turns = None
    if cfg.k_turn:  # one R^T per tool call (new evidence found), and each rollout's turns
        R_T, turns = rewards.k_turn_levels([t.messages for t in trajectories], [q["aliases"] for q in episodes],
                                           [q.get("support") for q in episodes], cfg.max_tool_calls)
    if turn_reward is not None:
        R_T = turn_reward(trajectories, episodes)
    return mt_grpo.Levels(R_T=torch.tensor(R_T, dtype=torch.float32), R_O=torch.tensor(R_O, dtype=torch.float32),
                          has_result=torch.tensor([t.has_result for t in trajectories]),
                          turns=None if turns is None else torch.tensor(turns),
                          first_results=[t.results[0] if t.has_result else None for t in trajectories])


def turn_advantages(cfg: Config, levels: mt_grpo.Levels) -> torch.Tensor:
    """Per-turn advantages of the whole batch, (N, 2), or (N, max_tool_calls + 1) with --k-turn: MT-GRPO's turn
    split and its baselines (mt_grpo.py), or GiGPO's (extensions/estimators.py). Every group is normalised whole."""
    if cfg.method == "gigpo":  # the field's estimator, behind this entry point (extensions/estimators.py)
        from extensions import estimators
        return estimators.gigpo(cfg, levels)
    if cfg.k_turn:
        return mt_grpo.k_turn_advantages(levels.R_T, levels.R_O, levels.turns, cfg.G, cfg.method, lam=cfg.lam,
                                         convention=cfg.convention, has_result=levels.has_result,
                                         normalise=cfg.k_turn_normalise)
    return mt_grpo.turn_advantages(levels.R_T, levels.R_O, cfg.G, cfg.method, lam=cfg.lam, convention=cfg.convention,
                                   has_result=levels.has_result)


def token_advantages(cfg: Config, levels: mt_grpo.Levels, trajectories, batch, rows: slice, critic=None) -> torch.Tensor:
    """The advantage of each id of this process's rows (``batch`` of ``trajectories[rows]``), (n, L-1) like the
    update's log-probs, 0 off the model's ids: the method's turn advantages spread, or an estimator's own model's."""
    if critic is not None:
        return critic.token_advantages(levels, trajectories, batch, rows)
    return mt_grpo.token_advantages(turn_advantages(cfg, levels)[rows], batch.turn[:, 1:])[0]


def level_stats(cfg: Config, levels: mt_grpo.Levels) -> dict:
    """The logged means of R_T and R_O and the share of groups whose rewards do not vary (no signal)."""
    R_T = levels.R_T.sum(dim=1) if cfg.k_turn else levels.R_T
    return {"reward_turn": R_T.mean().item(), "reward_outcome": levels.R_O.mean().item(),
            **mt_grpo.collapse_stats(R_T, levels.R_O, cfg.G)}
