"""The policy model as the training loop sees it: loading, packing trajectories into tensors, and
per-token log-probabilities of the tokens the model wrote."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

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
    """token_logprobs as a module's forward, at the sampling ``temperature`` (a call may ask for another). DDP and DeepSpeed hook their work into the forward of the
    module they wrap (DDP readies its gradient all-reduce, ZeRO-3 gathers each layer's shards), and
    token_logprobs calls the model's parts (base_model, output embeddings) rather than its forward: so
    the training loop hands accelerate this module, whose forward is the whole computation.

    Given ``prompt_lens`` the forward shares each distinct prompt's computation among the rows that start
    with it (shared_prefix_logprobs): the same numbers, for fewer FLOPs. Under gradient checkpointing it
    falls back to the plain forward (the checkpointed recomputation fails on the packed attention)."""

    def __init__(self, model, bf16: bool = True, temperature: float = 1.0):
        super().__init__()
        self.model, self.bf16, self.temperature = model, bf16, temperature
        self.config = model.config  # accelerate's DeepSpeed set-up reads hidden_size from it ("auto" buckets)

    def forward(self, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor,
                prompt_lens: torch.Tensor | None = None, temperature: float | None = None) -> torch.Tensor:
        return logprobs(self.model, ids, attn, turn, self.bf16, prompt_lens,
                        self.temperature if temperature is None else temperature)


def logprobs(model, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor, bf16: bool = True,
             prompt_lens: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """token_logprobs; with ``prompt_lens``, through shared_prefix_logprobs (the same numbers), except under
    gradient checkpointing (the checkpointed recomputation fails on the packed attention)."""
    if prompt_lens is None or getattr(model, "is_gradient_checkpointing", False):
        return token_logprobs(model, ids, attn, turn, bf16, temperature=temperature)
    return shared_prefix_logprobs(model, ids, attn, turn, prompt_lens, bf16, temperature=temperature)


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


def common_head(ids: torch.Tensor, turn: torch.Tensor) -> int:
    """How many leading ids all rows share, stopping before any row's first model-written id: a head
    (the system prompt, for rows of different questions) that one forward can compute for all of them."""
    same = (ids == ids[:1]).all(0) & (turn == 0).all(0)
    return int(same.long().cumprod(0).sum())


def shared_prefix_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor, prompt_lens: torch.Tensor,
                           bf16: bool = True, chunk: int = LOGPROB_CHUNK, temperature: float = 1.0) -> torch.Tensor:
    """token_logprobs in one forward that computes each distinct prompt once and no padding: (N, L-1), the
    same numbers.

    The G rollouts of a question repeat its prompt (system prompt + question: about half of a CPU run's
    row). A key and value at position t depend only on ids up to t, so the keys and values of one copy
    of a prompt serve every row that starts with it, and the gradients of all G rows add up in that one
    copy, as they would in G copies. The forward's input is one packed sequence: the U distinct prompts,
    then each row's completion, real ids only, each at its own position. The projections and the MLP,
    most of the FLOPs, run on exactly those ids (a 16-row CPU batch was 12% padding, and a prompt forward
    of its own ran at half the speed of a long one); only the attention needs rows: ``packed_attention``
    lays its inputs out as rows (a prompt attends to itself; a completion to its prompt and to itself)
    and packs the result again. Rows are right-padded; prompt ``i`` is ``ids[i, :prompt_lens[i]]``.
    """
    layout = Layout.of(ids, attn, prompt_lens)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16), packed_attention_in(model):
        hidden = model.base_model(input_ids=layout.ids[None], position_ids=layout.positions[None],
                                  layout=layout).last_hidden_state[0]
    # the packed index of each completion token, and of the hidden state that predicts it: the one before
    # it in its row, or its prompt's last one for a completion's first token
    t = layout.n_prompt + torch.arange(len(layout.c_rows), device=ids.device)
    before = torch.where(layout.c_cols == 0, layout.prompt_ends[layout.owner_of[layout.c_rows]] - 1, t - 1)
    col = layout.positions[t]                          # a completion token's position is its column in ``ids``
    sel = turn[layout.c_rows, col] > 0                 # only the model's own tokens get a log-prob
    logp_sel = head_logprobs(model, hidden[before[sel]], layout.ids[t[sel]], bf16, chunk, temperature)
    # back to token_logprobs's layout: the log-prob of ids[i, c] sits at column c - 1
    full = torch.zeros((ids.shape[0], ids.shape[1] - 1), dtype=logp_sel.dtype, device=ids.device)
    return full.index_put((layout.c_rows[sel], col[sel] - 1), logp_sel)


@dataclass
class Layout:
    """Where the ids of shared_prefix_logprobs's packed sequence sit as rows: first the U distinct prompts
    (prompt token t goes to slot ``p_slots[t]`` = row * Pm + column of a (U, Pm) grid), then the N
    completions (completion token t is row ``c_rows[t]``, column ``c_cols[t]`` of an (N, C) grid, slot
    ``c_slots[t]``). ``owner_of[i]``: row i's prompt; ``prompt_ends``: where each prompt ends in the packed
    sequence; ``sees``: (N, 1, C, Pm + C), what each completion query may attend to, its prompt's real keys
    and its own completion's up to itself."""
    ids: torch.Tensor
    positions: torch.Tensor
    p_slots: torch.Tensor
    c_rows: torch.Tensor
    c_cols: torch.Tensor
    c_slots: torch.Tensor
    prompt_grid: tuple[int, int]
    completion_grid: tuple[int, int]
    owner_of: torch.Tensor
    prompt_ends: torch.Tensor
    sees: torch.Tensor

    @property
    def n_prompt(self) -> int:
        return len(self.p_slots)

    @staticmethod
    def of(ids: torch.Tensor, attn: torch.Tensor, prompt_lens: torch.Tensor) -> "Layout":
        group = prompt_groups(ids, prompt_lens)
        owners = group.unique()                       # the row that stands for each distinct prompt
        owner_of = torch.searchsorted(owners, group)  # per row: which distinct prompt
        P = prompt_lens.to(ids.device)
        Pu, Pm = P[owners], int(P.max())
        C = int((attn.sum(1) - P).max())              # the longest completion
        prompt_real = torch.arange(Pm, device=ids.device) < Pu[:, None]                            # (U, Pm)
        col = P[:, None] + torch.arange(C, device=ids.device)
        completion_real = attn.gather(1, col.clamp(max=ids.shape[1] - 1)).bool() & (col < ids.shape[1])  # (N, C)
        p_rows, p_cols = prompt_real.nonzero(as_tuple=True)
        c_rows, c_cols = completion_real.nonzero(as_tuple=True)
        causal = torch.ones(C, C, dtype=torch.bool, device=ids.device).tril()
        sees = torch.cat([prompt_real[owner_of, None, :].expand(-1, C, -1), causal & completion_real[:, None, :]], 2)
        return Layout(ids=torch.cat([ids[owners[p_rows], p_cols], ids[c_rows, P[c_rows] + c_cols]]),
                      positions=torch.cat([p_cols, P[c_rows] + c_cols]), p_slots=p_rows * Pm + p_cols,
                      c_rows=c_rows, c_cols=c_cols, c_slots=c_rows * C + c_cols,
                      prompt_grid=(len(owners), Pm), completion_grid=(len(ids), C),
                      owner_of=owner_of, prompt_ends=Pu.cumsum(0), sees=sees[:, None])


PACKED_ATTENTION = "mtgrpo_packed"


def packed_attention(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                     scaling: float | None = None, layout: Layout | None = None, **kwargs):
    """The attention of shared_prefix_logprobs's packed sequence, registered with transformers'
    AttentionInterface. Query, key and value, (1, heads, T, D), are laid out as rows, zeros where a row
    has no id: the prompts as (U, heads, Pm, D), causal; the completions as (N, heads, C, D), each behind
    its prompt's keys and values (index_select: the gradients of all rows of a prompt add up in it) with
    ``layout.sees`` as the mask. PyTorch's SDPA computes both; the output is packed again, (1, T, heads, D).
    Laying out and packing are an index_copy and an index_select, so the gradients take the same path back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n = layout.n_prompt

    def grid(x, slots, shape):  # (heads, T', D) -> (rows, heads, cols, D): token t into slot row * cols + col
        out = x.new_zeros(shape[0] * shape[1], x.shape[0], x.shape[2]).index_copy(0, slots, x.transpose(0, 1))
        return out.view(shape[0], shape[1], x.shape[0], x.shape[2]).transpose(1, 2)

    def packed(out, slots):  # sdpa's output (rows, cols, heads, D) -> (T', heads, D)
        return out.reshape(-1, *out.shape[2:]).index_select(0, slots)

    q_p, k_p, v_p = (grid(x[0, :, :n], layout.p_slots, layout.prompt_grid) for x in (query, key, value))
    q_c, k_c, v_c = (grid(x[0, :, n:], layout.c_slots, layout.completion_grid) for x in (query, key, value))
    kw = dict(dropout=dropout, scaling=scaling)
    out_p, _ = sdpa_attention_forward(module, q_p, k_p, v_p, None, is_causal=True, **kw)  # (U, Pm, heads, D)
    out_c, _ = sdpa_attention_forward(module, q_c, torch.cat([k_p[layout.owner_of], k_c], 2),
                                      torch.cat([v_p[layout.owner_of], v_c], 2), layout.sees, **kw)
    return torch.cat([packed(out_p, layout.p_slots), packed(out_c, layout.c_slots)])[None], None


@contextmanager
def packed_attention_in(model):
    """Run the model's attention layers with ``packed_attention`` for a while (every layer reads the
    implementation's name from the one config at each call). Registered without a mask function, so
    transformers builds no mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


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
