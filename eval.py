"""Evaluate policies on held-out questions: the paper's Table 5 columns, side by side.

    python eval.py base runs/mt_grpo-seed0-X                 # demo world's eval split, greedy
    python eval.py base runs/r1 --questions ../shared/data/triviaqa/questions.jsonl \\
        --corpus ../shared/data/wiki/passages.jsonl.gz --holdout 400   # real data
    python eval.py base --sampled --samples 4 --json out.json

A model is ``base`` (the embedded SmolLM2-135M-Instruct), a run folder (its ``checkpoint/``), or any
model folder. Each is rolled out through the same environment as training (env.py) with one episode
per question (greedy) or ``--samples`` episodes (sampled at ``--temperature``) and scored by
rewards.py. A run folder's episodes use the settings it was trained with (its config.json: tool
calls, token budgets, passages per search, few-shot, temperature); ``base`` and plain model folders
use config.Config's defaults, the budget of the default training run; a flag overrides both. Columns (Zeng et al., Table 5): tool execution (0..0.2), search answer (0..0.5),
XML format (0..0.2), exact match (0..1), plus answer presence, the share of episodes with a tool
call, and EM in percent.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import data
import env
import rewards
import search
import config
from config import Config, EnvConfig, episode
from infra.assemble import hf_sampler
from policy import load_policy

# (key, header) in the order of the paper's Table 5, then ours
COLUMNS = [("tool_execution", "Tool exec (0-.2)"), ("search_answer", "Search ans (0-.5)"),
           ("xml", "XML fmt (0-.2)"), ("exact_match", "Exact match (0-1)"),
           ("answer_presence", "Ans present (0-.5)"), ("tool_call_rate", "Tool-call rate"), ("em_percent", "EM %")]


# The episode settings a flag can override: the Config fields of EnvConfig.
EPISODE_FIELDS = tuple(f.name for f in dataclasses.fields(EnvConfig))


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


def run_config(name: str, overrides: dict | None = None) -> Config:
    """The Config a model is evaluated under: a run folder's own config.json (what train.py wrote),
    else Config's defaults; then ``overrides`` (flags; None = not given)."""
    folder = Path(name)
    if folder.name == "checkpoint":  # runs/x/checkpoint is evaluated as runs/x
        folder = folder.parent
    cfg, path = Config(), folder / "config.json"
    if name != "base" and (folder / "checkpoint").is_dir() and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError as e:
            raise EvalError(f"{path}: not valid JSON ({e}); restore it from the run or pass the episode flags "
                            f"with a model folder (its checkpoint/) instead") from None
        if not isinstance(saved, dict):
            raise EvalError(f"{path}: expected train.py's settings (a JSON object)")
        # only fields this Config knows: a run written by an older or newer train.py still evaluates
        fields = {f.name for f in dataclasses.fields(Config)}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k in fields})
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (overrides or {}).items() if v is not None})
    check_episode(cfg, f"{name}: ")
    return cfg


def check_episode(cfg: Config, where: str = "") -> None:
    """env.rollout's own limits (config.check_episode), as one clear message naming the flag, before any model is loaded."""
    problem = config.check_episode(episode(cfg))
    if problem:
        raise EvalError(where + problem)


def episode_config(cfg: Config, sampled: bool) -> EnvConfig:
    """The run's episode (config.episode), greedy unless --sampled (then as the run or the flags sample)."""
    env_cfg = episode(cfg)
    return env_cfg if sampled else dataclasses.replace(env_cfg, temperature=0.0)


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


def evaluate(policy, tokenizer, questions: list[dict], index, env_cfg: EnvConfig, samples: int = 1,
             batch: int = 64, desc: str | None = None) -> dict:
    """Roll out ``samples`` episodes per question with ``policy`` (HFPolicy or any object with
    its ``generate``; ``env_cfg.temperature`` 0 = greedy) in chunks of ``batch`` episodes and
    average each reward over all episodes. ``desc``: show a progress bar (episodes) under that name.

    An untrained model rarely writes <tool> or <answer>: each such turn gets a format reminder and
    the episode goes on, so its turns end only at the budgets, max_turn_tokens per turn and
    max_completion_tokens per episode. Those come from config.Config (or the run), the budget the
    policies were trained under, so a model is never cut shorter than it was trained to write, and
    the cost of a model that never stops is known in advance: with the CPU defaults its episode ends
    at 256 completion tokens, three turns (64, 64 and the 40-odd left) with two format reminders
    between them. A bound on the number of reminders would cut a trained model's retries too."""
    per_chunk = max(1, batch // samples)
    trajectories = []
    bar = tqdm(total=len(questions) * samples, desc=desc, unit="episode", disable=desc is None, dynamic_ncols=True)
    with torch.no_grad(), bar:
        for i in range(0, len(questions), per_chunk):
            chunk = questions[i:i + per_chunk]
            trajectories += env.rollout(policy, tokenizer, [q["question"] for q in chunk], samples, index, env_cfg)
            bar.update(len(chunk) * samples)
    aliases = [q["aliases"] for q in questions for _ in range(samples)]
    scores = rewards.compute([t.messages for t in trajectories], aliases)
    result = rewards.means(scores)
    stats = env.episode_stats(trajectories, aliases)
    result.update({k: stats[k] for k in ("tool_call_rate", "calls_per_episode", "answer_found")})
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


def add_episode_flags(ap: argparse.ArgumentParser, temperature_note: str = "") -> None:
    """--max-tool-calls ... --few-shot, default None: the run folder's config.json, else Config's default (one
    source; run_config resolves them)."""
    defaults = Config()
    for k in EPISODE_FIELDS:
        flag = "--" + k.replace("_", "-")
        if k == "few_shot":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                            help=f"a worked exchange in the prompt (default: the run's, else {defaults.few_shot})")
        else:
            ap.add_argument(flag, type=type(getattr(defaults, k)), default=None,
                            help=f"default: the run's, else {getattr(defaults, k)}"
                                 + (f" {temperature_note}" if k == "temperature" and temperature_note else ""))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="'base', run folders or model folders")
    ap.add_argument("--questions", help="question JSONL (default: the demo world's eval split)")
    ap.add_argument("--corpus", help="passage JSONL(.gz) (default: the demo world's corpus)")
    ap.add_argument("--holdout", type=int, default=0, help="evaluate on the rows train.py --holdout kept out")
    ap.add_argument("--n", type=int, default=200, help="first N questions (0 = all)")
    ap.add_argument("--sampled", action="store_true", help="sample at --temperature instead of greedy")
    ap.add_argument("--samples", type=int, default=1, help="episodes per question when --sampled")
    ap.add_argument("--batch", type=int, default=64, help="episodes per rollout call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    add_episode_flags(ap, "(used with --sampled)")
    args = ap.parse_args(argv)
    for k in ("n", "samples", "batch", "holdout"):
        if getattr(args, k) < (1 if k in ("samples", "batch") else 0):
            raise EvalError(f"--{k} {getattr(args, k)}: must be >= {1 if k in ('samples', 'batch') else 0}")
    for k in ("temperature", "top_k", "top_p"):
        if getattr(args, k) is not None and not args.sampled:
            raise EvalError(f"--{k.replace('_', '-')} needs --sampled (without it every episode is greedy)")
    if args.samples > 1 and not args.sampled:
        raise EvalError("--samples > 1 needs --sampled (greedy episodes of one question are identical)")
    if (args.questions is None) != (args.corpus is None):
        raise EvalError("pass --questions and --corpus together (or neither, for the demo world)")
    for name in ("questions", "corpus"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            raise EvalError(f"--{name} {path}: file not found")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise EvalError(f"--json {args.json}: no folder {Path(args.json).parent} to write it in (create it first)")
    return args


def episode_settings(args) -> dict[str, EnvConfig]:
    """Each model's EnvConfig, all resolved (and checked) before any model is loaded."""
    overrides = {k: getattr(args, k) for k in EPISODE_FIELDS}
    return {name: episode_config(run_config(name, overrides), args.sampled) for name in args.models}


def run(args) -> tuple[dict[str, dict], dict[str, EnvConfig]]:
    models = {name: resolve_model(name) for name in args.models}  # fail on a bad name before any work
    settings = episode_settings(args)
    if len({dataclasses.astuple(c) for c in settings.values()}) > 1:
        # each run keeps its own settings; a reader comparing rows should know they differ
        print("note: the models' episode settings differ (see each model's line below, or pass the flags "
              "to evaluate all under one)", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_questions(args.questions, args.holdout, args.n)
    indexes, results = {}, {}  # one search index per retriever setting the models were trained with
    for name, path in models.items():
        env_cfg, cfg = settings[name], run_config(name)
        retriever = (cfg.bm25_k1, cfg.bm25_b, cfg.stemmer)
        if retriever not in indexes:
            indexes[retriever] = search.load_index(args.corpus or data.demo_world()["corpus"], k1=cfg.bm25_k1,
                                                   b=cfg.bm25_b, stemmer=cfg.stemmer)
        index = indexes[retriever]
        print(f"{name}: {describe(env_cfg)} bm25_k1={cfg.bm25_k1} bm25_b={cfg.bm25_b} stemmer={cfg.stemmer}",
              file=sys.stderr)
        model, tokenizer = load_policy(path)
        # the sampler train.py runs on this machine (on a CPU, the speed path's unless --no-fast)
        policy = hf_sampler(run_config(name), model.eval(), tokenizer, model.device, args.seed)
        results[name] = evaluate(policy, tokenizer, questions, index, env_cfg, args.samples if args.sampled else 1,
                                 args.batch, desc=name)
        print(f"{name}: {json.dumps({k: round(v, 4) for k, v in results[name].items()})}", file=sys.stderr)
    return results, settings


def describe(env_cfg: EnvConfig) -> str:
    return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(env_cfg).items())


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        results, settings = run(args)
    except (EvalError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(results))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps({"questions": args.questions or "demo-world eval", "holdout": args.holdout,
                                   "n": args.n, "sampled": args.sampled, "results": results,
                                   "settings": {k: dataclasses.asdict(c) for k, c in settings.items()}}, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
