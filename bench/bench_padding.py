"""The micro-batch layout of train.update, A/B: length-grouped micro-batches cut to their longest row
(train.micro_batches) against the layout they replaced (rows in order, every micro-batch as wide as
the whole batch).

    python bench/bench_padding.py                  # SmolLM2-135M, 16 rows, 3 timed updates a layout
    python bench/bench_padding.py --hidden 384 --layers 6 --updates 5   # a random Llama instead

The batch is shaped like the CPU default's rollouts (common.synthetic_batch: 16 rows of ~170 prompt
+ 150-256 completion tokens). One timed update, per layout: for each micro-batch, a forward and
backward of policy.token_logprobs on its rows cut to its width (what train.update runs per
micro-batch), then gradient clipping and an AdamW step (config.Config's lr, betas and clip). Everything but the layout is the same, and
the two layouts take turns update by update, so both meet the same background load; the first
update of each is a warm-up. Printed: mean seconds of each and the ratio grouped / whole.

The figure in bench/results/bench_step.txt (SmolLM2-135M: 19.70 vs 23.20 s, 0.849) came from an
earlier version inside bench_step.py (``--padding-ab 3``) that timed the whole train.update with its
micro-batch function swapped for the baseline; this script times the same model work without
reaching into train.py, so its seconds are not that file's to the digit.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import mean, quiet_transformers, random_llama, set_threads, synthetic_batch, tokenizer  # first: the repo root
import config
import train
from policy import load_policy, token_logprobs


def whole_width(attn: torch.Tensor, size: int) -> list[tuple[torch.Tensor, int]]:
    """The baseline layout, in train.micro_batches's form: rows in order, every micro-batch at the
    batch's full width."""
    return [(torch.arange(i, min(i + size, attn.shape[0])), attn.shape[1]) for i in range(0, attn.shape[0], size)]


def timed_update(model, optimizer, batch, layout, cfg: config.Config) -> float:
    """Seconds of one update over ``layout``'s micro-batches (rows, width), with cfg's clip and dtype."""
    ids, attn, turn = batch
    n_tokens = (turn[:, 1:] > 0).sum()
    t0 = time.perf_counter()
    for rows, width in layout:
        logp = token_logprobs(model, ids[rows, :width], attn[rows, :width], turn[rows, :width], cfg.bf16)
        (-(logp * (turn[rows, 1:width] > 0)).sum() / n_tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=3, help="timed updates per layout (after one warm-up each)")
    p.add_argument("--rows", type=int, default=16, help="rollouts in the batch")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=0, help="a random Llama of this width (0: SmolLM2-135M)")
    p.add_argument("--layers", type=int, default=2, help="its layers (with --hidden)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    quiet_transformers()
    set_threads(args.threads)
    if args.hidden:
        tok = tokenizer()
        model, name = random_llama(tok, args.hidden, args.layers), f"random Llama (hidden {args.hidden}, {args.layers} layers)"
    else:
        (model, tok), name = load_policy(None), "SmolLM2-135M"
    model.train()
    batch = synthetic_batch(tok, args.rows)
    cfg = config.Config(micro_batch=args.micro_batch, bf16=args.bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    layouts = {"grouped": train.micro_batches(batch[1], args.micro_batch),
               "whole": whole_width(batch[1], args.micro_batch)}
    times = {k: [] for k in layouts}
    for _ in range(1 + args.updates):
        for k, layout in layouts.items():
            times[k].append({"s": timed_update(model, optimizer, batch, layout, cfg)})
    grouped, whole = (mean(times[k][1:], "s") for k in ("grouped", "whole"))
    lengths = batch[1].sum(1)
    print(f"{name} update, {args.rows} rows of {int(lengths.min())}-{int(lengths.max())} tokens, micro-batch "
          f"{args.micro_batch}, {torch.get_num_threads()} threads, bf16 {args.bf16}: length-grouped micro-batches cut "
          f"to their longest row {grouped:.2f} s (widths {[w for _, w in layouts['grouped']]}), every micro-batch "
          f"at the batch's width {whole:.2f} s (mean of {args.updates} each, alternating): "
          f"grouped/whole {grouped / whole:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
