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
on its neighbours' lengths beyond floating-point rounding. For Llama-family models every forward (the
one-token steps, where a rollout spends most of its time, and the prefills) runs ``CpuForward``: the
model's computation written for a CPU, where a one-token step is bound by how fast the weights stream
from memory and by the overhead of many small operations; other models take their own forward.
"""
from __future__ import annotations

import copy

import torch

import env
from config import Sampling
from policy import Sampler

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


def preallocated_cache(layers: int, shape: tuple[int, int, int, int], room: int, dtype: torch.dtype, device):
    """A DynamicCache of ``layers`` layers, each holding ``shape`` = (B, heads, L, dim) zero keys and
    values (the caller writes its own into ``store_k[:, :, :L]`` and ``store_v``), with room for ``room``
    more positions. transformers' DynamicLayer appends by torch.cat, copying the whole cache on every
    decode step (a quarter of a CPU decode step); these layers write the new keys and values in place."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        def __init__(self):
            super().__init__()
            B, H, L, D = shape
            # zeros, not empty: the one-token step reads the whole store, its unwritten tail masked, and a
            # masked score times uninitialised memory could still be NaN
            self.store_k = torch.zeros(B, H, L + room, D, dtype=dtype, device=device)
            self.store_v = torch.zeros(B, H, L + room, D, dtype=dtype, device=device)
            self.length, self.dtype, self.device, self.is_initialized = L, dtype, device, True
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
    cache.layers = [InPlaceLayer() for _ in range(layers)]
    return cache


class PackedLinear:
    """``x -> F.linear(x, weight, bias)``, then optionally one elementwise operation, with the weight
    reordered once into oneDNN's blocked layout.

    A one-token decode step multiplies every weight by a handful of rows. Read in its plain layout a bf16
    weight streams at ~8 GB/s here; in the layout oneDNN's kernel reads (the reorder PyTorch's own compiler
    applies to frozen weights) at ~17 GB/s, with bit-identical results. What follows the product (``then``:
    SiLU, or ``+ other`` / ``* other`` with a tensor of the output's shape) is applied by oneDNN to the
    product's fp32 accumulator before it is rounded and written (a "post-op"): one operation instead of
    two, and one rounding instead of two. Where oneDNN is missing, the plain product and the operation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: int = 16):
        self.weight, self.bias = weight, bias
        self.packed = (weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float32)
                       and torch.backends.mkldnn.is_available())
        if self.packed:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def __call__(self, x: torch.Tensor, then: str = "none", other: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed:
            if other is None:  # oneDNN's names: "swish" is SiLU
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, then, [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, self.bias, then)
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        return {"none": lambda: y, "swish": lambda: torch.nn.functional.silu(y),
                "add": lambda: y + other, "mul": lambda: y * other}[then]()


class CpuForward:
    """The forward of a Llama-family model (Llama, SmolLM2, Qwen2) over S new ids per row against the KV
    cache, written out over the model's own weights for a CPU: the one-token decode steps (S = 1), which
    take most of a rollout's time, and the prefills. Its rotary embedding is the model's module, called as
    it is, and its norms use the model's norm weights (``rms_norm``); the rest is spelled out so that

    - every weight is read in oneDNN's blocked layout (``PackedLinear``), the query/key/value
      projections are one product, and what follows a product is fused onto it: the residual additions
      after the attention's output projection and after the MLP's down projection, SiLU after the gate
      projection, and the gate's product with the up projection (a one-token step is ~20 small
      operations a layer, and each costs microseconds of overhead);
    - the new keys and values are written straight into the preallocated cache; a one-token step's
      attention reads the whole cache buffer, its unwritten tail masked, in its own contiguous layout (a
      slice of it would be copied by the CPU batched matmul on every step, 30 layers x 2 per step);
    - a prefill's projections and MLP run on its real ids only: left-padded rows of the environment's
      replies are about a third padding;
    - none of the generic forward's per-step work runs (mask construction, cache bookkeeping, output
      objects).

    The weights are copies, taken once per rollout. Numerically it is the model's forward with
    ``grouped_decode_attention`` up to where it rounds (in bf16 a fused operation rounds once where the
    model's forward rounds twice); tests check its logits against the model's forward (Llama and Qwen2,
    fp32 and bf16)."""

    FAMILIES = ("llama", "qwen2")

    @staticmethod
    def supports(model) -> bool:
        c = model.config
        # the fused projections read plain weights: LoRA-wrapped projections take the model's own forward
        plain = (all(type(getattr(layer.self_attn, n, None)) is torch.nn.Linear for layer in model.model.layers
                     for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
                 and all(type(getattr(layer.mlp, n, None)) is torch.nn.Linear for layer in model.model.layers
                         for n in ("gate_proj", "up_proj", "down_proj")))
        on_cpu = model.model.embed_tokens.weight.device.type == "cpu"  # written for a CPU (oneDNN): elsewhere the model's own
        return (on_cpu and c.model_type in CpuForward.FAMILIES and c.hidden_act == "silu" and plain
                and not getattr(c, "mlp_bias", False) and not getattr(c, "use_sliding_window", False)
                and getattr(c, "pretraining_tp", 1) == 1)

    @torch.no_grad()
    def __init__(self, model):
        self.model, attn = model, model.model.layers[0].self_attn
        self.H, self.Hk, self.D = model.config.num_attention_heads, model.config.num_key_value_heads, attn.head_dim
        self.scaling = attn.scaling
        self.layers = []
        for layer in model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            self.layers.append((PackedLinear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), bias),
                                PackedLinear(a.o_proj.weight, a.o_proj.bias), PackedLinear(mlp.gate_proj.weight),
                                PackedLinear(mlp.up_proj.weight), PackedLinear(mlp.down_proj.weight)))
        self.head = PackedLinear(model.lm_head.weight, model.lm_head.bias)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache, may_attend: torch.Tensor,
                 real: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, vocab) in fp32 after each row's last id, for S new ids per row (S = 1: a decode step;
        more: a prefill). ``ids``, ``positions``: (B, S), left-padded; ``real``: (B, S), the ids that are
        not padding (None: all are). ``cache``: the InPlaceLayer cache, whose layers all hold ``length``
        positions; the new keys and values go at ``length`` .. ``length + S - 1``. ``may_attend``: (B, S,
        cache room), True where new id s of a row may attend (its own position included). Each line is
        the model's own computation in fewer, larger operations. The projections and the MLP run on the
        real ids alone, packed (N, hidden): a padded prefill of the environment's replies is a third
        padding. The attention of a prefill is PyTorch's SDPA, as in the model's forward."""
        m, (B, S), H, Hk, D, n_rep = self.model.model, ids.shape, self.H, self.Hk, self.D, self.H // self.Hk
        packed = real is not None and not bool(real.all())
        x = m.embed_tokens(ids[real] if packed else ids.reshape(-1))          # (N, hidden)
        pos = positions[real] if packed else positions.reshape(-1)
        cos, sin = (c[0, :, None] for c in m.rotary_emb(x, pos[None]))     # (N, 1, D)
        # rotate_half(v) = cat(-v2, v1) = roll(v, D/2) with its first half negated: the sign goes into sin once
        half = D // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)
        if S == 1:  # an additive mask over the scores, (B, 1, 1, cache room)
            key_bias = torch.zeros(may_attend.shape, device=ids.device).masked_fill_(~may_attend, float("-inf"))[:, None]
        for layer, (qkv, o_proj, gate, up, down), kv in zip(m.layers, self.layers, cache.layers):
            projected = qkv(rms_norm(x, layer.input_layernorm))
            qk = projected[:, :(H + Hk) * D].view(-1, H + Hk, D)   # queries and keys, rotated together
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)    # qk cos + rotate_half(qk) sin
            keys, values = qk[:, H:], projected[:, (H + Hk) * D:].view(-1, Hk, D)
            new_k = kv.store_k[:, :, kv.length:kv.length + S].transpose(1, 2)   # (B, S, Hk, D), in the store
            new_v = kv.store_v[:, :, kv.length:kv.length + S].transpose(1, 2)
            q = qk[:, :H]
            if packed:  # padding keeps the store's zeros (its keys are masked) and zero queries
                new_k[real], new_v[real] = keys, values
                q = q.new_zeros(B, S, H, D).index_put_((real,), q)
            else:
                new_k.copy_(keys.view(B, S, Hk, D))
                new_v.copy_(values.view(B, S, Hk, D))
                q = q.view(B, S, H, D)
            kv.length += S
            if S == 1:  # grouped_decode_attention's computation, over the whole cache buffer
                grouped = q.reshape(B, Hk, n_rep, D)   # query head h reads key/value head h // n_rep
                # the bf16 scores are promoted to the fp32 key_bias's dtype inside the addition (no separate cast)
                scores = torch.add(key_bias, torch.matmul(grouped, kv.store_k.transpose(-1, -2)), alpha=self.scaling)
                out = torch.matmul(scores.softmax(-1).to(x.dtype), kv.store_v).reshape(B, H * D)
            else:
                n = kv.length  # the written part of the buffer (SDPA reads a strided slice without copying it)
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), kv.store_k[:, :, :n], kv.store_v[:, :, :n], attn_mask=may_attend[:, None, :, :n],
                    scale=self.scaling, enable_gqa=True).transpose(1, 2)   # (B, S, H, D)
                out = out[real].reshape(-1, H * D) if packed else out.reshape(B * S, H * D)
            x = o_proj(out, "add", x)                                        # x + o_proj(attention)
            h = rms_norm(x, layer.post_attention_layernorm)
            x = down(up(h, "mul", gate(h, "swish")), "add", x)              # x + down(up(h) * silu(gate(h)))
        for kv in cache.layers:
            kv._views()
        # each row's last id is its last column (rows are left-padded)
        last = real.sum(1).cumsum(0) - 1 if packed else torch.arange(S - 1, B * S, S, device=x.device)
        return self.head(rms_norm(x[last], m.norm)).float()

    def empty_cache(self, rows: int, room: int):
        """An InPlaceLayer cache of ``rows`` rows holding nothing yet, with room for ``room`` positions."""
        w = self.model.model.embed_tokens.weight
        return preallocated_cache(len(self.layers), (rows, self.Hk, 0, self.D), room, w.dtype, w.device)


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """The model's RMSNorm module ``norm`` (Llama's, Qwen2's: normalise in fp32, round, scale) in two
    operations instead of seven: PyTorch's rms_norm computes a bf16 input in fp32 and rounds the result
    once, as the module does."""
    return torch.nn.functional.rms_norm(x, x.shape[-1:], eps=norm.variance_epsilon) * norm.weight


class CachedPolicy(Sampler):
    """``policy.generate`` for ``env.rollout`` with prefix-shared KV caches and a bf16 sampling copy.

    ``model`` is the trained model (any dtype); with ``dtype`` None the sampler uses it as it is, else a
    copy in ``dtype`` that ``start_rollout`` refreshes. ``seed`` gives a private, reproducible random
    stream (one generator per call). ``fast_decode``: every forward through ``CpuForward`` where the
    model's family allows it (else the model's own forward). After each
    call ``last_logprobs`` holds, per row, the log-prob of each returned id under the sampling model's whole
    tempered distribution (config.Sampling's contract)."""

    def __init__(self, model, tokenizer, seed: int | None = None, dtype: torch.dtype | None = torch.bfloat16,
                 fast_decode: bool = True):
        self.source, self.tokenizer, self.seed, self.calls = model, tokenizer, seed, 0
        self.dtype = dtype
        self.model = model if dtype is None or dtype == next(model.parameters()).dtype else None
        self.fast_decode, self.fast = fast_decode, None
        self.ends = sorted(env.end_ids(tokenizer))
        self.store: list[tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = []  # (ids, per-layer K, V)
        self.last_logprobs: list[list[float]] | None = None

    # ------------------------------------------------------------------ weights and the per-rollout store
    @torch.no_grad()
    def start_rollout(self) -> None:
        """Forget the previous rollout's caches and copy the current weights into the sampling model."""
        self.store = []
        if self.model is None:
            _register_attention()
            self.model = copy.deepcopy(self.source).to(self.dtype).eval().requires_grad_(False)
            self.model.set_attn_implementation(ATTENTION)
        elif self.model is not self.source:
            for dst, src in zip(self.model.state_dict().values(), self.source.state_dict().values()):
                dst.copy_(src)
        # CpuForward's fused projections are copies: rebuilt from the current weights every rollout
        self.fast = CpuForward(self.model) if self.fast_decode and CpuForward.supports(self.model) else None

    def end_rollout(self) -> None:
        """Free what only the rollout needed (every row's KV cache, CpuForward's packed weights) before
        the update takes its memory: at SmolLM2's CPU batch, about 0.5 GB off the step's peak."""
        self.store, self.fast = [], None

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
        """Logits (B, vocab) after each row's last id and the cache with ``ids``' keys and values added.
        ``ids``, ``positions``: (B, S), left-padded; ``mask``: (B, cached + S), 1 = a real key."""
        if self.fast is not None and past is not None:
            W, S, L = past.layers[0].length, ids.shape[1], past.layers[0].store_k.shape[2]
            cols, new = torch.arange(L, device=ids.device), W + torch.arange(S, device=ids.device)
            # new id s may attend to the row's real keys up to its own position, and always to itself
            may = torch.zeros(ids.shape[0], S, L, dtype=torch.bool, device=ids.device)
            may[:, :, :W + S] = mask.bool()[:, None, :]
            may &= cols <= new[:, None]
            may[:, torch.arange(S), new] = True
            return self.fast(ids, positions, past, may, mask[:, W:].bool()), past
        # only the last position's logits are sampled from; the vocabulary projection of every other
        # position (a fifth of SmolLM2's FLOPs per token) would be thrown away. The last position is given as
        # an index tensor, not ``logits_to_keep=1``: that slices a strided (B, 1, hidden) view, and the CPU
        # matmul multiplies a strided batch by expanding the head's weight to (B, hidden, vocab) and copying
        # it (0.9 GB and up to 4 s for a 16-row prefill of SmolLM2); the index gathers a contiguous copy
        last = torch.tensor([ids.shape[1] - 1], device=ids.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                         use_cache=True, logits_to_keep=last)
        return out.logits[:, -1].float(), out.past_key_values

    def _prefill(self, rows: list[list[int]]) -> None:
        """Store the KV cache of ``row[:-1]`` for each distinct row that no stored sequence starts."""
        distinct = [list(r[:-1]) for r in dict.fromkeys(tuple(r) for r in rows)]
        device = self.model.device
        if self.fast is None:  # the model's own forward, one sequence at a time (no padding to mask)
            for row in distinct:
                ids = torch.tensor([row], device=device)
                _, past = self._forward(ids, torch.ones_like(ids), torch.arange(len(row), device=device)[None], None)
                self.store.append((row, [(k[0], v[0]) for k, v, *_ in past]))
            return
        # all at once, left-padded, through CpuForward (which skips the padding)
        ids, mask, positions = self._left_padded(distinct, [0] * len(distinct))
        S = ids.shape[1]
        cache = self.fast.empty_cache(len(distinct), S)
        self._forward(ids, mask, positions, cache)
        for i, row in enumerate(distinct):
            self.store.append((row, [(layer.store_k[i, :, S - len(row):], layer.store_v[i, :, S - len(row):])
                                     for layer in cache.layers]))

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
        cache = preallocated_cache(layers, (B, k0.shape[0], W, k0.shape[2]), S + room, k0.dtype, k0.device)
        cached = torch.zeros((B, W), dtype=torch.long, device=k0.device)
        for i, (e, n) in enumerate(hits):
            for layer, (k, v) in zip(cache.layers, self.store[e][1]):
                layer.store_k[i, :, W - n:W], layer.store_v[i, :, W - n:W] = k[:, :n], v[:, :n]
            cached[i, W - n:] = 1
        rest, real, positions = self._left_padded([r[n:] for r, (_, n) in zip(rows, hits)], [n for _, n in hits])
        return cache, rest, torch.cat([cached, real], 1), positions

    def _left_padded(self, seqs: list[list[int]], starts: list[int]):
        """``seqs`` left-padded into one batch: (ids, 1 where an id is real, positions), each (B, longest);
        sequence i starts at position ``starts[i]`` (its padding takes that position too; it is masked)."""
        device, S = self.model.device, max(len(q) for q in seqs)
        ids = torch.full((len(seqs), S), self.ends[0], dtype=torch.long, device=device)
        real, positions = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (q, start) in enumerate(zip(seqs, starts)):
            ids[i, S - len(q):], real[i, S - len(q):] = torch.tensor(q, device=device), 1
            positions[i] = start
            positions[i, S - len(q):] = torch.arange(start, start + len(q), device=device)
        return ids, real, positions

    # ------------------------------------------------------------------ sampling
    def _sample(self, logits: torch.Tensor, sampling: Sampling, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """One id per row, and its log-prob under the whole tempered distribution (Sampling's contract).
        Drawn by inverting the cumulative distribution at a uniform draw: the same distribution as
        torch.multinomial, which on a CPU costs 16 ms for 16 rows of a 49k vocabulary (a quarter of a
        decode step) against 0.4 ms for a cumsum and a binary search. The probabilities are fp32, their
        running sum fp64 (49k fp32 additions would drift by up to ~1e-3). The top-k and top-p cuts zero
        the probabilities they drop; the draw renormalises (u is uniform below the kept total)."""
        if sampling.temperature <= 0:
            token = logits.argmax(-1)
            return token, torch.log_softmax(logits, -1).gather(1, token[:, None]).squeeze(1)
        probs = tempered = torch.softmax(logits / sampling.temperature, dim=-1)
        if 0 < sampling.top_k < probs.shape[-1]:  # keep the k most likely ids (and any tied with the k-th)
            kth = probs.topk(sampling.top_k, dim=-1).values[:, -1:]
            probs = probs.masked_fill(probs < kth, 0.0)
        if sampling.top_p < 1.0:  # then the smallest set whose (renormalised) probability reaches top_p
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1, dtype=torch.float64) - sorted_p
            drop = before >= sampling.top_p * sorted_p.sum(-1, keepdim=True, dtype=torch.float64)
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        cdf = probs.cumsum(-1, dtype=torch.float64)
        u = torch.rand(len(probs), 1, generator=gen, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
        # the first id whose cumulative probability exceeds u: an id of probability 0 is never drawn
        token = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
        return token, tempered.gather(1, token[:, None]).squeeze(1).log()

    def _stopped(self, new: list[int], stop: list[str]) -> bool:
        if new[-1] in self.ends:
            return True
        tail = env._decode(self.tokenizer, new[-12:])  # a stop string spans a few tokens, never 12
        return any(s in tail for s in stop)

    def _step(self, token: torch.Tensor, position: torch.Tensor, past, seen: torch.Tensor) -> torch.Tensor:
        """The next logits after one new id per row (its key goes at the cache's current length)."""
        if self.fast is not None:
            return self.fast(token[:, None], position[:, None], past, seen[:, None])
        length = past.layers[0].length + 1
        return self._forward(token[:, None], seen[:, :length].long(), position[:, None], past)[0]

    @torch.no_grad()
    def generate(self, batch, max_new_tokens: int, sampling: Sampling, stop) -> list[list[int]]:
        if self.model is None:
            self.start_rollout()
        rows = [list(r) for r in batch]
        gen = torch.Generator(device=self.model.device)
        gen.manual_seed((self.seed if self.seed is not None else torch.initial_seed() % 2**31) * 100_003 + self.calls)
        self.calls += 1
        past, ids, mask, positions = self._batch_cache(rows, max_new_tokens)
        logits, past = self._forward(ids, mask, positions, past)
        # seen[j, t]: slot j may attend to cache position t (its real keys), over the whole cache buffer
        seen = torch.zeros(len(rows), past.layers[0].store_k.shape[2], dtype=torch.bool, device=mask.device)
        seen[:, :mask.shape[1]] = mask.bool()
        new = [[] for _ in rows]
        logps = [[] for _ in rows]
        next_pos = positions[:, -1] + 1
        live = list(range(len(rows)))  # batch slot j holds row live[j]
        while True:
            token, lp = self._sample(logits, sampling, gen)
            keep, token_list, lp_list = [], token.tolist(), lp.tolist()
            for j, i in enumerate(live):
                new[i].append(token_list[j])
                logps[i].append(lp_list[j])
                if not (len(new[i]) >= max_new_tokens or self._stopped(new[i], stop)):
                    keep.append(j)
            self._remember(rows, new, live, past, seen, [j for j in range(len(live)) if j not in keep])
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch
                index = torch.tensor(keep, device=seen.device)
                past.batch_select_indices(index)
                seen, token, next_pos = seen[index], token[index], next_pos[index]
                live = [live[j] for j in keep]
            seen[:, past.layers[0].length] = True  # the new id's own key
            logits = self._step(token, next_pos, past, seen)
            next_pos = next_pos + 1
        out = [env.cut_turn(n, self.tokenizer, stop, max_new_tokens) for n in new]
        self.last_logprobs = [lp[:len(o)] for lp, o in zip(logps, out)]
        return out

    def _remember(self, rows, new, live, past, seen, done: list[int]) -> None:
        """Store the cache of each finished row: its context and what it wrote, less the last id (whose
        key/value was never computed). The row's real keys are where ``seen`` is True."""
        length = past.layers[0].length
        for j in done:
            i = live[j]
            real = seen[j, :length]
            kv = [(layer.keys[j][:, real], layer.values[j][:, real]) for layer in past.layers]
            self.store.append((rows[i] + new[i][:-1], kv))
