"""The CPU default's training step as it was and as it is, in one run, alternating.

    python bench/bench_cpu_step.py                       # SmolLM2-135M, train.py's defaults, 3 timed steps an arm
    python bench/bench_cpu_step.py --steps 1 --warmup 0  # quicker

Every arm is train.py's own loop (assemble.setup + train.train_step) on the same Config, the CPU default
(2 questions x G 8 rollouts a step, 64-token turns, a 256-token episode budget, the demo world), from the
same warm-started weights, with the same seed, so the same question stream. Each arm is its own process
(its own allocator, its own peak memory):

    before      --no-fast, the reference path, the C library's malloc: transformers ``generate`` on
                the fp32 weights, each turn re-reading its whole context, and the update forwarding every
                row whole (the step as it was, run as ``make train`` ran it);
    after-libc  the defaults, the C library's malloc: fast.CachedPolicy (each prompt's KV cache computed
                once for its G rollouts, each turn continuing the previous one's cache, a bf16 sampling
                copy, every forward through fast.CpuForward) and fast.shared_prefix_logprobs in the update;
    after       the defaults under tcmalloc, as ``make train`` runs them now (where tcmalloc is installed;
                else the same as after-libc, and the header says so).

The warm start (train.py's 7 supervised steps) runs once and every arm loads it. The arms take turns
step by step, rotating who goes first, so all meet the same background load; one arm runs at a time.
The first ``--warmup`` steps of each arm are dropped.

Printed and written to bench/results/cpu_step.txt, per arm: seconds per step, rollout seconds, the
rollouts' model tokens per second (tokens the model sampled / rollout seconds), update seconds, the
update's FLOP/s as a share of this machine's bf16 matmul peak, with FLOPs counted as
bench_step.update_flops counts the *plain* update (every row's prompt included): the same work for every
arm, so a share above the plain one is what not recomputing the shared prompts buys; and the process's
peak RSS. Then the ratios against before.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (ROOT, allocator, mean, quiet_transformers,  # first: puts the repository root on sys.path
                   set_threads, write_result)

# arm -> (train.py flags, preload tcmalloc)
ARMS = {"before": ({"fast": False}, False), "after-libc": ({}, False), "after": ({}, True)}


def tcmalloc() -> str | None:
    """The tcmalloc library the Makefile preloads for ``make train``, where installed."""
    found = sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4") + glob.glob("/usr/lib64/libtcmalloc_minimal.so.4"))
    return found[0] if found else None


def warm_started(folder: Path, cfg) -> str:
    """train.py's warm start of ``cfg.model`` (None: SmolLM2-135M), once, saved for both arms."""
    import torch

    import config
    from extensions import warmstart
    from infra import assemble
    from policy import load_policy

    model, tok = load_policy(cfg.model)
    questions, index = assemble.load_task(cfg)
    torch.manual_seed(cfg.seed)
    warmstart.run(model, tok, index, questions, config.episode(cfg), steps=cfg.warmstart_steps,
                  lr=cfg.warmstart_lr, seed=cfg.seed, bf16=cfg.bf16, micro_batch=cfg.micro_batch)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def base_config(args):
    import config

    return config.Config(threads=args.threads, warmstart_steps=args.warmstart_steps, model=args.model,
                        **({"G": args.G, "batch_size": 2 * args.G, "micro_batch": args.G} if args.G else {}))


def worker(args) -> int:
    """One arm's process: assemble.setup from the warm start, then one train_step per line on stdin, its metrics
    row (with the plain update's FLOPs) printed as one JSON line after ``ROW``."""
    from bench_step import update_flops

    import train
    from infra import assemble
    from policy import pack

    cfg = dataclasses.replace(base_config(args), model=args.start, warmstart_steps=0,
                              output_dir=str(Path(args.start).parent / args.worker), **ARMS[args.worker][0])
    run = assemble.setup(cfg)
    for line in sys.stdin:
        row, trajs, _ = train.train_step(cfg, run, int(line))
        _, attn, turn = pack(trajs, run.tokenizer.pad_token_id)
        row["update_flops"] = update_flops(run.model, attn, turn, cfg.micro_batch)["total"]
        row["allocator"] = allocator()
        print("ROW " + json.dumps(row), flush=True)
    return 0


def timed_steps(args) -> dict[str, list[dict]]:
    base = base_config(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cpu_step-"))
    t0 = time.time()
    start = warm_started(tmp / "warm", base)
    print(f"warm start ({base.warmstart_steps} steps) {time.time() - t0:.0f} s", flush=True)
    common = ["--start", start, "--threads", str(args.threads), "--warmstart-steps", str(args.warmstart_steps),
              "--G", str(args.G)] + (["--model", args.model] if args.model else [])
    procs = {}
    for arm, (_, preload) in ARMS.items():
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        if preload and tcmalloc():
            env["LD_PRELOAD"] = tcmalloc()
        procs[arm] = subprocess.Popen([sys.executable, __file__, "--worker", arm, *common], env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
    rows = {arm: [] for arm in ARMS}
    try:
        for step in range(args.warmup + args.steps):
            arms = list(ARMS)
            for arm in arms[step % len(arms):] + arms[:step % len(arms)]:  # rotate who goes first
                procs[arm].stdin.write(f"{step}\n")
                procs[arm].stdin.flush()
                row = next((json.loads(line[4:]) for line in procs[arm].stdout if line.startswith("ROW ")), None)
                if row is None:
                    raise RuntimeError(f"the {arm} arm's process ended without a result (exit {procs[arm].wait()})")
                print(f"step {step + 1} {arm:10s}: {row['step_seconds']:.1f} s (rollout {row['rollout_seconds']:.1f} s, "
                      f"{row['rollout_tokens_per_second']:.0f} model tok/s; update {row['update_seconds']:.1f} s), "
                      f"tool calls {row['tool_call_rate']:.2f}, peak RSS {row['peak_rss_gb']:.2f} GiB", flush=True)
                if step >= args.warmup:
                    rows[arm].append(row)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    return rows


def report(args, rows: dict[str, list[dict]], peak: float) -> str:
    import torch

    b = rows["before"]
    tok_s = {arm: sum(r["model_tokens"] for r in rs) / sum(r["rollout_seconds"] for r in rs) for arm, rs in rows.items()}
    share = {arm: 100 * sum(r["update_flops"] for r in rs) / sum(r["update_seconds"] for r in rs) / peak
             for arm, rs in rows.items()}
    lines = [f"bench_cpu_step: {args.model or 'SmolLM2-135M'}, train.py's CPU defaults (batch 16 = 2 questions x G 8, "
             f"micro-batch 4, bf16 update), torch {torch.__version__}, {args.threads} threads; {args.warmup} warm-up + "
             f"{args.steps} timed steps an arm, alternating, one process an arm; bf16 matmul peak {peak / 1e9:.0f} GFLOP/s",
             "| arm | allocator | s/step | rollout s | rollout model tok/s | update s | update, share of bf16 peak (plain FLOPs) | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, rs in rows.items():
        lines.append(f"| {arm} | {rs[0]['allocator']} | {mean(rs, 'step_seconds'):.1f} | {mean(rs, 'rollout_seconds'):.1f} | "
                     f"{tok_s[arm]:.0f} | {mean(rs, 'update_seconds'):.1f} | {share[arm]:.0f}% | "
                     f"{max(r['peak_rss_gb'] for r in rs):.2f} |")
    for arm in ("after-libc", "after"):
        a = rows[arm]
        lines.append(f"ratio before/{arm}: step {mean(b, 'step_seconds') / mean(a, 'step_seconds'):.2f}x (target >= 3), "
                     f"rollout {mean(b, 'rollout_seconds') / mean(a, 'rollout_seconds'):.2f}x, "
                     f"update {mean(b, 'update_seconds') / mean(a, 'update_seconds'):.2f}x; "
                     f"{arm}'s rollouts {tok_s[arm]:.0f} model tok/s (target >= 233, vLLM-CPU's figure)")
    lines.append("per step (s): " + "; ".join(f"{arm} " + ", ".join(f"{r['step_seconds']:.1f}" for r in rs)
                                             for arm, rs in rows.items()))
    lines.append("mismatch/abs_logp (sampler vs trainer log-prob of the sampled ids): "
                 + ", ".join(f"{arm} {mean(rs, 'mismatch/abs_logp'):.4f}" for arm, rs in rows.items()))
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
    p.add_argument("--worker", choices=list(ARMS), help=argparse.SUPPRESS)  # one arm's process (timed_steps starts it)
    p.add_argument("--start", help=argparse.SUPPRESS)                        # its warm-started model folder
    args = p.parse_args(argv)
    set_threads(args.threads)
    quiet_transformers()
    if args.worker:
        return worker(args)
    import torch
    from bench_step import matmul_peak

    rows = timed_steps(args)
    write_result(args.out, report(args, rows, matmul_peak(torch.bfloat16, tuple(args.peak_sizes))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
