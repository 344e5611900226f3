"""The field's other turn-level estimators, beside MT-GRPO (mt_grpo.py), on the same two-turn episode, each by its
own definition. Rewards arrive at the same two levels: R_T after turn 1 (the search), R_O after turn 2 (the answer).

    GiGPO    (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training"; verl-agent, its
             authors' framework, whose search recipe sets the defaults here). A_k = A^E + omega * A^S_k: A^E
             normalises the episode's return R_T + R_O within its group, over the group's *steps* (a rollout
             counts once per turn it took: verl-agent's cross-step normalisation); A^S_k normalises the return from
             step k among the rollouts that stood in the *same state* before step k (its "anchor state" groups).
    MT-PPO   (the MT-GRPO paper's second version, "Turn-Level Reward Design"): PPO with a critic trained beside
             the policy instead of groups. The turn-level reward enters the reward signal: R_T at the last token
             of turn 1, R_O at the last token of the episode; GAE over the model's tokens, the environment's
             skipped (veRL's compute_gae_advantage_return); the critic learns by PPO's clipped value loss.

The anchor states here: before turn 1 every rollout of a question has seen the same prompt, so the step group of
turn 1 is the whole group; before turn 2 a rollout has seen its own search result, so the step group of turn 2
is the rollouts of the question whose search returned the same text, or, with ``similarity`` below 1, text this
similar (verl-agent's similarity-based grouping).
"""
from __future__ import annotations

import math
from difflib import SequenceMatcher

import torch
from torch import Tensor

from mt_grpo import STD_EPS, group_normalise

# verl-agent's GiGPO search recipe (examples/gigpo_trainer/run_search.sh) and veRL's critic defaults
# (trainer/config/critic/critic.yaml), which the settings in config.py and these constants follow
CRITIC_WEIGHT_DECAY, CRITIC_GRAD_CLIP, WHITEN_EPS = 0.01, 1.0, 1e-8


# ------------------------------------------------------------------------------------------ GiGPO
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


def normalise_over_steps(R: Tensor, turns: Tensor, G: int) -> Tensor:
    """verl-agent's episode normalisation across steps: every step of a rollout is a row there, all carrying the
    episode's return, so the group's mean and std (Bessel's) run over each rollout's return counted once per turn
    it took; each rollout then gets (R_i - mean) / (std + 1e-4), and a group whose steps all agree gets 0. When
    every rollout takes the same number of turns the mean is the trajectories' and only the std's count differs."""
    A = torch.zeros_like(R if R.is_floating_point() else R.float())
    for start in range(0, R.shape[0], G):
        rows = slice(start, start + G)
        steps = R[rows].float().repeat_interleave(turns[rows])
        if not (steps == steps[0]).all():
            A[rows] = (R[rows] - steps.mean()) / (steps.std() + STD_EPS)
    return A


def gigpo_advantages(R_T: Tensor, R_O: Tensor, G: int, turn2_groups: Tensor, has_result: Tensor, *,
                     omega: float = 1.0, gamma: float = 0.95, episode_norm: str = "steps") -> Tensor:
    """GiGPO's per-turn advantages (N, 2) on the two-turn episode.

        step returns   a rollout that searched took two steps: return_1 = R_T + gamma * R_O, return_2 = R_O;
                       one that never did took one, which earned both: return_1 = R_T + R_O, undiscounted
        A^E     = norm(R_T + R_O) within the group, over its steps ("steps", verl-agent's default:
                  normalise_over_steps) or over its rollouts ("trajectories": GRPO-MR's advantage)
        A^S_1   = norm_G(return_1)           step 1's anchor is the prompt: its step group is the whole group
        A^S_2   = norm_{same result}(R_O)    step 2's anchor is the search result (``turn2_groups``)
        turn 1  = A^E + omega * A^S_1,   turn 2 = A^E + omega * A^S_2

    ``turn2_groups`` (N,): anchor_groups of each rollout's first search result (None where none came back: such a
    rollout has no turn 2, and its A^S_2 is 0). A rollout alone in its result group gets A^S_2 = 0. Defaults:
    verl-agent's search recipe (step_advantage_w 1, gamma 0.95, mode mean_std_norm)."""
    if R_T.dim() != 1 or R_T.shape != R_O.shape or turn2_groups.shape != R_T.shape or has_result.shape != R_T.shape:
        raise ValueError(f"need R_T, R_O, turn2_groups and has_result of one shape (N,), got {tuple(R_T.shape)}, "
                         f"{tuple(R_O.shape)}, {tuple(turn2_groups.shape)}, {tuple(has_result.shape)}")
    if episode_norm not in ("steps", "trajectories"):
        raise ValueError(f"unknown episode_norm {episode_norm!r}: steps or trajectories")
    searched = has_result.bool()
    A_E = (normalise_over_steps(R_T + R_O, 1 + searched.long(), G) if episode_norm == "steps"
           else group_normalise(R_T + R_O, G))
    A_S1 = group_normalise(torch.where(searched, R_T + gamma * R_O, R_T + R_O), G)
    A_S2 = normalise_within(R_O, turn2_groups)
    return torch.stack([A_E + omega * A_S1, A_E + omega * A_S2], dim=1)


def gigpo(cfg, levels) -> Tensor:
    """GiGPO behind advantages.turn_advantages: its step groups before turn 2 are the rollouts of a question whose
    first search returned the same (or, below similarity 1, similar) text."""
    groups = anchor_groups(levels.first_results, cfg.G, cfg.gigpo_similarity)
    return gigpo_advantages(levels.R_T, levels.R_O, cfg.G, groups, levels.has_result, omega=cfg.omega,
                            gamma=cfg.gigpo_gamma, episode_norm=cfg.gigpo_episode_norm)


# ------------------------------------------------------------------------------------------ MT-PPO
def token_rewards(turn: Tensor, R_T: Tensor, R_O: Tensor) -> Tensor:
    """(N, T) the reward of each id: R_T at the last id of turn 1, R_O at the last id the model wrote (both at the
    same id when the rollout took one turn); 0 elsewhere. ``turn`` (N, T): each id's turn, 0 on the environment's,
    the prompt and padding (aligned as the update reads them: turn[:, 1:] of policy.pack)."""
    cols = torch.arange(turn.shape[1], device=turn.device).expand_as(turn)
    last = lambda keep: torch.where(keep, cols, -1).max(1).values  # noqa: E731  (-1: no such id)
    r = torch.zeros(turn.shape, dtype=torch.float32)
    for reward, at in ((R_T, last(turn == 1)), (R_O, last(turn > 0))):
        has = at >= 0
        r[has.nonzero().flatten(), at[has]] += reward[has].float()
    return r


def token_gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the model's ids, the others skipped (Schulman et al. 2016; as veRL's
    compute_gae_advantage_return). Over the ids t with ``mask`` True, from the last back, with V(after the
    episode) = 0:

        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,   return_t = A_t + V_t

    where V_next and A_next are those of the next *model* id: the environment's ids between two turns carry them
    through unchanged. All (N, T); A and the returns are 0 where ``mask`` is False."""
    mask = mask.to(values.dtype)
    A = torch.zeros_like(values)
    next_v = next_a = torch.zeros(values.shape[0], dtype=values.dtype)
    for t in reversed(range(values.shape[1])):
        a = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * next_a
        A[:, t] = a * mask[:, t]
        next_v = values[:, t] * mask[:, t] + next_v * (1 - mask[:, t])
        next_a = a * mask[:, t] + next_a * (1 - mask[:, t])
    return A, (A + values) * mask


def whiten(A: Tensor, mask: Tensor, total: float, total_sq: float, count: float) -> Tensor:
    """PPO's advantage whitening, (A - mean) / sqrt(var + 1e-8) over the batch's model ids (veRL's masked_whiten,
    variance with Bessel's correction), from the batch's sums of A and A^2 and its id count (all processes');
    0 where ``mask`` is False."""
    mean = total / count
    var = (total_sq / count - mean ** 2) * count / max(count - 1, 1)
    return torch.where(mask.bool(), (A - mean) / math.sqrt(max(var, 0.0) + WHITEN_EPS), torch.zeros_like(A))


def value_loss(v: Tensor, v_old: Tensor, returns: Tensor, mask: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss per id (as veRL's compute_value_loss, before its token mean):

        0.5 * max((v - return)^2, (v_old + clip(v - v_old, -clip, clip) - return)^2)

    and whether the clipped term was the larger (its share is logged). 0 where ``mask`` is False."""
    clipped = v_old + (v - v_old).clamp(-clip, clip)
    plain, held = (v - returns) ** 2, (clipped - returns) ** 2
    m = mask.to(v.dtype)
    return 0.5 * torch.max(plain, held) * m, (held > plain) & mask.bool()


class ValueModel(torch.nn.Module):
    """The critic: a decoder (a copy of the start policy's) and a linear value head on its last hidden state, V at
    every position. The head starts at 0, so the first step's advantages are the whitened returns."""

    def __init__(self, model, bf16: bool):
        super().__init__()
        self.trunk, self.bf16 = model.base_model, bf16
        self.head = torch.nn.Linear(model.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, ids: Tensor, attn: Tensor) -> Tensor:
        """(N, L-1): the value of the state before each id from the second on (aligned with token_logprobs)."""
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            h = self.trunk(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        return self.head(h.float()).squeeze(-1)


class Critic:
    """MT-PPO's critic, train.py's hook for an estimator with a model of its own. ``token_advantages`` values this
    process's rows, places the turn-level rewards and runs GAE, whitened over the whole batch; ``learn``, after
    the policy's update, takes mu passes of the clipped value loss toward this batch's returns (one optimizer step
    each, micro-batched and weighted over the global batch's model ids as the policy's "token" loss) and logs the
    loss, the clip share and the explained variance of the values the advantages used. A separate model, not a
    head on the policy's trunk: the value loss never moves the policy, and the policy's update is the same code
    for every method. Its cost: a second copy of the model and its AdamW state."""

    def __init__(self, cfg, accelerator, model_path, bf16: bool):
        from policy import load_policy

        self.cfg, self.accelerator = cfg, accelerator
        net = ValueModel(load_policy(model_path)[0], bf16).to(accelerator.device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.critic_lr, betas=cfg.adam_betas,
                                      weight_decay=CRITIC_WEIGHT_DECAY)
        self.net, self.optimizer = accelerator.prepare(net, optimizer)
        self.pending = None  # (batch, values, returns) of the batch whose advantages were computed last

    @torch.no_grad()
    def values(self, batch) -> Tensor:
        mb, device = self.cfg.micro_batch, self.accelerator.device
        return torch.cat([self.net(batch.ids[i:i + mb].to(device), batch.attn[i:i + mb].to(device)).float().cpu()
                          for i in range(0, len(batch.ids), mb)])

    def global_sums(self, *values: float) -> list[float]:
        return self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.accelerator.device),
                                       "sum").tolist()

    def token_advantages(self, levels, trajectories, batch, rows: slice) -> Tensor:
        mask = batch.turn[:, 1:] > 0
        r = token_rewards(batch.turn[:, 1:], levels.R_T[rows], levels.R_O[rows])
        V = self.values(batch) * mask
        A, returns = token_gae(r, V, mask, gamma=self.cfg.gamma, lam=self.cfg.gae_lam)
        self.pending = (batch, V, returns)
        return whiten(A, mask, *self.global_sums(A[mask].sum().item(), (A[mask] ** 2).sum().item(), mask.sum().item()))

    def learn(self) -> dict:
        (batch, V_old, returns), cfg, acc = self.pending, self.cfg, self.accelerator
        mask = batch.turn[:, 1:] > 0
        n_tokens = self.global_sums(mask.sum().item())[0]
        scale = acc.num_processes * acc.gradient_accumulation_steps  # as train.update: the weights sum to the batch's
        loss_sum = clipped = norm = 0.0
        for _ in range(cfg.mu):
            for i in range(0, len(batch.ids), cfg.micro_batch):
                rows = slice(i, i + cfg.micro_batch)
                with acc.accumulate(self.net):
                    v = self.net(batch.ids[rows].to(acc.device), batch.attn[rows].to(acc.device)).float().cpu()
                    losses, held = value_loss(v, V_old[rows], returns[rows], mask[rows], cfg.value_clip)
                    loss = losses.sum() / max(n_tokens, 1)
                    acc.backward(loss * scale)
                loss_sum, clipped = loss_sum + loss.item() / cfg.mu, clipped + held.sum().item() / cfg.mu
            norm += float(acc.clip_grad_norm_(self.net.parameters(), CRITIC_GRAD_CLIP)) / cfg.mu
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        loss_sum, clipped, ret_sum, ret_sq, err_sum, err_sq = self.global_sums(
            loss_sum, clipped, returns[mask].sum().item(), (returns[mask] ** 2).sum().item(),
            (returns - V_old)[mask].sum().item(), ((returns - V_old)[mask] ** 2).sum().item())
        var = lambda s, sq: sq / n_tokens - (s / n_tokens) ** 2  # noqa: E731
        return {"critic/value_loss": loss_sum, "critic/clip_frac": clipped / max(n_tokens, 1), "critic/grad_norm": norm,
                "critic/explained_variance": 1 - var(err_sum, err_sq) / var(ret_sum, ret_sq)
                if var(ret_sum, ret_sq) > 0 else float("nan")}

    def state_dict(self) -> dict:
        return {"model": self.accelerator.unwrap_model(self.net).state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.accelerator.unwrap_model(self.net).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
