"""The field's other turn-level estimators, beside MT-GRPO (mt_grpo.py), on the same two-turn episode.

Each returns per-turn advantages (N, 2) that mt_grpo.token_advantages spreads over the tokens, so the loss,
the update and everything after are the same for every method. Rewards arrive at the same two levels:
R_T after turn 1 (the search), R_O after turn 2 (the answer).

    GiGPO    (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training")
             A_k = A^E + omega * A^S_k. A^E = norm(R_T + R_O) over the G rollouts (the episode's return,
             which is GRPO-MR's advantage); A^S_k normalises the discounted return from step k among the
             rollouts that stood in the *same state* before step k (its "anchor state" groups).
    MT-PPO   (the MT-GRPO paper's v2, "Turn-Level Reward Design"): a learned critic instead of groups.
             V(s_k) at each turn's start; GAE over turns, delta_k = r_k + gamma V(s_k+1) - V(s_k),
             A_k = delta_k + gamma * lam * A_k+1; the batch's turn advantages whitened.

What the anchor states are here: before turn 1 every rollout of a question has seen the same prompt, so the
step group of turn 1 is the whole group; before turn 2 a rollout has seen its own search result, so the
step group of turn 2 is the rollouts of the question whose search returned the same text. This is GiGPO's
"identical observation" rule applied to the observation the environment gives (the result), not the whole
history (which always differs in the sampled turn 1).

Pure torch like mt_grpo.py, except ValueHead at the end, MT-PPO's critic, which reads a model's hidden states.
"""
from __future__ import annotations

from difflib import SequenceMatcher

import torch
from torch import Tensor

from mt_grpo import STD_EPS, group_normalise

METHODS = ("gigpo", "mt_ppo")


def anchor_groups(keys: list, G: int, similarity: float = 1.0) -> Tensor:
    """(N,) group labels: rollouts i and j share a label when they belong to the same question (i // G) and
    their ``keys`` (the observation before a turn: text, or any hashable) are equal, or, with ``similarity``
    below 1, when a key's difflib ratio to a group's first key reaches it (verl-agent's similarity-based
    GiGPO; it joins the first such group). None never matches anything."""
    labels, firsts = [], []  # firsts: (question, first key) of each group, in label order
    for i, key in enumerate(keys):
        label = None
        if key is not None:
            for g, (q, first) in enumerate(firsts):
                if q == i // G and (first == key or (similarity < 1 and isinstance(key, str) and
                                                     SequenceMatcher(None, first, key).ratio() >= similarity)):
                    label = g
                    break
        if label is None:
            label = len(firsts)
            firsts.append((i // G if key is not None else None, key))
        labels.append(label)
    return torch.tensor(labels)


def normalise_within(R: Tensor, groups: Tensor) -> Tensor:
    """(R_i - mean) / (std + 1e-4) over the rollouts sharing ``groups[i]`` (std with Bessel's correction, as
    mt_grpo.group_normalise); a group of one, or whose rewards are all equal, gets 0 (nothing to compare)."""
    A = torch.zeros_like(R if R.is_floating_point() else R.float())
    for g in groups.unique():
        idx = (groups == g).nonzero().flatten()
        if idx.numel() >= 2:
            A[idx] = group_normalise(R[idx], idx.numel())
    return A


def gigpo_advantages(R_T: Tensor, R_O: Tensor, G: int, turn2_groups: Tensor, *, omega: float = 1.0,
                     gamma: float = 0.95) -> Tensor:
    """GiGPO's per-turn advantages (N, 2) on the two-turn episode; step rewards r_1 = R_T, r_2 = R_O.

        A^E     = norm_G(R_T + R_O)                                   the episode (GRPO-MR's advantage)
        A^S_1   = norm_G(R_T + gamma * R_O)                           step 1's return; anchor: the prompt,
                                                                      so its step group is the whole group
        A^S_2   = norm_{same result}(R_O)                             step 2's return; anchor: the result
        turn 1  = A^E + omega * A^S_1,   turn 2 = A^E + omega * A^S_2

    ``turn2_groups`` (N,): anchor_groups of each rollout's first search result (None where none came back:
    such a rollout has no turn 2, and its A^S_2 is 0). A rollout alone in its result group gets A^S_2 = 0 and
    turn 2 the episode advantage only; with every result distinct GiGPO is GRPO-MR plus a step-1 term.
    Defaults: verl-agent's (the GiGPO authors' framework) step_advantage_w 1 and gamma 0.95; its mean_std_norm
    normalisation."""
    if R_T.dim() != 1 or R_T.shape != R_O.shape or turn2_groups.shape != R_T.shape:
        raise ValueError(f"need R_T, R_O and turn2_groups of one shape (N,), got {tuple(R_T.shape)}, "
                         f"{tuple(R_O.shape)}, {tuple(turn2_groups.shape)}")
    A_E = group_normalise(R_T + R_O, G)
    A_S1 = group_normalise(R_T + gamma * R_O, G)
    A_S2 = normalise_within(R_O, turn2_groups)
    return torch.stack([A_E + omega * A_S1, A_E + omega * A_S2], dim=1)


def turn_gae(r: Tensor, V: Tensor, turns: Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """GAE over turns: (advantages (N, K), returns (N, K)); entries past a rollout's ``turns`` are 0.

    r[i, k-1] is the reward that came after turn k, V[i, k-1] the critic's value of the state before it;
    with V(s_{T_i + 1}) = 0 after a rollout's last turn T_i:
        delta_k = r_k + gamma * V(s_k+1) - V(s_k),   A_k = delta_k + gamma * lam * A_k+1,   return_k = A_k + V(s_k)
    (Schulman et al. 2016 with turns as the time steps). The returns are the critic's targets."""
    if r.shape != V.shape or r.dim() != 2 or turns.shape != r.shape[:1]:
        raise ValueError(f"need r and V of shape (N, K) and turns (N,), got {tuple(r.shape)}, {tuple(V.shape)}, "
                         f"{tuple(turns.shape)}")
    N, K = r.shape
    present = torch.arange(1, K + 1)[None, :] <= turns[:, None]
    r, V = r * present, V * present
    A = torch.zeros_like(r)
    next_A, next_V = torch.zeros(N, dtype=r.dtype), torch.zeros(N, dtype=r.dtype)
    for k in reversed(range(K)):
        delta = r[:, k] + gamma * next_V - V[:, k]
        A[:, k] = torch.where(present[:, k], delta + gamma * lam * next_A, torch.zeros_like(delta))
        next_A, next_V = A[:, k], V[:, k]
    return A, (A + V) * present


def whiten(A: Tensor, present: Tensor) -> Tensor:
    """PPO's advantage whitening: (A - mean) / (std + 1e-4) over the ``present`` entries of the batch; others 0."""
    a = A[present]
    if a.numel() < 2:
        return torch.zeros_like(A)
    return torch.where(present, (A - a.mean()) / (a.std() + STD_EPS), torch.zeros_like(A))


def two_turn_rewards(R_T: Tensor, R_O: Tensor, has_result: Tensor) -> tuple[Tensor, Tensor]:
    """MT-PPO's step rewards (N, 2) and turn counts on the two-turn episode: (R_T, R_O) after turns 1 and 2;
    a rollout with no result took one turn, and both levels come after it."""
    turns = 1 + has_result.long()
    r = torch.stack([torch.where(has_result, R_T, R_T + R_O), torch.where(has_result, R_O, torch.zeros_like(R_O))], 1)
    return r, turns


def mt_ppo_advantages(R_T: Tensor, R_O: Tensor, values: Tensor, has_result: Tensor, *, gamma: float = 1.0,
                      lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """MT-PPO on the two-turn episode: (whitened per-turn advantages (N, 2), the critic's targets (N, 2)).
    A rollout without a result has one turn; mt_grpo.token_advantages gives its tokens column 1."""
    r, turns = two_turn_rewards(R_T, R_O, has_result.bool())
    A, returns = turn_gae(r, values, turns, gamma=gamma, lam=lam)
    present = torch.arange(1, 3)[None, :] <= turns[:, None]
    return whiten(A, present), returns


def turn_starts(turn: Tensor, K: int = 2) -> Tensor:
    """(N, K) positions in packed rows (policy.pack's ``turn``: 0 on prompt, environment and padding ids, k on
    the model's turn k) of the id before each turn's first id: the state s_k the critic values (turn 1: the
    prompt's last id; turn 2: the last id of the result's message). -1 where a row has no turn k."""
    pos = torch.full((turn.shape[0], K), -1, dtype=torch.long)
    for k in range(1, K + 1):
        took = (turn == k).any(1)
        pos[:, k - 1] = torch.where(took, (turn == k).long().argmax(1) - 1, pos[:, k - 1])
    return pos


class ValueHead:
    """MT-PPO's critic: V(s_k) = w . [h(s_k), 1], a linear read-out of the policy's last hidden state at each
    turn's start (detached: the critic does not move the policy). ``fit`` refits w by ridge regression
    (penalty ``ridge``) to the GAE returns of the last ``window`` batches, a least-squares critic: no learning
    rate to tune, and the same fit every time. It starts at w = 0, so the first step's advantages are the
    returns. Memory: ``window`` batches of (rows x 2) hidden states; compute: one no-grad forward of the batch a
    step and a (hidden + 1)-square solve."""

    def __init__(self, hidden: int, ridge: float = 1.0, window: int = 4):
        self.w = torch.zeros(hidden + 1, dtype=torch.float64)
        self.ridge, self.window = ridge, window
        self.memory: list[tuple[Tensor, Tensor]] = []  # (X, y) of the last ``window`` batches

    @torch.no_grad()
    def features(self, model, ids: Tensor, attn: Tensor, starts: Tensor) -> Tensor:
        """(N, K, hidden): the decoder's last hidden state at ``starts`` (turn_starts), 0 where a turn is absent."""
        h = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state.float()
        got = h.gather(1, starts.clamp(min=0).to(h.device)[:, :, None].expand(-1, -1, h.shape[-1]))
        return (got * (starts >= 0).to(h.device)[:, :, None]).cpu()

    @staticmethod
    def design(feats: Tensor) -> Tensor:
        """[h, 1] in float64: the features with the bias column the read-out's last weight multiplies."""
        return torch.cat([feats.double(), torch.ones(*feats.shape[:-1], 1, dtype=torch.float64)], -1)

    def __call__(self, feats: Tensor) -> Tensor:
        """V of every (row, turn): (N, K)."""
        return (self.design(feats) @ self.w).float()

    def fit(self, feats: Tensor, targets: Tensor, present: Tensor) -> float:
        """Add this batch's present (state, return) pairs and refit w on the window. Returns the critic's loss
        on this batch before the refit, mean (V - return)^2 / 2: its error on states it had not been fitted to."""
        loss = (((self(feats) - targets) ** 2)[present].mean() / 2).item()
        X = self.design(feats[present])
        self.memory = (self.memory + [(X, targets[present].double())])[-self.window:]
        X, y = torch.cat([m[0] for m in self.memory]), torch.cat([m[1] for m in self.memory])
        self.w = torch.linalg.solve(X.T @ X + self.ridge * torch.eye(X.shape[1], dtype=torch.float64), X.T @ y)
        return loss

    def state_dict(self) -> dict:
        return {"w": self.w, "memory": self.memory}

    def load_state_dict(self, state: dict) -> None:
        self.w, self.memory = state["w"], state["memory"]
