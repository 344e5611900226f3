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
    """token_logprobs as a module's forward. DDP and DeepSpeed hook their work into the forward of the
    module they wrap (DDP readies its gradient all-reduce, ZeRO-3 gathers each layer's shards), and
    token_logprobs calls the model's parts (base_model, output embeddings) rather than its forward: so
    the training loop hands accelerate this module, whose forward is the whole computation.

    Given ``prompt_lens`` the forward shares each distinct prompt's computation among the rows that start
    with it (shared_prefix_logprobs): the same numbers, for fewer FLOPs. Under gradient checkpointing
    transformers turns the KV cache off, so it falls back to the plain forward."""

    def __init__(self, model, bf16: bool = True):
        super().__init__()
        self.model, self.bf16 = model, bf16
        self.config = model.config  # accelerate's DeepSpeed set-up reads hidden_size from it ("auto" buckets)

    def forward(self, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor,
                prompt_lens: torch.Tensor | None = None) -> torch.Tensor:
        return logprobs(self.model, ids, attn, turn, self.bf16, prompt_lens)


def logprobs(model, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor, bf16: bool = True,
             prompt_lens: torch.Tensor | None = None) -> torch.Tensor:
    """token_logprobs; with ``prompt_lens``, through shared_prefix_logprobs (the same numbers), except under
    gradient checkpointing, where transformers turns the KV cache off."""
    if prompt_lens is None or getattr(model, "is_gradient_checkpointing", False):
        return token_logprobs(model, ids, attn, turn, bf16)
    return shared_prefix_logprobs(model, ids, attn, turn, prompt_lens, bf16)


def prompt_groups(ids: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the first row with the same prompt (the same ids up to its prompt length):
    the G rollouts of a question share one."""
    first: dict[tuple, int] = {}
    return torch.tensor([first.setdefault(tuple(ids[i, :int(n)].tolist()), i) for i, n in enumerate(prompt_lens)],
                        dtype=torch.long, device=ids.device)


# Positions per vocabulary projection in token_logprobs. Its float32 logits are (positions x vocabulary):
# 2048 x 152k (Qwen2.5) is 1.2 GB, where a 12 x 1k-token micro-batch in one piece would take 7 GB, and
# about 3x that with its backward.
LOGPROB_CHUNK = 2048


def token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor, bf16: bool = True,
                   chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """log pi(x_t | x_<t) at every position t >= 1, shape (N, L-1); 0 where turn_idx is 0.

    Only the model's own tokens need a log-prob, so the vocabulary projection (the largest
    matmul: 49k x 576 for SmolLM2) runs on those positions alone, not on the prompt and padding.
    """
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
    sel = turn[:, 1:] > 0
    logp_sel = head_logprobs(model, hidden[sel], ids[:, 1:][sel], bf16, chunk)
    return torch.zeros(sel.shape, dtype=logp_sel.dtype, device=ids.device).masked_scatter(sel, logp_sel)


def common_head(ids: torch.Tensor, turn: torch.Tensor) -> int:
    """How many leading ids all rows share, stopping before any row's first model-written id: a head
    (the system prompt, for rows of different questions) that one forward can compute for all of them."""
    same = (ids == ids[:1]).all(0) & (turn == 0).all(0)
    return int(same.long().cumprod(0).sum())


def shared_prefix_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor, prompt_lens: torch.Tensor,
                           bf16: bool = True, chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """token_logprobs, computing each distinct prompt once: (N, L-1), the same numbers.

    The G rollouts of a question repeat its prompt (system prompt + question: about half of a CPU run's
    row). A key and value at position t depend only on ids up to t, so one forward over the U distinct
    prompts gives the keys and values every row needs for its prompt part; each row's completion then
    runs as a continuation of its prompt's KV cache (index_select: gradients from all G rows add up in
    the one prompt forward, as they would in G copies). A completion's first token is predicted by its
    prompt's last hidden state. Rows are right-padded; prompt ``i`` is ``ids[i, :prompt_lens[i]]``.
    """
    from transformers import DynamicCache

    N, L = ids.shape
    group = prompt_groups(ids, prompt_lens)
    owners = group.unique()                       # the row that stands for each distinct prompt
    owner_of = torch.searchsorted(owners, group)  # per row: which distinct prompt
    P = prompt_lens.to(ids.device)
    Pu, Pm = P[owners], int(P.max())
    C = int((attn.sum(1) - P).max())              # the longest completion
    cols = torch.arange(C, device=ids.device)
    take = (P[:, None] + cols).clamp(max=L - 1)   # row i's completion is ids[i, P_i : P_i + C]
    rest, rest_attn = ids.gather(1, take), attn.gather(1, take) * (P[:, None] + cols < L)
    prefix_attn = (torch.arange(Pm, device=ids.device) < Pu[:, None]).long()
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model.base_model(input_ids=ids[owners, :Pm] * prefix_attn, attention_mask=prefix_attn, use_cache=True)
        past = DynamicCache([(k.index_select(0, owner_of), v.index_select(0, owner_of)) for k, v, *_ in out.past_key_values])
        hidden = model.base_model(input_ids=rest, attention_mask=torch.cat([prefix_attn[owner_of], rest_attn], 1),
                                  position_ids=P[:, None] + cols, past_key_values=past, use_cache=True).last_hidden_state
    # completion token j is predicted from the hidden state before it: the prompt's last one for j = 0
    last = out.last_hidden_state[torch.arange(len(owners), device=ids.device), Pu - 1]
    before = torch.cat([last[owner_of, None], hidden[:, :-1]], dim=1)   # (N, C, H)
    rest_turn = turn.gather(1, take) * rest_attn
    sel = rest_turn > 0
    logp_sel = head_logprobs(model, before[sel], rest[sel], bf16, chunk)
    # back to token_logprobs's layout: completion token j of row i sits at column P_i - 1 + j
    full = torch.zeros((N, L - 1), dtype=logp_sel.dtype, device=ids.device)
    rows_, cols_ = sel.nonzero(as_tuple=True)
    return full.index_put((rows_, P[rows_] - 1 + cols_), logp_sel)


def head_logprobs(model, h: torch.Tensor, targets: torch.Tensor, bf16: bool, chunk: int) -> torch.Tensor:
    """log pi(target | h) for rows of hidden states, through the output embeddings, ``chunk`` rows at a time."""
    head = model.get_output_embeddings()
    if h.shape[0] <= chunk:  # one piece: nothing to bound
        return selected_logprobs(head, h, targets, bf16)
    # piece by piece, each recomputed in the backward pass (checkpoint), so that only one piece's
    # logits are alive at a time, forward or backward
    pieces = [checkpoint(selected_logprobs, head, h[i:i + chunk], targets[i:i + chunk], bf16, use_reentrant=False)
              if torch.is_grad_enabled() else selected_logprobs(head, h[i:i + chunk], targets[i:i + chunk], bf16)
              for i in range(0, h.shape[0], chunk)]
    return torch.cat(pieces)


def selected_logprobs(head, h: torch.Tensor, targets: torch.Tensor, bf16: bool) -> torch.Tensor:
    """log softmax(head(h))[target] per row, as minus the cross-entropy: one fused log-softmax whose
    backward is one pass over the (rows x vocabulary) logits. (The target's logit minus a separate
    logsumexp is the same number, but its backward runs a subtraction, an exponential and a product as
    three passes, each writing a fresh rows x vocabulary tensor: 0.8 s more of a SmolLM2 CPU update.)"""
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = head(h)
    return -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
