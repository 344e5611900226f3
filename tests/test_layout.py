"""The card's shape: the paper's files at the root, the layers one way up, and the README's figures the code's.

The root holds the files the project was asked for (mt_grpo.py, env.py, search.py, rewards.py, train.py,
eval.py, tests/, requirements.txt, README.md) and at most 10 modules in all; everything else is in a package
named for what it is. The settings (config.py) and the math (mt_grpo.py) import no other module of the
project; nothing but the benchmark drivers, the examples and the tests imports the loop (train.py); no
module imports another that imports it back.
"""
from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARD = ["mt_grpo.py", "env.py", "search.py", "rewards.py", "train.py", "eval.py", "tests", "requirements.txt",
        "README.md"]
PACKAGES = ("extensions", "infra", "tools", "fast")


def project_modules() -> dict[str, Path]:
    """Module name -> file, for the root modules and the packages' (not tests, bench, examples)."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).glob("*.py"):
            mods[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return mods


def imports(path: Path, names: set[str], top_level_only: bool = True) -> set[str]:
    """The project modules ``path`` imports (``from infra import lora`` counts as infra.lora); with
    ``top_level_only``, only the imports made when the module itself is imported."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} & names | {f"{node.module}.{a.name}" for a in node.names} & names
    return found - {path.stem}


def test_the_root_is_the_card():
    for name in CARD:
        assert (ROOT / name).exists(), name
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(modules) <= 10, modules
    assert not (ROOT / "evaluate.py").exists()  # eval.py is the evaluation command


def test_the_settings_and_the_math_import_no_other_project_module():
    mods = project_modules()
    for name in ("config", "mt_grpo"):
        assert imports(mods[name], set(mods), top_level_only=False) == set(), name
    # and importing the settings loads no torch: they sit below everything that does
    p = subprocess.run([sys.executable, "-c", "import sys, config; print('torch' in sys.modules)"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr


def test_only_drivers_examples_and_tests_import_the_loop():
    mods = project_modules()
    importers = [name for name, path in mods.items() if name != "train" and "train" in imports(path, set(mods), False)]
    assert importers == [], importers


def test_there_are_no_circular_imports():
    """Module-level imports among the project's modules form no cycle (a function-level import, made at call
    time, cannot start one)."""
    mods = project_modules()
    graph = {name: imports(path, set(mods)) for name, path in mods.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]):
        state[name] = "open"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", " -> ".join(trail + [name, dep])
            if dep not in state:
                visit(dep, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_backslash_continuations():
    """No statement is continued with a backslash (a backslash inside a string, a shell line in a docstring, is
    text)."""
    offenders = []
    for path in project_modules().values():
        text = path.read_text()
        in_strings = set()
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.STRING:
                in_strings |= set(range(tok.start[0], tok.end[0]))
        offenders += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1)
                      if line.rstrip().endswith("\\") and i not in in_strings and not line.lstrip().startswith("#")]
    assert offenders == [], offenders
