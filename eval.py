"""Evaluate policies on held-out questions: the paper's Table 5 columns, side by side.

    python eval.py base runs/mt_grpo-seed0-X                 # demo world's eval split, greedy
    python eval.py base runs/r1 --questions ../shared/data/triviaqa/questions.jsonl \\
        --corpus ../shared/data/wiki/passages.jsonl.gz --holdout 300 --top-k 3   # real data
    python eval.py base --sampled --samples 4 --json out.json

A model is ``base`` (the embedded SmolLM2-135M-Instruct), a run folder (its ``checkpoint/``), or any
model folder. Each is rolled out through the same environment as training (env.py) with one episode
per question (greedy) or ``--samples`` episodes (sampled at ``--temperature``) and scored by
rewards.py. Columns (Zeng et al., Table 5): tool execution (0..0.2), search answer (0..0.5),
XML format (0..0.2), exact match (0..1), plus answer presence, the share of episodes with a tool
call, and EM in percent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import data
import env
import rewards
import search
from policy import load_policy

# (key, header) in the order of the paper's Table 5, then ours
COLUMNS = [("tool_execution", "Tool exec (0-.2)"), ("search_answer", "Search ans (0-.5)"),
           ("xml", "XML fmt (0-.2)"), ("exact_match", "Exact match (0-1)"),
           ("answer_presence", "Ans present (0-.5)"), ("tool_call_rate", "Tool-call rate"), ("em_percent", "EM %")]


class EvalError(ValueError):
    """Bad input to eval.py; the message names the fix."""


def resolve_model(name: str) -> str | None:
    """``base`` -> None (the embedded model); a run folder -> its checkpoint; else the folder itself."""
    if name == "base":
        return None
    path = Path(name)
    if (path / "checkpoint" / "config.json").is_file():
        return str(path / "checkpoint")
    if (path / "config.json").is_file():
        return str(path)
    raise EvalError(f"{name}: neither 'base', a run folder with checkpoint/, nor a model folder with config.json")


def load_questions(questions: str | None, holdout: int, n: int | None) -> list[dict]:
    """The evaluation questions: the demo world's eval split, or the ``holdout`` rows that
    ``train.py --holdout`` kept out of training (all rows when holdout is 0), first ``n`` of them."""
    if questions is None:
        rows = data.load_questions(data.demo_world()["eval"])
    else:
        rows = data.load_questions(questions)
        if holdout:
            if holdout > len(rows):
                raise EvalError(f"--holdout {holdout} exceeds the {len(rows)} questions in {questions}")
            rows = data.split_questions(rows, holdout)[1]
    return rows[:n] if n else rows


def evaluate(policy, tokenizer, questions: list[dict], index, env_cfg: env.EnvConfig, samples: int = 1,
             batch: int = 64) -> dict:
    """Roll out ``samples`` episodes per question with ``policy`` (env.HFPolicy or any object with
    its ``generate``; ``env_cfg.temperature`` 0 = greedy) in chunks of ``batch`` episodes and
    average each reward over all episodes."""
    per_chunk = max(1, batch // samples)
    trajectories = []
    with torch.no_grad():
        for i in range(0, len(questions), per_chunk):
            chunk = questions[i:i + per_chunk]
            trajectories += env.rollout(policy, tokenizer, [q["question"] for q in chunk], samples, index, env_cfg)
    aliases = [q["aliases"] for q in questions for _ in range(samples)]
    scores = rewards.compute([t.messages for t in trajectories], aliases)
    result = rewards.means(scores)
    result["tool_call_rate"] = float(np.mean([any(c is not None for c in t.tool_calls) for t in trajectories]))
    result["em_percent"] = 100.0 * result["exact_match"]
    result["episodes"] = len(trajectories)
    return result


def table(results: dict[str, dict]) -> str:
    """Plain-text table, one row per model (also valid Markdown)."""
    name_w = max(12, *(len(n) for n in results))
    head = "| " + "Model".ljust(name_w) + " | " + " | ".join(h for _, h in COLUMNS) + " |"
    rule = "|" + "-" * (name_w + 2) + "|" + "|".join("-" * (len(h) + 2) for _, h in COLUMNS) + "|"
    rows = []
    for name, r in results.items():
        cells = [(f"{r[k]:.1f}" if k == "em_percent" else f"{r[k]:.3f}").rjust(len(h)) for k, h in COLUMNS]
        rows.append("| " + name.ljust(name_w) + " | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="'base', run folders or model folders")
    ap.add_argument("--questions", help="question JSONL (default: the demo world's eval split)")
    ap.add_argument("--corpus", help="passage JSONL(.gz) (default: the demo world's corpus)")
    ap.add_argument("--holdout", type=int, default=0, help="evaluate on the rows train.py --holdout kept out")
    ap.add_argument("--n", type=int, default=200, help="first N questions (0 = all)")
    ap.add_argument("--sampled", action="store_true", help="sample at --temperature instead of greedy")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--samples", type=int, default=1, help="episodes per question when --sampled")
    ap.add_argument("--batch", type=int, default=64, help="episodes per rollout call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    # the environment, defaults as train.py's
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--max-turn-tokens", type=int, default=64)
    ap.add_argument("--max-completion-tokens", type=int, default=256)
    ap.add_argument("--result-max-tokens", type=int, default=96)
    ap.add_argument("--max-tool-calls", type=int, default=2)
    ap.add_argument("--few-shot", action="store_true")
    args = ap.parse_args(argv)
    if args.samples > 1 and not args.sampled:
        raise EvalError("--samples > 1 needs --sampled (greedy episodes of one question are identical)")
    if (args.questions is None) != (args.corpus is None):
        raise EvalError("pass --questions and --corpus together (or neither, for the demo world)")
    for name in ("questions", "corpus"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            raise EvalError(f"--{name} {path}: file not found")
    return args


def run(args) -> dict[str, dict]:
    models = {name: resolve_model(name) for name in args.models}  # fail on a bad name before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_questions(args.questions, args.holdout, args.n)
    index = search.load_index(args.corpus or data.demo_world()["corpus"])
    env_cfg = env.EnvConfig(max_tool_calls=args.max_tool_calls, max_turn_tokens=args.max_turn_tokens,
                            max_completion_tokens=args.max_completion_tokens, top_k=args.top_k,
                            result_max_tokens=args.result_max_tokens, few_shot=args.few_shot,
                            temperature=args.temperature if args.sampled else 0.0)
    results = {}
    for name, path in models.items():
        model, tokenizer = load_policy(path)
        policy = env.HFPolicy(model.eval(), tokenizer, seed=args.seed)
        results[name] = evaluate(policy, tokenizer, questions, index, env_cfg, args.samples if args.sampled else 1,
                                 args.batch)
        print(f"{name}: {json.dumps({k: round(v, 4) for k, v in results[name].items()})}", file=sys.stderr)
    return results


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        results = run(args)
    except (EvalError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(results))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps({"questions": args.questions or "demo-world eval", "holdout": args.holdout,
                                   "n": args.n, "sampled": args.sampled, "results": results}, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
