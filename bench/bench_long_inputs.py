"""Model output of any length must cost time in proportion to its length: the reward parser and the
search tool on the long inputs a policy will eventually write, each against a baseline of the same
size measured in the same run.

    python bench/bench_long_inputs.py                 # 200,000-character inputs, 5 rounds
    python bench/bench_long_inputs.py --chars 20000 --rounds 3

1. rewards.parse on "<tool>" + n spaces, never closed (the input on which the seed's regex
   r"<tool>\\s*(.*?)\\s*</tool>" backtracks catastrophically: ~13 s at n = 3,000; DEVIATIONS.md,
   item 7), against the same text closed by "</tool>". A ratio near 1 means no blow-up.
2. search.Index.search (bm25s, the demo world's corpus) on a query of n characters ("Everest lorem
   ipsum ..."), against a query of the first MAX_QUERY_TOKENS words of it: the tool cuts a query
   to those words, so the long one costs only its tokenisation more.
The two sides alternate, round by round; each figure is the best of the rounds (a busy machine only
slows a run down).
"""
from __future__ import annotations

import argparse
import sys
import time

import common  # noqa: F401  (first: puts the repo root on sys.path)
import data
import rewards
import search


def best_seconds(fns: dict, rounds: int) -> dict[str, float]:
    """Best wall time of each function over ``rounds`` rounds, the functions taking turns."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def report(what: str, best: dict[str, float]) -> None:
    (a, ta), (b, tb) = best.items()
    print(f"{what}: {a} {ta * 1e3:.2f} ms, {b} {tb * 1e3:.2f} ms, ratio {ta / tb:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chars", type=int, default=200_000, help="length of the long inputs")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--corpus", help="passage JSONL for the search part (default: the demo world's)")
    args = p.parse_args(argv)
    n = args.chars
    unclosed, closed = "<tool>" + " " * n, "<tool>" + " " * n + "</tool>"
    report(f"rewards.parse, {n:,} spaces after <tool>",
           best_seconds({"unclosed": lambda: rewards.parse(unclosed), "closed": lambda: rewards.parse(closed)},
                        args.rounds))
    index = search.load_index(args.corpus or data.demo_world()["corpus"])
    huge = ("Everest " + "lorem ipsum " * (n // 12 + 1))[:n]
    cut = " ".join(huge.split()[:search.MAX_QUERY_TOKENS])
    report(f"Index.search, a {n:,}-character query",
           best_seconds({"long": lambda: index.search(huge, 1), f"first {search.MAX_QUERY_TOKENS} words":
                         lambda: index.search(cut, 1)}, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
