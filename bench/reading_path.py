"""The reference path of one training step: which functions of which files it runs, and how many lines they are.

    python bench/reading_path.py            # a tiny random model, one step of train.py's own loop, --no-fast

The step (train.train_step: rollouts, rewards, advantages, the update) is traced with sys.settrace; every
function of the repository it enters is counted once, by the lines of its source (docstring and comments
included: a reader reads them too). The count is what a reader must read to follow one step from train.py
down, on the reference path; set-up (model loading, the data, the index) is not part of it. It fails if the
step entered the speed path (fast/), which --no-fast must keep it out of.
"""
from __future__ import annotations

import argparse
import ast
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from common import ROOT, quiet_transformers, save_random_llama  # first: puts the repo root on sys.path


def function_spans(path: Path) -> dict[int, tuple[str, int]]:
    """first line of each function (its ``def``, or its first decorator's) -> (name, lines)."""
    spans = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])  # a decorated function's code
            spans[start] = (node.name, node.end_lineno - start + 1)                 # starts at its first decorator
    return spans


def trace_step(step) -> set[tuple[str, int]]:
    """(file, first line) of every function of the repository that ``step()`` enters."""
    seen = set()
    root = str(ROOT)

    def tracer(frame, event, arg):
        if event == "call":
            filename = frame.f_code.co_filename
            if filename.startswith(root) and "/.venv" not in filename:
                seen.add((filename, frame.f_code.co_firstlineno))
        return None  # calls only: no line events

    sys.settrace(tracer)
    try:
        step()
    finally:
        sys.settrace(None)
    return seen


def reading_path(seen: set[tuple[str, int]]) -> dict[str, list[tuple[str, int]]]:
    """file (relative) -> [(function, lines)] for the traced functions (a comprehension or lambda counts with
    the function around it)."""
    out = defaultdict(list)
    for filename, first in sorted(seen):
        spans = function_spans(Path(filename))
        if first in spans:
            out[str(Path(filename).relative_to(ROOT))].append(spans[first])
    return dict(out)


def one_step(folder: Path):
    """A callable that runs one training step of a tiny model on the demo world, with --no-fast."""
    import config
    import train

    model_dir = save_random_llama(folder / "model", hidden=64, layers=2)
    cfg = config.Config(model=str(model_dir), fast=False, warmstart_steps=0, G=2, batch_size=4, micro_batch=2,
                        max_turn_tokens=12, max_completion_tokens=90, max_steps=1, threads=1,
                        output_dir=str(folder / "run"))
    config.validate(cfg)
    run = train.setup(cfg)
    return lambda: train.train_step(cfg, run, 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    quiet_transformers()
    with tempfile.TemporaryDirectory() as folder:
        path = reading_path(trace_step(one_step(Path(folder))))
    fast = [f for f in path if f.startswith("fast/")]
    total = sum(n for functions in path.values() for _, n in functions)
    width = max(len(f) for f in path)
    print(f"the reference path of one training step (train.train_step, --no-fast): {total} lines in "
          f"{sum(len(v) for v in path.values())} functions of {len(path)} files")
    for f, functions in sorted(path.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        names = ", ".join(name for name, _ in sorted(functions, key=lambda x: -x[1]))
        print(f"  {f:<{width}}  {sum(n for _, n in functions):>4}  {names}")
    if fast:
        print(f"error: the reference path entered the speed path: {', '.join(fast)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
