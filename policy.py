"""The policy: the model (loading it), how it samples an episode's messages (the samplers), and the per-token
log-probabilities of the ids it wrote (packing trajectories into tensors, the update's forward)."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

import data
import env
from config import Sampling


def load_policy(model_path: str | None, gradient_checkpointing: bool = False, flash_attention: bool = False):
    """(model, tokenizer) in float32 (bf16 comes from autocast); None = the embedded SmolLM2-135M.

    flash_attention: use flash-attn 2 where it can run (see attention_implementation). Pass it only when
    every forward runs under 16-bit autocast: flash-attn has no float32 kernel, and our weights stay float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path or data.embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=attention_implementation(flash_attention))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


def attention_implementation(flash_attention: bool) -> str:
    """flash_attention_2 when asked for, on CUDA, with a flash_attn that imports; else PyTorch's SDPA.

    flash-attn is optional (requirements-gpu.txt says how to install it): its wheels exist for a few torch
    and CUDA versions only, and elsewhere pip compiles it for hours. A wheel built against another torch
    fails at import (undefined symbols), so the import itself is tried, and any failure means SDPA."""
    if not (flash_attention and torch.cuda.is_available()):
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # ImportError, or an OSError/RuntimeError from a wheel built for another torch
        warnings.warn(f"flash-attn is not usable ({type(e).__name__}: {e}); using PyTorch's SDPA attention")
        return "sdpa"
    return "flash_attention_2"


@dataclass
class Batch:
    """One process's rollouts as tensors (``pack_batch``): what train.update trains on."""
    ids: torch.Tensor                         # (N, L) prompt + completion ids, right-padded
    attn: torch.Tensor                        # (N, L) 1 on real ids
    turn: torch.Tensor                        # (N, L) 0 on prompt, environment and padding ids, k on model turn k
    A: torch.Tensor | None = None             # (N, L-1) the advantage of each predicted id (advantages.py)
    sampler_logp: torch.Tensor | None = None  # (N, L-1) the sampler's log-prob of each id (the mismatch meter)
    prompt_lens: torch.Tensor | None = None   # (N,) each row's prompt length: the speed path computes each prompt once


def pack_batch(trajectories, pad_id: int, prompt_lens: bool = False) -> Batch:
    """``trajectories`` as a Batch, without advantages yet; the sampler's log-probs aligned with token_logprobs (NaN
    on prompt, environment and padding ids and where it reported none); ``prompt_lens``: for the speed path."""
    N, L = len(trajectories), max(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories)
    b = Batch(torch.full((N, L), pad_id, dtype=torch.long), torch.zeros((N, L), dtype=torch.long),
              torch.zeros((N, L), dtype=torch.long), sampler_logp=torch.full((N, L - 1), float("nan")))
    for i, t in enumerate(trajectories):
        p, n = len(t.prompt_ids), len(t.prompt_ids) + len(t.completion_ids)
        b.ids[i, :n], b.attn[i, :n] = torch.tensor(list(t.prompt_ids) + list(t.completion_ids)), 1
        b.turn[i, p:n] = torch.tensor(t.turn_idx, dtype=torch.long)
        logp = (list(t.sampler_logprobs) + [float("nan")] * (n - p))[:n - p]
        b.sampler_logp[i, p - 1:n - 1] = torch.tensor(logp, dtype=torch.float32)  # column t - 1: the log-prob of id t
    b.prompt_lens = torch.tensor([len(t.prompt_ids) for t in trajectories]) if prompt_lens else None
    return b


def pack(trajectories, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, turn_idx) of pack_batch, each (N, L): prompt + completion ids;
    turn_idx is 0 on prompt, environment and padding tokens and k on the model's k-th turn."""
    b = pack_batch(trajectories, pad_id)
    return b.ids, b.attn, b.turn


def mismatch_sums(logp_trainer: torch.Tensor, logp_sampler: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sampler-trainer mismatch meter's sums over the model's tokens with a sampler log-prob: [sum |d|,
    sum (e^d - 1 - d), count], d = log p_trainer - log p_sampler; e^d - 1 - d is the k3 estimator of KL(sampler ||
    trainer). Both are ~0 unless a weight sync was skipped, a dtype is wrong or the template drifted."""
    ok = mask.bool() & logp_sampler.isfinite()
    d = (logp_trainer.detach().double() - logp_sampler.double())[ok]
    return torch.stack([d.abs().sum(), (d.exp() - 1 - d).sum(), ok.sum().double()])


class LogProbs(torch.nn.Module):
    """token_logprobs as a forward (at the sampling ``temperature`` unless a call asks for another), for accelerate
    to wrap: DDP and DeepSpeed hook their all-reduce and ZeRO-3 gathers into a wrapped module's forward. With
    ``prompt_lens`` the speed path's ``shared_prefix`` (fast.shared_prefix_logprobs) computes the same numbers."""

    def __init__(self, model, bf16: bool = True, temperature: float = 1.0, shared_prefix=None):
        super().__init__()
        self.model, self.bf16, self.temperature, self.shared_prefix = model, bf16, temperature, shared_prefix
        self.config = model.config  # accelerate's DeepSpeed set-up reads hidden_size from it ("auto" buckets)

    def forward(self, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor,
                prompt_lens: torch.Tensor | None = None, temperature: float | None = None) -> torch.Tensor:
        temperature = self.temperature if temperature is None else temperature
        if prompt_lens is None:
            return token_logprobs(self.model, ids, attn, turn, self.bf16, temperature=temperature)
        return self.shared_prefix(self.model, ids, attn, turn, prompt_lens, self.bf16, temperature=temperature)


# Positions per vocabulary projection in token_logprobs. Its float32 logits are (positions x vocabulary):
# 2048 x 152k (Qwen2.5) is 1.2 GB, where a 12 x 1k-token micro-batch in one piece would take 7 GB, and
# about 3x that with its backward.
LOGPROB_CHUNK = 2048


def token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor, bf16: bool = True,
                   chunk: int = LOGPROB_CHUNK, temperature: float = 1.0) -> torch.Tensor:
    """log pi(x_t | x_<t) at every position t >= 1, shape (N, L-1); 0 where turn_idx is 0. pi = softmax(logits /
    temperature), the distribution the ids were drawn from before a top-k or top-p cut (as the seed's TRL trainer).
    The vocabulary projection, the largest matmul, runs on the model's own tokens only (the rest need none)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
    sel = turn[:, 1:] > 0
    logp_sel = head_logprobs(model, hidden[sel], ids[:, 1:][sel], bf16, chunk, temperature)
    return torch.zeros(sel.shape, dtype=logp_sel.dtype, device=ids.device).masked_scatter(sel, logp_sel)


def head_logprobs(model, h: torch.Tensor, targets: torch.Tensor, bf16: bool, chunk: int,
                  temperature: float = 1.0) -> torch.Tensor:
    """log pi(target | h) for rows of hidden states, through the output embeddings, ``chunk`` rows at a time, each
    piece recomputed in the backward pass (checkpoint): only one piece's logits are alive, forward or backward."""
    piece = functools.partial(selected_logprobs, model.get_output_embeddings(), bf16=bf16, temperature=temperature)
    if h.shape[0] <= chunk:  # one piece: nothing to bound
        return piece(h, targets)
    run = functools.partial(checkpoint, piece, use_reentrant=False) if torch.is_grad_enabled() else piece
    return torch.cat([run(h[i:i + chunk], targets[i:i + chunk]) for i in range(0, h.shape[0], chunk)])


def selected_logprobs(head, h: torch.Tensor, targets: torch.Tensor, bf16: bool, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(head(h) / temperature)[target] per row, as minus the cross-entropy: a fused log-softmax whose
    backward is one pass over the logits (a logit minus a logsumexp takes three, each a fresh rows x vocabulary)."""
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = head(h)
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    return -torch.nn.functional.cross_entropy(logits, targets, reduction="none")


# ----------------------------------------------------------------------------- sampling
class Sampler:
    """What env.rollout needs of a policy and a checkpoint keeps of it: HFPolicy (the reference), ScriptedPolicy
    (tests), fast.CachedPolicy (speed), infra.vllm_backend.VLLMPolicy. ``calls`` counts generate calls: a call's
    draws are seeded from (seed, calls), saved by a checkpoint: --resume samples what an unbroken run would."""
    calls: int = 0
    last_logprobs: list[list[float]] | None = None  # each returned id's log-prob, per row of the last call

    def start_rollout(self) -> None:
        """Before a rollout's first ``generate`` (a sampler that keeps state per rollout starts it afresh)."""

    def generate(self, batch: list[list[int]], max_new_tokens: int, sampling: Sampling, stop: list[str]) -> list[list[int]]:
        """The ids each row of ``batch`` writes next, one message each: cut after a stop string or an
        end-of-turn id (kept), and to ``max_new_tokens``; drawn as ``sampling`` says."""
        raise NotImplementedError

    def end_rollout(self) -> None:
        """After a rollout's last ``generate`` (free what only the rollout needed)."""


class SampledLogprobs:
    """A ``generate`` logits processor keeping each sampled token's log-prob under the whole tempered distribution
    (Sampling's contract; it runs before transformers' warpers). A call sees the token the last step sampled as
    ``input_ids[:, -1]``; ``finish`` adds the last one. Memory: one (rows x vocabulary) tensor, not one a step."""

    def __init__(self, temperature: float = 1.0):
        self.prev, self.steps, self.temperature = None, [], temperature if temperature > 0 else 1.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor, new_tokens: int) -> list[list[float]]:
        if self.prev is not None and len(self.steps) < new_tokens:
            self.steps.append(self.prev.gather(1, sequences[:, -1:]).squeeze(1))
        return torch.stack(self.steps, dim=1).tolist() if self.steps else [[] for _ in range(sequences.shape[0])]


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` left-padded into one batch: (ids, attention mask), each (B, longest), every row's last id in
    the last column (where a causal LM's next-token logits are read)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


class HFPolicy(Sampler):
    """Batched sampling with transformers' ``generate``: the reference sampler. Rows are left-padded and each is cut
    by ``cut_turn`` afterwards (``pad == eos`` for SmolLM2); ``seed`` gives a private, reproducible random stream."""

    def __init__(self, model, tokenizer, seed: int | None = None):
        self.model, self.tokenizer, self.seed, self.calls = model, tokenizer, seed, 0
        self.last_logprobs: list[list[float]] | None = None
        self.stopping: dict[tuple, object] = {}  # stop strings -> StoppingCriteriaList, built once

    def stop_criteria(self, stop):
        """Built once per stop set: ``generate(stop_strings=...)`` would rebuild it, a pass over the vocabulary, every call."""
        from transformers import StoppingCriteriaList, StopStringCriteria
        if tuple(stop) not in self.stopping:
            self.stopping[tuple(stop)] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stop))])
        return self.stopping[tuple(stop)]

    @torch.no_grad()
    def generate(self, batch, max_new_tokens: int, sampling: Sampling, stop) -> list[list[int]]:
        from transformers import LogitsProcessorList
        ends, device = sorted(env.end_ids(self.tokenizer)), self.model.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else ends[0]
        ids, mask = left_pad(batch, pad)
        # Exactly the asked distribution: override what a checkpoint's generation_config may add
        # (Qwen2.5-Instruct: top_k 20, repetition_penalty 1.05), or the ids would be off-policy.
        kw = (dict(do_sample=False, temperature=None, top_p=None, top_k=None) if sampling.temperature <= 0 else
              dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k))
        record = SampledLogprobs(sampling.temperature)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=self.seed is not None):
            if self.seed is not None:  # one derived seed per call: reproducible, never touches global RNG
                torch.manual_seed(self.seed * 100_003 + self.calls)
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=max_new_tokens, eos_token_id=ends, pad_token_id=pad,
                                      stopping_criteria=self.stop_criteria(stop) if stop else None,
                                      logits_processor=LogitsProcessorList([record]), use_cache=True,
                                      repetition_penalty=1.0, min_p=None, **kw)
        self.calls += 1
        rows = [env.cut_turn(row, self.tokenizer, stop, max_new_tokens) for row in out[:, ids.shape[1]:].tolist()]
        self.last_logprobs = [lp[:len(row)] for lp, row in zip(record.finish(out, out.shape[1] - ids.shape[1]), rows)]
        return rows


class ScriptedPolicy(Sampler):
    """Writes given texts instead of sampling (tests). ``turns[r]`` are the texts of episode ``r``,
    turn by turn, where episodes are numbered as ``rollout`` returns them (question-major:
    ``r = i*G + g``). Each text is tokenised and cut like a sampled turn (stop strings, end-of-turn
    token, ``max_new_tokens``); ``<|im_end|>`` in a text is the EOS token, and a script that has
    run out writes just that token.
    Rows are matched to episodes by their context (the ids an episode was last given plus what it
    wrote is a prefix of its next row), so finished episodes may drop out of the batch. Use one
    ScriptedPolicy per rollout."""

    def __init__(self, tokenizer, turns: list[list[str]]):
        self.tokenizer, self.turns = tokenizer, [list(t) for t in turns]
        self.context: list[list[int]] = [[] for _ in turns]
        self.done = [0] * len(turns)  # turns written per episode

    def generate(self, batch, max_new_tokens: int, sampling: Sampling, stop) -> list[list[int]]:
        outs, r = [], 0
        for row in batch:
            while r < len(self.context) and row[:len(self.context[r])] != self.context[r]:
                r += 1  # episode r has finished: its context is not a prefix of this row
            if r == len(self.context):
                raise ValueError("a batch row matches no scripted episode (one ScriptedPolicy per rollout)")
            script = self.turns[r]
            if self.done[r] < len(script):
                ids = env._encode(self.tokenizer, script[self.done[r]])
            else:
                ids = [env._markers(self.tokenizer).close[0]]
            ids = env.cut_turn(ids, self.tokenizer, stop, max_new_tokens)
            self.context[r], self.done[r] = list(row) + ids, self.done[r] + 1
            outs.append(ids)
            r += 1
        return outs
