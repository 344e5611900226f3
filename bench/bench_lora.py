"""LoRA against full fine-tuning: seconds per update and peak memory, same run, alternating.

    python bench/bench_lora.py                          # SmolLM2-135M, 16 rows, 3 rounds of (LoRA, full)
    python bench/bench_lora.py --hidden 384 --layers 6  # a random Llama instead

One update is what train.update runs on the CPU default's batch (common.synthetic_batch: 16 rows shaped
like its rollouts): length-grouped micro-batches (train.micro_batches), a forward and backward of
policy.token_logprobs on each, gradient clipping and an AdamW step over the trainable parameters
(infra.assemble.prepare's optimizer: under LoRA the adapter only). LoRA is lora.wrap with --lora-r/--lora-alpha on
every linear projection of each block (config.Config's default targets).

Peak memory is a process's ru_maxrss, which only grows: so every measurement runs in a fresh
subprocess (this script with --worker), and the modes take turns (LoRA, full, LoRA, full, ...) so both
meet the same background load. Each worker loads the model, runs one warm-up update and --updates
timed ones. Printed and written to bench/results/lora.txt: per mode the mean seconds per update, the
peak RSS of the process, what the updates added to the peak after loading, and the ratios LoRA / full.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from common import (  # first: the repo root
    ROOT,
    fresh_process,
    mean,
    quiet_transformers,
    random_llama,
    set_threads,
    synthetic_batch,
    tokenizer,
    write_result,  # first: the repo root
)


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def worker(args) -> dict:
    """One measurement in this (fresh) process: load, warm up, time ``args.updates`` updates."""
    import torch

    import config
    import train
    from infra import lora
    from policy import load_policy, token_logprobs

    set_threads(args.threads)
    quiet_transformers()
    tok = tokenizer()
    torch.manual_seed(0)
    model = random_llama(tok, args.hidden, args.layers) if args.hidden else load_policy(None)[0]
    if args.worker == "lora":
        model, _ = lora.wrap(model, args.lora_r, args.lora_alpha, config.LORA_TARGETS)
    model.train()
    cfg = config.Config()
    params = lora.trainable(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas)
    ids, attn, turn = synthetic_batch(tok, args.rows)
    n_tokens = (turn[:, 1:] > 0).sum()
    loaded = peak_gb()

    def update() -> float:
        t0 = time.perf_counter()
        for rows, width in train.micro_batches(attn, args.micro_batch):
            logp = token_logprobs(model, ids[rows, :width], attn[rows, :width], turn[rows, :width], args.bf16)
            (-(logp * (turn[rows, 1:width] > 0)).sum() / n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    update()  # warm-up: first-touch allocations, the optimizer's state
    seconds = [update() for _ in range(args.updates)]
    return {"mode": args.worker, "seconds": sum(seconds) / len(seconds), "peak_gb": peak_gb(),
            "added_gb": peak_gb() - loaded, "trainable": sum(p.numel() for p in params),
            "total": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="measurements per mode, alternating LoRA / full")
    p.add_argument("--updates", type=int, default=1, help="timed updates per measurement (after one warm-up)")
    p.add_argument("--rows", type=int, default=16, help="rollouts in the batch (the CPU default's batch_size)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--hidden", type=int, default=0, help="a random Llama of this width (0: SmolLM2-135M)")
    p.add_argument("--layers", type=int, default=2, help="its layers (with --hidden)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora.txt"), help="where the result is written")
    p.add_argument("--worker", choices=["lora", "full"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    passed = ["--updates", str(args.updates), "--rows", str(args.rows), "--micro-batch", str(args.micro_batch),
              "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--hidden", str(args.hidden),
              "--layers", str(args.layers), "--threads", str(args.threads), "--bf16" if args.bf16 else "--no-bf16"]
    runs = {"lora": [], "full": []}
    for r in range(args.rounds):
        for mode in ("lora", "full"):
            runs[mode].append(fresh_process(__file__, mode, passed))
            print(f"round {r + 1} {mode}: {runs[mode][-1]['seconds']:.2f} s/update, peak {runs[mode][-1]['peak_gb']:.2f} GB",
                  flush=True)
    model = f"random Llama hidden {args.hidden} x {args.layers} layers" if args.hidden else "SmolLM2-135M"
    lines = [f"bench_lora: {model}, {args.rows} rows, micro-batch {args.micro_batch}, bf16 {args.bf16}, "
             f"{args.threads} threads, LoRA r {args.lora_r} alpha {args.lora_alpha:g} on every linear projection of each block; "
             f"{args.rounds} fresh processes per mode, alternating, each 1 warm-up + {args.updates} timed update(s)",
             "| mode | trainable params | s/update (mean) | peak RSS GB (mean) | added by the updates GB |",
             "|---|---|---|---|---|"]
    for mode in ("lora", "full"):
        rs = runs[mode]
        lines.append(f"| {'LoRA' if mode == 'lora' else 'full'} | {rs[0]['trainable']:,} of {rs[0]['total']:,} | "
                     f"{mean(rs, 'seconds'):.2f} | {mean(rs, 'peak_gb'):.2f} | {mean(rs, 'added_gb'):.2f} |")
    lines.append(f"ratio LoRA/full: s/update {mean(runs['lora'], 'seconds') / mean(runs['full'], 'seconds'):.3f}, "
                 f"peak RSS {mean(runs['lora'], 'peak_gb') / mean(runs['full'], 'peak_gb'):.3f}")
    lines.append("per measurement (s/update): LoRA " + ", ".join(f"{x['seconds']:.2f}" for x in runs["lora"])
                 + "; full " + ", ".join(f"{x['seconds']:.2f}" for x in runs["full"]))
    text = "\n".join(lines) + "\n"
    write_result(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
