"""The shared-prefix forward of the update (fast.shared_prefix_logprobs) and the prefix-caching sampler
(fast.CachedPolicy) compute what the plain computations do: the same log-probs and gradients to 1e-5
in fp32, the same ids and log-probs when sampling."""
import math

import pytest
import torch

import env
import fast.shared_prefix as shared_prefix
import policy
from config import EnvConfig
from fast import CachedPolicy, common_head_logprobs
from helpers import FakeSearcher, tiny_llama
from policy import HFPolicy


def grouped_batch(tok, G=3, seed=0):
    """Two prompts of different lengths, G right-padded rows each with completions of different lengths and
    a turn pattern (model, environment, model); row-major by group, as a rollout returns them."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (9, 6)]
    rows, turns = [], []
    for p in prompts:
        for r in range(G):
            c = torch.randint(5, 1000, (7 + 3 * r,), generator=g).tolist()
            rows.append(p + c)
            turns.append([0] * len(p) + [1] * 3 + [0] * 2 + [2] * (len(c) - 5))
    L = max(map(len, rows))
    ids, attn, turn = (torch.zeros(len(rows), L, dtype=torch.long) for _ in range(3))
    for i, (r, t) in enumerate(zip(rows, turns)):
        ids[i, :len(r)], attn[i, :len(r)], turn[i, :len(r)] = torch.tensor(r), 1, torch.tensor(t)
    lens = torch.tensor([len(p) for p in prompts for _ in range(G)])
    return ids, attn, turn, lens


def values_and_grads(model, f):
    model.zero_grad()
    out = f()
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shared_prefix_logprobs_and_gradients_equal_the_plain_forward(tok):
    model = tiny_llama(tok, kv_heads=2).train()  # grouped-query attention, as SmolLM2 and Qwen2.5
    ids, attn, turn, lens = grouped_batch(tok)
    plain, g_plain = values_and_grads(model, lambda: policy.token_logprobs(model, ids, attn, turn, bf16=False))
    shared, g_shared = values_and_grads(model, lambda: shared_prefix.shared_prefix_logprobs(model, ids, attn, turn, lens, bf16=False))
    assert (plain != 0).sum() == (turn[:, 1:] > 0).sum()  # every model token has a log-prob
    assert torch.allclose(shared, plain, atol=1e-5, rtol=0), (shared - plain).abs().max()
    assert g_plain.keys() == g_shared.keys()
    for n in g_plain:
        assert torch.allclose(g_shared[n], g_plain[n], atol=1e-5, rtol=1e-4), n
    # the module the update calls takes the shared path when given the prompt lengths
    logprobs = policy.LogProbs(model, bf16=False, shared_prefix=shared_prefix.shared_prefix_logprobs)
    assert torch.allclose(logprobs(ids, attn, turn, lens), plain, atol=1e-5, rtol=0)


def test_any_split_point_is_a_valid_prefix_but_a_wrong_prompt_is_caught(tok, monkeypatch):
    """A key/value depends only on the ids before it, so cutting the shared part one id earlier changes
    nothing; continuing a row from *another* question's prompt (the bug the equality test must catch)
    changes the numbers."""
    model = tiny_llama(tok)
    ids, attn, turn, lens = grouped_batch(tok)
    plain = policy.token_logprobs(model, ids, attn, turn, bf16=False)
    with torch.no_grad():
        shorter = shared_prefix.shared_prefix_logprobs(model, ids, attn, turn, lens - 1, bf16=False)
        assert torch.allclose(shorter, plain, atol=1e-5, rtol=0)
        monkeypatch.setattr(shared_prefix, "prompt_groups", lambda ids, lens: torch.zeros(len(ids), dtype=torch.long))
        mis_shared = shared_prefix.shared_prefix_logprobs(model, ids, attn, turn, lens, bf16=False)
    assert (mis_shared - plain)[3:].abs().max() > 1e-2  # the second question's rows read the first's prompt
    assert torch.allclose(mis_shared[:3], plain[:3], atol=1e-5, rtol=0)


def test_prompt_groups_follow_the_ids_not_the_row_order(tok):
    ids, attn, turn, lens = grouped_batch(tok, G=2)
    assert shared_prefix.prompt_groups(ids, lens).tolist() == [0, 0, 2, 2]
    ids[1, 0] += 1  # a different prompt, though in the first group's place
    assert shared_prefix.prompt_groups(ids, lens).tolist() == [0, 1, 2, 2]


def count_cpu_forwards(monkeypatch) -> list:
    """Record each call of sampler.CpuForward (so a test knows the rollout's forwards took that path)."""
    import fast.sampler as sampler

    calls, step = [], sampler.CpuForward.__call__
    monkeypatch.setattr(sampler.CpuForward, "__call__", lambda self, *a: calls.append(1) or step(self, *a))
    return calls


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_cached_sampler_matches_a_plain_forward(tok, temperature, monkeypatch):
    """Multi-turn rollouts with the prefix-caching sampler in fp32: every sampled id's reported log-prob is
    the plain full-context forward's (so the KV cache it reused, across the G rows and across turns, was
    the right one), and greedy ids equal HF generate's."""
    model = tiny_llama(tok, kv_heads=2)
    cfg = EnvConfig(max_turn_tokens=6, max_completion_tokens=120, temperature=temperature)
    questions = ["Who wrote Dracula?", "Where is Paris?"]
    cached = CachedPolicy(model, tok, seed=3, dtype=None)
    steps = count_cpu_forwards(monkeypatch)
    trajs = env.rollout(cached, tok, questions, 3, FakeSearcher(), cfg)
    assert steps and any(t.turn_idx.count(0) for t in trajs)  # one-token steps ran; environment ids were continued
    assert cached.store == [] and cached.fast is None  # end_rollout freed the caches before the update
    for t in trajs:
        ids = torch.tensor([t.prompt_ids + t.completion_ids])
        turn = torch.tensor([[0] * len(t.prompt_ids) + t.turn_idx])
        ref = policy.token_logprobs(model, ids, torch.ones_like(ids), turn, bf16=False,
                                   temperature=temperature or 1.0)[0, len(t.prompt_ids) - 1:]
        for k, lp in enumerate(t.sampler_logprobs):
            if not math.isnan(lp):
                assert abs(lp - ref[k].item()) < 1e-4, (k, lp, ref[k].item())
    if temperature == 0:
        hf = env.rollout(HFPolicy(model, tok, seed=3), tok, questions, 3, FakeSearcher(), cfg)
        assert [t.completion_ids for t in trajs] == [t.completion_ids for t in hf]


def test_cached_sampler_is_reproducible_and_its_bf16_copy_follows_the_model(tok):
    model = tiny_llama(tok)
    cfg = EnvConfig(max_turn_tokens=5, max_completion_tokens=60)

    def run(pol):
        return [t.completion_ids for t in env.rollout(pol, tok, ["Who wrote Dracula?"], 4, FakeSearcher(), cfg)]

    a, b = CachedPolicy(model, tok, seed=1), CachedPolicy(model, tok, seed=1)
    assert run(a) == run(b) and run(a) != run(CachedPolicy(model, tok, seed=2))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    a.start_rollout()  # what env.rollout calls first: the bf16 copy takes the new weights
    assert next(a.model.parameters()).dtype == torch.bfloat16
    assert torch.equal(next(a.model.parameters()), next(model.parameters()).bfloat16())


def test_grouped_decode_attention_equals_sdpa(tok):
    """The sampler's one-token attention (each key/value head with its n_rep query heads as one matrix)
    against transformers' SDPA path (which repeats the keys and values), with padding masked."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask  # noqa: F401  (the mask format both read)

    import fast.sampler as sampler

    model = tiny_llama(tok, kv_heads=2)
    layer = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 16, generator=g), torch.randn(3, 2, 9, 16, generator=g), torch.randn(3, 2, 9, 16, generator=g)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :4] = False  # a left-padded row
    mask[2, ..., 5] = False   # padding between a row's cached part and its new ids
    ours, _ = sampler.grouped_decode_attention(layer, q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=0.25)
    assert ours.shape == ref.shape == (3, 1, 4, 16)
    assert torch.allclose(ours, ref, atol=1e-5)
    ours_nomask, _ = sampler.grouped_decode_attention(layer, q, k, v, None, scaling=0.25)
    assert not torch.allclose(ours_nomask[1], ours[1], atol=1e-3)  # the mask mattered


def test_cached_sampler_copy_with_its_own_attention_matches_the_model(tok):
    """A float64 sampling copy (so rounding is not the question) runs the grouped decode attention and the
    in-place cache: its reported log-probs are the fp32 model's full forward's."""
    model = tiny_llama(tok, kv_heads=2)
    cfg = EnvConfig(max_turn_tokens=6, max_completion_tokens=100)
    pol = CachedPolicy(model, tok, seed=5, dtype=torch.float64)
    trajs = env.rollout(pol, tok, ["Who wrote Dracula?", "Where is Paris?"], 3, FakeSearcher(), cfg)
    assert pol.model.config._attn_implementation == "mtgrpo_grouped_decode"
    for t in trajs:
        ids = torch.tensor([t.prompt_ids + t.completion_ids])
        turn = torch.tensor([[0] * len(t.prompt_ids) + t.turn_idx])
        ref = policy.token_logprobs(model, ids, torch.ones_like(ids), turn, bf16=False,
                                   temperature=cfg.temperature)[0, len(t.prompt_ids) - 1:]
        got = torch.tensor(t.sampler_logprobs)
        ok = got.isfinite()
        assert ok.sum() == t.model_tokens and torch.allclose(got[ok], ref[ok], atol=1e-4)


def tiny_qwen2(tok, kv_heads=2):
    """A random Qwen2 (biased query/key/value projections, untied head) with the real vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(1)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_forward_is_the_models_own_forward(tok, family, dtype):
    """sampler.CpuForward (fused and oneDNN-packed projections, attention over the whole cache buffer, the
    padding of a ragged prefill skipped) against the model's own forward: two prompts of different
    lengths prefilled together, a ragged continuation (3 ids and 1 id, left-padded), then two one-token
    steps (the second reads the key the first wrote). The same logits as the model's forward over the
    same cache, to rounding, and in fp32 the same as a full forward over each whole sequence. A wrong
    position, head order, padding or mask would move them by far more."""
    import fast.sampler as sampler

    model = (tiny_llama(tok, kv_heads=2) if family == "llama" else tiny_qwen2(tok)).to(dtype)
    assert sampler.CpuForward.supports(model)
    rows = [torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 5)]
    more = [[300, 301, 302], [400]]
    tokens = [torch.tensor([17, 923]), torch.tensor([40, 41])]

    def run(fast: bool):
        pol = CachedPolicy(model, tok, dtype=None, fast_decode=fast)
        pol.start_rollout()
        assert (pol.fast is not None) == fast
        past, ids, mask, positions = pol._batch_cache(rows, 3 + len(tokens))
        out = [pol._forward(ids, mask, positions, past)[0]]
        ids, cont = torch.tensor([more[0], [0, 0] + more[1]]), torch.tensor([[1, 1, 1], [0, 0, 1]])  # left-padded
        pos = positions[:, -1:] + 1 + torch.tensor([[0, 1, 2], [0, 0, 0]])
        mask = torch.cat([mask, cont], 1)
        out.append(pol._forward(ids, mask, pos, past)[0])
        seen = torch.zeros(2, past.layers[0].store_k.shape[2], dtype=torch.bool)
        seen[:, :mask.shape[1]] = mask.bool()
        pos = pos[:, -1] + 1
        for token in tokens:
            seen[:, past.layers[0].length] = True
            out.append(pol._step(token, pos, past, seen))
            pos = pos + 1
        return torch.stack(out)

    fast, generic = run(True), run(False)
    tol = 1e-4 if dtype == torch.float32 else 0.05 * generic.abs().max().item()
    assert torch.allclose(fast, generic, atol=tol, rtol=0), (fast - generic).abs().max()
    if dtype == torch.float32:
        for i, r in enumerate(rows):
            whole = r + more[i] + [int(tokens[0][i]), int(tokens[1][i])]
            full = model(input_ids=torch.tensor([whole])).logits[0]
            ends = [len(r) - 1, len(r) + len(more[i]) - 1, len(whole) - 2, len(whole) - 1]
            assert torch.allclose(fast[:, i], full[ends], atol=1e-4, rtol=0)


def test_the_warm_starts_shared_system_prompt_is_computed_once_with_the_same_loss_and_gradients(tok, searcher,
                                                                                               monkeypatch):
    """The speed path's warm-start log-probs (fast.common_head_logprobs) forward the system prompt all rows share
    once: in fp32 the warm start's loss and every gradient equal the reference's (policy.token_logprobs); a head
    a few ids too long (into the question) does not."""
    from extensions import warmstart
    from helpers import WARMSTART_CFG as CFG
    from helpers import WARMSTART_QUESTIONS as QUESTIONS

    demos = warmstart.demonstrations(tok, searcher, QUESTIONS, CFG)
    ids, attn, turn = policy.pack(demos, tok.pad_token_id)
    head = shared_prefix.common_head(ids, turn)
    prompt = len(demos[0].prompt_ids)
    assert 20 < head < prompt and ids[0, head] != ids[1, head]  # the system prompt, not the question

    def loss_and_grads(logprobs):
        model = tiny_llama(tok, kv_heads=2)
        loss = warmstart.token_loss(model, ids, attn, turn, bf16=False, logprobs=logprobs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (plain, g_plain), (shared, g_shared) = loss_and_grads(policy.token_logprobs), loss_and_grads(common_head_logprobs)
    assert torch.allclose(shared, plain, atol=1e-5, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g_shared, g_plain))
    # a few ids too long, and the rows still made to share them: the second row reads the first's question ids
    monkeypatch.setattr(shared_prefix, "common_head", lambda ids, turn: head + 4)
    monkeypatch.setattr(shared_prefix, "prompt_groups", lambda ids, lens: torch.zeros(len(ids), dtype=torch.long))
    wrong = warmstart.token_loss(tiny_llama(tok, kv_heads=2), ids, attn, turn, bf16=False, logprobs=common_head_logprobs)
    assert (wrong - plain).abs() > 1e-4


def test_without_the_speed_package_the_default_job_runs_on_the_reference_path(tmp_path, tiny_model_dir):
    """train.py with fast/ hidden (as if the package were deleted): the run completes, every step on the
    reference path (policy.HFPolicy, policy.token_logprobs), and no module of fast/ was ever imported."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from helpers import tiny_args

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    script = ("import sys; sys.modules['fast'] = None\n"  # import fast now fails, and find_spec('fast') is None
              "import train\n"
              f"code = train.main({tiny_args(tiny_model_dir, out, '--max-steps', '2')!r})\n"
              "assert not any(m == 'fast' or m.startswith('fast.') for m in sys.modules if sys.modules[m] is not None)\n"
              "sys.exit(code)\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["model_tokens"] > 0 for r in rows)
