"""The paper's comparison in miniature: GRPO-OR vs GRPO-MR vs MT-GRPO on real TriviaQA + Wikipedia.

    python bench/bench_learning.py --out runs/bench-learning --threads 1     # ~50-120 min on 2 CPU cores
    python bench/bench_learning.py --seeds 1 --methods grpo_mr --threads 1   # one run; run several at once
    python bench/bench_learning.py --world demo --out runs/bench-learning-demo --steps 6 --eval-n 64

Every method starts from the same warm-started SmolLM2-135M (warmstart.py, seed 0, on training
questions only), trains with the same seeds, step budget, G and lengths, and is evaluated greedily by
eval.py on questions train.py never saw (``--holdout``). Training runs and evaluations are the real
``train.py`` / ``eval.py`` commands, run as subprocesses; each is skipped when its output already
exists, so a killed benchmark continues where it stopped. Writes ``--results``/learning.md (a table
shaped like the paper's Table 5) and learning_curves.png.

``--world demo`` runs the same comparison on the embedded demo world with train.py's CPU defaults
(its train split, its own eval split, top-1, 256-token episodes; files learning_demo.md and
learning_demo_curves.png): there every answer can be found by searching, so the outcome reward
carries signal that real trivia, out of a 135M model's reach, does not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
METHODS = {"grpo_or": "GRPO-OR", "grpo_mr": "GRPO-MR", "mt_grpo": "MT-GRPO"}
CURVES = [("tool_execution", "tool execution (0-0.2)"), ("search_answer", "search answer (0-0.5)"),
          ("tool_call_rate", "tool-call rate"), ("exact_match", "exact match (0-1)")]


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        sys.exit(f"failed (exit {rc}): see {log}")
    print(f"  {time.time() - t0:.0f} s", flush=True)


def warm_start(args, out: Path) -> Path:
    """One supervised warm start shared by every run (the cold-start fix of train.py, done once)."""
    import train

    cfg = train.Config(**{**train.PRESETS[args.preset], "questions": args.questions, "corpus": args.corpus,
                          "holdout": args.holdout, "seed": 0})
    return shared_warm_start(out, cfg, lambda: train.load_task(cfg))


def shared_warm_start(out: Path, cfg, load_task) -> Path:
    """Warm-start the embedded model with cfg's warm-start settings on load_task()'s (questions,
    index), save it atomically as out/warmstart (reused when it exists), return the folder."""
    folder = out / "warmstart"
    if (folder / "config.json").is_file():
        return folder
    import train
    import warmstart
    from policy import load_policy

    questions, index = load_task()
    train.seed_everything(0)
    model, tok = load_policy(None)
    ws = warmstart.run(model, tok, index, questions, train.env_config(cfg), steps=cfg.warmstart_steps,
                       lr=cfg.warmstart_lr, seed=0, bf16=cfg.bf16, micro_batch=cfg.micro_batch)
    print(f"warm start: {ws['demonstrations']} demonstrations, loss {ws['first_loss']:.3f} -> {ws['last_loss']:.3f}")
    tmp = out / ".warmstart-tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


# the environment both training and evaluation use (the real preset's, as flags)
ENV_FLAGS = ["--top-k", "3", "--result-max-tokens", "128", "--max-completion-tokens", "320"]


def train_run(args, out: Path, start: Path, method: str, seed: int, task_flags=("--preset", "real")) -> Path:
    folder = out / f"{method}-seed{seed}"
    metrics = folder / "metrics.jsonl"
    if (folder / "checkpoint" / "state.pt").is_file() and metrics.is_file() and \
            len(metrics.read_text().splitlines()) >= args.steps:
        return folder
    resume = ["--resume"] if (folder / "checkpoint" / "state.pt").is_file() else []
    if not resume and folder.exists():  # a run killed before its first checkpoint: start it again
        import shutil

        shutil.rmtree(folder)
    run([sys.executable, "train.py", *task_flags, "--questions", args.questions, "--corpus", args.corpus,
         "--holdout", str(args.holdout), "--model", str(start), "--warmstart-steps", "0", "--method", method,
         "--seed", str(seed), "--max-steps", str(args.steps), "--G", str(args.G), "--batch-size", str(args.batch_size),
         "--save-every", "2", "--sample-every", "0", "--threads", str(args.threads), "--output-dir", str(folder),
         *resume], out / "train.log")
    return folder


def evaluate(args, out: Path, model: Path, name: str, env_flags=ENV_FLAGS) -> dict:
    path = out / f"eval-{name}.json"
    if not path.is_file():
        run([sys.executable, "eval.py", str(model), "--questions", args.eval_questions or args.questions,
             "--corpus", args.corpus, "--holdout", str(args.holdout), "--n", str(args.eval_n), *env_flags,
             "--batch", "16", "--threads", str(args.threads), "--json", str(path)], out / "eval.log")
    return json.loads(path.read_text())["results"][str(model)]


def summarise(args, start_eval: dict, evals: dict, curves: dict, methods=METHODS, curve_keys=CURVES) -> str:
    import numpy as np

    from eval import COLUMNS

    def cell(values, key):
        v = np.array([r[key] for r in values])
        fmt = "{:.1f}" if key == "em_percent" else "{:.3f}"
        return fmt.format(v.mean()) + (f" ± {fmt.format(v.std())}" if len(v) > 1 else "")

    lines = [f"Held-out evaluation: {args.eval_n} questions kept out of training, greedy, mean ± std over "
             f"seeds {', '.join(map(str, args.seeds))}.", "",
             "| Method | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|",
             "| Start (warm start, no RL) | " + " | ".join(cell([start_eval], k) for k, _ in COLUMNS) + " |"]
    for m, label in methods.items():
        if evals.get(m):
            lines.append(f"| {label} | " + " | ".join(cell(evals[m], k) for k, _ in COLUMNS) + " |")
    half = args.steps // 2
    lines += ["", f"Training rollouts (sampled, G={args.G}), mean over steps {half + 1}-{args.steps} and seeds:", "",
              "| Method | " + " | ".join(h for _, h in curve_keys) + " |", "|---" * (len(curve_keys) + 1) + "|"]
    for m, label in methods.items():
        rows = [r for run_rows in curves.get(m, []) for r in run_rows if r["step"] > half]
        if rows:
            lines.append(f"| {label} | " + " | ".join(f"{np.mean([r[k] for r in rows]):.3f}" for k, _ in curve_keys) + " |")
    return "\n".join(lines)


def plot(curves: dict, path: Path, methods=METHODS, curve_keys=CURVES) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(curve_keys), figsize=(13, 3.2), dpi=80)
    colors = {"grpo_or": "tab:gray", "grpo_mr": "tab:blue", "mt_grpo": "tab:red"}
    for ax, (key, title) in zip(axes, curve_keys):
        for (m, label) in methods.items():
            color = colors[m]
            runs = curves.get(m, [])
            if not runs:
                continue
            n = min(len(r) for r in runs)
            ys = np.array([[row[key] for row in r[:n]] for r in runs])
            steps = np.arange(1, n + 1)
            for y in ys:
                ax.plot(steps, y, color=color, alpha=0.25, lw=1)
            ax.plot(steps, ys.mean(0), color=color, lw=2, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=["real", "demo"], default="real",
                    help="real: the shared TriviaQA + Wikipedia; demo: the embedded demo world, CPU defaults")
    ap.add_argument("--out", default="runs/bench-learning")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the table and plot go")
    ap.add_argument("--questions", default=str(SHARED / "triviaqa" / "questions.jsonl"))
    ap.add_argument("--corpus", default=str(SHARED / "wiki" / "passages.jsonl.gz"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--holdout", type=int, default=400)
    ap.add_argument("--eval-n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    args = ap.parse_args()
    args.eval_questions, args.preset, env_flags, name = None, "real", ENV_FLAGS, "learning"
    if args.world == "demo":  # train on the demo world's train split, evaluate on its eval split
        import data

        world = data.demo_world()
        args.questions, args.corpus, args.eval_questions = str(world["train"]), str(world["corpus"]), str(world["eval"])
        args.holdout, args.preset, env_flags, name = 0, "cpu", [], "learning_demo"
    for p in (args.questions, args.corpus):
        if not Path(p).is_file():
            sys.exit(f"error: {p} not found: this benchmark needs the shared real data (../shared/data)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.questions, args.corpus = str(Path(args.questions).resolve()), str(Path(args.corpus).resolve())
    t0 = time.time()
    start = warm_start(args, out)
    start_eval = evaluate(args, out, start, "start", env_flags)
    evals, curves = {}, {}
    for seed in args.seeds:  # seed-major: a partial benchmark still compares the methods
        for m in args.methods:
            folder = train_run(args, out, start, m, seed, task_flags=("--preset", args.preset))
            curves.setdefault(m, []).append([json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()])
            evals.setdefault(m, []).append(evaluate(args, out, folder, f"{m}-seed{seed}", env_flags))
    report = summarise(args, start_eval, evals, curves)
    minutes = (time.time() - t0) / 60
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_learning.py " + " ".join(sys.argv[1:])
    title = "Learning benchmark" + (" (demo world)" if args.world == "demo" else "")
    (results / f"{name}.md").write_text(f"# {title}\n\n`{command}` ({minutes:.0f} min of this invocation)"
                                        f"\n\n{report}\n\n![curves]({name}_curves.png)\n")
    plot(curves, results / f"{name}_curves.png")
    print(report)


if __name__ == "__main__":
    main()
