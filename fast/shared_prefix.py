"""The update's shared-prefix forward: the same log-probs and gradients as policy.token_logprobs, each distinct
prompt computed once and no padding (see fast/__init__.py)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from policy import LOGPROB_CHUNK, head_logprobs, token_logprobs


def prompt_groups(ids: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the first row with the same prompt (the same ids up to its prompt length):
    the G rollouts of a question share one."""
    first: dict[tuple, int] = {}
    return torch.tensor([first.setdefault(tuple(ids[i, :int(n)].tolist()), i) for i, n in enumerate(prompt_lens)],
                        dtype=torch.long, device=ids.device)


def common_head(ids: torch.Tensor, turn: torch.Tensor) -> int:
    """How many leading ids all rows share, stopping before any row's first model-written id: a head
    (the system prompt, for rows of different questions) that one forward can compute for all of them."""
    same = (ids == ids[:1]).all(0) & (turn == 0).all(0)
    return int(same.long().cumprod(0).sum())


def common_head_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor, bf16: bool = True,
                         temperature: float = 1.0) -> torch.Tensor:
    """token_logprobs with the head every row shares (common_head: the system prompt, for rows of different
    questions, as in a warm-start batch) computed once."""
    head = common_head(ids, turn)
    if head <= 1:
        return token_logprobs(model, ids, attn, turn, bf16, temperature=temperature)
    return shared_prefix_logprobs(model, ids, attn, turn, torch.full((len(ids),), head, device=ids.device), bf16,
                                  temperature=temperature)


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


