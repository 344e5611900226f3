"""The CPU default's training step before and after the shared-prefix work, in one run, alternating.

    python bench/bench_cpu_step.py                       # SmolLM2-135M, train.py's defaults, 3 timed steps an arm
    python bench/bench_cpu_step.py --steps 1 --warmup 0  # quicker

Both arms are train.py's own loop (train.setup + train.train_step) on the same Config, the CPU default
(2 questions x G 8 rollouts a step, 64-token turns, a 256-token episode budget, the demo world), from the
same warm-started weights, with the same seed, so the same question stream:

    before  --sampler generate --no-shared-prefix: transformers ``generate`` on the fp32 weights, each turn
            re-reading its whole context, and the update forwarding every row whole (the step as it was);
    after   the defaults: sampler.CachedPolicy (each prompt's KV cache computed once for its G rollouts,
            each turn continuing the previous one's cache, a bf16 sampling copy, grouped one-token
            attention, in-place cache) and policy.shared_prefix_logprobs in the update.

Each arm trains its own weights, as a run would; the warm start (train.py's 7 supervised steps) runs
once and both arms load it. The arms take turns step by step, swapping who goes first each step, so both
meet the same background load. The first ``--warmup`` steps of each arm are dropped.

Printed and written to bench/results/cpu_step.txt, per arm: seconds per step, rollout seconds, the
rollouts' model tokens per second (tokens the model sampled / rollout seconds), update seconds, and the
update's FLOP/s as a share of this machine's bf16 matmul peak, with FLOPs counted as
bench_step.update_flops counts the *plain* update (every row's prompt included): the same work for both
arms, so a share above the plain one is what not recomputing the shared prompts buys. Then the ratios
before/after.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, allocator, mean, quiet_transformers, set_threads, write_result  # first: puts the repository root on sys.path

ARMS = {"before": {"sampler": "generate", "shared_prefix": False}, "after": {}}


def warm_started(folder: Path, cfg) -> str:
    """train.py's warm start of ``cfg.model`` (None: SmolLM2-135M), once, saved for both arms."""
    import torch

    import train
    import warmstart
    from policy import load_policy

    model, tok = load_policy(cfg.model)
    questions, index = train.load_task(cfg)
    torch.manual_seed(cfg.seed)
    warmstart.run(model, tok, index, questions, train.env_config(cfg), steps=cfg.warmstart_steps,
                  lr=cfg.warmstart_lr, seed=cfg.seed, bf16=cfg.bf16, micro_batch=cfg.micro_batch)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def timed_steps(args) -> dict[str, list[dict]]:
    import train
    from bench_step import update_flops
    from policy import pack

    base = train.Config(threads=args.threads, warmstart_steps=args.warmstart_steps, model=args.model,
                        **({"G": args.G, "batch_size": 2 * args.G, "micro_batch": args.G} if args.G else {}))
    tmp = Path(tempfile.mkdtemp(prefix="bench_cpu_step-"))
    t0 = time.time()
    start = warm_started(tmp / "warm", base)
    print(f"warm start ({base.warmstart_steps} steps) {time.time() - t0:.0f} s", flush=True)
    cfgs = {arm: dataclasses.replace(base, model=start, warmstart_steps=0, output_dir=str(tmp / arm), **flags)
            for arm, flags in ARMS.items()}
    runs = {arm: train.setup(cfg) for arm, cfg in cfgs.items()}
    rows = {arm: [] for arm in ARMS}
    for step in range(args.warmup + args.steps):
        for arm in (list(ARMS) if step % 2 == 0 else list(ARMS)[::-1]):
            row, trajs, _ = train.train_step(cfgs[arm], runs[arm], step)
            _, attn, turn = pack(trajs, runs[arm].tokenizer.pad_token_id)
            row["update_flops"] = update_flops(runs[arm].model, attn, turn, base.micro_batch)["total"]
            print(f"step {step + 1} {arm:6s}: {row['step_seconds']:.1f} s (rollout {row['rollout_seconds']:.1f} s, "
                  f"{row['rollout_tokens_per_second']:.0f} model tok/s; update {row['update_seconds']:.1f} s), "
                  f"tool calls {row['tool_call_rate']:.2f}, peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
            if step >= args.warmup:
                rows[arm].append(row)
    return rows


def report(args, rows: dict[str, list[dict]], peak: float) -> str:
    import torch

    b, a = rows["before"], rows["after"]
    tok_s = {arm: sum(r["model_tokens"] for r in rs) / sum(r["rollout_seconds"] for r in rs) for arm, rs in rows.items()}
    share = {arm: 100 * sum(r["update_flops"] for r in rs) / sum(r["update_seconds"] for r in rs) / peak
             for arm, rs in rows.items()}
    lines = [f"bench_cpu_step: {args.model or 'SmolLM2-135M'}, train.py's CPU defaults (batch 16 = 2 questions x G 8, micro-batch 4, "
             f"bf16 update), torch {torch.__version__}, {args.threads} threads, allocator {allocator()}; {args.warmup} warm-up + {args.steps} "
             f"timed steps an arm, alternating; bf16 matmul peak {peak / 1e9:.0f} GFLOP/s",
             "| arm | s/step | rollout s | rollout model tok/s | update s | update, share of bf16 peak (plain FLOPs) |",
             "|---|---|---|---|---|---|"]
    for arm, rs in rows.items():
        lines.append(f"| {arm} | {mean(rs, 'step_seconds'):.1f} | {mean(rs, 'rollout_seconds'):.1f} | {tok_s[arm]:.0f} | "
                     f"{mean(rs, 'update_seconds'):.1f} | {share[arm]:.0f}% |")
    lines.append(f"ratio before/after: step {mean(b, 'step_seconds') / mean(a, 'step_seconds'):.2f}x (target >= 3), "
                 f"rollout {mean(b, 'rollout_seconds') / mean(a, 'rollout_seconds'):.2f}x, "
                 f"update {mean(b, 'update_seconds') / mean(a, 'update_seconds'):.2f}x; "
                 f"after's rollouts {tok_s['after']:.0f} model tok/s (target >= 233, vLLM-CPU's figure)")
    lines.append("per step (s): before " + ", ".join(f"{r['step_seconds']:.1f}" for r in b)
                 + "; after " + ", ".join(f"{r['step_seconds']:.1f}" for r in a))
    lines.append("mismatch/abs_logp (sampler vs trainer log-prob of the sampled ids): before "
                 + f"{mean(b, 'mismatch/abs_logp'):.4f}, after {mean(a, 'mismatch/abs_logp'):.4f}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per arm")
    p.add_argument("--warmstart-steps", type=int, default=7, help="train.py's warm start, run once for both arms")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="a model folder instead of SmolLM2-135M (the smoke test's tiny one)")
    p.add_argument("--G", type=int, default=0, help="rollouts per question (0: train.py's default); 2 questions a step")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_step.txt"))
    p.add_argument("--peak-sizes", type=int, nargs="+", default=[1024, 2048, 3072],
                   help="square matmul sizes behind the bf16 peak (small ones only to smoke-test: on a CPU without "
                        "bf16 units a 3072 product takes minutes)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    quiet_transformers()
    import torch

    from bench_step import matmul_peak

    rows = timed_steps(args)
    write_result(args.out, report(args, rows, matmul_peak(torch.bfloat16, tuple(args.peak_sizes))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
