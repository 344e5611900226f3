"""mt_grpo.py as a worked example: one group of G = 4 rollouts, advantages by hand.

Read with the paper (arXiv 2505.11821) open. Every rollout: prompt -> turn 1 (reason, call
wiki_search) -> <result> from the environment -> turn 2 (answer). Rewards (rewards.py):
R_T = tool execution (0..0.2) + search result has the answer (0 or 0.5), max 0.7;
R_O = answer presence (0.5) + exact match (1.0) + format (..0.2) + XML (..0.2), max 1.9.

    rollout  story                                          R_T   R_O
    1        search found the answer, answered correctly    0.7   1.9
    2        search found the answer, answered wrongly      0.7   0.4
    3        search missed, but the answer was right anyway 0.2   1.9
    4        tool call failed (Error: ...), wrong answer    0.0   0.2

Rollout 2 is the case the paper is about: its first turn was good, its outcome was bad.
GRPO-OR punishes the good search; MT-GRPO credits it through A_T.

Hand arithmetic (G = 4, Bessel: divide the squared deviations by G - 1 = 3; eps = 1e-4):

  R_T : mean = (0.7+0.7+0.2+0.0)/4 = 0.4;  deviations  0.3, 0.3, -0.2, -0.4
        std = sqrt((0.09+0.09+0.04+0.16)/3) = sqrt(0.126667) = 0.355903;  std+eps = 0.356003
        A_T = 0.3/0.356003, ... =  0.8427,  0.8427, -0.5618, -1.1236
  R_O : mean = (1.9+0.4+1.9+0.2)/4 = 1.1;  deviations  0.8, -0.7, 0.8, -0.9
        std = sqrt((0.64+0.49+0.64+0.81)/3) = sqrt(0.86) = 0.927362;  std+eps = 0.927462
        A_O =  0.8626, -0.7547,  0.8626, -0.9704
  R_T + R_O = 2.6, 1.1, 2.1, 0.2 : mean = 1.5;  deviations  1.1, -0.4, 0.6, -1.3
        std = sqrt((1.21+0.16+0.36+1.69)/3) = sqrt(1.14) = 1.067708;  std+eps = 1.067808
        A_MR =  1.0301, -0.3746,  0.5619, -1.2174
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import mt_grpo
from mt_grpo import collapse_stats, group_normalise, policy_loss, token_advantages, turn_advantages

DT = torch.float64
G = 4
R_T = torch.tensor([0.7, 0.7, 0.2, 0.0], dtype=DT)
R_O = torch.tensor([1.9, 0.4, 1.9, 0.2], dtype=DT)

A_T = torch.tensor([0.8427, 0.8427, -0.5618, -1.1236], dtype=DT)
A_O = torch.tensor([0.8626, -0.7547, 0.8626, -0.9704], dtype=DT)
A_MR = torch.tensor([1.0301, -0.3746, 0.5619, -1.2174], dtype=DT)

# Token layout, one row per rollout: 0 = prompt / <result> / padding, k = the model's turn k.
#               prompt  turn 1    result  turn 2  pad
TURN_IDX = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 2, 2, 0],
                         [0, 0, 1, 1, 0, 0, 2, 2, 2, 0],
                         [0, 0, 1, 1, 1, 1, 0, 0, 2, 2],
                         [0, 0, 1, 0, 0, 2, 0, 0, 0, 0]])

HAND = dict(atol=1e-4, rtol=0)  # hand values are rounded to 4 decimals


def test_group_normalisation_by_hand():
    torch.testing.assert_close(group_normalise(R_T, G), A_T, **HAND)
    torch.testing.assert_close(group_normalise(R_O, G), A_O, **HAND)
    torch.testing.assert_close(group_normalise(R_T + R_O, G), A_MR, **HAND)


def test_grpo_or_gives_every_turn_the_outcome_advantage():
    # Rollout 2's good search gets A_O = -0.7547 on both turns: punished for the bad answer.
    A = turn_advantages(R_T, R_O, G, "grpo_or")
    torch.testing.assert_close(A, torch.stack([A_O, A_O], 1), **HAND)


def test_grpo_mr_gives_every_turn_the_merged_advantage():
    # Merging helps a little (rollout 2: -0.3746 instead of -0.7547) but still one number per rollout.
    A = turn_advantages(R_T, R_O, G, "grpo_mr")
    torch.testing.assert_close(A, torch.stack([A_MR, A_MR], 1), **HAND)


def test_mt_grpo_at_lambda_1_by_hand():
    # turn 1 = A_O + A_T:  0.8626+0.8427 = 1.7053 | -0.7547+0.8427 = 0.0879
    #                      0.8626-0.5618 = 0.3008 | -0.9704-1.1236 = -2.0940
    # turn 2 = A_O.  Rollout 2's search turn is now (slightly) positive.
    expected = torch.tensor([[1.7053, 0.8626], [0.0879, -0.7547],
                             [0.3008, 0.8626], [-2.0940, -0.9704]], dtype=DT)
    for convention in mt_grpo.CONVENTIONS:  # at lam = 1 the two conventions agree
        A = turn_advantages(R_T, R_O, G, "mt_grpo", lam=1.0, convention=convention)
        torch.testing.assert_close(A, expected, **HAND)


def test_token_advantages_by_hand():
    A_tok, mask = token_advantages(turn_advantages(R_T, R_O, G, "mt_grpo"), TURN_IDX)
    a, b = 0.0879, -0.7547  # rollout 2: turn-1 and turn-2 advantages from above
    torch.testing.assert_close(A_tok[1], torch.tensor([0, 0, a, a, 0, 0, b, b, b, 0], dtype=DT), **HAND)
    c, d = -2.0940, -0.9704  # rollout 4: one turn-1 token, one turn-2 token
    torch.testing.assert_close(A_tok[3], torch.tensor([0, 0, c, 0, 0, d, 0, 0, 0, 0], dtype=DT), **HAND)
    assert torch.equal(mask, TURN_IDX > 0)
    assert torch.all(A_tok[~mask] == 0)  # prompt, <result> and padding carry no advantage

    # the trajectory-level methods put one number on every model token of a rollout
    A_tok, _ = token_advantages(turn_advantages(R_T, R_O, G, "grpo_or"), TURN_IDX)
    torch.testing.assert_close(A_tok[1], torch.tensor([0, 0, b, b, 0, 0, b, b, b, 0], dtype=DT), **HAND)
    A_tok, _ = token_advantages(turn_advantages(R_T, R_O, G, "grpo_mr"), TURN_IDX)
    e = -0.3746
    torch.testing.assert_close(A_tok[1], torch.tensor([0, 0, e, e, 0, 0, e, e, e, 0], dtype=DT), **HAND)


def test_lambda_conventions_differ_away_from_1():
    # lam = 0.5, turn 1:
    #   seed  A_O + 0.5*A_T:  0.8626+0.4213 = 1.2839 | -0.7547+0.4213 = -0.3334
    #                         0.8626-0.2809 = 0.5817 | -0.9704-0.5618 = -1.5322
    #   paper A_T + 0.5*A_O:  0.8427+0.4313 = 1.2740 |  0.8427-0.3774 =  0.4653
    #                        -0.5618+0.4313 = -0.1305| -1.1236-0.4852 = -1.6088
    # Rollout 2's good search is punished under the seed's reading and rewarded under the
    # paper's; rollout 3's lucky miss the other way round. Turn 2 is A_O either way.
    seed = turn_advantages(R_T, R_O, G, lam=0.5, convention="seed")
    paper = turn_advantages(R_T, R_O, G, lam=0.5, convention="paper")
    torch.testing.assert_close(seed[:, 0], torch.tensor([1.2839, -0.3334, 0.5817, -1.5322], dtype=DT), **HAND)
    torch.testing.assert_close(paper[:, 0], torch.tensor([1.2740, 0.4653, -0.1305, -1.6088], dtype=DT), **HAND)
    torch.testing.assert_close(seed[:, 1], A_O, **HAND)
    torch.testing.assert_close(paper[:, 1], A_O, **HAND)
    assert seed[1, 0] < 0 < paper[1, 0]


def test_zero_variance_group_is_exactly_zero():
    # The paper's G = 21, all outcomes 1.9, float32: mean(R) is off by one ulp, so the bare
    # formula gives (1.2e-7) / (1.2e-7 + 1e-4) ~ 1e-3 instead of 0. We return exactly 0.
    R = torch.full((21,), 1.9, dtype=torch.float32)
    naive = (R - R.mean()) / (R.std() + 1e-4)
    assert naive.abs().max() > 1e-4  # the trap is real
    A = group_normalise(R, 21)
    assert torch.equal(A, torch.zeros(21))

    # A group whose turn rewards are all equal (nobody found the answer) but outcomes differ:
    # A_T = 0, so MT-GRPO's turn 1 reduces to A_O; a flat group in both is all zeros, no NaN.
    R_T2 = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.7, 0.7, 0.7, 0.7], dtype=DT)
    R_O2 = torch.tensor([1.9, 0.4, 1.9, 0.2, 1.9, 1.9, 1.9, 1.9], dtype=DT)
    A = turn_advantages(R_T2, R_O2, G, "mt_grpo")
    torch.testing.assert_close(A[:4, 0], A_O, **HAND)
    assert torch.equal(A[4:], torch.zeros(4, 2, dtype=DT))
    assert collapse_stats(R_T2, R_O2, G) == {"zero_var_share/turn": 1.0, "zero_var_share/outcome": 0.5}
    assert collapse_stats(R_T, R_O, G) == {"zero_var_share/turn": 0.0, "zero_var_share/outcome": 0.0}


def test_rollout_without_tool_result_falls_back_to_merged_advantage():
    # Say rollout 4's tool call never parsed, so no <result> came back: there is no "turn before
    # the result" to credit, and the seed gives the whole rollout A_MR = -1.2174. The others keep
    # their MT-GRPO values (normalisation still runs over all 4 rollouts).
    has_result = torch.tensor([True, True, True, False])
    A = turn_advantages(R_T, R_O, G, "mt_grpo", has_result=has_result)
    torch.testing.assert_close(A[3], torch.tensor([-1.2174, -1.2174], dtype=DT), **HAND)
    torch.testing.assert_close(A[:3], turn_advantages(R_T, R_O, G, "mt_grpo")[:3])
    # the trajectory-level methods ignore has_result
    torch.testing.assert_close(turn_advantages(R_T, R_O, G, "grpo_or", has_result=has_result)[3],
                               torch.stack([A_O[3], A_O[3]]), **HAND)


def test_groups_are_consecutive_rollouts():
    # Two prompts, G = 4 each: rollout i belongs to group i // 4, so the second group's rewards
    # (shifted by +10 and doubled) must not leak into the first group's statistics.
    R = torch.cat([R_O, 10 + 2 * R_O])
    A = group_normalise(R, G)
    torch.testing.assert_close(A[:4], A_O, **HAND)
    # doubling the spread doubles the std, so the advantages are the same up to eps
    torch.testing.assert_close(A[4:], A_O, atol=2e-4, rtol=0)
    # normalising over one group of 8 instead would give different numbers
    assert not torch.allclose(group_normalise(R, 8)[:4], A[:4], atol=1e-2)


def test_turns_beyond_K_get_the_last_column():
    A = torch.tensor([[1.0, -2.0]], dtype=DT)
    A_tok, mask = token_advantages(A, torch.tensor([[0, 1, 0, 2, 0, 3, 4]]))
    assert A_tok.tolist() == [[0.0, 1.0, 0.0, -2.0, 0.0, -2.0, -2.0]]
    assert mask.tolist() == [[False, True, False, True, False, True, True]]


@pytest.mark.parametrize("call, message", [
    (lambda: group_normalise(R_O, 1), "G must be >= 2"),
    (lambda: group_normalise(R_O[:3], 2), "N % G == 0"),
    (lambda: turn_advantages(R_T[:3], R_O[:3], 2), "N % G == 0"),
    (lambda: turn_advantages(R_T, R_O, 4, "ppo"), "mt_grpo, grpo_or, grpo_mr"),
    (lambda: turn_advantages(R_T, R_O, 4, convention="other"), "seed, paper"),
    (lambda: turn_advantages(R_T[:, None].repeat(1, 2), R_O, 4), "for K turns use k_turn_advantages"),
    (lambda: turn_advantages(R_T, R_O, 4, has_result=torch.ones(3, dtype=torch.bool)), "has_result"),
    (lambda: token_advantages(torch.zeros(4, 2), -TURN_IDX), ">= 0"),
    (lambda: policy_loss(*[torch.zeros(4, 10)] * 2, None, torch.zeros(4, 10), TURN_IDX, beta=0.1), "logp_ref"),
    (lambda: policy_loss(*[torch.zeros(4, 10)] * 3, torch.zeros(4, 10), TURN_IDX, aggregation="x"), "token, micro_batch, sequence"),
])
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def random_batch(seed: int, N: int = 8, T: int = 12):
    """Random float64 log-probs. logp_old is off by ~0.3 nats so that some ratios leave [0.8, 1.2]."""
    g = torch.Generator().manual_seed(seed)
    logp_new = -torch.rand(N, T, generator=g, dtype=DT) * 3
    logp_old = logp_new + 0.3 * torch.randn(N, T, generator=g, dtype=DT)
    logp_ref = logp_new + 0.3 * torch.randn(N, T, generator=g, dtype=DT)
    R_T = torch.randint(0, 8, (N,), generator=g).to(DT) / 10
    R_O = torch.randint(0, 20, (N,), generator=g).to(DT) / 10
    # rollouts of different lengths: prompt (2), turn 1, result (2), turn 2, padding
    turn_idx = torch.zeros(N, T, dtype=torch.long)
    for i in range(N):
        t1, t2 = 1 + i % 3, 1 + (i * 5) % 4
        turn_idx[i, 2:2 + t1] = 1
        turn_idx[i, 4 + t1:4 + t1 + t2] = 2
    length = 4 + (turn_idx > 0).sum(1)  # everything up to the last turn-2 token is "completion"
    return logp_new, logp_old, logp_ref, R_T, R_O, turn_idx, length


def test_gradient_with_one_iteration_is_minus_A_over_token_count():
    # mu = 1: logp_old = logp_new.detach(), so ratio = 1, nothing is clipped, and
    # d loss / d logp_t = -A_t * ratio_t / n = -A_t / n on each of the n unmasked tokens.
    logp_new, _, _, R_T, R_O, turn_idx, _ = random_batch(0)
    A_tok, mask = token_advantages(turn_advantages(R_T, R_O, G, lam=0.7), turn_idx)
    logp = logp_new.clone().requires_grad_()
    loss, stats = policy_loss(logp, logp.detach(), None, A_tok, turn_idx)
    loss.backward()
    n = mask.sum()
    torch.testing.assert_close(logp.grad[mask], -A_tok[mask] / n)
    assert torch.all(logp.grad[~mask] == 0)
    assert stats["clip_frac"] == 0.0
    assert logp.grad[mask].abs().max() > 0  # the check above is not vacuous


def test_diagnostics_by_hand():
    A_tok, _ = token_advantages(turn_advantages(R_T, R_O, G), TURN_IDX)
    logp = torch.zeros(4, 10, dtype=DT)
    old = logp.clone()
    old[0, 2] = -1.0  # ratio e = 2.72 > 1.2 on a token with A = 1.7053 > 0: clipped
    old[1, 6] = 1.0   # ratio 1/e = 0.37 < 0.8 on a token with A = -0.7547 < 0: clipped
    old[2, 2] = 1.0   # ratio 0.37 but A = 0.3008 > 0: min() keeps the unclipped term
    _, stats = policy_loss(logp, old, logp, A_tok, TURN_IDX, beta=0.1)
    assert stats["clip_frac"] == pytest.approx(2 / 18)  # 2 of the 18 model tokens in TURN_IDX
    assert stats["kl"] == 0.0  # logp_ref == logp_new


def test_turn_advantage_means_by_hand():
    """What train.update logs as adv_mean/turn{k}: the token-weighted mean advantage of each turn."""
    from accelerate import Accelerator

    import train
    A_tok, _ = token_advantages(turn_advantages(R_T, R_O, G), TURN_IDX)
    means = train.turn_advantage_means(A_tok, TURN_IDX, Accelerator(cpu=True))
    # turn 1 has 3+2+4+1 tokens, turn 2 has 2+3+2+1
    # turn 1: (3*1.7053 + 2*0.0879 + 4*0.3008 - 2.0940) / 10 = 4.4009 / 10 = 0.4401
    # turn 2: (2*0.8626 - 3*0.7547 + 2*0.8626 - 0.9704) / 8 = 0.2159 / 8 = 0.0270
    assert means == {"adv_mean/turn1": pytest.approx(0.4401, abs=1e-4), "adv_mean/turn2": pytest.approx(0.0270, abs=1e-4)}


# --- Cross-check against an independent implementation: TRL's GRPOTrainer -----------------
# TRL computes the loss inside GRPOTrainer._compute_loss(self, model, inputs), which first runs
# the model to get per-token log-probs. We call that real method with a stub `self` carrying
# only the attributes it reads, whose log-prob function hands back our tensor instead of
# running a model. Everything after that (ratio, clip, KL, masking, aggregation) is TRL's code.

def trl_loss(logp_new, logp_old, logp_ref, advantages, completion_mask, tool_mask, *, eps, beta, loss_type):
    from trl.trainer.grpo_trainer import GRPOTrainer

    N, T = logp_new.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp_new, torch.zeros_like(logp_new), None),
        loss_type=loss_type, beta=beta, epsilon_low=eps, epsilon_high=eps,
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x),
        _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1, dtype=torch.long),
        "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": completion_mask,
        "tool_mask": tool_mask,  # TRL's own multi-turn mask: 0 on tool-output tokens
        "advantages": advantages, "old_per_token_logps": logp_old, "ref_per_token_logps": logp_ref,
    }
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("method", ["grpo_or", "grpo_mr"])
@pytest.mark.parametrize("aggregation, loss_type", [("token", "bnpo"), ("sequence", "grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_trajectory_methods_match_trl(method, aggregation, loss_type, beta):
    logp_new, logp_old, logp_ref, R_T, R_O, turn_idx, length = random_batch(1)
    A = turn_advantages(R_T, R_O, G, method)
    A_tok, mask = token_advantages(A, turn_idx)

    ours_logp = logp_new.clone().requires_grad_()
    ours, stats = policy_loss(ours_logp, logp_old, logp_ref, A_tok, turn_idx,
                              eps=0.2, beta=beta, aggregation=aggregation)
    ours.backward()

    # TRL gets the trajectory-level advantage as one number per rollout (its native (B,) form),
    # a completion mask (everything after the prompt, before padding) and a tool mask (0 on
    # the <result> tokens); their product is our turn_idx > 0.
    position = torch.arange(turn_idx.shape[1])
    completion_mask = ((position >= 2) & (position < length[:, None])).to(DT)
    tool_mask = (mask | (completion_mask == 0)).to(DT)
    assert torch.equal(completion_mask * tool_mask, mask.to(DT))
    trl_logp = logp_new.clone().requires_grad_()
    theirs, metrics = trl_loss(trl_logp, logp_old, logp_ref, A[:, 0], completion_mask, tool_mask,
                               eps=0.2, beta=beta, loss_type=loss_type)
    theirs.backward()

    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad, atol=1e-10, rtol=0)
    assert 0 < stats["clip_frac"] < 1  # some tokens were clipped, so the clip path was exercised
    assert stats["clip_frac"] == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-12)
    if beta > 0:
        assert stats["kl"] == pytest.approx(metrics["kl"][0], abs=1e-12)


def test_mt_grpo_token_advantages_match_trl():
    # TRL also accepts (B, T) advantages, so the turn-level method can be checked the same way.
    logp_new, logp_old, logp_ref, R_T, R_O, turn_idx, _ = random_batch(2)
    A_tok, mask = token_advantages(turn_advantages(R_T, R_O, G, "mt_grpo", lam=0.5), turn_idx)
    ours_logp, trl_logp = logp_new.clone().requires_grad_(), logp_new.clone().requires_grad_()
    ours, _ = policy_loss(ours_logp, logp_old, logp_ref, A_tok, turn_idx, beta=0.04)
    theirs, _ = trl_loss(trl_logp, logp_old, logp_ref, A_tok, mask.to(DT), torch.ones_like(logp_new),
                         eps=0.2, beta=0.04, loss_type="bnpo")
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad, atol=1e-10, rtol=0)


# --- Beyond two turns: K-turn MT-GRPO with variable-length episodes -------------------------------
#
# K = 3: up to two searches, then an answer. Four rollouts of a two-hop question ("which river lies
# at the town where X was born?": search X -> the town; search the town -> the river):
#
#    rollout  story                                               turns  R_T^1  R_T^2  R_O
#    1        searched X (found the town), searched it, right       3     0.7    0.7   1.9
#    2        searched X (found the town), searched it, wrong       3     0.7    0.7   0.4
#    3        searched X (found the town), then guessed, wrong      2     0.7    0.0   0.4
#    4        searched badly (no town), searched again (found it)   3     0.2    0.7   0.4
#
# Turn 1 and turn 2 were taken by all four (rollout 3's turn 2 is its answer: no call, R_T^2 = 0).

from mt_grpo import k_turn_advantages, masked_group_normalise  # noqa: E402


def two_hop_group():
    R_T = torch.tensor([[0.7, 0.7], [0.7, 0.7], [0.7, 0.0], [0.2, 0.7]], dtype=DT)
    R_O = torch.tensor([1.9, 0.4, 0.4, 0.4], dtype=DT)
    turns = torch.tensor([3, 3, 2, 3])
    return R_T, R_O, turns


def test_k_turn_mt_grpo_by_hand():
    """A_3 = A_O; A_2 = A_T^2 + lam*A_3; A_1 = A_T^1 + lam*A_2 (paper convention, lam = 1).
    R_O = 1.9, 0.4, 0.4, 0.4: mean 0.775, deviations 1.125, -0.375 x 3, std = sqrt(1.6875/3) = 0.75
        A_O = 1.125/0.7501 = 1.4998, -0.49993 x 3
    R_T^2 = 0.7, 0.7, 0.0, 0.7: mean 0.525, std = sqrt((3 x 0.030625 + 0.275625)/3) = 0.35
        A_T^2 = 0.175/0.3501 = 0.49986 x 3 (rollouts 1, 2, 4), -1.49957 (rollout 3)
    R_T^1 = 0.7, 0.7, 0.7, 0.2: mean 0.575, deviations 0.125 x 3, -0.375, std = sqrt(0.1875/3) = 0.25
        A_T^1 = 0.125/0.2501 = 0.49980 x 3, -0.375/0.2501 = -1.49940
    Rollout 3 took only 2 turns: its turn 2 is its last and gets A_O, its turn 1 A_T^1 + A_O."""
    R_T, R_O, turns = two_hop_group()
    A = k_turn_advantages(R_T, R_O, turns, G, "mt_grpo", convention="paper")
    A_O, A_T2, A_T1 = group_normalise(R_O, G), group_normalise(R_T[:, 1], G), group_normalise(R_T[:, 0], G)
    assert A_O[0].item() == pytest.approx(1.4998, abs=1e-4) and A_T2[2].item() == pytest.approx(-1.4996, abs=1e-4)
    expected = torch.stack([
        torch.stack([A_T1[0] + A_T2[0] + A_O[0], A_T2[0] + A_O[0], A_O[0]]),
        torch.stack([A_T1[1] + A_T2[1] + A_O[1], A_T2[1] + A_O[1], A_O[1]]),
        torch.stack([A_T1[2] + A_O[2], A_O[2], A_O[2]]),           # 2 turns: column 3 unused (A_O)
        torch.stack([A_T1[3] + A_T2[3] + A_O[3], A_T2[3] + A_O[3], A_O[3]]),
    ])
    assert torch.allclose(A, expected)
    # Rollout 2 (two good searches, wrong answer): the first search is credited (+0.50), the second
    # is neutral (its good A_T^2 cancels the bad outcome), the answer punished (-0.50). GRPO-OR
    # would give all three turns -0.50.
    assert A[1, 0].item() == pytest.approx(0.4997, abs=1e-4) and abs(A[1, 1].item()) < 1e-3 and A[1, 2] < 0
    # Rollout 4's bad first search is blamed (A_T^1 = -1.5) even though its second search was good.
    assert A[3, 0] < A[3, 1]


def test_k_turn_lambda_discounts_later_turns():
    """A_1 = A_T^1 + lam*A_T^2 + lam^2*A_O: return-to-go with discount lam (paper convention)."""
    R_T, R_O, turns = two_hop_group()
    lam = 0.5
    A = k_turn_advantages(R_T, R_O, turns, G, "mt_grpo", lam=lam, convention="paper")
    A_O, A_T2, A_T1 = group_normalise(R_O, G), group_normalise(R_T[:, 1], G), group_normalise(R_T[:, 0], G)
    assert torch.allclose(A[0, 0], A_T1[0] + lam * A_T2[0] + lam ** 2 * A_O[0])
    seed = k_turn_advantages(R_T, R_O, turns, G, "mt_grpo", lam=lam, convention="seed")
    assert torch.allclose(seed[0, 0], A_O[0] + lam * A_T2[0] + lam * A_T1[0])  # seed: A_k+1 + lam*A_T^k


def test_k_turn_baselines_are_trajectory_level():
    R_T, R_O, turns = two_hop_group()
    A_MR = group_normalise(R_T.sum(1) + R_O, G)
    assert torch.equal(k_turn_advantages(R_T, R_O, turns, G, "grpo_mr"), A_MR[:, None].repeat(1, 3))
    assert torch.equal(k_turn_advantages(R_T, R_O, turns, G, "grpo_or"), group_normalise(R_O, G)[:, None].repeat(1, 3))


@pytest.mark.parametrize("method", mt_grpo.PAPER_METHODS)
@pytest.mark.parametrize("convention", mt_grpo.CONVENTIONS)
@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_k_equals_2_reproduces_the_two_turn_advantages_bit_for_bit(method, convention, lam):
    """Random rewards, 8 groups of 5, some rollouts without a tool result (one turn, A_MR fallback)."""
    g = torch.Generator().manual_seed(7)
    N, G5 = 40, 5
    R_T = torch.randint(0, 8, (N,), generator=g).float() / 10
    R_O = torch.randint(0, 20, (N,), generator=g).float() / 10
    has_result = torch.rand(N, generator=g) > 0.3
    turns = 1 + has_result.long()  # a result starts turn 2
    two = turn_advantages(R_T, R_O, G5, method, lam=lam, convention=convention, has_result=has_result)
    k = k_turn_advantages(R_T[:, None], R_O, turns, G5, method, lam=lam, convention=convention, has_result=has_result)
    assert torch.equal(two, k)


def test_the_bias_of_normalising_turns_that_never_happened():
    """K = 4 (three searches allowed). Rollouts 1-2 stopped after their first search (answered in
    turn 2); rollouts 3-4 searched twice more, and their third searches earned the same 0.2 (ran,
    found nothing new). Among the rollouts that took turn 3 nothing distinguishes the two: A_T^3
    must be 0. The naive way fills the missing R_T^3 with 0 and normalises over all four: the two
    long rollouts then get A_T^3 = +0.87 each for merely going on, a push towards longer episodes
    that no reward asked for."""
    R_T3 = torch.tensor([0.0, 0.0, 0.2, 0.2], dtype=DT)   # 0 = "no turn 3" for rollouts 1-2
    turns = torch.tensor([2, 2, 4, 4])
    naive = group_normalise(R_T3, G)
    assert naive[2].item() == pytest.approx(0.866, abs=1e-3) and naive[0].item() == pytest.approx(-0.866, abs=1e-3)
    ours = masked_group_normalise(R_T3, turns >= 3, G)
    assert torch.equal(ours, torch.zeros(4, dtype=DT))
    # and in the full advantage: the long rollouts' turn 3 gets only what follows (A_O), nothing more
    R_T = torch.stack([torch.tensor([0.7, 0.7, 0.7, 0.7]), torch.tensor([0.0, 0.0, 0.2, 0.2]), R_T3.float()], 1)
    R_O = torch.tensor([0.4, 1.9, 0.4, 1.9])
    A = k_turn_advantages(R_T, R_O, turns, G, "mt_grpo", convention="paper")
    assert torch.allclose(A[2, 2], A[2, 3]) and torch.allclose(A[3, 2], A[3, 3])


def test_the_naive_switch_reproduces_that_bias_and_masked_is_the_default():
    """k_turn_advantages(normalise="naive") is the zero-filled normalisation above, kept as an option so
    that bench/bench_credit.py can measure in training what the bias does: the long rollouts' turn 3 gets
    +0.87 on top of what follows; the default (masked) gives it nothing."""
    R_T = torch.stack([torch.full((4,), 0.7), torch.tensor([0.0, 0.0, 0.2, 0.2]), torch.tensor([0.0, 0.0, 0.2, 0.2])], 1)
    R_O = torch.tensor([0.4, 1.9, 0.4, 1.9])
    turns = torch.tensor([2, 2, 4, 4])
    naive = k_turn_advantages(R_T, R_O, turns, G, "mt_grpo", convention="paper", normalise="naive")
    masked = k_turn_advantages(R_T, R_O, turns, G, "mt_grpo", convention="paper")
    assert torch.equal(masked, k_turn_advantages(R_T, R_O, turns, G, "mt_grpo", convention="paper", normalise="masked"))
    assert torch.allclose(naive[2, 2] - naive[2, 3], group_normalise(R_T[:, 2], G)[2])  # the +0.87 of turns never taken
    assert naive[2, 2] - naive[2, 3] == pytest.approx(0.866, abs=1e-3) and torch.allclose(masked[2, 2], masked[2, 3])
    for method in ("grpo_or", "grpo_mr"):  # trajectory-level methods have no turn normalisation to switch
        assert torch.equal(k_turn_advantages(R_T, R_O, turns, G, method, normalise="naive"),
                           k_turn_advantages(R_T, R_O, turns, G, method))
    with pytest.raises(ValueError, match="unknown normalisation"):
        k_turn_advantages(R_T, R_O, turns, G, normalise="zero")


def test_masked_normalisation_compares_only_present_rollouts():
    R = torch.tensor([0.7, 0.0, 0.2, 9.9, 1.0, 1.0, 5.0, 5.0], dtype=DT)
    present = torch.tensor([True, True, True, False, True, False, False, False])
    A = masked_group_normalise(R, present, G)
    assert torch.equal(A[:3], group_normalise(R[:3], 3))       # the 9.9 of an absent rollout is ignored
    assert A[3] == 0 and torch.equal(A[4:], torch.zeros(4, dtype=DT))  # one present rollout: nothing to compare
    assert torch.equal(masked_group_normalise(R, torch.ones(8, dtype=torch.bool), G), group_normalise(R, G))


def test_k_turn_token_advantages_follow_the_turn_index():
    R_T, R_O, turns = two_hop_group()
    A = k_turn_advantages(R_T, R_O, turns, G, "mt_grpo")
    turn_idx = torch.tensor([[0, 1, 1, 0, 2, 0, 3, 3]] * 4)
    A_tok, mask = token_advantages(A, turn_idx)
    assert torch.equal(A_tok[1], torch.stack([A[1, 0] * 0, A[1, 0], A[1, 0], A[1, 0] * 0, A[1, 1], A[1, 0] * 0, A[1, 2], A[1, 2]]))


@pytest.mark.parametrize("call, message", [
    (lambda: k_turn_advantages(torch.zeros(4), torch.zeros(4), torch.ones(4), G), "need R_T"),
    (lambda: k_turn_advantages(torch.zeros(4, 2), torch.zeros(4), torch.full((4,), 4), G), "turns must lie in 1..3"),
    (lambda: masked_group_normalise(torch.zeros(4), torch.ones(3, dtype=torch.bool), G), "present must have shape"),
])
def test_k_turn_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
