"""What MT-PPO's critic costs: peak memory and seconds per step of --method mt_ppo against --method mt_grpo, on the
CPU default run (SmolLM2-135M-Instruct on the demo world), same settings, alternating.

    python bench/bench_critic.py                 # 2 rounds of (MT-GRPO, MT-PPO), 3 steps each
    python bench/bench_critic.py --rounds 3 --steps 4

The critic is a model of its own (extensions.estimators.ValueModel: a copy of the policy's starting weights with a
zero-initialised value head), trained by its own AdamW beside the policy: veRL's PPO layout, and the MT-GRPO
paper's second version's "critic network trained beside the policy". A value head on the policy's own trunk
would cost no second model, but its value loss would then move the policy's weights, with a weight between the
two losses that neither the paper nor veRL's PPO sets. So MT-PPO holds a second copy of the weights, its
gradients and AdamW's two moments: about twice the policy's training memory.

Peak memory is a process's ru_maxrss, which only grows: every measurement is a fresh process (this script with
--worker) that runs train.py's loop for --steps steps (the warm start off, so both methods run the same rollouts'
worth of work) and reads its metrics.jsonl; the methods take turns, so both meet the same background load.
Written to bench/results/critic.txt: per method the peak RSS and the median seconds per step (rollouts and
update, and the critic's fit for MT-PPO), and the ratios MT-PPO / MT-GRPO.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, fresh_process, write_result  # first: puts the repo root on sys.path

METHODS = ("mt_grpo", "mt_ppo")


def worker(args) -> dict:
    """One run of train.py's loop in this (fresh) process; its metrics rows summarised."""
    import train

    with tempfile.TemporaryDirectory() as out:
        argv = ["--method", args.worker, "--max-steps", str(args.steps), "--warmstart-steps", "0",
                *(["--model", args.model] if args.model else []),
                "--threads", str(args.threads), "--sample-every", "0", "--output-dir", out]
        if train.main(argv) != 0:
            raise SystemExit(f"train.py {' '.join(argv)} failed")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"method": args.worker, "peak_gb": rows[-1]["peak_rss_gb"],
            "step_seconds": statistics.median(r["step_seconds"] for r in rows),
            "update_seconds": statistics.median(r["update_seconds"] for r in rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per method, alternating")
    p.add_argument("--steps", type=int, default=3, help="training steps per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="another checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "critic.txt"), help="where the result is written")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    passed = ["--steps", str(args.steps), "--threads", str(args.threads), *(["--model", args.model] if args.model else [])]
    runs = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for m in METHODS:
            runs[m].append(fresh_process(__file__, m, passed))
            print(f"round {r + 1} {m}: peak {runs[m][-1]['peak_gb']:.2f} GB, {runs[m][-1]['step_seconds']:.1f} s/step",
                  flush=True)

    def avg(m, key):
        return statistics.mean(x[key] for x in runs[m])

    model = args.model or "SmolLM2-135M-Instruct"
    command = "python bench/bench_critic.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"{command}  ({datetime.date.today()})",
             f"bench_critic: the CPU default run ({model}, demo world, no warm start), {args.steps} steps "
             f"a process, {args.threads} threads; {args.rounds} fresh processes per method, alternating",
             "| method | peak RSS GB (mean) | s/step (median, mean over processes) | update s (incl. the critic's fit) |",
             "|---|---|---|---|"]
    for m in METHODS:
        lines.append(f"| {m} | {avg(m, 'peak_gb'):.2f} | {avg(m, 'step_seconds'):.1f} | {avg(m, 'update_seconds'):.1f} |")
    lines.append(f"ratio MT-PPO / MT-GRPO: peak RSS {avg('mt_ppo', 'peak_gb') / avg('mt_grpo', 'peak_gb'):.2f}, "
                 f"s/step {avg('mt_ppo', 'step_seconds') / avg('mt_grpo', 'step_seconds'):.2f}")
    lines.append("per process (peak GB): " + "; ".join(f"{m} " + ", ".join(f"{x['peak_gb']:.2f}" for x in runs[m])
                                                       for m in METHODS))
    write_result(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
