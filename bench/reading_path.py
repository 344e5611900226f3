"""The reference path of one training step that searches: which functions and data definitions it reads, in which
files, and how many lines they are.

    python bench/reading_path.py            # a tiny random model, one step of train.py's own loop, --no-fast
    python bench/reading_path.py --check    # exit 1 if the README's figure no longer matches the code

The step (train.train_step: rollouts, rewards, advantages, the update, the metrics row) is traced with
sys.settrace. Every rollout's first turn calls the search tool and its second answers: the sampler is the
reference one (policy.HFPolicy: transformers' generate runs for real, and what it wrote is then replaced by a
search and an answer), so the environment runs the tool (search.py) and the turn split is MT-GRPO's.
Counted, once each, by the lines of their source (docstrings and comments included: a reader reads them too):
  - every function of the repository the step enters (a comprehension or lambda counts with its function);
  - every class of the repository whose instance the step touches (an argument, a local, a return value,
    ``self``), and its bases: its own lines, without the methods, which count as functions when they run. These
    are the data definitions a reader needs (Trajectory, Batch, Levels, ...). Of a record with many fields
    (config.py's Config and EnvConfig, one field per flag of --help, and infra/assemble.py's Run, all a run
    holds) a reader of one step needs the fields the step reads: its header and docstring count, and each
    field the step read (recorded as it ran), at its full length.
Set-up (model loading, the data, the index: infra/assemble.py) is not part of it. It fails if the step entered
the speed path (fast/) or an extension (extensions/), which the paper's step must keep out of.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from common import ROOT, quiet_transformers, save_random_llama  # first: puts the repo root on sys.path

README = ROOT / "README.md"
FIGURE = re.compile(r"One step that searches runs (\d+) lines \((\d+) of functions, (\d+) of data definitions\) in "
                    r"(\d+) files")
OFF_PATH = ("fast/", "extensions/")  # speed-only and extension-only code
NOT_READ = ("bench/", "tests/")      # the tracer's own scaffolding


SETTINGS = ("Config", "EnvConfig", "Run")  # records of many fields: counted by the fields the step reads
READ: dict[type, set] = defaultdict(set)  # recorded class -> the fields the step read


def recording(obj):
    """``obj`` (a settings instance) as an instance of a subclass that records which fields are read."""
    def getattribute(self, name):
        if not name.startswith("_"):
            READ[type(obj)].add(name)
        return object.__getattribute__(self, name)

    rec = type(f"Recorded{type(obj).__name__}", (type(obj),), {"__getattribute__": getattribute})
    copy = object.__new__(rec)
    copy.__dict__.update(obj.__dict__)
    return copy


def settings_lines(path: Path, name: str, read: set) -> int:
    """A settings class's header and docstring, and the fields of it that were read, by lines."""
    node = next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef) and n.name == name)
    fields = [f for f in node.body if isinstance(f, ast.AnnAssign)]
    header = (fields[0].lineno if fields else node.end_lineno + 1) - node.lineno  # class line, docstring
    return header + sum(f.end_lineno - f.lineno + 1 for f in fields if f.target.id in read)


def definitions(path: Path) -> tuple[dict, dict]:
    """(first line of each function -> (name, lines), class name -> (lines without its methods, first line))."""
    functions, classes = {}, {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])  # a decorated function's code
            functions[start] = (node.name, node.end_lineno - start + 1)            # starts at its first decorator
        elif isinstance(node, ast.ClassDef):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            methods = sum(m.end_lineno - min([m.lineno] + [d.lineno for d in m.decorator_list]) + 1
                          for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)))
            classes[node.name] = (node.end_lineno - start + 1 - methods, start)
    return functions, classes


def READ_BY_CLASS(cls) -> set:
    """The fields of ``cls`` the step read, through any recorded instance of it or of a subclass (a field read on
    a Config that EnvConfig declares counts in EnvConfig)."""
    own = {f for f in getattr(cls, "__dataclass_fields__", {})}
    return {f for recorded, fields in READ.items() if issubclass(recorded, cls) for f in fields} & own


def ours(filename: str) -> bool:
    return filename.startswith(str(ROOT)) and "/.venv" not in filename


def trace_step(step) -> tuple[set, set]:
    """((file, first line) of every repository function ``step()`` enters, {repository class} it touches)."""
    seen, classes = set(), set()

    def tracer(frame, event, arg):
        if not ours(frame.f_code.co_filename):
            return None
        if event == "call":
            seen.add((frame.f_code.co_filename, frame.f_code.co_firstlineno))
            frame.f_trace_lines = False
            return tracer  # to see the frame return: its locals (arguments and the rest) are all set by then
        if event == "return":
            for value in [*frame.f_locals.values(), arg]:
                for cls in type(value).__mro__:  # a reader of a class reads its bases too (Config: EnvConfig)
                    module = sys.modules.get(cls.__module__)
                    if module is not None and ours(getattr(module, "__file__", "") or ""):
                        classes.add(cls)
        return tracer

    sys.settrace(tracer)
    try:
        step()
    finally:
        sys.settrace(None)
    return seen, classes


def reading_path(seen: set, classes: set) -> dict[str, list[tuple[str, int, str]]]:
    """file (relative) -> [(name, lines, "function" | "data")] for the traced functions and touched classes."""
    out = defaultdict(list)
    for filename, first in sorted(seen):
        functions, _ = definitions(Path(filename))
        if first in functions:
            out[str(Path(filename).relative_to(ROOT))].append((*functions[first], "function"))
    for cls in sorted(classes, key=lambda c: c.__qualname__):
        path = Path(sys.modules[cls.__module__].__file__)
        lines = definitions(path)[1].get(cls.__name__)
        if lines is not None:
            n = settings_lines(path, cls.__name__, READ_BY_CLASS(cls)) if cls.__name__ in SETTINGS else lines[0]
            out[str(path.relative_to(ROOT))].append((cls.__name__, n, "data"))
    return {f: v for f, v in out.items() if not f.startswith(NOT_READ)}


def one_step(folder: Path):
    """A callable that runs one training step of a tiny model on the demo world, with --no-fast; every rollout
    searches for its question's subject, then answers."""
    import config
    import train
    from infra import assemble
    from policy import HFPolicy

    class SearchThenAnswer(HFPolicy):
        """HFPolicy, run for real; what it wrote is replaced by a search (turn 1) or an answer (turn 2)."""

        def generate(self, batch, max_new_tokens, sampling, stop):
            super().generate(batch, max_new_tokens, sampling, stop)
            searched = ["<result>" in self.tokenizer.decode(row).rsplit("<|im_start|>user", 1)[-1] for row in batch]
            # written here, not through env.py, whose functions the tracer would count as the step's
            call = '<tool>{"name": "wiki_search", "args": {"query": "the river of the town"}}</tool>'
            texts = ["<answer>x</answer>" if s else "<reasoning>I will search.</reasoning>\n" + call for s in searched]
            rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            self.last_logprobs = [[-1.0] * len(r) for r in rows]
            return rows

    model_dir = save_random_llama(folder / "model", hidden=64, layers=2)
    cfg = config.Config(model=str(model_dir), fast=False, warmstart_steps=0, G=2, batch_size=4, micro_batch=2,
                        max_steps=1, threads=1, output_dir=str(folder / "run"))  # the CPU default's episode
    config.validate(cfg)
    run = assemble.setup(cfg)
    run.sampler = SearchThenAnswer(run.model, run.tokenizer, seed=0)
    recorded = recording(run)  # which of the run's fields and settings the step reads
    recorded.env_cfg, cfg = recording(run.env_cfg), recording(cfg)
    return lambda: train.train_step(cfg, recorded, 0), run


def measure() -> tuple[dict, int, int, list[str]]:
    """(the path, its lines of functions, its lines of data definitions, problems)."""
    quiet_transformers()
    with tempfile.TemporaryDirectory() as folder:
        step, run = one_step(Path(folder))
        seen, classes = trace_step(step)
        searched = run.index.search("the river of the town")  # the query finds passages of the demo world
    path = reading_path(seen, classes)
    problems = [f"the step entered {f}, which the paper's step must keep out of" for f in path if f.startswith(OFF_PATH)]
    if not searched or "search" not in {name for name, _, kind in path.get("search.py", []) if kind == "function"}:
        problems.append("the step never ran search.py's search: its first turn did not call the tool")
    functions = sum(n for entries in path.values() for _, n, kind in entries if kind == "function")
    data = sum(n for entries in path.values() for _, n, kind in entries if kind == "data")
    return path, functions, data, problems


def figure(functions: int, data: int, files: int) -> str:
    return (f"One step that searches runs {functions + data} lines ({functions} of functions, {data} of data "
            f"definitions) in {files} files")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's figure differs from this count")
    args = ap.parse_args(argv)
    path, functions, data, problems = measure()
    width = max(len(f) for f in path)
    print(f"{figure(functions, data, len(path))} (the reference path of train.train_step, --no-fast):")
    for f, entries in sorted(path.items(), key=lambda kv: -sum(n for _, n, _ in kv[1])):
        names = ", ".join(f"{name}{' (data)' if kind == 'data' else ''}"
                          for name, _, kind in sorted(entries, key=lambda x: -x[1]))
        print(f"  {f:<{width}}  {sum(n for _, n, _ in entries):>4}  {names}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if args.check:
        m = FIGURE.search(README.read_text())
        if m is None or m.group(0) != figure(functions, data, len(path)):
            print(f"error: the README says {m.group(0) if m else 'nothing'!r}; the code: "
                  f"{figure(functions, data, len(path))!r}", file=sys.stderr)
            return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
