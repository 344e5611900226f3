"""Does LoRA learn `make train`'s task as well as full fine-tuning? Paired seeds, 95% intervals.

    python bench/bench_lora_learning.py                        # seeds 0-3: 8 runs, ~45 min on 2 CPU cores
    python bench/bench_lora_learning.py --seeds 0 --max-steps 2 --out runs/lora-quick   # a quick look
    python bench/bench_lora_learning.py --lora-flags "--lr 5e-4" --name lora_learning_lr5e-4   # another recipe

The design, fixed before the runs:
  arms      full fine-tuning (`train.py`, the CPU default) and LoRA (`train.py --preset lora`: the same run
            with the documented LoRA recipe; --lora-flags changes it, written into the results). Nothing
            else differs.
  pairing   each seed runs both arms: the same questions, warm-start demonstrations and sampler seeds.
            Within a seed the arms take turns at going first (even seeds LoRA first), so a slow spell of
            the machine falls on both.
  end       per run, the training rollouts' exact_match and tool_execution averaged over the last
            --last steps (3: 48 rollouts, at the sampling temperature, as `make train` prints them)
  diagnosis the share of groups with a flat R^O (mean over the steps)
  cost      update seconds (mean over the steps), peak RSS of the run's process (GB), wall minutes
  report    per arm: mean +- 95% t-interval over seeds; the paired differences LoRA - full, mean +- 95%
            t-interval over seeds. The goal: LoRA within 10 EM points of full fine-tuning.

Each run is the real `train.py` in a subprocess, its output beside its folder (<arm>-seed<n>.log); a run
whose metrics.jsonl is complete is not run again, so a killed benchmark continues where it stopped. The
1.6 GB checkpoint of each finished run is deleted (the metrics are what this reads). Writes
``--results``/<name>.md and <name>_curves.png (--name, default lora_learning).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, as_flags  # first: puts the repo root on sys.path
import config
from tools import plot

ARMS = {"full": [], "lora": ["--preset", "lora"]}
LABELS = {"full": "full fine-tuning", "lora": "LoRA"}
METRICS = [("exact_match", "EM"), ("tool_execution", "tool_execution")]
# the share of groups whose R^O did not vary (no outcome signal), mean over every step: a near-deterministic
# policy after the warm start shows here first
DIAGNOSTICS = [("flat_outcome", "flat R^O groups")]
COSTS = [("update_s", "update s"), ("peak_rss_gb", "peak RSS GB"), ("wall_min", "wall min")]


def recipe_flags() -> str:
    """The LoRA preset as flags, from config.PRESETS (its one source)."""
    return " ".join(as_flags({k: f"{v:g}" if isinstance(v, float) else v for k, v in config.PRESETS["lora"].items()}))


def train_run(args, arm: str, seed: int) -> Path:
    folder = Path(args.out) / f"{arm}-seed{seed}"
    metrics = folder / "metrics.jsonl"
    if metrics.is_file() and len(metrics.read_text().splitlines()) >= args.max_steps:
        return folder
    if folder.exists():  # a run killed part way: start it again (the runs are short)
        shutil.rmtree(folder)
    arm_flags = ARMS[arm] + (args.lora_flags.split() if arm == "lora" else [])
    cmd = [sys.executable, "train.py", *arm_flags, "--seed", str(seed), "--max-steps", str(args.max_steps),
           "--threads", str(args.threads), "--output-dir", str(folder), *args.train_flags.split()]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(folder.with_suffix(".log"), "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if rc:
        sys.exit(f"failed (exit {rc}): see {folder.with_suffix('.log')}")
    (folder / "wall_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    print(f"  {time.time() - t0:.0f} s", flush=True)
    return folder


def summary(args, folder: Path) -> dict:
    """One run's end figures and costs."""
    rows = plot.load_run(str(folder))
    last = rows[-args.last:]
    out = {k: sum(r[k] for r in last) / len(last) for k, _ in METRICS}
    out["flat_outcome"] = sum(r["zero_var_share/outcome"] for r in rows) / len(rows)
    out["update_s"] = sum(r["update_seconds"] for r in rows) / len(rows)
    out["peak_rss_gb"] = max(r["peak_rss_gb"] for r in rows)
    out["wall_min"] = float((folder / "wall_seconds.txt").read_text()) / 60
    warm = re.search(r"loss ([\d.]+) -> ([\d.]+)", folder.with_suffix(".log").read_text())
    out["warmstart_loss"] = float(warm.group(2)) if warm else float("nan")
    out["first_tool_call_rate"] = rows[0]["tool_call_rate"]
    out["batch_size"] = json.loads((folder / "config.json").read_text())["batch_size"]
    out["rows"] = rows
    return out


def cell(values: list[float], digits: int = 3) -> str:
    mean, half = plot.mean_ci95(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def report(args, runs: dict[str, dict[int, dict]], minutes: float) -> str:
    seeds = sorted(set(runs["full"]) & set(runs["lora"]))
    rollouts = runs["full"][seeds[0]]["batch_size"] * args.last
    extra = f" {args.train_flags}" if args.train_flags else ""
    keys = METRICS + DIAGNOSTICS + COSTS
    lines = ["# LoRA against full fine-tuning on `make train`'s task", "",
             f"`python bench/bench_lora_learning.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')}, "
             f"{minutes:.0f} min of this invocation, this 2-core CPU machine)", "",
             f"Each seed ({', '.join(map(str, seeds))}) runs `train.py --seed N --max-steps {args.max_steps} --threads "
             f"{args.threads}{extra}` twice: full fine-tuning (the CPU default) and LoRA (`--preset lora`: {recipe_flags()}"
             f"{', then ' + args.lora_flags if args.lora_flags else ''}). "
             f"End = the training rollouts' mean over the last {args.last} steps ({rollouts} rollouts, sampled at "
             f"the run's temperature). Mean ± 95% t-interval over seeds (n = {len(seeds)}).", "",
             "| arm | " + " | ".join(h for _, h in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for arm in ARMS:
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cell([runs[arm][s][k] for s in seeds], 2 if k in dict(COSTS) else 3)
                                                         for k, _ in keys) + " |")
    lines += ["", "Paired differences, LoRA − full (per seed, then mean ± 95% t-interval over seeds):", "",
              "| | " + " | ".join(h for _, h in keys) + " |", "|---" * (len(keys) + 1) + "|",
              "| LoRA − full | " + " | ".join(cell([runs["lora"][s][k] - runs["full"][s][k] for s in seeds],
                                                    2 if k in dict(COSTS) else 3) for k, _ in keys) + " |", "",
              "Per seed (EM, tool_execution; warm-start final loss; tool-call rate at step 1):", ""]
    for s in seeds:
        lines.append(f"- seed {s}: " + "; ".join(
            f"{LABELS[arm]} {runs[arm][s]['exact_match']:.3f}, {runs[arm][s]['tool_execution']:.3f} "
            f"(warm start {runs[arm][s]['warmstart_loss']:.3f}, step 1 calls {runs[arm][s]['first_tool_call_rate']:.2f})"
            for arm in ARMS))
    em = [runs["lora"][s]["exact_match"] - runs["full"][s]["exact_match"] for s in seeds]
    if len(em) > 1:
        mean, half = plot.mean_ci95(em)
        verdict = ("within" if mean - half > -0.10 else "not shown within") + " 10 EM points of full fine-tuning"
        lines += ["", f"Goal: LoRA within 10 EM points. Paired EM difference {mean:+.3f}, 95% interval "
                      f"[{mean - half:+.3f}, {mean + half:+.3f}]: LoRA is {verdict} (the interval's low end against -0.10)."]
    lines += ["", f"![curves]({args.name}_curves.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--max-steps", type=int, default=config.Config().max_steps, help="RL steps per run")
    ap.add_argument("--last", type=int, default=3, help="the end figures average this many final steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-flags", default="", help="more train.py flags for both arms (the smoke test's tiny model)")
    ap.add_argument("--lora-flags", default="", help="train.py flags after --preset lora for the LoRA arm only "
                    "(a recipe to try: they override the preset's)")
    ap.add_argument("--name", default="lora_learning", help="the results' file stem (<name>.md, <name>_curves.png)")
    ap.add_argument("--out", help="the runs' folder (default runs/<name>: another recipe never reuses a run)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    args.out = args.out or f"runs/{args.name}"
    if args.max_steps < 1 or not 1 <= args.last <= args.max_steps:
        ap.error("--max-steps must be >= 1 and --last between 1 and --max-steps")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    for seed in args.seeds:
        order = list(ARMS) if seed % 2 else list(reversed(ARMS))  # even seeds: LoRA first
        for arm in order:
            runs[arm][seed] = summary(args, train_run(args, arm, seed))
    text = report(args, runs, (time.time() - t0) / 60)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.md").write_text(text)
    seeds = {LABELS[arm]: [runs[arm][s]["rows"] for s in sorted(runs[arm])] for arm in ARMS}
    group = {f"{args.name}_curves": ("Training rollouts (sampled), mean and 95% CI over seeds", [k for k, _ in METRICS])}
    for drawn in plot.plot_seeds(seeds, results, group, band="ci95").values():
        drawn.close()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
