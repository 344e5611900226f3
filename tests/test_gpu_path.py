"""What the paper's GPU recipe needs, checked as far as a CPU can: log-probs in bounded memory, attention
that falls back to SDPA, an engine sized for the episode and checked against its GPU share, a weight
channel that checks its room, sleep mode in the right order, and the sampler-trainer mismatch meter.
(The real vLLM engine is in tests/test_vllm.py, ZeRO-3 in tests/test_zero3.py.)"""
import copy
import dataclasses
import math
import sys
import types

import pytest
import torch

import config
import env
import policy
from config import EnvConfig, Sampling
from helpers import mismatch, tiny_llama
from infra import assemble, vllm_backend
from policy import HFPolicy


# ----------------------------------------------------------------------------- chunked log-probs
def plain_logprobs(model, ids, attn, turn):
    """The unchunked reference: one float32 log_softmax over the vocabulary at every position."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.where(turn[:, 1:] > 0, logp, torch.zeros_like(logp))


@pytest.mark.parametrize("chunk", [policy.LOGPROB_CHUNK, 7, 1])
def test_chunked_logprobs_and_gradients_equal_the_plain_ones(tiny_model, chunk):
    model = copy.deepcopy(tiny_model).float()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=gen)
    attn = torch.ones_like(ids)
    attn[2, 15:] = 0
    turn = torch.zeros_like(ids)
    turn[:, 8:15] = 1
    turn[1, 16:] = 2  # 7 + 7 + 11 = 25 model positions: several chunks of 7, the last one short
    weights = torch.randn(3, 19, generator=gen)

    def loss_and_grads(fn):
        model.zero_grad()
        logp = fn()
        (logp * weights).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_g = loss_and_grads(lambda: plain_logprobs(model, ids, attn, turn))
    got, got_g = loss_and_grads(lambda: policy.token_logprobs(model, ids, attn, turn, bf16=False, chunk=chunk))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # float32 sums in another order: measured up to 1.1e-5 of a tensor's largest entry (chunk 1, a norm weight);
    # a mis-shared chunk (wrong targets or positions) is O(1) off
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=0, atol=3e-5 * ref_g[n].abs().max().item())
    assert (got[turn[:, 1:] == 0] == 0).all() and (got[turn[:, 1:] > 0] < 0).all()


def test_chunks_are_recomputed_in_the_backward_pass(tiny_model, monkeypatch):
    """Several chunks with gradients on: each goes through torch's checkpoint (its logits are not kept)."""
    calls = []
    monkeypatch.setattr(policy, "checkpoint", lambda fn, *a, **k: calls.append(1) or fn(*a))
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
    turn = torch.ones_like(ids)
    policy.token_logprobs(tiny_model, ids, torch.ones_like(ids), turn, bf16=False, chunk=5)  # 22 positions
    assert len(calls) == 5
    calls.clear()
    with torch.no_grad():
        policy.token_logprobs(tiny_model, ids, torch.ones_like(ids), turn, bf16=False, chunk=5)
    assert calls == []  # nothing to recompute without a backward pass


# ----------------------------------------------------------------------------- attention
def test_attention_is_sdpa_unless_flash_attn_really_imports(monkeypatch):
    assert policy.attention_implementation(False) == "sdpa"
    assert policy.attention_implementation(True) == "sdpa"  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # installed but broken: import raises ImportError
    with pytest.warns(UserWarning, match="flash-attn is not usable"):
        assert policy.attention_implementation(True) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert policy.attention_implementation(True) == "flash_attention_2"


def test_load_policy_uses_sdpa_on_cpu(tiny_model_dir):
    model, _ = policy.load_policy(str(tiny_model_dir), flash_attention=True)
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- engine sizing
def qwen25_7b():
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)


def test_the_gpu_budget_counts_weights_and_one_sequence_of_kv_cache():
    sizes = vllm_backend.check_gpu_budget(qwen25_7b(), 2048, 0.3, 80 * 2**30)
    assert sizes["weights"] == pytest.approx(2 * 7.62e9, rel=0.01)  # Qwen2.5-7B: 7.62B parameters, bf16
    assert sizes["kv_cache"] == 2 * 28 * 4 * 128 * 2 * 2048  # keys + values, 28 layers, 4 KV heads of 128, bf16


def test_an_engine_that_cannot_fit_fails_early_naming_the_flags():
    with pytest.raises(ValueError) as e:
        vllm_backend.check_gpu_budget(qwen25_7b(), 2048, 0.3, 40 * 2**30)  # 12 GiB for 14 GiB of weights
    message = str(e.value)
    assert "--vllm-gpu-memory" in message and "--max-completion-tokens" in message
    share = float(message.split("--vllm-gpu-memory to ")[1].split(",")[0])
    vllm_backend.check_gpu_budget(qwen25_7b(), 2048, share, 40 * 2**30)  # the suggested share does fit


def test_engine_kwargs_on_cpu_are_sized_by_the_episode():
    kw = vllm_backend.engine_kwargs("unused", max_model_len=700, max_batched_tokens=512, gpu_memory=0.3, sleep=True)
    assert kw == {"dtype": "float32", "max_model_len": 700, "max_num_batched_tokens": 700}


def test_the_hf_backend_chooses_its_sampler_by_device(tok, tiny_model):
    """On CUDA the hf backend samples with transformers' generate under bf16 autocast (what bench/gpu_check.py
    measures, through assemble.make_sampler itself); on CPU with the speed path's cached sampler, whose
    CPU-written forward never runs on another device; --no-fast gives generate on both."""
    import fast
    from fast import CpuForward

    cfg = config.Config()
    on = {d: type(assemble.hf_sampler(cfg, tiny_model, tok, torch.device(d), seed=0)) for d in ("cpu", "cuda")}
    assert on == {"cpu": fast.CachedPolicy, "cuda": HFPolicy}  # nothing is moved to CUDA: only the choice
    reference = dataclasses.replace(cfg, fast=False)
    assert type(assemble.hf_sampler(reference, tiny_model, tok, torch.device("cpu"), seed=0)) is HFPolicy
    assert CpuForward.supports(tiny_llama(tok))
    with torch.device("meta"):
        assert not CpuForward.supports(tiny_llama(tok))  # any device but the CPU: the model's own forward


def test_the_engine_gets_the_gpu_no_training_process_uses():
    """The seed's layout: 7 training processes on 8 GPUs leave GPU 7 to the engine (TRL's "auto" at fc4dae2);
    with no GPU to spare, or on CPU, it shares the main process's device."""
    device = vllm_backend.engine_device
    assert device("auto", 8, 7) == 7 and device("auto", 2, 1) == 1
    assert device("auto", 8, 8) is None and device("auto", 1, 1) is None and device("auto", 0, 2) is None
    assert device("shared", 8, 7) is None and device("6", 8, 4) == 6
    for bad in (("3", 8, 4), ("8", 8, 4), ("0", 1, 1)):
        with pytest.raises(ValueError, match="--vllm-device"):
            device(*bad)


def test_only_gpu_shows_the_engine_its_gpu_while_it_starts(monkeypatch):
    """What the engine's process inherits: only its GPU (the physical one, where CUDA_VISIBLE_DEVICES already
    renumbers them); afterwards the variable is what it was."""
    import os

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with vllm_backend.only_gpu(7):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    with vllm_backend.only_gpu(2):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    with vllm_backend.only_gpu(None):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_an_engine_on_its_own_gpu_never_starts_in_this_process(monkeypatch):
    """A GPU of its own needs the engine's own process: asking for it in-process is one clear error, raised
    before vLLM is imported."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(RuntimeError, match="GPU of its own"):
        vllm_backend.VLLMPolicy("unused", None, device=7)


def test_longest_prompt_is_the_longest_built_prompt(tok):
    qs = ["Who?", "What is the name of the river that runs through the capital of France?", "Which year?"]
    cfg = EnvConfig(few_shot=False)
    assert env.longest_prompt(tok, qs, cfg) == max(len(env.build_prompt(tok, q, cfg)) for q in qs)


def test_a_rollout_longer_than_the_engine_is_a_clear_error(tok):
    p = object.__new__(vllm_backend.VLLMPolicy)
    p.max_model_len, p.asleep, p.calls = 100, set(), 0
    with pytest.raises(ValueError, match="--vllm-max-model-len"):
        p.generate([[1] * 90], 20, Sampling(), [])


# ----------------------------------------------------------------------------- weight channel
GIB = 2**30


def test_weight_file_goes_to_shared_memory_when_it_has_room(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    assert vllm_backend.weight_file_folder(GIB, folders=(str(shm), None), free=lambda p: 10 * GIB) == str(shm)


def test_weight_file_falls_back_to_disk_and_says_how_to_fix_shm(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    free = {str(shm): 64 << 20}
    with pytest.warns(UserWarning, match="--shm-size=3g"):
        assert vllm_backend.weight_file_folder(GIB, folders=(str(shm), None), free=lambda p: free.get(p, 100 * GIB)) is None


def test_no_room_for_the_weight_file_is_one_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="--shm-size=16g, or point TMPDIR"):
        vllm_backend.weight_file_folder(14 * GIB, folders=(str(tmp_path), None), free=lambda p: GIB)


# ----------------------------------------------------------------------------- sleep mode
class FakeLLM:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


def sleeping_policy(sleeps: bool):
    p = object.__new__(vllm_backend.VLLMPolicy)
    p.llm, p.sleeps, p.asleep = FakeLLM(), sleeps, set()
    return p


def test_sleep_frees_everything_and_the_sync_wakes_the_weights_first():
    p = sleeping_policy(True)
    p.sleep()
    p.sleep()  # once asleep, stays asleep
    p.wake("weights")  # what load_weights does before writing them
    p.wake()           # what generate does before sampling: the KV cache
    p.wake()
    assert p.llm.calls == [("sleep", 2), ("wake_up", ["weights"]), ("wake_up", ["kv_cache"])]


def test_without_sleep_mode_nothing_sleeps():
    p = sleeping_policy(False)
    p.sleep()
    p.wake()
    assert p.llm.calls == []


# ----------------------------------------------------------------------------- the mismatch meter
def test_hf_sampler_logprobs_are_the_models_own(tok, tiny_model):
    """HFPolicy's last_logprobs are log pi(id | context) under the sampling model's whole distribution at the
    sampling temperature (before top-k): the trainer's number for the same id, in fp32 to 1e-5."""
    model = copy.deepcopy(tiny_model).float().eval()
    pol = HFPolicy(model, tok, seed=0)
    prompts = [env.build_prompt(tok, q, EnvConfig(few_shot=False)) for q in ("Who wrote Dracula?", "Why?")]
    rows = pol.generate(prompts, 12, Sampling(0.7, 50, 1.0), env.STOP)
    for prompt, row, lp in zip(prompts, rows, pol.last_logprobs):
        assert len(lp) == len(row) > 0
        ids = torch.tensor([prompt + row])
        turn = torch.tensor([[0] * len(prompt) + [1] * len(row)])
        ref = policy.token_logprobs(model, ids, torch.ones_like(ids), turn, bf16=False, temperature=0.7)
        torch.testing.assert_close(torch.tensor(lp), ref[0, len(prompt) - 1:], rtol=1e-5, atol=1e-5)


def test_mismatch_is_zero_for_the_same_weights_and_large_for_others(tok, tiny_model, searcher):
    model = copy.deepcopy(tiny_model).float().eval()
    trajectories = env.rollout(HFPolicy(model, tok, seed=1), tok, ["Who wrote Dracula?"], 4, searcher,
                               EnvConfig(few_shot=False, max_turn_tokens=16, max_completion_tokens=128))
    assert all(len(t.sampler_logprobs) == len(t.completion_ids) for t in trajectories)
    for t in trajectories:  # environment ids carry no sampler log-prob, model ids do
        assert all(math.isnan(lp) == (k == 0) for lp, k in zip(t.sampler_logprobs, t.turn_idx))
    same, kl_same, count = mismatch(model, trajectories, bf16=False)
    assert count == sum(t.model_tokens for t in trajectories)
    assert same < 1e-5 and abs(kl_same) < 1e-8
    bf16, _, _ = mismatch(model, trajectories, bf16=True)  # HF on CPU: fp32 sampling, bf16 update
    assert bf16 > 100 * same
    torch.manual_seed(123)  # other weights than tiny_model's (seed 0), whatever seeded the global stream before
    other = type(model)(model.config).eval()  # weights the batch was not sampled with (a skipped sync)
    stale, kl_stale, _ = mismatch(other, trajectories, bf16=False)
    assert stale > 0.1 and kl_stale > 0.01


def test_the_gpu_check_dry_run_passes(tmp_path):
    """bench/gpu_check.py at tiny sizes on CPU: every row runs, the ZeRO-3 launch included."""
    import json

    import gpu_check

    assert gpu_check.main(["--dry-run", "--json", str(tmp_path / "check.json")]) == 0
    rows = {r[0]: r for r in json.loads((tmp_path / "check.json").read_text())["rows"]}
    assert rows["ZeRO-3, 1 process, train.main"][1].startswith("ok")
    assert any(name.startswith("update:") and "of peak" in r[2] for name, r in rows.items())
    # on CPU assemble.make_sampler builds the cached sampler; on CUDA the same call gives HFPolicy
    assert rows["HF rollouts (CachedPolicy, assemble.make_sampler)"][1].endswith("tok/s")
