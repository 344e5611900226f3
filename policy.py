"""The policy model as the training loop sees it: loading, packing trajectories into tensors, and
per-token log-probabilities of the tokens the model wrote."""
from __future__ import annotations

import warnings

import torch
from torch.utils.checkpoint import checkpoint

import data


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


def pack(trajectories, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, turn_idx), each (N, L): prompt + completion ids.
    turn_idx is 0 on prompt, environment and padding tokens and k on the model's k-th turn."""
    L = max(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories)
    ids = torch.full((len(trajectories), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(trajectories), L), dtype=torch.long)
    turn = torch.zeros((len(trajectories), L), dtype=torch.long)
    for i, t in enumerate(trajectories):
        seq = list(t.prompt_ids) + list(t.completion_ids)
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = 1
        turn[i, len(t.prompt_ids):len(seq)] = torch.tensor(t.turn_idx, dtype=torch.long)
    return ids, attn, turn


def pack_sampler_logprobs(trajectories, width: int) -> torch.Tensor:
    """The sampler's log-probs of the ids ``pack`` laid out, (N, width - 1) aligned with token_logprobs
    (column t - 1 holds the log-prob of id t); NaN on prompt, environment and padding ids and where the
    sampler reported none."""
    out = torch.full((len(trajectories), width - 1), float("nan"))
    for i, t in enumerate(trajectories):
        lp = list(t.sampler_logprobs) + [float("nan")] * (len(t.completion_ids) - len(t.sampler_logprobs))
        start = len(t.prompt_ids) - 1
        out[i, start:start + len(t.completion_ids)] = torch.tensor(lp[:len(t.completion_ids)], dtype=torch.float32)
    return out


def mismatch_sums(logp_trainer: torch.Tensor, logp_sampler: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sums for the sampler-trainer mismatch meter over the model's tokens where the sampler reported a
    log-prob: [sum |d|, sum (e^d - 1 - d), count], d = log p_trainer - log p_sampler of the sampled token.
    e^d - 1 - d is the "k3" estimator of KL(sampler || trainer) from the sampler's own samples (unbiased,
    never negative). Both are ~0 when the trainer computes the distribution the tokens were drawn from; a
    skipped weight sync, a wrong dtype or a template drift show at once."""
    ok = mask.bool() & logp_sampler.isfinite()
    d = (logp_trainer.detach().double() - logp_sampler.double())[ok]
    return torch.stack([d.abs().sum(), (d.exp() - 1 - d).sum(), ok.sum().double()])


class LogProbs(torch.nn.Module):
    """token_logprobs as a module's forward, at the sampling ``temperature`` (a call may ask for another).
    DDP and DeepSpeed hook their work into the forward of the module they wrap (DDP readies its gradient
    all-reduce, ZeRO-3 gathers each layer's shards), and token_logprobs calls the model's parts
    (base_model, output embeddings) rather than its forward: so the training loop hands accelerate this
    module, whose forward is the whole computation.

    ``shared_prefix`` (optional): a function with token_logprobs's arguments plus each row's prompt length
    that returns the same numbers faster (the speed path's fast.shared_prefix.shared_prefix_logprobs); the
    forward uses it when it is given ``prompt_lens``."""

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
    """log pi(x_t | x_<t) at every position t >= 1, shape (N, L-1); 0 where turn_idx is 0. pi is the policy
    at the sampling temperature, softmax(logits / temperature): the distribution the ids were drawn from
    before any top-k or top-p cut (as the seed's TRL trainer divides its logits by the temperature).

    Only the model's own tokens need a log-prob, so the vocabulary projection (the largest
    matmul: 49k x 576 for SmolLM2) runs on those positions alone, not on the prompt and padding.
    """
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
    sel = turn[:, 1:] > 0
    logp_sel = head_logprobs(model, hidden[sel], ids[:, 1:][sel], bf16, chunk, temperature)
    return torch.zeros(sel.shape, dtype=logp_sel.dtype, device=ids.device).masked_scatter(sel, logp_sel)


def head_logprobs(model, h: torch.Tensor, targets: torch.Tensor, bf16: bool, chunk: int,
                  temperature: float = 1.0) -> torch.Tensor:
    """log pi(target | h) for rows of hidden states, through the output embeddings, ``chunk`` rows at a time."""
    head = model.get_output_embeddings()
    if h.shape[0] <= chunk:  # one piece: nothing to bound
        return selected_logprobs(head, h, targets, bf16, temperature)
    # piece by piece, each recomputed in the backward pass (checkpoint), so that only one piece's
    # logits are alive at a time, forward or backward
    pieces = [checkpoint(selected_logprobs, head, h[i:i + chunk], targets[i:i + chunk], bf16, temperature,
                         use_reentrant=False)
              if torch.is_grad_enabled() else selected_logprobs(head, h[i:i + chunk], targets[i:i + chunk], bf16, temperature)
              for i in range(0, h.shape[0], chunk)]
    return torch.cat(pieces)


def selected_logprobs(head, h: torch.Tensor, targets: torch.Tensor, bf16: bool, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(head(h) / temperature)[target] per row, as minus the cross-entropy: one fused log-softmax whose
    backward is one pass over the (rows x vocabulary) logits. (The target's logit minus a separate
    logsumexp is the same number, but its backward runs a subtraction, an exponential and a product as
    three passes, each writing a fresh rows x vocabulary tensor: 0.8 s more of a SmolLM2 CPU update.)"""
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = head(h)
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    return -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
