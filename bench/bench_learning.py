"""The paper's comparison in miniature: GRPO-OR vs GRPO-MR vs MT-GRPO on real TriviaQA + Wikipedia.

    python bench/bench_learning.py --out runs/bench-learning --threads 1     # ~50-120 min on 2 CPU cores
    python bench/bench_learning.py --seeds 1 --methods grpo_mr --threads 1   # one run; run several at once
    python bench/bench_learning.py --world demo --out runs/bench-learning-demo --steps 6 --eval-n 64

Every method starts from the same warm-started SmolLM2-135M (warmstart.py, seed 0, on training
questions only), trains with the same seeds, step budget, G and lengths, and is evaluated greedily by
eval.py on questions train.py never saw (``--holdout``), beside the untrained model and the warm
start. Training runs and evaluations are the real ``train.py`` / ``eval.py`` commands, run as
subprocesses; each is skipped when its output already exists, so a killed benchmark continues where
it stopped. Writes ``--results``/learning.md (its set-up, a table shaped like the paper's Table 5,
per-seed figures) and learning_curves.png.

``--world demo`` runs the same comparison on the embedded demo world with train.py's CPU defaults
(its train split, its own eval split, top-1, 256-token episodes; files learning_demo.md and
learning_demo_curves.png): there every answer can be found by searching, so the outcome reward
carries signal that real trivia, out of a 135M model's reach, does not.

The committed learning.md, learning_demo.md and two_hop.md were written by earlier versions of this
script and extended by hand after their runs (how the runs were scheduled, the reading of the
results; learning.md's base-model row came from a separate ``eval.py base`` run). A rerun writes
the set-up, the base row and the per-seed figures itself and drops the hand-written paragraphs.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT  # first: puts the repo root on sys.path
import config
import data
from tools import plot

METHODS = {"grpo_or": "GRPO-OR", "grpo_mr": "GRPO-MR", "mt_grpo": "MT-GRPO"}
CURVES = [("tool_execution", "tool execution (0-0.2)"), ("search_answer", "search answer (0-0.5)"),
          ("tool_call_rate", "tool-call rate"), ("exact_match", "exact match (0-1)")]
# the environment both training and evaluation use (the real preset's, as flags)
ENV_FLAGS = ["--passages", "3", "--result-max-tokens", "128", "--max-completion-tokens", "320"]
SAMPLING_FLAGS = ("--temperature", "--top-k", "--top-p")


@dataclass
class Comparison:
    """One benchmark: the task, the runs to compare, and where they go."""
    out: Path                    # runs, evaluations and logs (reused when they exist)
    questions: str               # training questions (JSONL)
    corpus: str                  # passages (JSONL(.gz))
    eval_questions: str | None   # held-out questions; None: the --holdout split of ``questions``
    holdout: int                 # train.py / eval.py --holdout
    task_flags: list[str]        # train.py flags that set the task (a preset, or the environment)
    env_flags: list[str]         # eval.py flags that give every evaluation training's environment
    methods: dict[str, str] = field(default_factory=lambda: dict(METHODS))  # method -> label
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 4
    G: int = 8
    batch_size: int = 16
    eval_n: int = 32
    threads: int = 0             # torch threads per run (0 = torch's default)
    model: str | None = None     # the model to warm-start and the base row (None: the embedded SmolLM2-135M)


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        sys.exit(f"failed (exit {rc}): see {log}")
    print(f"  {time.time() - t0:.0f} s", flush=True)


def shared_warm_start(c: Comparison, cfg, load_task) -> tuple[Path, dict]:
    """Warm-start c.model with cfg's warm-start settings on load_task()'s (questions, index), save it
    atomically as out/warmstart (reused when it exists); returns the folder and its warm-start stats."""
    folder = c.out / "warmstart"
    if not (folder / "config.json").is_file():
        from extensions import warmstart
        from infra import assemble
        from policy import load_policy

        questions, index = load_task()
        assemble.seed_everything(0)
        model, tok = load_policy(c.model)
        ws = warmstart.run(model, tok, index, questions, config.episode(cfg), steps=cfg.warmstart_steps,
                           lr=cfg.warmstart_lr, seed=0, bf16=cfg.bf16, micro_batch=cfg.micro_batch)
        print(f"warm start: {ws['demonstrations']} demonstrations, loss {ws['first_loss']:.3f} -> {ws['last_loss']:.3f}")
        tmp = c.out / ".warmstart-tmp"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "warmstart.json").write_text(json.dumps({**ws, "steps": cfg.warmstart_steps, "lr": cfg.warmstart_lr}))
        os.replace(tmp, folder)
    stats = folder / "warmstart.json"
    return folder, (json.loads(stats.read_text()) if stats.is_file() else {"steps": cfg.warmstart_steps})


def train_run(c: Comparison, start: Path, method: str, seed: int) -> Path:
    folder = c.out / f"{method}-seed{seed}"
    metrics = folder / "metrics.jsonl"
    if (folder / "checkpoint" / "state.pt").is_file() and metrics.is_file() and \
            len(metrics.read_text().splitlines()) >= c.steps:
        return folder
    resume = ["--resume"] if (folder / "checkpoint" / "state.pt").is_file() else []
    if not resume and folder.exists():  # a run killed before its first checkpoint: start it again
        shutil.rmtree(folder)
    run([sys.executable, "train.py", *c.task_flags, "--questions", c.questions, "--corpus", c.corpus,
         "--holdout", str(c.holdout), "--model", str(start), "--warmstart-steps", "0", "--method", method,
         "--seed", str(seed), "--max-steps", str(c.steps), "--G", str(c.G), "--batch-size", str(c.batch_size),
         "--save-every", "2", "--sample-every", "0", "--threads", str(c.threads), "--output-dir", str(folder),
         *resume], c.out / "train.log")
    return folder


def evaluate(c: Comparison, models: dict[str, str], name: str) -> dict[str, dict]:
    """eval.py on ``models`` (label -> 'base' or a folder) in one call, cached as out/eval-<name>.json."""
    path = c.out / f"eval-{name}.json"
    if not path.is_file():
        # eval.py is greedy: the training run's sampling flags do not apply to it
        flags = [x for k, v in zip(c.env_flags[::2], c.env_flags[1::2]) if k not in SAMPLING_FLAGS for x in (k, v)]
        run([sys.executable, "eval.py", *models.values(), "--questions", c.eval_questions or c.questions,
             "--corpus", c.corpus, "--holdout", str(c.holdout), "--n", str(c.eval_n), *flags,
             "--batch", "16", "--threads", str(c.threads), "--json", str(path)], c.out / "eval.log")
    results = json.loads(path.read_text())["results"]
    return {label: results[model] for label, model in models.items()}


def run_comparison(c: Comparison, start: Path) -> tuple[dict, dict, dict]:
    """The untrained model and the warm start, then every (seed, method) run and its evaluation.
    Returns (evaluations of "base" and "start", {method: [evaluation per seed]}, {method: [metrics per seed]})."""
    first = evaluate(c, {"base": c.model or "base", "start": str(start)}, "base-start")
    evals, curves = {}, {}
    for seed in c.seeds:  # seed-major: a partial benchmark still compares the methods
        for m in c.methods:
            folder = train_run(c, start, m, seed)
            curves.setdefault(m, []).append(plot.load_run(str(folder)))
            evals.setdefault(m, []).append(evaluate(c, {m: str(folder)}, f"{m}-seed{seed}")[m])
    return first, evals, curves


def count_rows(path: str) -> int:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def setup_text(c: Comparison, ws: dict, lr: float) -> str:
    """The set-up paragraph, from the comparison's inputs."""
    held_out = (f"{c.holdout} held out by `--holdout {c.holdout}`, training draws from the rest" if c.holdout
                else f"held-out questions from {Path(c.eval_questions).name}")
    demos = f" on {ws['demonstrations']} demonstrations" if "demonstrations" in ws else ""
    return (f"{'SmolLM2-135M' if c.model is None else Path(c.model).name}: {count_rows(c.questions):,} questions of "
            f"{Path(c.questions).name} ({held_out}) and {count_rows(c.corpus):,} passages of {Path(c.corpus).name}. "
            f"One warm start ({ws['steps']} supervised steps{demos}, seed 0) shared by every run; then {c.steps} RL "
            f"steps of {c.batch_size} rollouts ({c.batch_size // c.G} questions x G {c.G}), lr {lr:g}, seeds "
            f"{', '.join(map(str, c.seeds))}, {c.threads or 'default'} torch threads per run; evaluation greedy on the "
            f"first {c.eval_n} held-out questions. Everything else is `train.py {' '.join(c.task_flags)}`.")


def summarise(c: Comparison, first: dict, evals: dict, curves: dict, curve_keys=CURVES) -> str:
    import numpy as np

    from eval import COLUMNS

    def cell(values, key):
        v = np.array([r[key] for r in values])
        fmt = "{:.1f}" if key == "em_percent" else "{:.3f}"
        return fmt.format(v.mean()) + (f" ± {fmt.format(v.std())}" if len(v) > 1 else "")

    def row(label, values):
        return f"| {label} | " + " | ".join(cell(values, k) for k, _ in COLUMNS) + " |"

    lines = [f"Held-out evaluation: {c.eval_n} questions kept out of training, greedy, mean ± std over "
             f"seeds {', '.join(map(str, c.seeds))}.", "",
             "| Method | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|",
             row("Untrained base model (no warm start)", [first["base"]]),
             row("Start (warm start, no RL)", [first["start"]])]
    lines += [row(label, evals[m]) for m, label in c.methods.items() if evals.get(m)]
    half = c.steps // 2
    lines += ["", f"Training rollouts (sampled, G={c.G}), mean over steps {half + 1}-{c.steps} and seeds:", "",
              "| Method | " + " | ".join(h for _, h in curve_keys) + " |", "|---" * (len(curve_keys) + 1) + "|"]
    for m, label in c.methods.items():
        rows = [r for run_rows in curves.get(m, []) for r in run_rows if r["step"] > half]
        if rows:
            lines.append(f"| {label} | " + " | ".join(f"{np.mean([r[k] for r in rows]):.3f}" for k, _ in curve_keys) + " |")
    per_seed = [f"seed {seed}: " + ", ".join(f"{label} {evals[m][i]['em_percent']:.1f} ({evals[m][i]['tool_call_rate']:.2f})"
                                            for m, label in c.methods.items() if len(evals.get(m, [])) > i)
                for i, seed in enumerate(c.seeds)]
    lines += ["", "Per seed, held-out EM % (tool-call rate): " + "; ".join(per_seed) + "."]
    return "\n".join(lines)


def plot_curves(curves: dict, results: Path, name: str, methods=METHODS, curve_keys=CURVES) -> None:
    """<results>/<name>_curves.png: the training curves of ``curve_keys``, one colour per method, the
    mean over its seeds with their spread (plot.py draws it, as it draws any run's curves)."""
    seeds = {label: curves[m] for m, label in methods.items() if curves.get(m)}
    group = {f"{name}_curves": ("Training rollouts (sampled)", [k for k, _ in curve_keys])}
    for drawn in plot.plot_seeds(seeds, results, group).values():
        drawn.close()


def write_results(results: Path, name: str, title: str, script: str, setup: str, report: str, minutes: float) -> None:
    """results/<name>.md: the command that made it, the set-up, the tables; the plot goes beside it."""
    results.mkdir(parents=True, exist_ok=True)
    command = f"python bench/{script} " + " ".join(sys.argv[1:])
    (results / f"{name}.md").write_text(f"# {title}\n\n`{command}` ({minutes:.0f} min of this invocation)\n\n"
                                        f"{setup}\n\n{report}\n\n![curves]({name}_curves.png)\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=["real", "demo"], default="real",
                    help="real: the shared TriviaQA + Wikipedia; demo: the embedded demo world, CPU defaults")
    ap.add_argument("--out", default="runs/bench-learning")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the table and plot go")
    ap.add_argument("--questions", default=str(data.SHARED_DATA / "triviaqa" / "questions.jsonl"))
    ap.add_argument("--corpus", default=str(data.SHARED_DATA / "wiki" / "passages.jsonl.gz"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--holdout", type=int, default=400)
    ap.add_argument("--eval-n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    ap.add_argument("--model", help="the model to warm-start (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--warmstart-steps", type=int, help="default: the preset's")
    args = ap.parse_args(argv)
    from infra import assemble

    if args.world == "demo":  # train on the demo world's train split, evaluate on its eval split
        world = data.demo_world()
        questions, corpus, eval_questions, holdout = world["train"], world["corpus"], str(world["eval"]), 0
        preset, env_flags, name, title = "cpu", [], "learning_demo", "Learning benchmark (demo world)"
    else:
        questions, corpus, eval_questions, holdout = args.questions, args.corpus, None, args.holdout
        preset, env_flags, name, title = "real", ENV_FLAGS, "learning", "Learning benchmark"
    for p in (questions, corpus):
        if not Path(p).is_file():
            sys.exit(f"error: {p} not found: this benchmark needs the shared real data (data.SHARED_DATA)")
    c = Comparison(out=Path(args.out).resolve(), questions=str(Path(questions).resolve()),
                   corpus=str(Path(corpus).resolve()), eval_questions=eval_questions, holdout=holdout,
                   task_flags=["--preset", preset], env_flags=env_flags,
                   methods={m: METHODS[m] for m in METHODS if m in args.methods}, seeds=args.seeds, steps=args.steps,
                   G=args.G, batch_size=args.batch_size, eval_n=args.eval_n, threads=args.threads, model=args.model)
    c.out.mkdir(parents=True, exist_ok=True)
    overrides = {} if args.warmstart_steps is None else {"warmstart_steps": args.warmstart_steps}
    cfg = config.Config(**{**config.PRESETS[preset], "questions": c.questions, "corpus": c.corpus,
                          "holdout": c.holdout, "seed": 0, **overrides})
    t0 = time.time()
    start, ws = shared_warm_start(c, cfg, lambda: assemble.load_task(cfg))
    first, evals, curves = run_comparison(c, start)
    report = summarise(c, first, evals, curves)
    write_results(Path(args.results), name, title, "bench_learning.py", setup_text(c, ws, cfg.lr), report,
                  (time.time() - t0) / 60)
    plot_curves(curves, Path(args.results), name, c.methods)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
