"""Training curves from runs' metrics.jsonl: one PNG per metric group, several runs overlaid.

    python tools/plot.py runs/mt_grpo-seed0-X --out plots                      # one run
    python tools/plot.py runs/a runs/b --label MT-GRPO --label GRPO-MR --out plots   # overlaid, labelled

A RUN is a run folder (its metrics.jsonl, one JSON row per step, as train.py writes it) or the file
itself. Groups (GROUPS below): the rewards per level (R_T, R_O) and the six reward columns, the tool
use, exact match, the share of groups with zero reward variance (their advantages are all 0: no
signal), the PPO clip fraction, and the sampler-trainer mismatch (mismatch/*) where a run logs it.
A group whose metrics no run has is skipped. Benchmarks draw their curves with ``plot_seeds`` (a
mean over seeds per method, with the seeds' spread as a band).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import matplotlib
except ModuleNotFoundError:  # `make train` installs requirements.txt alone
    sys.exit("error: plot.py needs matplotlib: run `make setup` (or pip install -r requirements-extra.txt)")

matplotlib.use("Agg")  # files only: no display needed (and none on a server)
import matplotlib.pyplot as plt  # noqa: E402

# group name -> (title, keys); "prefix/*" takes every key under the prefix, in the order first seen
GROUPS = {
    "rewards": ("Rewards per level and per column", ["reward_turn", "reward_outcome", "tool_execution",
                                                     "search_answer", "answer_presence", "exact_match", "format",
                                                     "xml"]),
    "tool_calls": ("Tool use", ["tool_call_rate", "calls_per_episode", "answer_found"]),
    "exact_match": ("Exact match", ["exact_match"]),
    "zero_variance": ("Share of groups with zero reward variance (no signal)", ["zero_var_share/*"]),
    "clip_frac": ("PPO clip fraction", ["clip_frac"]),
    "mismatch": ("Sampler-trainer mismatch", ["mismatch/*"]),
}


class PlotError(ValueError):
    """Bad input to plot.py; the message names the fix."""


@dataclass
class Plot:
    path: Path     # the PNG written
    figure: object  # its matplotlib Figure (legend texts = the run labels); close it when done

    def close(self) -> None:
        plt.close(self.figure)


def read_metrics(path: Path) -> list[dict]:
    """The rows of one metrics.jsonl. A last line that is not whole JSON yet (no newline: a run still
    writing it) is skipped; anywhere else it is an error."""
    lines = path.read_text().split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines):
                continue  # unterminated: the writer has not finished this row
            raise PlotError(f"{path}:{i}: not a JSON row (is this train.py's metrics.jsonl?)") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise PlotError(f"{path}:{i}: a row needs an integer \"step\" (is this train.py's metrics.jsonl?)")
        rows.append(row)
    if not rows:
        raise PlotError(f"{path}: no rows yet (the run has not finished a step)")
    return rows


def load_run(run: str) -> list[dict]:
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run}: no metrics.jsonl (pass a run folder that train.py wrote, or the file itself)")
    return read_metrics(path)


def default_label(run: str) -> str:
    path = Path(run).resolve()
    return (path.parent if path.is_file() else path).name


def keys_of(spec: list[str], runs: dict[str, list[dict]]) -> list[str]:
    """The metric keys a group's spec names that at least one run logs, in a stable order."""
    out = []
    for key in spec:
        if key.endswith("/*"):
            prefix = key[:-1]
            found = dict.fromkeys(k for rows in runs.values() for row in rows for k in row if k.startswith(prefix))
            out += [k for k in found if k not in out]
        elif any(key in row for rows in runs.values() for row in rows) and key not in out:
            out.append(key)
    return out


def number(v) -> float:
    """A metric value as a float; NaN (a gap in the curve) for anything else (null, a string)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def curve(rows: list[dict], key: str) -> dict[int, float]:
    """step -> value of ``key`` in one run's rows (the steps that log it)."""
    return {r["step"]: number(r[key]) for r in rows if key in r}


BANDS = {"range": "band: lowest to highest run", "ci95": "band: 95% CI of the mean (t over runs)"}
# t_{0.975, df} for df = 1..30 (two-sided 95%); beyond, 1.96 + 2.5 / df is within 0.002
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom: a 95% CI is mean +- t975 * sd / sqrt(n)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.5 / df


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t interval); half-width 0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n)


def over_seeds(seeds: list[list[dict]], key: str, band: str = "range") -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, low, high) of ``key`` over several runs of one method (its seeds): at each
    step that every run logging ``key`` has reached, so a run that stopped early does not turn the
    mean into a mean of fewer seeds part-way. A NaN in any run makes that step a gap. ``band``:
    "range" (low, high = the lowest and highest run) or "ci95" (the mean's 95% t interval)."""
    if band not in BANDS:
        raise PlotError(f"band {band!r}: choose one of {', '.join(BANDS)}")
    curves = [c for c in (curve(rows, key) for rows in seeds) if c]
    if not curves:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    values = [[c[s] for c in curves] for s in steps]
    mean = [sum(v) / len(v) for v in values]  # NaN where any run has NaN
    if band == "ci95":
        half = [m if math.isnan(m) else mean_ci95(v)[1] for m, v in zip(mean, values)]
        return steps, mean, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)]
    # min/max would pass over a NaN unless it came first: the band has the mean's gaps instead
    lo = [m if math.isnan(m) else min(v) for m, v in zip(mean, values)]
    hi = [m if math.isnan(m) else max(v) for m, v in zip(mean, values)]
    return steps, mean, lo, hi


def seeds_figure(seeds: dict[str, list[list[dict]]], title: str, keys: list[str], band: str = "range"):
    """One figure: a panel per key, one colour per label across panels, one legend. A label with one
    run is its line; with several (seeds), their mean, in a band from the lowest to the highest run."""
    cols = min(4, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n + 0.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        for i, (label, runs) in enumerate(seeds.items()):
            steps, mean, lo, hi = over_seeds(runs, key, band)
            if len(runs) > 1 and steps:
                ax.fill_between(steps, lo, hi, color=colours[i % len(colours)], alpha=0.2, linewidth=0)
            if steps:
                ax.plot(steps, mean, marker="o", markersize=3, color=colours[i % len(colours)], label=label)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=colours[i % len(colours)], marker="o", markersize=3)
               for i in range(len(seeds))]
    if any(len(runs) > 1 for runs in seeds.values()):
        title += f"\n(line: mean over runs; {BANDS[band]})"  # a reader must not take it for one run
    fig.suptitle(title)
    fig.legend(handles, list(seeds), loc="lower center", ncol=min(len(seeds), 4), frameon=False)
    fig.tight_layout(rect=(0, 0.08 if rows_n == 1 else 0.05, 1, 1))
    return fig


def plot_group(runs: dict[str, list[dict]], title: str, keys: list[str]):
    """One figure: a panel per key, each run (label -> its rows) one line."""
    return seeds_figure({label: [rows] for label, rows in runs.items()}, title, keys)


def plot_seeds(seeds: dict[str, list[list[dict]]], out_dir, groups: dict = GROUPS, band: str = "range") -> dict[str, Plot]:
    """Like ``plot_runs``, but each label (a method) has several runs (``seeds``: label -> the metrics
    rows of each of its runs), drawn as their mean per step with a band from the lowest to the highest
    run (``band="ci95"``: the 95% confidence interval of the mean): how far seeds disagree shows without
    a line per seed."""
    if not seeds or not all(seeds.values()):
        raise PlotError("no runs to plot")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pooled = {label: [row for rows in runs for row in rows] for label, runs in seeds.items()}
    plots = {}
    for name, (title, spec) in groups.items():
        keys = keys_of(spec, pooled)
        if not keys:
            continue  # e.g. mismatch/* where no run sampled with vLLM
        fig = seeds_figure(seeds, title, keys, band)
        path, tmp = out_dir / f"{name}.png", out_dir / f".{name}.png.tmp"
        fig.savefig(tmp, format="png", dpi=100,
                    metadata={"Title": title, "Description": "runs: " + ", ".join(seeds)})
        os.replace(tmp, path)
        plots[name] = Plot(path, fig)
    return plots


def plot_runs(runs: dict[str, list[dict]], out_dir, groups: dict = GROUPS) -> dict[str, Plot]:
    """Write ``<out_dir>/<group>.png`` for every group some run has metrics for; ``runs``: label -> its
    metrics rows. Returns group -> Plot (path, figure). Each PNG is written whole or not at all, and
    carries the run labels in its metadata (``Description``)."""
    return plot_seeds({label: [rows] for label, rows in runs.items()}, out_dir, groups)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their metrics.jsonl)")
    ap.add_argument("--label", action="append", help="one per RUN, in order (default: the folder names)")
    ap.add_argument("--out", required=True, help="folder for the PNGs (created if missing)")
    args = ap.parse_args(argv)
    try:
        labels = args.label or [default_label(r) for r in args.runs]
        if len(labels) != len(args.runs):
            raise PlotError(f"{len(labels)} --label for {len(args.runs)} runs: give one per run, in order")
        if len(set(labels)) != len(labels):
            dup = next(x for x in labels if labels.count(x) > 1)
            raise PlotError(f"two runs are both labelled {dup!r}: pass one --label per run")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise PlotError(f"--out {args.out} is a file: pass a folder")
        runs = {label: load_run(r) for label, r in zip(labels, args.runs)}
        plots = plot_runs(runs, args.out)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an --out that cannot be created or written
        print(f"error: cannot write the plots to {args.out}: {e.strerror} (pass another --out)", file=sys.stderr)
        return 2
    for name, p in plots.items():
        p.close()
        print(f"wrote {p.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
