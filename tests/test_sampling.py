"""The sampling contract (Sampling), for every sampler train.py can use.

The seed samples with TRL's defaults of its pinned commit: temperature 0.9, top-k 50, top-p 1. A sampler
must draw from the *truncated* tempered distribution: softmax(logits / 0.9) kept to its 50 most likely ids,
renormalised. The log-prob it reports for a drawn id is taken from the *whole* tempered distribution,
before the cut: the number the trainer computes (policy.token_logprobs at the same temperature), so that
the mismatch meter reads ~0 when both sides hold the same weights. Reading the truncated distribution's
log-prob instead (vLLM's "processed" log-probs) would show a mismatch of log(mass kept) on every token.
"""
import math

import pytest
import torch

import env
import policy
from config import GREEDY, EnvConfig, Sampling
from fast import CachedPolicy
from helpers import (
    PROMPT,
    SEED_SAMPLING,
    VOCAB,
    FakeSearcher,
    chi2,
    designed_logits,
    designed_model,
    draw_counts,
    tiny_llama,
    truncated,
)
from policy import HFPolicy


@pytest.mark.parametrize("make", [lambda m, tok: HFPolicy(m, tok, seed=0),
                                  lambda m, tok: CachedPolicy(m, tok, seed=0, dtype=None)], ids=["hf", "cached"])
def test_samplers_draw_the_truncated_tempered_distribution(tok, make):
    """20,000 one-id draws at the seed's T 0.9 / top-k 50: no id outside the 50 kept, and the counts fit the
    truncated tempered distribution (Pearson's chi-square with 49 degrees of freedom, below its mean plus 5
    standard deviations), while the two near misses, the cut at temperature 1 and no cut at all, do not.
    Each draw's reported log-prob is that of the whole tempered distribution."""
    logits = designed_logits()
    sampler = make(designed_model(tok, logits), tok)
    counts, logprobs = draw_counts(sampler, 20_000, SEED_SAMPLING)
    want = truncated(logits, SEED_SAMPLING)
    assert int((counts > 0).sum()) <= 50 and counts[want == 0].sum() == 0
    df = 49
    assert chi2(counts, want) < df + 5 * math.sqrt(2 * df)
    assert chi2(counts, truncated(logits, Sampling(1.0, 50, 1.0))) > df + 10 * math.sqrt(2 * df)
    # no id outside the 50 was drawn, where the uncut distribution would have drawn some 20 (P(none) < 1e-8)
    tail = torch.softmax(logits.double() / 0.9, -1)[want == 0].sum()
    assert counts.sum() * tail > 18
    with torch.no_grad():
        own = sampler.model(torch.tensor([PROMPT])).logits[0, -1].double()  # the model's logits, exactly
    whole = torch.log_softmax(own / 0.9, -1)
    drawn = [i for i in range(VOCAB) for _ in range(int(counts[i]))]
    assert sorted(logprobs) == pytest.approx(sorted(whole[drawn].tolist()), abs=1e-5)
    cut = torch.log(truncated(own, SEED_SAMPLING))  # the truncated distribution's would be ~0.012 higher
    assert (cut[drawn] - whole[drawn]).min() > 0.005


def test_inverse_cdf_sampling_draws_the_models_distribution(tok):
    """CachedPolicy._sample itself: each id's frequency is its probability (within 5 standard errors), an id
    of probability 0 is never drawn, top-k keeps the k most likely, top-p the nucleus of what top-k kept,
    temperature 0 is argmax; the log-prob is always the whole tempered distribution's."""
    pol = CachedPolicy(tiny_llama(tok), tok)
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), -1.0]]).repeat(40_000, 1)
    p = torch.softmax(logits[0], -1)
    draws, logp = pol._sample(logits, Sampling(1.0, 0, 1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert freq[3] == 0 and (freq - p).abs().max() < 5 * (p * (1 - p) / len(draws)).sqrt().max()
    assert torch.allclose(logp, p.log()[draws], atol=1e-6)  # each draw's log-prob under the model
    nucleus, logp = pol._sample(logits, Sampling(1.0, 0, 0.7), torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {0, 1}  # p = 0.64, 0.24: the smallest set reaching 0.7
    assert torch.allclose(logp, p.log()[nucleus], atol=1e-6)  # before top-p renormalises
    top2, _ = pol._sample(logits, Sampling(1.0, 2, 1.0), torch.Generator().manual_seed(0))
    assert set(top2.tolist()) == {0, 1}  # the two most likely
    # top-p reads what top-k kept, renormalised: (0.73, 0.27), so 0.7 is reached by id 0 alone
    both, _ = pol._sample(logits, Sampling(1.0, 2, 0.7), torch.Generator().manual_seed(0))
    assert set(both.tolist()) == {0}
    hot, logp = pol._sample(logits, Sampling(2.0, 0, 1.0), torch.Generator().manual_seed(0))
    assert torch.allclose(logp, torch.log_softmax(logits[0] / 2.0, -1)[hot], atol=1e-6)  # tempered
    assert pol._sample(logits[:2], GREEDY, None)[0].tolist() == [0, 0]


@pytest.mark.parametrize("make", [lambda m, tok: HFPolicy(m, tok, seed=1),
                                  lambda m, tok: CachedPolicy(m, tok, seed=1, dtype=None)], ids=["hf", "cached"])
def test_the_trainers_logprobs_of_sampled_ids_equal_the_samplers(tok, make):
    """Multi-message rollouts at the seed's sampling: the trainer's log-prob of every sampled id, at the same
    temperature, is the one the sampler reported (fp32 on both sides, to 1e-4)."""
    model = tiny_llama(tok, kv_heads=2)
    cfg = EnvConfig(max_turn_tokens=8, max_completion_tokens=120)
    assert cfg.sampling() == SEED_SAMPLING  # the defaults are the seed's
    trajs = env.rollout(make(model, tok), tok, ["Who wrote Dracula?", "Where is Paris?"], 3, FakeSearcher(), cfg)
    compared = 0
    for t in trajs:
        ids = torch.tensor([t.prompt_ids + t.completion_ids])
        turn = torch.tensor([[0] * len(t.prompt_ids) + t.turn_idx])
        ref = policy.token_logprobs(model, ids, torch.ones_like(ids), turn, bf16=False, temperature=0.9)[0]
        ref = ref[len(t.prompt_ids) - 1:]
        for k, lp in enumerate(t.sampler_logprobs):
            if not math.isnan(lp):
                assert abs(lp - ref[k].item()) < 1e-4, (k, lp, ref[k].item())
                compared += 1
    assert compared == sum(t.model_tokens for t in trajs) > 20
