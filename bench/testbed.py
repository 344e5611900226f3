"""An exact two-turn testbed for every advantage estimator in the project: bias and variance with no network.

    python bench/testbed.py            # the full design below: bench/results/testbed.md and testbed_curves.png
    python bench/testbed.py --quick    # every part at a tiny size (seconds): bench/results/testbed_quick.md
    python bench/testbed.py --out DIR  # write the results elsewhere

WHY. bench/bench_credit.py measures the estimators on a neural "instrument": a small Llama that searches a world of
people and towns (bench/credit/world.py). A person's passage names three towns; a question asks one of them and
often names a decoy person, so the question used as the query finds the decoy's passage. There every difference
between estimators is buried in training noise (8 seeds detect nothing under ~5 EM points). This testbed keeps the
episode's two decisions and throws the network away: the policy is a table of logits, every outcome of a group of
rollouts can be enumerated, and so the *expected* gradient of each estimator is computed exactly, not sampled.

THE EPISODE (K = 2). One question. The rewards are the seed's (rewards.REWARD_MAX).
  turn 1  pick one of Q = 4 queries. Query 0 is the right one: it finds the subject's passage. Queries 1-3 (the
          question as query, ...) find the decoy's passage (one passage, the decoy the question names).
          Optional ("no-search"): a 5th action answers at once. No tool call, no result (has_result False), so
          MT-GRPO falls back to A^MR for that rollout as mt_grpo.turn_advantages does. The answer is right with a
          fixed chance p_guess = 0.1 (a question the model sometimes knows).
  turn 2  read the result and pick one of the M candidate answers it offers. In the subject's passage candidate 0
          is right (M = 3: three towns, one per relation; M = 1: the passage gives the answer away). The decoy's
          passage offers M candidates, none of them right. "learnable": turn 2 has logits of its own.
          "fixed chance": a uniform pick (right 1/M of the time after the right search) with no parameters.
  R^T = 0.2 (tool_execution: every query executes) + 0.5 (search_answer: the result holds the answer, which
        only the subject's passage does). No search: R^T = 0.
        Variants of the 0.5: "aligned" as said; "noisy": flipped with probability 0.25 (paid for the decoy's
        passage, withheld from the subject's); "judge": a judge that pays any search (0.7 for every query).
  R^O = 0.5 + 1.0 = 1.5 (answer_presence + exact_match) for a right answer, else 0. format and xml are omitted:
        on a well-formed episode they are a constant (0.4), which group normalisation removes exactly and which
        only shifts MT-PPO's critic targets.
  The policy: tabular softmax, logits th1[q] for turn 1 and th2[q, result] for turn 2 (result: the subject's or
  the decoy's passage). One "token" per decision, so a rollout's policy gradient is
      A_1 grad log pi(a_1 | q) + A_2 grad log pi(a_2 | q, result)
  (the second term only when a result came back and turn 2 is learnable), and a batch's gradient is the mean
  over its N rollouts, g = (1/N) sum_i sum_k A_ik grad log pi(a_ik | s_ik). A step is th <- th + lr g (plain SGD).

THE ESTIMATORS: the project's own functions, imported in ONE block below and reached only through one adapter
each (rewards in, per-turn advantages (N, 2) out), so that they can be repointed in one place:
  MT-GRPO   mt_grpo.turn_advantages(method "mt_grpo", lam, convention, has_result): turn 1 A_O + lam A_T ("seed")
            or A_T + lam A_O ("paper"), turn 2 A_O; equal at lam = 1 (the default here)
  GRPO-OR   the same function, method "grpo_or": (A_O, A_O)
  GRPO-MR   the same function, method "grpo_mr": (A_MR, A_MR), A_MR = norm(R^T + R^O)
  GiGPO     extensions/estimators.gigpo_advantages with config.py's defaults (omega 1, gamma 0.95, the episode term
            normalised over the group's steps), its turn-2 step groups extensions/estimators.anchor_groups of the
            search result's text (the rollouts of a question that read the same passage)
  MT-PPO    token level (extensions/estimators.py) on the episode as two model ids: token_rewards (R^T after turn
            1, R^O after the last id), token_gae (config.py's gamma 1, gae_lam 1) with the critic's values, and
            whiten over each batch's model ids; the critic is tabular, V(q) and V(q, result), trained beside the
            policy: one SGD step (lr_v) a batch on the mean over the batch's model ids of (V - target)^2 / 2, its
            targets token_gae's returns (the project's clipped value loss is this loss on its first pass).
  (Repointed during this work: estimators.py moved to extensions/ and its MT-PPO became token-level, turn_gae and
  mt_ppo_advantages gone, gigpo_advantages taking has_result. The results files come from the repointed code.)
  K = 3     mt_grpo.k_turn_advantages, method "mt_grpo" with normalise "masked" and "naive"; "grpo_mr", "grpo_or".

PART 1, EXACT BIAS AND VARIANCE. The objective is J(th) = E[R^T + R^O] for one question. "The exact gradient" is
g* = grad J, by autograd on J written as the finite sum over the outcomes of one rollout (its decisions and chance
events: at most 20 here). grad E[R^O] (the accuracy's gradient, up to the factor 1.5) is kept beside it.
An estimator's gradient from one group of G rollouts of the question is g = (1/G) sum_i sum_k A_ik grad log pi.
Its exact mean and covariance come from enumerating every outcome of a group, in two steps:
  - the outcomes of a rollout fall into classes with identical estimator inputs (R^T, R^O, has_result, the
    result's text, the critic's values): base setting {right query & right pick, right query & wrong pick, decoy}.
    A group's class counts n are multinomial(G, p), and there are C(G+C-1, C-1) of them (253 at G = 21, C = 3);
  - given n, every estimator's advantages are fixed (it sees nothing else), and which outcome within its class
    each rollout had is independent, with the class's known mean and covariance of grad log pi. So
    E[g | n] = (1/G) sum_c n_c sum_t A_ct gbar_ct and tr Cov(g_t | n) = (1/G^2) sum_c n_c A_ct^2 v_ct exactly.
  tests/test_testbed.py checks both against a Monte-Carlo average of sampled groups.
Scale: group normalisation and whitening rescale each estimator by an amount that varies from group to group, so
its length is arbitrary (the learning rate absorbs a constant). We compare it scale-free:
  cos      cos(E g, g*) over all parameters: 1 = it points, on average, where the exact gradient points;
           cos_O the same with grad E[R^O].
  norm-matched: g' = g ||g*|| / ||E g||; then per turn t (t = 1: th1; t = 2: th2)
  bias_t = ||E g'_t - g*_t|| / ||g*||    (bias_1^2 + bias_2^2 = 2 (1 - cos))
  var_t  = E||g'_t - E g'_t||^2 / ||g*||^2   (one group's noise, in units of the exact gradient's squared length)
  share_1 = ||E g_1|| / ||E g||: the part of its mean step an estimator spends on turn 1, beside the exact one.
At two policies: "start" (all logits 0: right query 1/4, or 1/5 with no-search; right pick 1/M) and "midway"
(right query 0.6, right pick 0.6, the rest uniform); G = 4, 8, 21 in the base setting, G = 8 in the others.
MT-PPO in part 1 is shown with its critic at its fixed point, V = V^pi (the exact values), and at V = 0 (a critic
that learnt nothing), whitened over the group (a batch of one question).

WHERE MT-GRPO IS BIASED (derived before running; part 1 measures it). With sigma_O, sigma_T the spreads of a
group's R^O and R^T, the mean of its turn-1 term is about grad_th1 (E[R^O] / sigma_O + lam E[R^T] / sigma_T):
turn 1 follows another objective than J, in which R^T weighs lam sigma_O / sigma_T instead of 1, and its turn-1
advantage is the sum of two unit-scale advantages, so it spends more of its step on turn 1 than g* does. Its turn 2
gets A_O, whose mean points along grad_th2 E[R^O] = grad_th2 J: the right direction. So (a) with an aligned R^T and
no no-search action both terms favour the right query: the direction within turn 1 is right and only the split
between the turns is off; (b) in this world every wrong query leads to the same outcomes and every wrong pick too,
so within a turn's block the mean of ANY estimator is a multiple of grad P(right query) (turn 1) or of grad P(right
pick | subject's passage) (turn 2): without the no-search action only the split between the turns (and a sign) can
be wrong, whatever R^T is (noisy, judge). The no-search action adds a third kind of turn-1 outcome, ranked
differently by R^T (any search 0.2 > 0) and by R^O (a guess 0.15 > 0), and only there can the direction within
turn 1 move. (This paragraph's first version said the noise and the judge move it; the quick pilot's table 1c
showed the symmetry, and it was corrected before the full run.) (c) the
has_result fallback gives no-search rows A^MR and the others A_O + lam A_T in one group: two different advantages
for the actions of one decision, which moves the mean as a baseline would not; (d) lam trades the two terms
(paper convention, lam = 0: turn 1 gets A_T alone). Every group-normalised estimator is a little biased besides,
through the std in its denominator (which depends on the rollout's own reward) and the zero-variance groups it
drops: GRPO-MR's numbers show that size.

PART 2, LEARNING CURVES. S = 1,000 seeds, vectorised over seeds. A seed: n_q = 8 questions, logits drawn
N(0, 1) (so the right query starts at 1/4 on average, varying by seed); 100 steps, each 4 distinct questions x
G = 8 rollouts (N = 32, as bench_credit); lr 1.0, lr_v 4.0. Paired: every estimator of a seed starts from the same
logits, draws the same questions and uses the same uniform random numbers to sample its decisions and chance events
(so step 1's rollouts are identical, and differences come from the updates). Measured exactly from the logits, with
no evaluation noise: accuracy = P(right answer) averaged over the seed's questions, P(right query), P(right pick |
subject's passage) and J. Reported: each estimator's mean with a 95% interval at steps 0, 10, 25, 50, 100; the mean
over steps 1-100 (AUC); and paired differences (estimator - MT-GRPO) of the final accuracy and the AUC, mean and
95% interval mean +- 1.96 sd / sqrt(S) over seeds.

AMENDED AFTER THE QUICK PILOT (then 48 seeds x 12 steps), BEFORE THE FULL RUN: with plain SGD an estimator's advantage
scale is its step size. GiGPO's turn 1, A^E + A^S_1 = norm(R^T + R^O) + norm(R^T + 0.95 R^O), is about twice
GRPO-MR's A^MR; MT-GRPO's A_O + lam A_T about twice GRPO-OR's A_O. So parts 2 and 3 run every estimator twice:
  "raw"      lr 1.0 for every estimator (the design as first written): its own normalisation sets its step;
  "matched"  lr_e = lr x ||E g_MT-GRPO|| / ||E g_e||, both exact (part 1's enumeration) at the cell's start policy
             (all logits 0) with G = 8, MT-PPO with V = 0 (its critic's start); K = 3 against MT-GRPO masked, the
             two question kinds together. Every estimator's mean first step is then as long as MT-GRPO's, and
             what differs is direction, noise and the split between the turns (with Adam on an LLM, whose
             parameters both turns share, a constant factor on the advantages would also mostly wash out).
MT-GRPO's runs are the same in both. The MT-PPO rows also report the critic's error, |V(q) - J_q| at the end.
AMENDED AFTER THE FIRST FULL RUN (whose raw and matched views disagreed on MT-GRPO against GRPO-OR/MR), a third
view, in the base setting only: each estimator at its own best lr from the grid {0.5, 1, 2, 4, 8} (best: the
highest mean AUC over the 1,000 seeds, the same seeds that are then compared: a small selection bias in every
estimator's favour alike), paired against MT-GRPO at its best. Also from then: in the win/loss table a difference
below 0.001 (a tenth of an accuracy point) counts as a tie however narrow its interval (at M = 1 GiGPO and MT-GRPO
normalise one indicator at different reward scales and differ by ~2e-5, only through group_normalise's + 1e-4),
and the list of cells where MT-GRPO loses is one table.

PART 3, THE MAP: where turn-level credit helps. The same design for every cell, 5 estimators each:
  (a, b) turn 2: "M=1" (R^O pays every right search: the right search always leads to the right answer),
         "M=3 fixed chance" (a right search is followed by a right answer 1/3 of the time, not learnable),
         "M=3 learnable" (the base);
  (c)    R^T: aligned, noisy (flip 0.25), judge (pays any search); a 3 x 3 grid with (a, b);
  (f)    the no-search action, with M=3 learnable, for each R^T (3 more cells);
  (d)    lam in {0, 0.5, 1, 2} x convention {seed, paper}, MT-GRPO only, in the base and the noisy cells;
  (e)    K = 3, a turn not taken. n_q = 8 questions: 4 one-hop (the answer is in the subject's passage), 4 two-hop
         (the subject's passage names a town; a second search finds the town's passage, which holds the answer).
         Turn 1: Q = 4 queries, or answer at once (guess right 0.1). Turn 2, after the first result: answer, or
         search again. Turn 3, after the second: the answer (no decision). Per-call rewards (rewards.call_rewards):
         0.2 + 0.5 if the result holds new evidence (the subject's passage: the one-hop answer or the two-hop
         bridge; the town's passage: the two-hop answer; a one-hop question's second search finds nothing new).
         R^O = 1.5 iff the answer's passage was read. turns = 1 (no search), 2 or 3. The unneeded turn: a second
         search on a one-hop question. Measured: P(second search | one-hop), P(second search | two-hop, bridge
         found), P(no search), accuracy, for masked, naive, GRPO-MR and GRPO-OR; paired against masked. Part 1's
         enumeration at the start policy gives each one's exact mean push on "search again".
         Note: in k_turn_advantages turn k's reward is normalised among the rollouts with turns >= k, and a
         rollout that answered in turn 2 took turn 2 (its R_T^2 = 0 is compared). So with K = 3 the two
         normalisations differ only through rollouts that never searched (turns = 1), which is why the no-search
         action is in (e); the run without it is kept as a check that masked and naive then coincide.
Every cell reports each estimator's final accuracy, paired against MT-GRPO (final and AUC), and the list of cells
where MT-GRPO loses (an interval wholly on the other side) is written out.

Threads: one (torch.set_num_threads(1)); run it under nice on a shared machine.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]  # the repository root on sys.path, as bench/common.py puts it
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ------------------------------------------------ the project's functions: the ONE place they enter this module
from config import Config  # noqa: E402  the estimators' default settings (config.py imports no torch)
from extensions.estimators import (anchor_groups, gigpo_advantages, token_gae, token_rewards,  # noqa: E402
                                   whiten)
from mt_grpo import k_turn_advantages, turn_advantages  # noqa: E402
from rewards import REWARD_MAX  # noqa: E402  the seed's reward levels

DEFAULTS = Config()  # GiGPO: omega, gigpo_gamma, gigpo_episode_norm; MT-PPO: gamma, gae_lam

TOOL = REWARD_MAX["tool_execution"]                               # 0.2: the call executed
FOUND = REWARD_MAX["search_answer"]                               # 0.5: the result holds the answer
RIGHT = REWARD_MAX["answer_presence"] + REWARD_MAX["exact_match"]  # 1.5: a right answer
NONE, SUBJECT, DECOY = 0, 1, 2  # the first result: none (no search), the subject's passage, the decoy's passage
RESULT_TEXT = {SUBJECT: "<result>\nthe subject's passage\n</result>", DECOY: "<result>\nthe decoy's passage\n</result>"}
F64 = torch.float64


# ================================================================================================ the adapters
@dataclass
class Rollouts:
    """A batch of rollouts as an estimator sees them; consecutive groups of G rows belong to one question."""
    R_T: Tensor                    # (N,) two turns; (N, K-1) K turns, one per tool call
    R_O: Tensor                    # (N,)
    has_result: Tensor             # (N,) bool
    result: Tensor                 # (N,) long: NONE, SUBJECT or DECOY, the first search result
    turns: Tensor | None = None    # (N,) K turns: the turns each rollout took
    values: Tensor | None = None   # (N, 2) MT-PPO: the critic's V at each turn's start


def adv_mt_grpo(ro: Rollouts, G: int, lam: float = 1.0, convention: str = "seed") -> Tensor:
    return turn_advantages(ro.R_T, ro.R_O, G, "mt_grpo", lam=lam, convention=convention, has_result=ro.has_result)


def adv_grpo_or(ro: Rollouts, G: int) -> Tensor:
    return turn_advantages(ro.R_T, ro.R_O, G, "grpo_or", has_result=ro.has_result)


def adv_grpo_mr(ro: Rollouts, G: int) -> Tensor:
    return turn_advantages(ro.R_T, ro.R_O, G, "grpo_mr", has_result=ro.has_result)


def adv_gigpo(ro: Rollouts, G: int, chunk: int = 16) -> Tensor:
    """GiGPO on ``chunk`` groups a call (its anchor_groups and normalise_within loop in Python over the batch), with
    the project's default settings; its turn-2 step groups: anchor_groups of the first search result's text."""
    out = []
    for s in range(0, len(ro.R_O), chunk * G):
        e = s + chunk * G
        keys = [RESULT_TEXT.get(int(r)) for r in ro.result[s:e]]  # None where no result came back
        out.append(gigpo_advantages(ro.R_T[s:e], ro.R_O[s:e], G, anchor_groups(keys, G), ro.has_result[s:e],
                                    omega=DEFAULTS.omega, gamma=DEFAULTS.gigpo_gamma,
                                    episode_norm=DEFAULTS.gigpo_episode_norm))
    return torch.cat(out)


def adv_mt_ppo(ro: Rollouts, batch: int) -> tuple[Tensor, Tensor]:
    """MT-PPO, token level, on the episode as two model ids (turn 1's decision, turn 2's; a rollout without a result
    has turn 1's only): token_rewards puts R^T after turn 1 and R^O after the last id, token_gae (the project's
    gamma and gae_lam) runs over them with the critic's values, and whiten whitens each batch of ``batch``
    consecutive rows (one seed's step). Returns (A (N, 2), the critic's targets (N, 2))."""
    N = len(ro.R_O)
    turn = torch.stack([torch.ones(N, dtype=torch.long), torch.where(ro.has_result, 2, 0)], 1)
    mask = turn > 0
    r = token_rewards(turn, ro.R_T, ro.R_O).to(F64)
    A, targets = token_gae(r, ro.values.to(F64) * mask, mask, gamma=DEFAULTS.gamma, lam=DEFAULTS.gae_lam)
    out = torch.zeros_like(A)
    for s in range(0, N, batch):
        a, m = A[s:s + batch], mask[s:s + batch]
        out[s:s + batch] = whiten(a, m, a[m].sum().item(), (a[m] ** 2).sum().item(), m.sum().item())
    return out, targets


def adv_k_turn(ro: Rollouts, G: int, method: str = "mt_grpo", normalise: str = "masked", lam: float = 1.0) -> Tensor:
    return k_turn_advantages(ro.R_T, ro.R_O, ro.turns, G, method, lam=lam, normalise=normalise,
                             has_result=ro.has_result)


# =============================================================================== estimators over many groups
FEATS = 6  # a rollout's estimator inputs as one row: R_T1, R_T2, R_O, has_result, result, turns


def features(ro: Rollouts) -> Tensor:
    N = len(ro.R_O)
    R_T = ro.R_T.reshape(N, -1).to(F64)
    R_T = torch.cat([R_T, torch.zeros(N, 2 - R_T.shape[1], dtype=F64)], 1)
    turns = ro.turns if ro.turns is not None else 1 + ro.has_result.long()
    return torch.cat([R_T, ro.R_O[:, None].to(F64), ro.has_result[:, None].to(F64), ro.result[:, None].to(F64),
                      turns[:, None].to(F64)], 1)


def rollouts(f: Tensor, K: int, values: Tensor | None = None) -> Rollouts:
    """The inverse of features: K = 2 gives R_T (N,) and no turns, K = 3 R_T (N, 2) and turns."""
    return Rollouts(R_T=f[:, 0] if K == 2 else f[:, :2], R_O=f[:, 2], has_result=f[:, 3].bool(),
                    result=f[:, 4].long(), turns=None if K == 2 else f[:, 5].long(), values=values)


def per_distinct_group(fn, ro: Rollouts, G: int, K: int, cache: dict) -> Tensor:
    """fn(ro, G) evaluated once per distinct group (its rows sorted), then put back in each group's own order.
    Exact for any estimator whose advantages are a function of its group's rows, equivariant under their order
    (every group-relative one here; tests/test_testbed.py checks it): it only saves calls to the Python loops in
    anchor_groups, normalise_within and masked_group_normalise. ``cache`` keeps groups seen at earlier steps."""
    f = features(ro)
    N = f.shape[0]
    n = N // G
    rows, code = torch.unique(f, dim=0, return_inverse=True)
    code = code.view(n, G)
    order = code.argsort(dim=1, stable=True)
    groups, inverse = torch.unique(code.gather(1, order), dim=0, return_inverse=True)
    gf = rows[groups.reshape(-1)].view(len(groups), G, FEATS)
    keys = [gf[u].numpy().tobytes() for u in range(len(groups))]
    todo = [u for u, k in enumerate(keys) if k not in cache]
    if todo:
        A_new = fn(rollouts(gf[todo].reshape(-1, FEATS), K), G).view(len(todo), G, -1)
        for j, u in enumerate(todo):
            cache[keys[u]] = A_new[j]
    A_sorted = torch.stack([cache[k] for k in keys])[inverse]  # (n, G, K)
    A = torch.empty_like(A_sorted).scatter_(1, order[..., None].expand_as(A_sorted), A_sorted)
    return A.reshape(N, -1)


@dataclass
class Estimator:
    name: str
    fn: object               # the adapter
    K: int = 2
    dedup: bool = False      # evaluate once per distinct group (adapters with Python loops over groups)
    critic: bool = False     # MT-PPO: needs values, returns critic targets, whitens per batch
    cache: dict = field(default_factory=dict, repr=False)

    def __call__(self, ro: Rollouts, G: int, batch: int | None = None) -> tuple[Tensor, Tensor | None]:
        """(per-turn advantages (N, K), the critic's targets (N, 2) or None)."""
        if self.critic:
            return self.fn(ro, batch or G)
        if self.dedup:
            return per_distinct_group(self.fn, ro, G, self.K, self.cache), None
        return self.fn(ro, G), None


def mt_grpo_est(lam: float = 1.0, convention: str = "seed") -> Estimator:
    name = "MT-GRPO" if lam == 1.0 else f"MT-GRPO lam={lam:g} {convention}"
    return Estimator(name, partial(adv_mt_grpo, lam=lam, convention=convention))


def two_turn_estimators() -> list[Estimator]:
    return [mt_grpo_est(), Estimator("GRPO-OR", adv_grpo_or), Estimator("GRPO-MR", adv_grpo_mr),
            Estimator("GiGPO", adv_gigpo, dedup=True), Estimator("MT-PPO", adv_mt_ppo, critic=True)]


def k_turn_estimators() -> list[Estimator]:
    return [Estimator("MT-GRPO masked", partial(adv_k_turn, normalise="masked"), K=3, dedup=True),
            Estimator("MT-GRPO naive", partial(adv_k_turn, normalise="naive"), K=3, dedup=True),
            Estimator("GRPO-MR", partial(adv_k_turn, method="grpo_mr"), K=3, dedup=True),
            Estimator("GRPO-OR", partial(adv_k_turn, method="grpo_or"), K=3, dedup=True)]


# ===================================================================================================== the world
@dataclass(frozen=True)
class Setting:
    Q: int = 4                  # queries; query 0 is the right one
    M: int = 3                  # candidate answers a passage offers; candidate 0 of the subject's is right
    learnable: bool = True      # turn 2 has logits (else a uniform pick, not learnable)
    turn_reward: str = "aligned"  # aligned | noisy | judge
    flip: float = 0.25          # noisy: chance the 0.5 of search_answer is flipped
    no_search: bool = False     # turn 1 may answer at once
    p_guess: float = 0.1        # ... and is then right with this chance

    @property
    def A1(self) -> int:
        return self.Q + int(self.no_search)

    def paid(self, found: bool) -> list[tuple[bool, float]]:
        """(search_answer paid?, probability) for a search whose result does (not) hold the answer."""
        if self.turn_reward == "aligned":
            return [(found, 1.0)]
        if self.turn_reward == "noisy":
            return [(found, 1 - self.flip), (not found, self.flip)]
        if self.turn_reward == "judge":
            return [(True, 1.0)]
        raise ValueError(f"unknown turn reward {self.turn_reward!r}")

    def expected_R_T(self, found: bool) -> float:
        return sum(p * (TOOL + FOUND * paid) for paid, p in self.paid(found))


@dataclass
class Outcome:
    """One outcome of one rollout: its probability (differentiable in the logits), the estimator's inputs
    (a features row), grad log pi of its decisions (P,), and its rewards."""
    prob: Tensor
    feats: tuple
    score: Tensor
    total: float   # R^T (summed over calls) + R^O
    R_O: float


def two_turn_outcomes(st: Setting, th1: Tensor, th2: Tensor) -> tuple[list[Outcome], list[slice]]:
    """Every outcome of a rollout of one question with logits th1 (A1,) and th2 (2, M) (row 0: the subject's
    passage, row 1: the decoy's); and the parameter blocks of the decisions: [turn 1, turn 2 (if learnable)]."""
    pi1 = torch.softmax(th1, 0)
    pi2 = torch.softmax(th2, -1) if st.learnable else torch.full((2, st.M), 1.0 / st.M, dtype=F64)
    P = st.A1 + (2 * st.M if st.learnable else 0)
    out = []
    for a1 in range(st.A1):
        g1 = torch.zeros(P, dtype=F64)
        g1[:st.A1] -= pi1.detach()
        g1[a1] += 1
        if st.no_search and a1 == st.Q:
            for right, p in ((True, st.p_guess), (False, 1 - st.p_guess)):
                out.append(Outcome(pi1[a1] * p, (0.0, 0.0, RIGHT * right, 0.0, NONE, 1.0), g1, RIGHT * right,
                                   RIGHT * right))
            continue
        res = SUBJECT if a1 == 0 else DECOY
        for a2 in range(st.M):
            g = g1.clone()
            if st.learnable:
                off = st.A1 + (res - 1) * st.M
                g[off:off + st.M] -= pi2[res - 1].detach()
                g[off + a2] += 1
            right = res == SUBJECT and a2 == 0
            for paid, p in st.paid(res == SUBJECT):
                R_T = TOOL + FOUND * paid
                out.append(Outcome(pi1[a1] * pi2[res - 1, a2] * p, (R_T, 0.0, RIGHT * right, 1.0, res, 2.0), g,
                                   R_T + RIGHT * right, RIGHT * right))
    blocks = [slice(0, st.A1)] + ([slice(st.A1, P)] if st.learnable else [])
    return out, blocks


def k_turn_outcomes(th1: Tensor, th2: Tensor, two_hop: bool, no_search: bool, Q: int = 4,
                    p_guess: float = 0.1) -> tuple[list[Outcome], list[slice]]:
    """K = 3: th1 (Q + no_search,), th2 (2, 2): after the subject's / decoy's passage, logits of (answer, search)."""
    A1 = Q + int(no_search)
    pi1, pi2 = torch.softmax(th1, 0), torch.softmax(th2, -1)
    P = A1 + 4
    out = []
    for a1 in range(A1):
        g1 = torch.zeros(P, dtype=F64)
        g1[:A1] -= pi1.detach()
        g1[a1] += 1
        if no_search and a1 == Q:
            for right, p in ((True, p_guess), (False, 1 - p_guess)):
                out.append(Outcome(pi1[a1] * p, (0.0, 0.0, RIGHT * right, 0.0, NONE, 1.0), g1, RIGHT * right,
                                   RIGHT * right))
            continue
        res = SUBJECT if a1 == 0 else DECOY
        found = res == SUBJECT
        for again in (0, 1):
            g = g1.clone()
            off = A1 + 2 * (res - 1)
            g[off:off + 2] -= pi2[res - 1].detach()
            g[off + again] += 1
            R_T1, R_T2 = TOOL + FOUND * found, again * (TOOL + FOUND * (two_hop and found))
            R_O = RIGHT * (found and (bool(again) or not two_hop))
            out.append(Outcome(pi1[a1] * pi2[res - 1, again], (R_T1, R_T2, R_O, 1.0, res, 2.0 + again), g,
                               R_T1 + R_T2 + R_O, R_O))
    return out, [slice(0, A1), slice(A1, P)]


# ================================================================================================ part 1: exact
def exact_gradients(outcomes: list[Outcome], params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(grad J, grad E[R^O]) over the flattened params, J = E[total reward], by autograd on the finite sums."""
    J = sum(o.prob * o.total for o in outcomes)
    O = sum(o.prob * o.R_O for o in outcomes)
    gJ = torch.autograd.grad(J, params, retain_graph=True)
    gO = torch.autograd.grad(O, params, allow_unused=True)
    gO = [torch.zeros_like(p) if g is None else g for g, p in zip(gO, params)]
    return torch.cat([g.reshape(-1) for g in gJ]), torch.cat([g.reshape(-1) for g in gO])


def compositions(G: int, C: int) -> Tensor:
    """(count, C) long: every vector of C non-negative counts summing to G (stars and bars)."""
    bars = torch.tensor(list(itertools.combinations(range(G + C - 1), C - 1)), dtype=torch.long).view(-1, C - 1)
    edges = torch.cat([torch.full((len(bars), 1), -1), bars, torch.full((len(bars), 1), G + C - 1)], 1)
    return edges.diff(dim=1) - 1


@dataclass
class Moments:
    mean: Tensor            # E g (P,)
    var: list[float]        # per decision turn: E||g_t - E g_t||^2
    groups: int             # count vectors enumerated


def exact_moments(outcomes: list[Outcome], blocks: list[slice], est: Estimator, G: int,
                  values: dict | None = None) -> Moments:
    """Exact mean and per-turn variance of one group's gradient g = (1/G) sum_i sum_t A_it g_it (see the docstring).
    ``values``: MT-PPO's critic, {"V1": V(q), result: V(q, result)}."""
    classes: dict[tuple, list[Outcome]] = {}
    for o in outcomes:
        if o.prob.item() > 0:
            classes.setdefault(tuple(round(x, 9) for x in o.feats), []).append(o)
    keys = list(classes)
    C, P, nb = len(keys), len(outcomes[0].score), len(blocks)
    p = torch.tensor([sum(o.prob.item() for o in classes[k]) for k in keys], dtype=F64)
    masks = torch.zeros(nb, P, dtype=F64)
    for t, b in enumerate(blocks):
        masks[t, b] = 1
    gbar = torch.zeros(nb, C, P, dtype=F64)   # E[g_t | class]
    sq = torch.zeros(nb, C, dtype=F64)        # E[||g_t||^2 | class]
    for c, k in enumerate(keys):
        for o in classes[k]:
            w = o.prob.item() / p[c]
            for t in range(nb):
                gt = o.score * masks[t]
                gbar[t, c] += w * gt
                sq[t, c] += w * gt.dot(gt)
    v = sq - (gbar ** 2).sum(-1)              # tr Cov(g_t | class)
    n = compositions(G, C)
    logP = math.lgamma(G + 1) - torch.lgamma(n.to(F64) + 1).sum(1) + (n.to(F64) * p.log()).sum(1)
    w = logP.exp()
    cum = n.cumsum(1)
    rows = torch.searchsorted(cum, torch.arange(G).expand(len(n), G).contiguous(), right=True)  # class of each row
    f = torch.tensor(keys, dtype=F64)[rows.reshape(-1)]
    vals = None
    if values is not None:  # the critic's V at each turn's start, per class, then per row
        per_class = torch.tensor([[values["V1"], values.get(int(k[4]), 0.0)] for k in keys], dtype=F64)
        vals = per_class[rows.reshape(-1)]
    A = est(rollouts(f, est.K, vals), G, batch=G)[0].view(len(n), G, -1)[..., :nb]
    start = (cum - n).clamp(max=G - 1)
    A_c = A.gather(1, start[..., None].expand(-1, -1, nb)) * (n > 0)[..., None]  # (count, C, nb)
    nA = n.to(F64)[..., None] * A_c
    m_n = sum(nA[..., t] @ gbar[t] for t in range(nb)) / G                          # E[g | n]  (count, P)
    cov = (nA * A_c * v.T[None]).sum(1) / G ** 2                                     # tr Cov(g_t | n)
    mean = w @ m_n
    var = [(w @ ((m_n * masks[t]) ** 2).sum(1) + w @ cov[:, t] - ((mean * masks[t]) ** 2).sum()).item()
           for t in range(nb)]
    return Moments(mean, var, len(n))


def scale_free(mom: Moments, gJ: Tensor, gO: Tensor, blocks: list[slice]) -> dict:
    """The docstring's cos, cos_O, bias_t, var_t and share_1 of an estimator's exact moments."""
    m = mom.mean
    if m.norm() == 0:
        return {"cos": float("nan"), "cos_O": float("nan"), "bias": [float("nan")] * len(blocks),
                "var": [float("nan")] * len(blocks), "share1": float("nan")}
    c = gJ.norm() / m.norm()
    return {"cos": (m @ gJ / (m.norm() * gJ.norm())).item(),
            "cos_O": (m @ gO / (m.norm() * gO.norm())).item() if gO.norm() > 0 else float("nan"),
            "bias": [((c * m[b] - gJ[b]).norm() / gJ.norm()).item() for b in blocks],
            "var": [(c ** 2 * vt / gJ.norm() ** 2).item() for vt in mom.var],
            "share1": (m[blocks[0]].norm() / m.norm()).item()}


def policy_logits(st: Setting, policy: str) -> tuple[Tensor, Tensor]:
    """th1 (A1,), th2 (2, M) of the "start" (all 0) or "midway" (right query 0.6, right pick 0.6) policy."""
    th1, th2 = torch.zeros(st.A1, dtype=F64), torch.zeros(2, st.M, dtype=F64)
    if policy == "midway":
        th1[0] = math.log(0.6 * (st.A1 - 1) / 0.4)
        if st.M > 1 and st.learnable:
            th2[0, 0] = math.log(0.6 * (st.M - 1) / 0.4)
    return th1, th2


def critic_values(outcomes: list[Outcome]) -> dict:
    """V^pi of the two turn starts: V1 = J, and per result E[R^O | that result]."""
    tot = sum(o.prob.item() for o in outcomes)
    V = {"V1": sum(o.prob.item() * o.total for o in outcomes) / tot}
    for r in (SUBJECT, DECOY):
        mass = sum(o.prob.item() for o in outcomes if o.feats[4] == r)
        if mass > 0:
            V[r] = sum(o.prob.item() * o.R_O for o in outcomes if o.feats[4] == r) / mass
    return V


def analyse(st: Setting, policy: str, est: Estimator, G: int, critic: str | None = None) -> dict:
    """Part 1 for one setting, policy, estimator and G: scale_free's numbers plus the exact split of g*."""
    th1, th2 = (t.requires_grad_() for t in policy_logits(st, policy))
    outcomes, blocks = two_turn_outcomes(st, th1, th2)
    gJ, gO = exact_gradients(outcomes, [th1, th2] if st.learnable else [th1])
    values = None
    if critic == "exact":
        values = critic_values(outcomes)
    elif critic == "zero":
        values = {"V1": 0.0}
    mom = exact_moments(outcomes, blocks, est, G, values)
    return {**scale_free(mom, gJ, gO, blocks), "share1_exact": (gJ[blocks[0]].norm() / gJ.norm()).item(),
            "cos_JO": (gJ @ gO / (gJ.norm() * gO.norm())).item(), "groups": mom.groups}


def analysis_estimators() -> list[tuple[Estimator, str | None]]:
    ests = two_turn_estimators()
    ppo = ests[-1]
    return [(e, None) for e in ests[:-1]] + [(replace(ppo, name="MT-PPO V=V^pi"), "exact"),
                                            (replace(ppo, name="MT-PPO V=0"), "zero")]


def k_turn_analysis(est: Estimator, G: int, two_hop: bool) -> dict:
    """Part 1 for K = 3 at the start policy (no-search allowed): cos with grad J and grad E[R^O], and the mean push
    on three logits (each / ||E g||): search again after the subject's passage, after the decoy's, and no search."""
    th1, th2 = torch.zeros(5, dtype=F64, requires_grad=True), torch.zeros(2, 2, dtype=F64, requires_grad=True)
    outcomes, blocks = k_turn_outcomes(th1, th2, two_hop, no_search=True)
    gJ, gO = exact_gradients(outcomes, [th1, th2])
    m = exact_moments(outcomes, blocks, est, G).mean
    at = {"search again after subject's": 5 + 1, "search again after decoy's": 5 + 3, "no search": 4}

    def unit(x):
        return {k: (x[i] / x.norm()).item() if x.norm() > 0 else 0.0 for k, i in at.items()}

    return {"cos": (m @ gJ / (m.norm() * gJ.norm())).item(), "cos_O": (m @ gO / (m.norm() * gO.norm())).item(),
            "cos_JO": (gJ @ gO / (gJ.norm() * gO.norm())).item(), "push": unit(m), "push_J": unit(gJ),
            "push_O": unit(gO)}


def start_step(st: Setting, est: Estimator, G: int) -> float:
    """||E g|| of one group's gradient at the start policy (all logits 0), exact; MT-PPO with V = 0."""
    th1, th2 = policy_logits(st, "start")
    outcomes, blocks = two_turn_outcomes(st, th1, th2)
    return exact_moments(outcomes, blocks, est, G, {"V1": 0.0} if est.critic else None).mean.norm().item()


def k_turn_start_step(est: Estimator, G: int) -> float:
    """The same for K = 3 (no-search allowed), a one-hop and a two-hop question together."""
    total = 0.0
    for two_hop in (False, True):
        outcomes, blocks = k_turn_outcomes(torch.zeros(5, dtype=F64), torch.zeros(2, 2, dtype=F64), two_hop, True)
        total += exact_moments(outcomes, blocks, est, G).mean.norm().item() ** 2
    return math.sqrt(total)


def matched_lrs(steps: dict[str, float], ref: str, lr: float) -> dict[str, float]:
    """lr_e = lr x ||E g_ref|| / ||E g_e||: every estimator's mean first step as long as the reference's."""
    return {name: lr * steps[ref] / step for name, step in steps.items()}


# ======================================================================================= parts 2, 3: learning
@dataclass(frozen=True)
class Design:
    seeds: int = 1000
    steps: int = 100
    questions: int = 8      # per seed
    batch_questions: int = 4  # distinct questions a step
    G: int = 8
    lr: float = 1.0
    lr_v: float = 4.0
    seed: int = 0
    exact_G: tuple = (4, 8, 21)
    checkpoints: tuple = (0, 10, 25, 50, 100)
    lr_grid: tuple = (0.5, 1.0, 2.0, 4.0, 8.0)


FULL = Design()
QUICK = Design(seeds=24, steps=8, G=4, exact_G=(4,), checkpoints=(0, 4, 8), lr_grid=(0.5, 2.0))


def categorical(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draws: probs (..., n), u (...) uniform -> (...) long. Shared u = common random numbers."""
    return (u[..., None] > probs.cumsum(-1)).sum(-1).clamp(max=probs.shape[-1] - 1)


def _rng_draws(gen: torch.Generator, S: int, n_q: int, B: int, G: int) -> tuple[Tensor, Tensor]:
    qs = torch.rand(S, n_q, generator=gen).argsort(-1)[:, :B]
    u = torch.rand(4, S, B, G, generator=gen, dtype=F64)
    return qs, u


@dataclass
class Batch:
    """One step's rollouts of every seed, shaped (S, B, G): decisions, the result, the probabilities they were
    drawn with, and the flat Rollouts (row order seed, question, rollout) the estimators read."""
    qs: Tensor     # (S, B) the questions
    a1: Tensor     # turn-1 action
    a2: Tensor     # turn-2 action
    res: Tensor    # NONE, SUBJECT or DECOY
    pi1: Tensor    # (S, B, G, A1)
    pi2: Tensor    # (S, B, G, M)
    ro: Rollouts


def sample_two_turn(st: Setting, th1: Tensor, th2: Tensor, qs: Tensor, u: Tensor) -> Batch:
    """One batch for every seed: th1 (S, n_q, A1), th2 (S, n_q, 2, M), qs (S, B), u (4, S, B, G)."""
    S, B = qs.shape
    G = u.shape[-1]
    s = torch.arange(S)[:, None, None]
    q = qs[:, :, None].expand(S, B, G)
    pi1 = torch.softmax(th1[s[..., 0], qs], -1)[:, :, None, :].expand(S, B, G, st.A1)
    a1 = categorical(pi1, u[0])
    none = (a1 == st.Q) if st.no_search else torch.zeros_like(a1, dtype=torch.bool)
    res = torch.where(none, NONE, torch.where(a1 == 0, SUBJECT, DECOY))
    pi2 = torch.softmax(th2[s, q, (res - 1).clamp(min=0)], -1)
    a2 = categorical(pi2, u[1])
    found = res == SUBJECT
    if st.turn_reward == "aligned":
        paid = found
    elif st.turn_reward == "noisy":
        paid = found ^ (u[2] < st.flip)
    else:
        paid = torch.ones_like(found)
    R_T = torch.where(none, 0.0, TOOL + FOUND * paid.to(F64))
    R_O = RIGHT * ((found & (a2 == 0)) | (none & (u[3] < st.p_guess))).to(F64)
    ro = Rollouts(R_T.reshape(-1), R_O.reshape(-1), (~none).reshape(-1), res.reshape(-1))
    return Batch(qs, a1, a2, res, pi1, pi2, ro)


def policy_gradient(bt: Batch, A: Tensor, n_q: int, A1: int, M: int, learnable: bool,
                    turn2_logits: int | None = None) -> tuple[Tensor, Tensor]:
    """Per seed, g = (1/N) sum_i sum_k A_ik grad log pi: dense (S, n_q, A1) and (S, n_q, 2, M2) arrays."""
    S, B, G = bt.a1.shape
    N = B * G
    A = A.view(S, B, G, -1)
    s = torch.arange(S)[:, None, None]
    sc1 = torch.nn.functional.one_hot(bt.a1, A1).to(F64) - bt.pi1
    g1 = torch.zeros(S, n_q, A1, dtype=F64)
    g1.index_put_((s[..., 0].expand(S, B), bt.qs), (A[..., 0, None] * sc1).sum(2) / N, accumulate=True)
    M2 = turn2_logits or M
    g2 = torch.zeros(S, n_q, 2, M2, dtype=F64)
    if learnable:
        took = (bt.res != NONE)[..., None]
        sc2 = (torch.nn.functional.one_hot(bt.a2, M2).to(F64) - bt.pi2) * took
        q = bt.qs[:, :, None].expand(S, B, G)
        g2.index_put_((s.expand(S, B, G), q, (bt.res - 1).clamp(min=0)), A[..., 1, None] * sc2 / N, accumulate=True)
    return g1, g2


def two_turn_metrics(st: Setting, th1: Tensor, th2: Tensor, per_question: bool = False) -> dict[str, Tensor]:
    """Exact, per seed (averaged over its questions, or per question): accuracy, P(right query), P(right pick |
    subject's passage), J."""
    pi1 = torch.softmax(th1, -1)
    pick = torch.softmax(th2[:, :, 0, :], -1)[..., 0]
    acc = pi1[..., 0] * pick
    J = pi1[..., 0] * (st.expected_R_T(True) + RIGHT * pick) + pi1[..., 1:st.Q].sum(-1) * st.expected_R_T(False)
    out = {"query": pi1[..., 0].mean(1), "pick": pick.mean(1)}
    if st.no_search:
        acc = acc + pi1[..., st.Q] * st.p_guess
        J = J + pi1[..., st.Q] * RIGHT * st.p_guess
        out["no_search"] = pi1[..., st.Q].mean(1)
    if per_question:
        return {"acc": acc, "J": J}
    return {"acc": acc.mean(1), "J": J.mean(1), **out}


def train_two_turn(st: Setting, est: Estimator, d: Design, lr: float | None = None) -> dict[str, Tensor]:
    """One estimator, every seed at once; returns each metric's curve (steps + 1, seeds). ``lr``: d.lr if None.
    A critic estimator's curves also hold critic_err, mean over questions of |V(q) - J_q|."""
    lr = d.lr if lr is None else lr
    S, n_q, B, G = d.seeds, d.questions, d.batch_questions, d.G
    gen = torch.Generator().manual_seed(d.seed)
    th1 = torch.randn(S, n_q, st.A1, generator=gen, dtype=F64)
    th2 = torch.randn(S, n_q, 2, st.M, generator=gen, dtype=F64)
    if not st.learnable:
        th2.zero_()  # a uniform pick, never updated
    V1, V2 = torch.zeros(S, n_q, dtype=F64), torch.zeros(S, n_q, 2, dtype=F64)
    def metrics():
        m = two_turn_metrics(st, th1, th2)
        if est.critic:
            m["critic_err"] = (V1 - two_turn_metrics(st, th1, th2, per_question=True)["J"]).abs().mean(1)
        return m

    curves = {k: [v] for k, v in metrics().items()}
    s = torch.arange(S)[:, None, None]
    for _ in range(d.steps):
        qs, u = _rng_draws(gen, S, n_q, B, G)
        bt = sample_two_turn(st, th1, th2, qs, u)
        q = qs[:, :, None].expand(S, B, G)
        r_idx = (bt.res - 1).clamp(min=0)
        if est.critic:
            bt.ro.values = torch.stack([V1[s, q].reshape(-1), V2[s, q, r_idx].reshape(-1)], 1)
        A, targets = est(bt.ro, G, batch=B * G)
        g1, g2 = policy_gradient(bt, A, n_q, st.A1, st.M, st.learnable)
        th1 += lr * g1
        th2 += lr * g2
        if est.critic:  # one SGD step on the batch-mean of (V - target)^2 / 2 over present (rollout, turn) entries
            took = (bt.res != NONE)
            present = (B * G + took.sum((1, 2))).to(F64)[:, None, None]
            t = targets.view(S, B, G, 2)
            e1 = (V1[s, q] - t[..., 0]) / present
            e2 = (V2[s, q, r_idx] - t[..., 1]) * took / present
            V1.index_put_((s[..., 0].expand(S, B), qs), -d.lr_v * e1.sum(2), accumulate=True)
            V2.index_put_((s.expand(S, B, G), q, r_idx), -d.lr_v * e2, accumulate=True)
        for k, v in metrics().items():
            curves[k].append(v)
    return {k: torch.stack(v) for k, v in curves.items()}


def sample_k_turn(th1: Tensor, th2: Tensor, qs: Tensor, u: Tensor, n_q: int, Q: int, no_search: bool,
                  p_guess: float = 0.1) -> Batch:
    """K = 3: th1 (S, n_q, Q + no_search), th2 (S, n_q, 2, 2) (answer, search again); questions n_q // 2 and up
    are two-hop."""
    S, B = qs.shape
    G = u.shape[-1]
    s = torch.arange(S)[:, None, None]
    q = qs[:, :, None].expand(S, B, G)
    A1 = th1.shape[-1]
    pi1 = torch.softmax(th1[s[..., 0], qs], -1)[:, :, None, :].expand(S, B, G, A1)
    a1 = categorical(pi1, u[0])
    none = (a1 == Q) if no_search else torch.zeros_like(a1, dtype=torch.bool)
    res = torch.where(none, NONE, torch.where(a1 == 0, SUBJECT, DECOY))
    pi2 = torch.softmax(th2[s, q, (res - 1).clamp(min=0)], -1)
    again = (categorical(pi2, u[1]) == 1) & ~none
    two = q >= n_q // 2
    found = res == SUBJECT
    R_T1 = torch.where(none, 0.0, TOOL + FOUND * found.to(F64))
    R_T2 = torch.where(again, TOOL + FOUND * (two & found).to(F64), 0.0)
    right = torch.where(two, found & again, found) | (none & (u[3] < p_guess))
    turns = 1 + (~none).long() + again.long()
    ro = Rollouts(torch.stack([R_T1, R_T2], -1).reshape(-1, 2), (RIGHT * right.to(F64)).reshape(-1),
                  (~none).reshape(-1), res.reshape(-1), turns=turns.reshape(-1))
    return Batch(qs, a1, again.long(), res, pi1, pi2, ro)


def k_turn_metrics(th1: Tensor, th2: Tensor, Q: int, no_search: bool, p_guess: float = 0.1) -> dict[str, Tensor]:
    n_q = th1.shape[1]
    pi1, pi2 = torch.softmax(th1, -1), torch.softmax(th2, -1)[..., 1]  # P(search again | subject's, decoy's)
    one = torch.arange(n_q) < n_q // 2
    right, searched = pi1[..., 0], pi1[..., :Q].sum(-1)
    extra = right * pi2[..., 0] + (searched - right) * pi2[..., 1]  # P(second search)
    acc = torch.where(one, right, right * pi2[..., 0])
    J = torch.where(one, right * (TOOL + FOUND + RIGHT + TOOL * pi2[..., 0]),
                    right * (TOOL + FOUND + pi2[..., 0] * (TOOL + FOUND + RIGHT)))
    J = J + (searched - right) * (TOOL + TOOL * pi2[..., 1])
    none = pi1[..., Q] if no_search else torch.zeros_like(right)
    acc, J = acc + none * p_guess, J + none * RIGHT * p_guess
    return {"acc": acc.mean(1), "J": J.mean(1), "extra_one_hop": extra[:, one].mean(1),
            "needed_two_hop": pi2[:, ~one, 0].mean(1), "no_search": none.mean(1), "query": right.mean(1)}


def train_k_turn(est: Estimator, d: Design, no_search: bool = True, Q: int = 4,
                 lr: float | None = None) -> dict[str, Tensor]:
    lr = d.lr if lr is None else lr
    S, n_q, B, G = d.seeds, d.questions, d.batch_questions, d.G
    gen = torch.Generator().manual_seed(d.seed)
    th1 = torch.randn(S, n_q, Q + int(no_search), generator=gen, dtype=F64)
    th2 = torch.randn(S, n_q, 2, 2, generator=gen, dtype=F64)
    curves = {k: [v] for k, v in k_turn_metrics(th1, th2, Q, no_search).items()}
    for _ in range(d.steps):
        qs, u = _rng_draws(gen, S, n_q, B, G)
        bt = sample_k_turn(th1, th2, qs, u, n_q, Q, no_search)
        A, _ = est(bt.ro, G)
        g1, g2 = policy_gradient(bt, A, n_q, th1.shape[-1], 2, True)
        th1 += lr * g1
        th2 += lr * g2
        for k, v in k_turn_metrics(th1, th2, Q, no_search).items():
            curves[k].append(v)
    return {k: torch.stack(v) for k, v in curves.items()}


# ============================================================================================== statistics
def ci(x: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (1.96 sd / sqrt(n)) over seeds."""
    return x.mean().item(), (1.96 * x.std() / math.sqrt(len(x))).item() if len(x) > 1 else float("nan")


def auc(curve: Tensor) -> Tensor:
    return curve[1:].mean(0)


def fmt_ci(x: Tensor, digits: int = 3) -> str:
    m, h = ci(x)
    return f"{m:+.{digits}f} [{m - h:+.{digits}f}, {m + h:+.{digits}f}]"


TIE = 1e-3  # a paired difference of accuracy below this counts as a tie in the win/loss table


def verdict(d: Tensor) -> int:
    """+1: the interval of the paired difference lies above 0; -1: below; 0: it covers 0 or |mean| < TIE."""
    m, h = ci(d)
    if abs(m) < TIE:  # e.g. GiGPO and MT-GRPO at M = 1: equal but for the + 1e-4 in group_normalise's denominator
        return 0
    return 1 if m - h > 0 else -1 if m + h < 0 else 0


# ================================================================================================= the report
def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def f3(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


EXACT_SETTINGS = {"fixed-chance turn 2": Setting(learnable=False), "M=1": Setting(M=1),
                  "noisy R^T (flip 0.25)": Setting(turn_reward="noisy"), "judge pays any search": Setting(turn_reward="judge"),
                  "no-search action": Setting(no_search=True)}
TURN2 = {"M=1": dict(M=1), "M=3 fixed chance": dict(learnable=False), "M=3 learnable": {}}
TURN_REWARDS = ("aligned", "noisy", "judge")
LAMBDAS = [(lam, conv) for lam in (0.0, 0.5, 2.0) for conv in ("seed", "paper")]


def part1(d: Design, log) -> list[str]:
    lines = ["## 1. Exact bias and variance of one group's gradient", "",
             "Scale-free, against the exact gradient g* = grad E[R^T + R^O] of one question (see the module "
             "docstring): cos (1 = points where g* points), cos_O (against grad E[R^O]), share_1 (the part of the "
             "mean step spent on turn 1, beside g*'s), bias_t and var_t per turn after matching the mean's length "
             "to g*'s (units of ||g*||, ||g*||^2; var per group of G rollouts). Exact enumeration: no sampling.", ""]
    base = Setting()
    head = ["estimator", "G", "cos", "cos_O", "share_1", "bias_1", "bias_2", "var_1", "var_2"]
    for policy in ("start", "midway"):
        rows, exact_share = [], None
        for G in d.exact_G:
            for est, critic in analysis_estimators():
                r = analyse(base, policy, est, G, critic)
                exact_share = r["share1_exact"]
                rows.append([est.name, G, f3(r["cos"]), f3(r["cos_O"]), f3(r["share1"]), f3(r["bias"][0]),
                             f3(r["bias"][1]), f3(r["var"][0]), f3(r["var"][1])])
        log(f"part 1: base, {policy} done")
        lines += [f"### 1a. Base setting (Q=4, M=3 learnable, aligned R^T), {policy} policy "
                  f"(g*'s share_1 = {exact_share:.3f})", ""] + table(head, rows) + [""]
    G = 8 if 8 in d.exact_G else d.exact_G[-1]
    rows = []
    for policy in ("start", "midway"):
        for lam, conv in LAMBDAS:
            r = analyse(base, policy, mt_grpo_est(lam, conv), G)
            rows.append([f"lam={lam:g} {conv}", policy, f3(r["cos"]), f3(r["cos_O"]), f3(r["share1"]),
                         f3(r["bias"][0]), f3(r["bias"][1]), f3(r["var"][0]), f3(r["var"][1])])
    lines += [f"### 1b. MT-GRPO's lam and convention, base setting, G={G} (lam=1: table 1a)", ""]
    lines += table(["MT-GRPO", "policy", *head[2:]], rows) + [""]
    rows = []
    for name, st in EXACT_SETTINGS.items():
        for policy in ("start", "midway"):
            for est, critic in analysis_estimators():
                r = analyse(st, policy, est, G, critic)
                b2 = f3(r["bias"][1]) if len(r["bias"]) > 1 else "-"
                v2 = f3(r["var"][1]) if len(r["var"]) > 1 else "-"
                rows.append([name, policy, est.name, f3(r["cos"]), f3(r["cos_O"]), f3(r["share1"]),
                             f3(r["bias"][0]), b2, f3(r["var"][0]), v2])
            rows.append([name, policy, "(exact g*)", "1", f3(r["cos_JO"]), f3(r["share1_exact"]), "0",
                         "0" if st.learnable else "-", "", ""])
        log(f"part 1: {name} done")
    lines += [f"### 1c. The other settings, G={G} (fixed-chance turn 2 has no turn-2 parameters: '-')", ""]
    lines += table(["setting", "policy", *head[:1], *head[2:]], rows) + [""]
    rows = []
    for two_hop in (False, True):
        for est in k_turn_estimators():
            r = k_turn_analysis(est, G, two_hop)
            rows.append([("two" if two_hop else "one") + "-hop", est.name, f3(r["cos"]), f3(r["cos_O"]),
                         *(f"{v:+.3f}" for v in r["push"].values())])
        rows.append([("two" if two_hop else "one") + "-hop", "(exact grad J)", "1", f3(r["cos_JO"]),
                     *(f"{v:+.3f}" for v in r["push_J"].values())])
        rows.append([("two" if two_hop else "one") + "-hop", "(exact grad E[R^O])", "", "1",
                     *(f"{v:+.3f}" for v in r["push_O"].values())])
    lines += [f"### 1d. K = 3 (no-search allowed), start policy, G={G}: mean push on three logits", "",
              "Each entry: that component of the estimator's exact mean gradient divided by the mean's length "
              "(positive: it raises the logit). Searching again after the subject's passage is, on a one-hop question, "
              "the unneeded turn.", ""]
    lines += table(["question", "estimator", "cos", "cos_O", "search again after subject's", "search again after decoy's",
                    "no search"], rows)
    return lines + [""]


MODES = ("raw", "matched")


def run_cell(st: Setting, d: Design, ests: list[Estimator] | None = None) -> dict:
    """Every estimator of a cell in both modes: {"lr": {name: matched lr}, "raw": {name: curves}, "matched": ...}.
    The first estimator is the reference (MT-GRPO): its matched lr is d.lr, so its runs are shared."""
    ests = ests or two_turn_estimators()
    lrs = matched_lrs({e.name: start_step(st, e, d.G) for e in ests}, ests[0].name, d.lr)
    out = {"lr": lrs, "raw": {}, "matched": {}}
    for e in ests:
        out["raw"][e.name] = train_two_turn(st, e, d)
        same = abs(lrs[e.name] - d.lr) < 1e-12
        out["matched"][e.name] = out["raw"][e.name] if same else train_two_turn(st, e, d, lrs[e.name])
    return out


def paired_rows(res: dict[str, dict[str, Tensor]], ref: str, keys: list[str], final: bool = True) -> list[list]:
    r = res[ref]
    return [[name, *(fmt_ci((cv[k][-1] - r[k][-1]) if final else (auc(cv[k]) - auc(r[k]))) for k in keys)]
            for name, cv in res.items() if name != ref]


def part2(d: Design, log) -> tuple[list[str], dict]:
    t0 = time.time()
    cell = run_cell(Setting(), d)
    log(f"part 2 done in {time.time() - t0:.0f} s")
    cps = [c for c in d.checkpoints if c <= d.steps]
    head = ["estimator", "lr", *(f"acc @{c}" for c in cps), "AUC", "P(right query)", "P(right pick)", "J",
            "critic err"]
    lines = ["## 2. Learning curves, base setting (Q=4, M=3 learnable, aligned R^T)", "",
             f"{d.seeds} paired seeds x {d.steps} steps of {d.batch_questions} questions x G={d.G}, critic lr "
             f"{d.lr_v}; raw: lr {d.lr} for all; matched: lr set so that the mean first step is MT-GRPO's length "
             f"(module docstring). Accuracy = exact P(right answer) of the policy, mean over a seed's {d.questions} "
             "questions; mean ± 95% half-width over seeds. critic err: MT-PPO's mean |V(q) - J_q| at the end.", ""]
    for mode in MODES:
        rows = []
        for name, cv in cell[mode].items():
            lr = d.lr if mode == "raw" else cell["lr"][name]
            rows.append([name, f"{lr:.3f}", *(f"{ci(cv['acc'][c])[0]:.3f} ± {ci(cv['acc'][c])[1]:.3f}" for c in cps),
                         f"{ci(auc(cv['acc']))[0]:.3f}", f"{ci(cv['query'][-1])[0]:.3f}",
                         f"{ci(cv['pick'][-1])[0]:.3f}", f"{ci(cv['J'][-1])[0]:.3f}",
                         f"{ci(cv['critic_err'][-1])[0]:.3f}" if "critic_err" in cv else ""])
        lines += [f"### 2{'ab'[MODES.index(mode)]}. {mode}", ""] + table(head, rows) + [""]
        lines += [f"Paired differences ({mode}), estimator - MT-GRPO, at step {d.steps} (AUC: mean over steps 1..T), "
                  "mean [95% interval]:", ""]
        drows = [[r[0], *r[1:]] for r in paired_rows(cell[mode], "MT-GRPO", ["acc"])]
        arows = paired_rows(cell[mode], "MT-GRPO", ["acc"], final=False)
        qrows = paired_rows(cell[mode], "MT-GRPO", ["query", "pick"])
        rows = [[a[0], a[1], b[1], c[1], c[2]] for a, b, c in zip(drows, arows, qrows)]
        lines += table(["estimator", "final accuracy", "AUC accuracy", "P(right query)", "P(right pick)"], rows)
        lines += [""]
    t0 = time.time()
    sweep = {e.name: {lr: train_two_turn(Setting(), e, d, lr) for lr in d.lr_grid} for e in two_turn_estimators()}
    log(f"part 2: lr sweep done in {time.time() - t0:.0f} s")
    best = {n: max(runs, key=lambda lr: auc(runs[lr]["acc"]).mean().item()) for n, runs in sweep.items()}
    rows = [[n, *(f"{auc(runs[lr]['acc']).mean():.3f} / {runs[lr]['acc'][-1].mean():.3f}" for lr in d.lr_grid),
             f"{best[n]:g}"] for n, runs in sweep.items()]
    lines += ["### 2c. Each estimator at its own best lr (grid; best = highest mean AUC)", "",
              "Entries: AUC accuracy / final accuracy, means over seeds.", ""]
    lines += table(["estimator", *(f"lr {lr:g}" for lr in d.lr_grid), "best lr"], rows) + [""]
    ref = sweep["MT-GRPO"][best["MT-GRPO"]]
    rows = [[n, f"{best[n]:g}", fmt_ci(runs[best[n]]["acc"][-1] - ref["acc"][-1]),
             fmt_ci(auc(runs[best[n]]["acc"]) - auc(ref["acc"]))] for n, runs in sweep.items() if n != "MT-GRPO"]
    lines += [f"Paired against MT-GRPO at its best lr ({best['MT-GRPO']:g}), mean [95% interval]:", ""]
    lines += table(["estimator", "its best lr", "final accuracy", "AUC accuracy"], rows) + [""]
    cell["sweep_best"] = {n: sweep[n][best[n]] for n in sweep}
    return lines, cell


def part3(d: Design, log) -> tuple[list[str], dict]:
    cells = {}
    for t2, kw in TURN2.items():
        for tr in TURN_REWARDS:
            cells[f"{t2}, {tr}"] = Setting(turn_reward=tr, **kw)
    for tr in TURN_REWARDS:
        cells[f"M=3 learnable + no-search, {tr}"] = Setting(turn_reward=tr, no_search=True)
    results = {}
    for name, st in cells.items():
        t0 = time.time()
        results[name] = run_cell(st, d)
        log(f"part 3: {name} done in {time.time() - t0:.0f} s")
    names = [e.name for e in two_turn_estimators()]
    head = ["cell", "MT-GRPO acc", *(f"{n} - MT" for n in names[1:])]
    lines = ["## 3. The map: where turn-level credit helps", "",
             f"Each cell: {d.seeds} paired seeds x {d.steps} steps, as part 2, raw and matched. Entries: paired "
             "difference (estimator - MT-GRPO) of accuracy, mean [95% interval]; positive = MT-GRPO loses.", ""]
    verdicts = {}
    k = 0
    for what in ("final", "AUC"):
        for mode in MODES:
            rows = []
            for cell, res in results.items():
                ref = res[mode]["MT-GRPO"]["acc"]
                rv = ref[-1] if what == "final" else auc(ref)
                diffs = {n: (res[mode][n]["acc"][-1] if what == "final" else auc(res[mode][n]["acc"])) - rv
                         for n in names[1:]}
                rows.append([cell, f"{ci(rv)[0]:.3f}", *(fmt_ci(x) for x in diffs.values())])
                for n, x in diffs.items():
                    verdicts[(mode, what, cell, n)] = (verdict(x), fmt_ci(x))
            lines += [f"### 3{'abcd'[k]}. {what} accuracy, {mode}", ""] + table(head, rows) + [""]
            k += 1
    lines += ["### 3e. The matched learning rates (lr 1.0 x MT-GRPO's mean first step / the estimator's)", ""]
    lines += table(["cell", *names], [[c, *(f"{res['lr'][n]:.3f}" for n in names)] for c, res in results.items()])
    lines += ["", "### Where MT-GRPO loses and wins (final accuracy; an estimator listed under 'loses to' beats "
              "MT-GRPO with its whole 95% interval above 0; 'beats': MT-GRPO ahead, interval wholly below 0; "
              f"|difference| < {TIE:g} is a tie)", ""]
    rows = []
    for cell in results:
        row = [cell]
        for mode in MODES:
            for sign in (1, -1):
                row.append(", ".join(f"{n} {txt.split(' ')[0]}" for (m, what, c, n), (v, txt) in verdicts.items()
                                     if m == mode and what == "final" and c == cell and v == sign) or "-")
        rows.append(row)
    lines += table(["cell", "raw: MT-GRPO loses to", "raw: MT-GRPO beats", "matched: MT-GRPO loses to",
                    "matched: MT-GRPO beats"], rows)
    for mode in MODES:
        for what in ("final", "AUC"):
            n_loss = sum(1 for (m, w, _, _), (v, _) in verdicts.items() if m == mode and w == what and v > 0)
            n_win = sum(1 for (m, w, _, _), (v, _) in verdicts.items() if m == mode and w == what and v < 0)
            total = sum(1 for (m, w, _, _) in verdicts if m == mode and w == what)
            lines += [f"- {mode}, {what} accuracy: MT-GRPO loses {n_loss}, wins {n_win}, ties {total - n_loss - n_win} "
                      f"of {total} comparisons"]
    # (d) lam
    rows = []
    for cell in ("M=3 learnable, aligned", "M=3 learnable, noisy"):
        st = cells[cell]
        ests = [mt_grpo_est()] + [mt_grpo_est(lam, conv) for lam, conv in LAMBDAS]
        lrs = matched_lrs({e.name: start_step(st, e, d.G) for e in ests}, "MT-GRPO", d.lr)
        for mode in MODES:
            ref = results[cell][mode]["MT-GRPO"]
            for e in ests[1:]:
                cv = train_two_turn(st, e, d, d.lr if mode == "raw" else lrs[e.name])
                rows.append([cell, mode, e.name.replace("MT-GRPO ", ""), f"{d.lr if mode == 'raw' else lrs[e.name]:.3f}",
                             f"{ci(cv['acc'][-1])[0]:.3f}", fmt_ci(cv["acc"][-1] - ref["acc"][-1]),
                             fmt_ci(auc(cv["acc"]) - auc(ref["acc"])), f"{ci(cv['query'][-1])[0]:.3f}",
                             f"{ci(cv['pick'][-1])[0]:.3f}"])
        log(f"part 3: lam in {cell} done")
    lines += ["", "### 3f. MT-GRPO's lam and convention, against MT-GRPO lam=1 (where both conventions agree)", ""]
    lines += table(["cell", "mode", "MT-GRPO", "lr", "final acc", "final - lam=1", "AUC - lam=1", "P(right query)",
                    "P(right pick)"], rows)
    # (e) K = 3
    ests = k_turn_estimators()
    lrs = matched_lrs({e.name: k_turn_start_step(e, d.G) for e in ests}, ests[0].name, d.lr)
    k3 = {"lr": lrs, "raw": {}, "matched": {}}
    for e in ests:
        k3["raw"][e.name] = train_k_turn(e, d)
        same = abs(lrs[e.name] - d.lr) < 1e-12
        k3["matched"][e.name] = k3["raw"][e.name] if same else train_k_turn(e, d, lr=lrs[e.name])
    fresh = k_turn_estimators()[:2]  # fresh caches: a cached group's rounding depends on the batch it came in
    check = {e.name: train_k_turn(e, d, no_search=False) for e in fresh}
    same = max((check[fresh[0].name][key] - check[fresh[1].name][key]).abs().max().item() for key in check[fresh[0].name])
    log("part 3: K = 3 done")
    keys = [("extra_one_hop", "P(2nd search / one-hop)"), ("needed_two_hop", "P(2nd search / two-hop, bridge)"),
            ("no_search", "P(no search)"), ("acc", "accuracy"), ("J", "J")]
    lines += ["", "### 3g. K = 3: one-hop and two-hop questions; a second search one-hop ones do not need", "",
              f"Final values (step {d.steps}), means over {d.seeds} seeds ('/' reads 'given'), then paired "
              "differences against MT-GRPO masked, mean [95% interval].", ""]
    for mode in MODES:
        res = k3[mode]
        rows = [[n, f"{d.lr if mode == 'raw' else lrs[n]:.3f}", *(f"{ci(cv[k][-1])[0]:.3f}" for k, _ in keys)]
                for n, cv in res.items()]
        lines += [f"{mode}:", ""] + table(["estimator", "lr", *(lbl for _, lbl in keys)], rows) + [""]
        lines += table(["estimator", *(lbl for _, lbl in keys[:4])],
                       paired_rows(res, ests[0].name, [k for k, _ in keys[:4]])) + [""]
    lines += [f"Check, the same K = 3 run (raw) without the no-search action: the largest difference between the "
              f"masked and the naive run's curves is {same:.1e} (every rollout then takes turn 2, so no turn is missing "
              "from a normalisation, and the two coincide)."]
    return lines + [""], {"cells": results, "k3": k3}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, torch threads {torch.get_num_threads()}")


def plot(path: Path, cell: dict, k3: dict) -> None:
    """Base cell: accuracy raw and matched with 95% bands; matched paired differences; K = 3 unneeded searches."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def band(ax, y, label):
        x = torch.arange(len(y))
        m, h = y.mean(1), 1.96 * y.std(1) / math.sqrt(y.shape[1])
        ax.plot(x, m, label=label)
        ax.fill_between(x, m - h, m + h, alpha=0.2)

    fig, ax = plt.subplots(1, 4, figsize=(20, 4.5))
    for i, mode in enumerate(MODES):
        for name, cv in cell[mode].items():
            band(ax[i], cv["acc"], name)
        ax[i].set(title=f"base setting, {mode} lr: accuracy (95% CI)", xlabel="step", ylabel="P(right answer)")
    ref = cell["matched"]["MT-GRPO"]["acc"]
    for name, cv in cell["matched"].items():
        if name != "MT-GRPO":
            band(ax[2], cv["acc"] - ref, f"{name} - MT-GRPO")
    ax[2].axhline(0, color="k", lw=0.5)
    ax[2].set(title="matched: paired difference vs MT-GRPO (95% CI)", xlabel="step")
    for mode, style in (("raw", "-"), ("matched", "--")):
        for name, cv in k3[mode].items():
            ax[3].plot(cv["extra_one_hop"].mean(1), style, label=f"{name} ({mode})")
    ax[3].set(title="K=3: P(second search | one-hop)", xlabel="step")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="every part at a tiny size (seconds)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for testbed*.md / *.png")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d = QUICK if args.quick else FULL
    stem = "testbed_quick" if args.quick else "testbed"
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    body = part1(d, log)
    lines2, cell = part2(d, log)
    lines3, extra = part3(d, log)
    wall = time.time() - t0
    head = [f"# The exact two-turn testbed ({'quick run' if args.quick else 'full run'})", "",
            "Written by bench/testbed.py itself (never edited by hand); the design is the module's docstring.", "",
            f"- command: `python bench/testbed.py{''.join(' ' + a for a in argv)}`",
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- wall time: {wall:.0f} s",
            f"- machine: {machine()}",
            f"- design: {d.seeds} seeds, {d.steps} steps, {d.questions} questions a seed, {d.batch_questions} a step, "
            f"G={d.G}, lr {d.lr}, critic lr {d.lr_v}, exact G {list(d.exact_G)}", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(head + body + lines2 + lines3) + "\n"
    (args.out / f"{stem}.md").write_text(text)
    if not args.no_plot:
        plot(args.out / f"{stem}_curves.png", cell, extra["k3"])
    log(f"wrote {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
