"""bench/testbed.py: its exact enumeration against Monte Carlo, its adapters against worked examples by hand, the
shortcuts it takes for speed against the plain calls, and its quick run end to end."""
from __future__ import annotations

import math

import pytest
import torch

import testbed as tb
from mt_grpo import k_turn_advantages, turn_advantages

torch.set_num_threads(1)
F64 = torch.float64


def norm(xs: list[float]) -> list[float]:
    """Group normalisation written out: (x - mean) / (sample std + 1e-4); all equal -> 0."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return [0.0] * len(xs) if max(xs) == min(xs) else [(x - m) / (sd + 1e-4) for x in xs]


# ---------------------------------------------------------------------------------------- (i) exact vs Monte Carlo
def sampled_batch(st: tb.Setting, G: int, groups: int, policy: str, seed: int = 1) -> tb.Batch:
    """``groups`` groups of G rollouts of one question, drawn by the training code's sampler."""
    th1, th2 = tb.policy_logits(st, policy)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(4, groups, 1, G, generator=gen, dtype=F64)
    return tb.sample_two_turn(st, th1.expand(groups, 1, -1).clone(), th2.expand(groups, 1, 2, st.M).clone(),
                              torch.zeros(groups, 1, dtype=torch.long), u)


def group_gradients(st: tb.Setting, bt: tb.Batch, A: torch.Tensor) -> torch.Tensor:
    """(groups, P): each group's g = (1/G) sum_i sum_k A_ik grad log pi, by the training code's policy_gradient."""
    g1, g2 = tb.policy_gradient(bt, A, 1, st.A1, st.M, st.learnable)
    return torch.cat([g1.reshape(len(g1), -1), g2.reshape(len(g2), -1)], 1)


CASES = [("MT-GRPO", tb.adv_mt_grpo, tb.Setting(), "start", 40000),
         ("MT-GRPO", tb.adv_mt_grpo, tb.Setting(no_search=True, turn_reward="noisy"), "midway", 40000),
         ("GRPO-MR", tb.adv_grpo_mr, tb.Setting(), "start", 40000),
         ("GRPO-MR", tb.adv_grpo_mr, tb.Setting(no_search=True), "midway", 40000),
         ("GiGPO", tb.adv_gigpo, tb.Setting(), "midway", 4000)]


@pytest.mark.parametrize("name, fn, st, policy, groups", CASES, ids=[f"{c[0]}-{c[3]}-{c[2].no_search}" for c in CASES])
def test_the_enumerated_expectation_of_a_gradient_equals_a_large_monte_carlo_average(name, fn, st, policy, groups):
    G = 4
    est = next(e for e in tb.two_turn_estimators() if e.name == name)
    th1, th2 = tb.policy_logits(st, policy)
    outcomes, blocks = tb.two_turn_outcomes(st, th1, th2)
    exact = tb.exact_moments(outcomes, blocks, est, G)
    bt = sampled_batch(st, G, groups, policy)
    g = group_gradients(st, bt, fn(bt.ro, G))  # the adapter on the raw batch: no class merging, no shortcut
    mean, se = g.mean(0), g.std(0) / math.sqrt(groups)
    assert exact.mean.abs().max() > 0.01  # something to compare
    z = (mean - exact.mean).abs() / se.clamp(min=1e-12)
    assert z.max() < 4, f"{name}: components off by {z.max():.1f} standard errors"
    for t, b in enumerate(blocks):  # and the exact per-turn variance of one group's gradient
        assert g[:, b].var(0).sum().item() == pytest.approx(exact.var[t], rel=0.1)


def test_the_exact_gradient_is_the_gradient_of_the_expected_return():
    """grad J by autograd on the enumerated J against (a) central finite differences of the same J and (b) the
    Monte-Carlo REINFORCE average (R^T + R^O) grad log pi of rollouts drawn by the training sampler."""
    st = tb.Setting(no_search=True, turn_reward="noisy")
    th1, th2 = (t.requires_grad_() for t in tb.policy_logits(st, "midway"))
    gJ, _ = tb.exact_gradients(tb.two_turn_outcomes(st, th1, th2)[0], [th1, th2])
    params = torch.cat([th1.detach(), th2.detach().reshape(-1)])

    def J(flat):
        outcomes, _ = tb.two_turn_outcomes(st, flat[:st.A1], flat[st.A1:].view(2, st.M))
        return sum(o.prob * o.total for o in outcomes).item()

    h = 1e-5
    fd = torch.tensor([(J(params + h * e) - J(params - h * e)) / (2 * h) for e in torch.eye(len(params), dtype=F64)],
                      dtype=F64)
    assert torch.allclose(gJ, fd, atol=1e-7)
    n = 50000  # groups of 2: REINFORCE, A = R^T + R^O on both turns, is unbiased for grad J
    bt = sampled_batch(st, 2, n, "midway")
    g = group_gradients(st, bt, (bt.ro.R_T + bt.ro.R_O)[:, None].expand(-1, 2).contiguous())
    z = (g.mean(0) - gJ.detach()).abs() / (g.std(0) / math.sqrt(n)).clamp(min=1e-12)
    assert z.max() < 4


# --------------------------------------------------------------------------------- (ii) worked examples by hand
def handmade_group():
    """One group of 4 rollouts of one question, drawn by the sampler with chosen random numbers (all logits 0,
    no-search allowed: 5 turn-1 actions at 0.2 each, 3 picks at 1/3 each):
      1: the right query, the right pick     R^T 0.7, R^O 1.5
      2: the right query, a wrong pick       R^T 0.7, R^O 0
      3: a wrong query (the decoy's passage) R^T 0.2, R^O 0
      4: no search, a wrong guess            R^T 0,   R^O 0, no result"""
    st = tb.Setting(no_search=True)
    u = torch.tensor([[0.1, 0.1, 0.3, 0.9],   # turn 1: query 0, query 0, query 1, no search
                      [0.1, 0.5, 0.5, 0.5],   # turn 2: pick 0 (right), pick 1, any, unused
                      [0.5, 0.5, 0.5, 0.5],   # flips (aligned R^T: unused)
                      [0.5, 0.5, 0.5, 0.5]],  # the guess: 0.5 > 0.1, wrong
                     dtype=F64).view(4, 1, 1, 4)
    bt = tb.sample_two_turn(st, torch.zeros(1, 1, 5, dtype=F64), torch.zeros(1, 1, 2, 3, dtype=F64),
                            torch.zeros(1, 1, dtype=torch.long), u)
    return st, bt


def test_the_sampler_gives_the_seed_rewards_of_a_handmade_group():
    _, bt = handmade_group()
    assert bt.ro.R_T.tolist() == pytest.approx([0.7, 0.7, 0.2, 0.0])
    assert bt.ro.R_O.tolist() == [1.5, 0.0, 0.0, 0.0]
    assert bt.ro.has_result.tolist() == [True, True, True, False]
    assert bt.ro.result.tolist() == [tb.SUBJECT, tb.SUBJECT, tb.DECOY, tb.NONE]


def test_the_adapters_give_the_advantages_worked_out_by_hand():
    st, bt = handmade_group()
    R_T, R_O = [0.7, 0.7, 0.2, 0.0], [1.5, 0.0, 0.0, 0.0]
    A_T, A_O, A_MR = norm(R_T), norm(R_O), norm([t + o for t, o in zip(R_T, R_O)])
    # by hand: A_O = (1.5 - 0.375) / (0.75 + 1e-4) = 1.49980; A_T = (0.7 - 0.4) / (0.355903 + 1e-4) = 0.84269
    assert A_O[0] == pytest.approx(1.49980, abs=1e-5) and A_T[0] == pytest.approx(0.84269, abs=1e-5)
    assert A_MR[3] == pytest.approx(-0.775 / (0.994569 + 1e-4), abs=1e-5)
    mt = [[A_O[i] + A_T[i], A_O[i]] for i in range(3)] + [[A_MR[3], A_MR[3]]]  # row 4: the has_result fallback
    got = tb.adv_mt_grpo(bt.ro, 4)
    assert torch.allclose(got, torch.tensor(mt, dtype=F64), atol=1e-9)
    assert torch.equal(got, turn_advantages(bt.ro.R_T, bt.ro.R_O, 4, "mt_grpo", has_result=bt.ro.has_result))
    paper = tb.adv_mt_grpo(bt.ro, 4, lam=0.5, convention="paper")
    assert paper[0, 0].item() == pytest.approx(A_T[0] + 0.5 * A_O[0], abs=1e-9)
    assert torch.allclose(tb.adv_grpo_or(bt.ro, 4), torch.tensor([[a, a] for a in A_O], dtype=F64), atol=1e-9)
    assert torch.allclose(tb.adv_grpo_mr(bt.ro, 4), torch.tensor([[a, a] for a in A_MR], dtype=F64), atol=1e-9)
    # GiGPO (the project's defaults): the episode term normalises R^T + R^O over the group's steps (a rollout that
    # searched counts twice, rollout 4 once); step 1 normalises R^T + 0.95 R^O (a rollout with no result: R^T + R^O)
    # over the group; step 2 R^O among rollouts that read the same passage: 1 and 2 (the subject's), 3 alone (the
    # decoy's: 0), 4 none (0).
    R = [t + o for t, o in zip(R_T, R_O)]
    steps = [2.2, 2.2, 0.7, 0.7, 0.2, 0.2, 0.0]
    m7 = sum(steps) / 7
    sd7 = math.sqrt(sum((x - m7) ** 2 for x in steps) / 6)
    E = [(x - m7) / (sd7 + 1e-4) for x in R]
    S1, S2 = norm([2.2 - 0.05 * 1.5, 0.7, 0.2, 0.0]), norm([1.5, 0.0]) + [0.0, 0.0]
    gi = [[E[i] + S1[i], E[i] + S2[i]] for i in range(4)]
    assert torch.allclose(tb.adv_gigpo(bt.ro, 4), torch.tensor(gi, dtype=F64), atol=1e-9)
    # MT-PPO, token level: two model ids; GAE with gamma 1, lambda 1 and the critic's values gives turn 2
    # R^O - V2 and turn 1 R^T + R^O - V1 (rollout 4: one id, both rewards after it); whitened over the 7 model ids
    # as (A - mean) / sqrt(var + 1e-8)
    V = [[1.0, 0.5], [1.0, 0.5], [1.0, 0.0], [1.0, 0.0]]
    bt.ro.values = torch.tensor(V, dtype=F64)
    raw = []
    for i in range(3):
        raw += [R_T[i] + R_O[i] - V[i][0], R_O[i] - V[i][1]]
    raw += [R_T[3] + R_O[3] - V[3][0]]
    m = sum(raw) / len(raw)
    sd = math.sqrt(sum((x - m) ** 2 for x in raw) / (len(raw) - 1) + 1e-8)
    w = [(x - m) / sd for x in raw]
    A, targets = tb.adv_mt_ppo(bt.ro, 4)  # (the rewards pass through float32 in token_rewards: atol 1e-6)
    assert torch.allclose(A, torch.tensor([[w[0], w[1]], [w[2], w[3]], [w[4], w[5]], [w[6], 0.0]], dtype=F64), atol=1e-6)
    assert targets[0].tolist() == pytest.approx([R_T[0] + R_O[0], R_O[0]], abs=1e-6)
    assert targets[3].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    # and the policy gradient of that group is (1/4) sum_i sum_k A_ik (onehot(a_ik) - pi)
    g1, g2 = tb.policy_gradient(bt, got, 1, st.A1, st.M, st.learnable)
    hand1 = sum(mt[i][0] * (torch.eye(5, dtype=F64)[a] - 0.2) for i, a in enumerate([0, 0, 1, 4])) / 4
    hand2 = (mt[0][1] * (torch.eye(3, dtype=F64)[0] - 1 / 3) + mt[1][1] * (torch.eye(3, dtype=F64)[1] - 1 / 3)) / 4
    assert torch.allclose(g1[0, 0], hand1) and torch.allclose(g2[0, 0, 0], hand2)
    assert torch.allclose(g2[0, 0, 1], (mt[2][1] * (torch.eye(3, dtype=F64)[bt.a2[0, 0, 2]] - 1 / 3)) / 4)


def test_the_k_turn_adapter_masked_against_naive_by_hand():
    """K = 3, one group: (1) right search, answers; (2) right search, searches again; (3) decoy, searches again;
    (4) no search. Turn 2's reward (the second call) is normalised among the rollouts that took turn 2 (1-3) when
    masked, among all four (4 counting 0) when naive."""
    ro = tb.Rollouts(R_T=torch.tensor([[0.7, 0.0], [0.7, 0.2], [0.2, 0.2], [0.0, 0.0]], dtype=F64),
                     R_O=torch.tensor([1.5, 1.5, 0.0, 0.0], dtype=F64), has_result=torch.tensor([True, True, True, False]),
                     result=torch.tensor([1, 1, 2, 0]), turns=torch.tensor([2, 3, 3, 1]))
    masked, naive = tb.adv_k_turn(ro, 4), tb.adv_k_turn(ro, 4, normalise="naive")
    assert torch.equal(masked, k_turn_advantages(ro.R_T, ro.R_O, ro.turns, 4, has_result=ro.has_result))
    A_O = norm([1.5, 1.5, 0.0, 0.0])
    T2m, T2n = norm([0.0, 0.2, 0.2]), norm([0.0, 0.2, 0.2, 0.0])
    assert T2m[1] == pytest.approx(0.57685, abs=1e-5) and T2n[1] == pytest.approx(0.86528, abs=1e-5)
    assert masked[1, 1].item() == pytest.approx(A_O[1] + T2m[1], abs=1e-9)  # seed convention: next + lam * own
    assert naive[1, 1].item() == pytest.approx(A_O[1] + T2n[1], abs=1e-9)
    assert masked[0, 1].item() == pytest.approx(A_O[0], abs=1e-9)  # turn 2 was rollout 1's last: A_O


# ------------------------------------------------------------------------------------------ the speed shortcuts
def test_per_distinct_group_gives_the_direct_call_exactly():
    gen = torch.Generator().manual_seed(3)
    n, G = 300, 4
    res = torch.randint(0, 3, (n * G,), generator=gen)
    ro = tb.Rollouts(R_T=torch.where(res == 0, 0.0, 0.2 + 0.5 * (res == 1)).to(F64),
                     R_O=1.5 * (torch.rand(n * G, generator=gen) < 0.4).to(F64) * (res != 2), has_result=res != 0,
                     result=res)
    direct = tb.adv_gigpo(ro, G)
    est = next(e for e in tb.two_turn_estimators() if e.name == "GiGPO")
    assert torch.allclose(est(ro, G)[0], direct, atol=1e-12) and len(est.cache) < n
    assert torch.allclose(est(ro, G)[0], direct, atol=1e-12)  # from the cache
    turns = torch.where(res == 0, 1, 2 + torch.randint(0, 2, (n * G,), generator=gen))
    ro3 = tb.Rollouts(R_T=torch.stack([ro.R_T, 0.2 * (turns == 3)], 1), R_O=ro.R_O, has_result=res != 0, result=res,
                      turns=turns)
    for e in tb.k_turn_estimators():
        assert torch.allclose(e(ro3, G)[0], e.fn(ro3, G), atol=1e-12), e.name


def test_the_critic_learns_the_values_of_a_fixed_policy():
    d = tb.Design(seeds=4, steps=150, lr=0.0)
    ppo = next(e for e in tb.two_turn_estimators() if e.critic)
    err = tb.train_two_turn(tb.Setting(), ppo, d)["critic_err"]
    assert err[0].mean() > 0.3 and err[-50:].mean() < 0.15  # its noise: one SGD step of 0.5 x the error a visit


# -------------------------------------------------------------------------------------------- (iii) the quick run
def test_the_quick_run_writes_its_results(tmp_path):
    assert tb.main(["--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "testbed_quick.md").read_text()
    assert f"- command: `python bench/testbed.py --quick --out {tmp_path}`" in text and "- wall time: " in text
    for heading in ("## 1. Exact bias", "### 1c.", "### 1d.", "## 2. Learning curves", "### 2b. matched", "### 2c.",
                    "## 3. The map", "### Where MT-GRPO loses",
                    "### 3e. The matched", "### 3f.", "### 3g. K = 3"):
        assert heading in text, heading
    # the report's table 1a holds part 1's numbers: MT-GRPO at G = 4, start policy
    r = tb.analyse(tb.Setting(), "start", tb.mt_grpo_est(), 4)
    assert f"| MT-GRPO | 4 | {r['cos']:.3f} | {r['cos_O']:.3f} | {r['share1']:.3f} |" in text
    assert "the masked and the naive run's curves is 0.0e+00" in text
    assert (tmp_path / "testbed_quick_curves.png").stat().st_size > 10000
