"""MT-GRPO advantages and policy loss, by hand (Zeng et al., arXiv 2505.11821).

A rollout is two turns: turn 1 is everything the model writes before the search result (its
reasoning and the tool call), the environment answers with a <result>, turn 2 is everything the
model writes after it (its reasoning and the answer). Each rollout gets a turn-level reward R_T
(did the tool run, did the result contain the answer) and an outcome reward R_O (is the answer
right, is the format right). The G rollouts of one prompt form a group; every advantage below is a
reward normalised within its group (GRPO). The three methods differ in who gets what:

    GRPO-OR   every model token gets  A_O  = norm(R_O)         outcome only, trajectory level
    GRPO-MR   every model token gets  A_MR = norm(R_T + R_O)   merged, still trajectory level
    MT-GRPO   turn-1 tokens get A_T + lam*A_O (paper) or A_O + lam*A_T (seed code),
              turn-2 tokens get A_O                             turn-level credit assignment

(the two turn-1 forms: see DEVIATIONS.md, item 1). k_turn_advantages at the end carries this to
episodes of up to K turns.

The loss is GRPO's PPO-clip objective per token, with an optional k3 KL penalty.
Only torch: nothing here knows about text, tokenizers or search.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The values these functions take (config.py offers the same ones as settings; tests/test_mt_grpo.py pins them equal).
# The paper's three methods are computed here; the field's other estimators are extensions/estimators.py's.
PAPER_METHODS = ("mt_grpo", "grpo_or", "grpo_mr")
CONVENTIONS = ("seed", "paper")  # which advantage lam multiplies on turn 1, see turn_advantages
AGGREGATIONS = ("token", "micro_batch", "sequence")  # how the per-token loss is averaged, see policy_loss
NORMALISATIONS = ("masked", "naive")  # how k_turn_advantages normalises turn k's reward, see there
STD_EPS = 1e-4  # the eps in (R - mean) / (std + eps): see DEVIATIONS.md, item 3


@dataclass
class Levels:
    """A batch's rewards by level, one row per rollout (advantages.reward_levels builds it from rewards.py's)."""
    R_T: Tensor                   # (N,) the turn-level reward R^T; K-turn: (N, K-1), one per tool call
    R_O: Tensor                   # (N,) the outcome reward R^O
    has_result: Tensor            # (N,) bool: a <result> came back, so MT-GRPO's turn 1 exists
    turns: Tensor | None = None   # (N,) the turns each rollout took (K-turn only)
    first_results: list | None = None  # (N,) each rollout's first search result, or None (GiGPO's anchor states)


def check_method(method: str) -> str:
    """Return `method` if it is one of the paper's methods computed here, else raise ValueError naming them."""
    if method not in PAPER_METHODS:
        raise ValueError(f"unknown method {method!r}; mt_grpo.py computes {', '.join(PAPER_METHODS)}")
    return method


def _groups(R: Tensor, G: int) -> Tensor:
    """View the reward vector R (N,) as (N/G, G): row j holds the rollouts i with i // G == j."""
    if R.dim() != 1:
        raise ValueError(f"expected a reward vector of shape (N,), got shape {tuple(R.shape)}")
    N = R.shape[0]
    if G < 2:
        raise ValueError(f"group size G must be >= 2 to compare rollouts of one prompt, got G={G}")
    if N == 0 or N % G != 0:
        raise ValueError(f"N={N} rollouts do not split into whole groups of G={G} (need N % G == 0, N > 0)")
    return R.reshape(N // G, G)


def flat_groups(R: Tensor, G: int) -> Tensor:
    """(N/G,) bool: True for groups whose G rewards are all equal (zero variance, no signal)."""
    R_g = _groups(R, G)
    return (R_g == R_g[:, :1]).all(dim=1)


def group_normalise(R: Tensor, G: int) -> Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, sec. 4.1.2; the MT-GRPO paper's norm):

        A_i = (R_i - mean_G(R)) / (std_G(R) + 1e-4),   std with Bessel's correction.

    Groups whose rewards are all equal get exactly 0: in floating point mean(R) need not equal
    R_i (e.g. 21 x 1.9 in float32), and (R_i - mean) / (tiny std + 1e-4) is then ~1e-3, not 0
    (see DEVIATIONS.md, item 3).
    """
    R = R if R.is_floating_point() else R.to(torch.get_default_dtype())
    R_g = _groups(R, G)
    A = (R_g - R_g.mean(dim=1, keepdim=True)) / (R_g.std(dim=1, keepdim=True) + STD_EPS)
    A = torch.where(flat_groups(R, G)[:, None], torch.zeros_like(A), A)
    return A.reshape(-1)


def turn_advantages(R_T: Tensor, R_O: Tensor, G: int, method: str = "mt_grpo", *, lam: float = 1.0,
                    convention: str = "seed", has_result: Tensor | None = None) -> Tensor:
    """Per-turn advantages, shape (N, K) with K = 2: column k-1 is the advantage of model turn k.

    With A_T = norm(R_T), A_O = norm(R_O), A_MR = norm(R_T + R_O), each over groups of G:
      grpo_or:  (A_O, A_O)          grpo_mr:  (A_MR, A_MR)
      mt_grpo:  (A_T + lam*A_O, A_O)  if convention == "paper"  (the paper's MT-GRPO advantage)
                (A_O + lam*A_T, A_O)  if convention == "seed"   (the seed code: turn 1 gets
                                      A_O on every token plus lam*A_T before the result)
      The two agree at lam = 1, the paper's setting (see DEVIATIONS.md, item 1).
    MT-GRPO rows with has_result False (no <result> came back, so "turn 1" is undefined) fall
    back to (A_MR, A_MR); has_result is ignored by the trajectory-level methods. All three
    normalisations run over the whole group, rollouts without a result included (see
    DEVIATIONS.md, item 2).

    R_T is (N,), the turn-level reward of turn 1; k_turn_advantages takes R_T of shape (N, K-1).
    """
    check_method(method)
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid conventions are {', '.join(CONVENTIONS)}")
    if R_T.dim() != 1:
        raise ValueError("R_T must have shape (N,) (two turns); for K turns use k_turn_advantages")
    if R_T.shape != R_O.shape:
        raise ValueError(f"R_T {tuple(R_T.shape)} and R_O {tuple(R_O.shape)} must have the same shape")
    A_O = group_normalise(R_O, G)
    A_MR = group_normalise(R_T + R_O, G)
    if method == "grpo_or":
        return torch.stack([A_O, A_O], dim=1)
    if method == "grpo_mr":
        return torch.stack([A_MR, A_MR], dim=1)
    A_T = group_normalise(R_T, G)
    turn1 = A_T + lam * A_O if convention == "paper" else A_O + lam * A_T
    A = torch.stack([turn1, A_O], dim=1)
    if has_result is not None:
        if has_result.shape != R_O.shape:
            raise ValueError(f"has_result must have shape {tuple(R_O.shape)}, got {tuple(has_result.shape)}")
        A = torch.where(has_result.bool()[:, None], A, A_MR[:, None].expand_as(A))
    return A


def loss_mask(turn_idx: Tensor) -> Tensor:
    """(N, T) bool: True on the model's own tokens (turn index >= 1), the only ones trained on."""
    return turn_idx > 0


def token_advantages(A: Tensor, turn_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Spread per-turn advantages A (N, K) over tokens; returns (A_tok (N, T), mask (N, T)).

    turn_idx (N, T) ints: 0 = prompt, environment (<result>) or padding token: advantage 0 and
    masked out; k >= 1 = a token the model wrote in turn k: A[:, k-1]. Turns beyond K share the
    last column: with the two-turn A, everything after the first result gets A_O however many
    searches followed (the seed's split).
    A bool mask also works as turn_idx: every True token then counts as turn 1.
    """
    if A.dim() != 2 or turn_idx.dim() != 2 or A.shape[0] != turn_idx.shape[0]:
        raise ValueError(f"need A (N, K) and turn_idx (N, T), got {tuple(A.shape)} and {tuple(turn_idx.shape)}")
    turn_idx = turn_idx.long()
    if (turn_idx < 0).any():
        raise ValueError("turn indices must be >= 0")
    mask = loss_mask(turn_idx)
    col = turn_idx.clamp(min=1, max=A.shape[1]) - 1
    A_tok = torch.where(mask, A.gather(1, col), A.new_zeros(()))
    return A_tok, mask


def policy_loss(logp_new: Tensor, logp_old: Tensor, logp_ref: Tensor | None, A_tok: Tensor,
                turn_idx: Tensor, *, eps: float = 0.2, beta: float = 0.0,
                aggregation: str = "token") -> tuple[Tensor, dict[str, float]]:
    """GRPO's clipped surrogate per token (PPO, Schulman et al. 2017, eq. 7; GRPO eq. 3):

        ratio_t = exp(logp_new_t - logp_old_t)
        loss_t  = -min(ratio_t * A_t, clip(ratio_t, 1-eps, 1+eps) * A_t) + beta * KL_t
        KL_t    = exp(logp_ref_t - logp_new_t) - (logp_ref_t - logp_new_t) - 1   (k3, GRPO eq. 4)

    All tensors are (N, T) over the same tokens; turn_idx (or a bool mask) selects the model's tokens (> 0).
    aggregation "token": the mean of loss_t over those tokens, every token weighing the same. "micro_batch" (the
    seed's, and TRL's at the commit it pins): that mean per micro-batch, which train.update averages, so a token
    weighs 1 / (tokens of its micro-batch). "sequence" (GRPO paper): the mean over each rollout's tokens, then over
    rollouts (one without tokens counts as 0, like TRL). See DEVIATIONS.md, item 4. With one pass over a batch
    (mu = 1) logp_old is logp_new detached: the ratio is 1 and the loss the plain policy gradient -A_t * logp_t;
    the clip acts on the later passes of mu > 1. Returns the loss and, as floats, clip_frac (the share of tokens
    whose gradient the clip removed) and kl (mean KL_t; only if beta > 0).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid ones are {', '.join(AGGREGATIONS)}")
    if beta > 0 and logp_ref is None:
        raise ValueError("beta > 0 needs logp_ref (log-probs of the reference policy)")
    turn_idx = turn_idx.long()
    mask = loss_mask(turn_idx)
    m = mask.to(logp_new.dtype)

    ratio = torch.exp(logp_new - logp_old)
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
    loss_t = -torch.min(ratio * A_tok, clipped * A_tok)
    if beta > 0:
        d = logp_ref - logp_new
        KL_t = torch.exp(d) - d - 1
        loss_t = loss_t + beta * KL_t

    if aggregation in ("token", "micro_batch"):
        loss = (loss_t * m).sum() / m.sum().clamp(min=1)
    else:
        loss = ((loss_t * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()

    with torch.no_grad():
        n = m.sum().clamp(min=1)
        # the min() picks the clipped term, whose gradient is 0, exactly in these two cases
        is_clipped = ((ratio > 1 + eps) & (A_tok > 0)) | ((ratio < 1 - eps) & (A_tok < 0))
        stats = {"clip_frac": ((is_clipped & mask).sum() / n).item()}
        if beta > 0:
            stats["kl"] = ((KL_t * m).sum() / n).item()
    return loss, stats


def collapse_stats(R_T: Tensor, R_O: Tensor, G: int) -> dict[str, float]:
    """Share of groups with zero reward variance, per reward level. Such a group gives that
    reward's advantage 0 for all its rollouts: a share near 1 means that signal has collapsed
    (e.g. the policy stopped calling the tool, so R_T is 0 everywhere)."""
    return {"zero_var_share/turn": flat_groups(R_T, G).float().mean().item(),
            "zero_var_share/outcome": flat_groups(R_O, G).float().mean().item()}


# ------------------------------------------------------------------------ K turns
#
# With up to K-1 tool calls a rollout takes T_i <= K turns: turns 1..T_i-1 each end in a tool call
# whose result starts the next turn, turn T_i is its last (normally the answer). Turn k has its own
# turn-level reward R_T^k (did call k run, did its result bring new evidence). The two-turn
# advantage carried on, return-to-go style (see DEVIATIONS.md, item 16), in the paper's convention:
#
#     A_i,T_i = A_O_i                               the last turn: the outcome advantage
#     A_i,k   = A_T^k_i + lam * A_i,k+1   (k < T_i)  its own turn advantage plus lam x what follows
#
# (seed convention: A_i,k+1 + lam * A_T^k_i; both give the two-turn formulas at K = 2).


def masked_group_normalise(R: Tensor, present: Tensor, G: int) -> Tensor:
    """group_normalise over only the rollouts with ``present`` True; the others get 0, and so does
    every rollout of a group with fewer than 2 present (nothing to compare with).

    Why: at turn k >= 2 only the rollouts that took turn k have an R_T^k. Filling the others with 0
    and normalising over all G (the naive way) compares a turn with turns that never happened: when
    most rollouts stop early, every rollout that went on looks better than average whatever its
    turn was worth, and the policy learns to take more turns for their own sake.
    tests/test_mt_grpo.py shows that case. When every rollout is present this *is* group_normalise.
    """
    if present.shape != R.shape:
        raise ValueError(f"present must have shape {tuple(R.shape)}, got {tuple(present.shape)}")
    present = present.bool()
    if present.all():
        return group_normalise(R, G)
    _groups(R, G)  # shape checks
    A = torch.zeros_like(R if R.is_floating_point() else R.float())
    for start in range(0, R.shape[0], G):
        idx = start + present[start:start + G].nonzero().flatten()
        if idx.numel() >= 2:
            A[idx] = group_normalise(R[idx], idx.numel())
    return A


def turn_normalise(R: Tensor, present: Tensor, G: int, normalise: str = "masked") -> Tensor:
    """A_T^k of one turn: "masked" normalises over the rollouts that took the turn (masked_group_normalise);
    "naive" over all G, a turn never taken counting as reward 0 (group_normalise of the zero-filled R).
    The naive one is kept to measure its bias (bench/bench_credit.py): it rates every rollout that went on
    above the ones that stopped, whatever its turn was worth."""
    if normalise not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalise!r}; valid ones are {', '.join(NORMALISATIONS)}")
    return masked_group_normalise(R, present, G) if normalise == "masked" else group_normalise(R, G)


def k_turn_advantages(R_T: Tensor, R_O: Tensor, turns: Tensor, G: int, method: str = "mt_grpo", *,
                      lam: float = 1.0, convention: str = "seed", has_result: Tensor | None = None,
                      normalise: str = "masked") -> Tensor:
    """Per-turn advantages for episodes of up to K turns, shape (N, K) with K = R_T.shape[1] + 1.

    R_T (N, K-1): R_T[i, k-1] = turn-level reward of rollout i's turn k (its k-th tool call; 0 when
    it made none). turns (N,) ints in 1..K: the turns rollout i took (its largest turn index).
    A_T^k is normalised among the rollouts that took turn k (masked_group_normalise; ``normalise="naive"``:
    over all G with 0 for a turn not taken, see turn_normalise); A_O and A_MR over the whole group. grpo_or / grpo_mr give every turn A_O / A_MR = norm(sum_k R_T^k + R_O).
    Like turn_advantages, MT-GRPO rows with has_result False fall back to A_MR on every turn.
    Columns past a rollout's last turn hold A_O; no token reads them. At K = 2 (R_T of shape
    (N, 1)) this returns turn_advantages(R_T[:, 0], ...) bit for bit.
    """
    check_method(method)
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid conventions are {', '.join(CONVENTIONS)}")
    if normalise not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalise!r}; valid ones are {', '.join(NORMALISATIONS)}")
    if R_T.dim() != 2 or R_T.shape[0] != R_O.shape[0] or turns.shape != R_O.shape:
        raise ValueError(f"need R_T (N, K-1), R_O (N,), turns (N,); got {tuple(R_T.shape)}, "
                         f"{tuple(R_O.shape)}, {tuple(turns.shape)}")
    K = R_T.shape[1] + 1
    turns = turns.long()
    if (turns < 1).any() or (turns > K).any():
        raise ValueError(f"turns must lie in 1..{K}")
    A_O = group_normalise(R_O, G)
    A_MR = group_normalise(R_T.sum(dim=1) + R_O if K > 2 else R_T[:, 0] + R_O, G)
    if method == "grpo_or":
        return A_O[:, None].repeat(1, K)
    if method == "grpo_mr":
        return A_MR[:, None].repeat(1, K)
    A = A_O[:, None].repeat(1, K)  # the last turn's value; filled backwards below
    for k in range(K - 1, 0, -1):  # turn k = column k-1, from the second-to-last turn back to turn 1
        A_T = turn_normalise(R_T[:, k - 1], turns >= k, G, normalise)
        nxt = A[:, k]
        own = A_T + lam * nxt if convention == "paper" else nxt + lam * A_T
        A[:, k - 1] = torch.where(turns > k, own, A[:, k - 1])  # only turns followed by another turn
    if has_result is not None:
        if has_result.shape != R_O.shape:
            raise ValueError(f"has_result must have shape {tuple(R_O.shape)}, got {tuple(has_result.shape)}")
        A = torch.where(has_result.bool()[:, None], A, A_MR[:, None].expand_as(A))
    return A
