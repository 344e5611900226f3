"""The default CPU sampler: a decode loop over a transformers model that never computes a key twice.

A rollout's rows repeat work that ``generate`` redoes on every call:

- the G rollouts of a question start from the *same* prompt, and ``generate`` prefills it G times;
- turn k+1's context is turn k's context plus what the model wrote plus the environment's reply, and
  ``generate`` re-reads all of it from the first token.

A key/value pair at position t depends only on the ids up to t, so the KV cache of any sequence serves
every row that starts with the same ids. ``CachedPolicy`` keeps, for the length of one rollout, the KV
cache of every row it has seen; each call looks up, per row, the stored sequence that shares the longest
prefix with it, and forwards only the rest: one prefill per distinct prompt, then per turn only the
environment's reply and the new tokens. Nothing is re-tokenised: a row is a list of ids throughout.

Sampling runs on a bf16 copy of the weights (``dtype``), refreshed from the trained model when a rollout
starts (``start_rollout``, called by ``env.rollout``). A real bf16 copy, not autocast: autocast would cast
every weight again on every one-token step. The update's bf16 autocast rounds the same fp32 weights to
the same bf16 values, so the sampler and the trainer compute nearly the same distribution; train.py's
mismatch meter measures how nearly.

The loop itself is the textbook one (prefill, then one token per step for every live row; a finished
row leaves the batch). Rows are left-padded into one batch; padding inside a row (between its cached
part and its new ids) is masked, and positions are given explicitly, so a row's numbers do not depend
on its neighbours' lengths beyond floating-point rounding.
"""
from __future__ import annotations

import copy

import torch

import env

ATTENTION = "mtgrpo_grouped_decode"  # the sampling copy's attention (registered below)


def grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """Attention for one new token per row, registered with transformers' AttentionInterface; longer
    queries (a prefill) go to PyTorch's SDPA as usual.

    With grouped-query attention (SmolLM2: 9 query heads over 3 key/value heads) the generic paths either
    copy every key and value n_rep times per step (eager) or run a kernel built for long queries (SDPA's
    CPU flash kernel: 6 ms a layer for a 16-row bf16 decode step here). Here the n_rep query heads of each
    key/value head are one small matrix: scores (B, kv heads, n_rep, L) in two matmuls, no copy."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, q, D = query.shape
    if q != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    Hk = key.shape[1]
    grouped = query.reshape(B, Hk, H // Hk, D)  # query head h reads key/value head h // n_rep (repeat_kv's order)
    # key @ query^T rather than query @ key^T: the cache is read in its own layout, never copied transposed
    scores = torch.matmul(key, grouped.transpose(-1, -2)).transpose(-1, -2).float()  # (B, Hk, n_rep, L)
    scores = scores * (scaling if scaling is not None else D ** -0.5)
    if attention_mask is not None:  # sdpa_mask's boolean (B, 1, 1, L): True = may attend
        scores = scores.masked_fill(~attention_mask.reshape(B, 1, 1, -1), float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (B, Hk, n_rep, D)
    return out.reshape(B, 1, H, D), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, grouped_decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the same boolean masks SDPA gets


def preallocated_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], room: int):
    """A DynamicCache over ``kv`` (per layer, (B, heads, L, dim)) with room for ``room`` more positions.
    transformers' DynamicLayer appends by torch.cat, copying the whole cache on every decode step (a
    quarter of a CPU decode step); these layers write the new keys and values in place."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        def __init__(self, keys, values):
            super().__init__()
            B, H, L, D = keys.shape
            self.store_k, self.store_v = keys.new_empty(B, H, L + room, D), values.new_empty(B, H, L + room, D)
            self.store_k[:, :, :L], self.store_v[:, :, :L], self.length = keys, values, L
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self._views()

        def _views(self):
            self.keys, self.values = self.store_k[:, :, :self.length], self.store_v[:, :, :self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            self.store_k[:, :, self.length:self.length + n] = key_states
            self.store_v[:, :, self.length:self.length + n] = value_states
            self.length += n
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices):
            self.store_k, self.store_v = self.store_k[indices], self.store_v[indices]
            self._views()

    cache = DynamicCache()
    cache.layers = [InPlaceLayer(k, v) for k, v in kv]
    return cache


class CachedPolicy:
    """``policy.generate`` for ``env.rollout`` with prefix-shared KV caches and a bf16 sampling copy.

    ``model`` is the trained model (any dtype); with ``dtype`` None the sampler uses it as it is, else a
    copy in ``dtype`` that ``start_rollout`` refreshes. ``seed`` gives a private, reproducible random
    stream (one generator per call). After each call ``last_logprobs`` holds, per row, the log-prob of
    each returned id under the sampling model's own distribution (temperature 1, before top-p)."""

    def __init__(self, model, tokenizer, seed: int | None = None, dtype: torch.dtype | None = torch.bfloat16):
        self.source, self.tokenizer, self.seed, self.calls = model, tokenizer, seed, 0
        self.dtype = dtype
        self.model = model if dtype is None or dtype == next(model.parameters()).dtype else None
        self.ends = sorted(env.end_ids(tokenizer))
        self.store: list[tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = []  # (ids, per-layer K, V)
        self.last_logprobs: list[list[float]] | None = None

    # ------------------------------------------------------------------ weights and the per-rollout store
    @torch.no_grad()
    def start_rollout(self) -> None:
        """Forget the previous rollout's caches and copy the current weights into the sampling model."""
        self.store = []
        if self.model is self.source:
            return
        if self.model is None:
            _register_attention()
            self.model = copy.deepcopy(self.source).to(self.dtype).eval().requires_grad_(False)
            self.model.set_attn_implementation(ATTENTION)
            return
        for dst, src in zip(self.model.state_dict().values(), self.source.state_dict().values()):
            dst.copy_(src)

    def _longest_prefix(self, row: list[int]) -> tuple[int, int]:
        """(entry, n): the stored sequence sharing the longest prefix with ``row``, and that prefix's length,
        at most len(row) - 1 (the last id must be forwarded: its logits give the next token)."""
        best, best_n = -1, 0
        for e, (ids, _) in enumerate(self.store):
            n, limit = 0, min(len(ids), len(row) - 1)
            while n < limit and ids[n] == row[n]:
                n += 1
            if n > best_n:
                best, best_n = e, n
        return best, best_n

    # ------------------------------------------------------------------ the forward over a padded batch
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                         use_cache=True)
        return out.logits[:, -1].float(), out.past_key_values

    def _prefill(self, rows: list[list[int]]) -> None:
        """Store the KV cache of ``row[:-1]`` for each distinct row that no stored sequence starts."""
        for row in dict.fromkeys(tuple(r) for r in rows):
            ids = torch.tensor([row[:-1]], device=self.model.device)
            _, past = self._forward(ids, torch.ones_like(ids), torch.arange(ids.shape[1], device=ids.device)[None], None)
            self.store.append((list(row[:-1]), [(k[0], v[0]) for k, v, *_ in past]))

    def _batch_cache(self, rows: list[list[int]], room: int):
        """Each row's cached prefix, left-padded into one DynamicCache, and its uncached rest, left-padded:
        (cache, rest ids, attention mask over cache + rest, positions of the rest, real-key masks)."""
        hits = [self._longest_prefix(r) for r in rows]
        if any(n == 0 for _, n in hits):
            self._prefill([r for r, (_, n) in zip(rows, hits) if n == 0])
            hits = [self._longest_prefix(r) for r in rows]
        W, S = max(n for _, n in hits), max(len(r) - n for r, (_, n) in zip(rows, hits))
        B, layers = len(rows), len(self.store[0][1])
        k0 = self.store[0][1][0][0]
        keys = [k0.new_zeros(B, k0.shape[0], W, k0.shape[2]) for _ in range(layers)]
        values = [k0.new_zeros(B, k0.shape[0], W, k0.shape[2]) for _ in range(layers)]
        rest = torch.full((B, S), self.ends[0], dtype=torch.long, device=k0.device)
        mask = torch.zeros((B, W + S), dtype=torch.long, device=k0.device)
        positions = torch.zeros((B, S), dtype=torch.long, device=k0.device)
        for i, (row, (e, n)) in enumerate(zip(rows, hits)):
            for l, (k, v) in enumerate(self.store[e][1]):  # noqa: E741
                keys[l][i, :, W - n:], values[l][i, :, W - n:] = k[:, :n], v[:, :n]
            r = len(row) - n
            rest[i, S - r:] = torch.tensor(row[n:], device=rest.device)
            mask[i, W - n:W], mask[i, W + S - r:] = 1, 1
            positions[i, S - r:] = torch.arange(n, len(row), device=rest.device)
            positions[i, :S - r] = n  # padding: any position; its keys are masked
        return preallocated_cache(list(zip(keys, values)), S + room), rest, mask, positions

    # ------------------------------------------------------------------ sampling
    def _sample(self, logits: torch.Tensor, temperature: float, top_p: float, gen) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    def _stopped(self, new: list[int], stop: list[str]) -> bool:
        if new[-1] in self.ends:
            return True
        tail = env._decode(self.tokenizer, new[-12:])  # a stop string spans a few tokens, never 12
        return any(s in tail for s in stop)

    @torch.no_grad()
    def generate(self, batch, max_new_tokens, temperature, top_p, stop) -> list[list[int]]:
        if self.model is None:
            self.start_rollout()
        rows = [list(r) for r in batch]
        gen = torch.Generator(device=self.model.device)
        gen.manual_seed((self.seed if self.seed is not None else torch.initial_seed() % 2**31) * 100_003 + self.calls)
        self.calls += 1
        past, ids, mask, positions = self._batch_cache(rows, max_new_tokens)
        logits, past = self._forward(ids, mask, positions, past)
        new = [[] for _ in rows]
        logps = [[] for _ in rows]
        next_pos = positions[:, -1] + 1
        live = list(range(len(rows)))  # batch slot j holds row live[j]
        while True:
            token = self._sample(logits, temperature, top_p, gen)
            lp = torch.log_softmax(logits, dim=-1).gather(1, token[:, None]).squeeze(1)
            keep, token_list, lp_list = [], token.tolist(), lp.tolist()
            for j, i in enumerate(live):
                new[i].append(token_list[j])
                logps[i].append(lp_list[j])
                if not (len(new[i]) >= max_new_tokens or self._stopped(new[i], stop)):
                    keep.append(j)
            self._remember(rows, new, live, past, mask, [j for j in range(len(live)) if j not in keep])
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch
                index = torch.tensor(keep, device=mask.device)
                past.batch_select_indices(index)
                mask, token, next_pos = mask[index], token[index], next_pos[index]
                live = [live[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            logits, past = self._forward(token[:, None], mask, next_pos[:, None], past)
            next_pos = next_pos + 1
        out = [env.cut_turn(n, self.tokenizer, stop, max_new_tokens) for n in new]
        self.last_logprobs = [lp[:len(o)] for lp, o in zip(logps, out)]
        return out

    def _remember(self, rows, new, live, past, mask, done: list[int]) -> None:
        """Store the cache of each finished row: its context and what it wrote, less the last id (whose
        key/value was never computed). The row's real keys are where its attention mask is 1."""
        for j in done:
            i = live[j]
            real = mask[j].bool()
            kv = [(k[j][:, real], v[j][:, real]) for k, v, *_ in past]
            self.store.append((rows[i] + new[i][:-1], kv))
