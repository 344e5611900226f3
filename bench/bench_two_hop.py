"""Beyond two turns: K-turn MT-GRPO vs GRPO-MR on the two-hop demo task, CPU.

    python bench/bench_two_hop.py --out runs/bench-two-hop

A two-hop question ("On which river lies the town where the poet X was born?") needs two searches:
X's passage names the town, the town's passage names the river (data.generate_two_hop). Episodes
have up to K = 3 turns (two tool calls, then the answer; --max-tool-calls 2) and each call earns its
own turn-level reward (rewards.call_rewards: ran, found new evidence). Both methods train with those
per-call rewards (train.py --k-turn): MT-GRPO gives turn k its own masked-normalised advantage plus
lambda times what follows (mt_grpo.k_turn_advantages), GRPO-MR one trajectory-level advantage of the
summed rewards. Same warm start (supervised steps on two-search demonstrations, so that both start
from a policy that sometimes searches twice), seeds, budget and lengths; evaluated greedily on
held-out two-hop questions. The runner, tables and plot are bench_learning.py's; like it, this skips
what already exists.
Measured: a 3-step warm start (loss 1.27 -> 0.62) left a model that never called the tool greedily
(0/48) and in 3 of 16 sampled rollouts: too little to start RL from, hence 8 steps (the CPU default
uses 7 for the one-hop task).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import ROOT, as_flags  # first: puts the repo root on sys.path
import config
import data
from bench_learning import (Comparison, plot_curves, run_comparison, setup_text, shared_warm_start, summarise,
                            write_results)

METHODS = {"grpo_mr": "GRPO-MR", "mt_grpo": "MT-GRPO (K-turn)"}
CURVES = [("calls_per_episode", "tool calls per episode"), ("search_answer", "first search found answer"),
          ("answer_found", "a search found the answer"), ("exact_match", "exact match (0-1)")]
# two-hop questions are long: a search turn that quotes one needs ~70 tokens, hence 96 per turn
ENV = {"max_tool_calls": 2, "max_turn_tokens": 96, "max_completion_tokens": 384, "passages": 1, "result_max_tokens": 96,
       "temperature": 1.0, "top_k": 0}
ENV_FLAGS = as_flags(ENV)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-two-hop")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmstart-steps", type=int, default=8)
    ap.add_argument("--eval-n", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model", help="the model to warm-start (default: the embedded SmolLM2-135M-Instruct)")
    args = ap.parse_args(argv)
    import search

    world = data.two_hop_world()
    c = Comparison(out=Path(args.out).resolve(), questions=str(world["train"]), corpus=str(world["corpus"]),
                   eval_questions=str(world["eval"]), holdout=0, task_flags=["--k-turn", *ENV_FLAGS],
                   env_flags=ENV_FLAGS, methods={m: METHODS[m] for m in METHODS if m in args.methods},
                   seeds=args.seeds, steps=args.steps, G=args.G, batch_size=args.batch_size, eval_n=args.eval_n,
                   threads=args.threads, model=args.model)
    c.out.mkdir(parents=True, exist_ok=True)
    cfg = config.Config(**ENV, warmstart_steps=args.warmstart_steps)
    t0 = time.time()
    start, ws = shared_warm_start(c, cfg, lambda: (data.load_questions(c.questions), search.load_index(c.corpus)))
    first, evals, curves = run_comparison(c, start)
    report = summarise(c, first, evals, curves, CURVES)
    write_results(Path(args.results), "two_hop", "Two-hop benchmark (K = 3 turns)", "bench_two_hop.py",
                  setup_text(c, ws, cfg.lr), report, (time.time() - t0) / 60)
    plot_curves(curves, Path(args.results), "two_hop", c.methods, CURVES)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
