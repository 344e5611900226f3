"""Rollout throughput: env.rollout with batched HFPolicy vs one episode at a time.

Both modes run the same random-initialised Llama (common.random_llama, SmolLM2's shape in small,
big enough that compute matters) on the same
questions with the same EnvConfig, and count the tokens the *model* wrote (turn_idx >= 1) per
second of wall time, prompt processing and environment steps included. A random model never
writes a valid tool call or answer, so every episode runs until the completion budget: both modes
produce about the same number of tokens and the search tool is never called (a null searcher).

    python bench/bench_rollout.py                       # 8 questions x G=4, printed as a table
    python bench/bench_rollout.py --questions 4 --G 8 --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import (NullSearcher, demo_questions, model_tokens, random_llama, set_threads,  # first: the repo root
                   tokenizer)
import env
from config import EnvConfig, Sampling
from policy import HFPolicy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--G", type=int, default=4)
    p.add_argument("--max-turn-tokens", type=int, default=64)
    p.add_argument("--max-completion-tokens", type=int, default=320)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    set_threads(args.threads)

    tok = tokenizer()
    model = random_llama(tok, args.hidden, args.layers)
    questions = [row["question"] for row in demo_questions(args.questions)]
    cfg = EnvConfig(max_turn_tokens=args.max_turn_tokens, max_completion_tokens=args.max_completion_tokens)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {n_params:.1f}M params; "
          f"torch threads {torch.get_num_threads()}; {len(questions)} questions x G={args.G}; "
          f"max_turn_tokens {cfg.max_turn_tokens}, max_completion_tokens {cfg.max_completion_tokens}")
    HFPolicy(model, tok, seed=0).generate([[1, 2, 3]], 4, Sampling(), env.STOP)  # warm-up

    start = time.perf_counter()
    batched = env.rollout(HFPolicy(model, tok, seed=0), tok, questions, args.G, NullSearcher(), cfg)
    t_batched = time.perf_counter() - start

    start, single = time.perf_counter(), []
    policy = HFPolicy(model, tok, seed=0)
    for q in questions:
        for _ in range(args.G):
            single += env.rollout(policy, tok, [q], 1, NullSearcher(), cfg)
    t_single = time.perf_counter() - start

    rate_b, rate_s = model_tokens(batched) / t_batched, model_tokens(single) / t_single
    print(f"{'mode':<26}{'episodes':>9}{'model tokens':>14}{'seconds':>10}{'tokens/s':>10}")
    print(f"{'batched (live episodes)':<26}{len(batched):>9}{model_tokens(batched):>14}{t_batched:>10.1f}{rate_b:>10.1f}")
    print(f"{'one episode at a time':<26}{len(single):>9}{model_tokens(single):>14}{t_single:>10.1f}{rate_s:>10.1f}")
    print(f"speed-up (tokens/s ratio, one run): {rate_b / rate_s:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
