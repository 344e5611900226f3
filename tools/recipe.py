"""The seed's recipe, setting by setting: what ``python train.py --print-recipe`` prints, and the table in the README.

"The seed" is the code released with the paper (SiliangZeng/Multi-Turn-RL-Agent, run through TRL at the commit
it pins, fc4dae2). Its values are written once, in config.SEED; this file only compares a resolved run with
them: each row is a setting, this run's value, the seed's, whether they agree, the DEVIATIONS.md item that
says why a run may differ, and the file that sets it in the seed. Settings that do not change what is learned
are config.BOOKKEEPING, not compared.

    python tools/recipe.py              # the README's table (--preset paper), as Markdown
    python tools/recipe.py --check      # exit 1 if the README's table no longer matches the code
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's modules

import config  # noqa: E402

README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- BEGIN recipe -->\n)(.*?)(<!-- END recipe -->)", re.S)


def compare(cfg: config.Config) -> list[tuple[str, str, str, str, str, str]]:
    """(setting, this run's value, the seed's value, agrees: yes | no, why it may differ, where the seed sets
    it) per setting of config.SEED."""
    out = []
    for name, seed in config.SEED.items():
        ok = config.seed_agrees(cfg, name)
        why = "" if ok or seed.item is None else f"DEVIATIONS.md, item {seed.item}"
        out.append((name, str(getattr(cfg, name)), config.seed_says(name), "yes" if ok else "no", why, seed.source))
    return out


def unlisted() -> list[str]:
    """Config fields neither compared nor bookkeeping (a new field must be placed in one or the other)."""
    listed = set(config.SEED) | config.BOOKKEEPING
    return [f.name for f in dataclasses.fields(config.Config) if f.name not in listed]


def table(cfg: config.Config) -> str:
    """The comparison as a Markdown table, with the not-a-setting parts of the recipe after it."""
    rows = compare(cfg)
    head = ("setting", "this run", "seed", "agrees", "why it may differ", "where the seed sets it")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    agree = sum(r[3] == "yes" for r in rows)
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows), "",
                      f"{agree} of {len(rows)} settings agree with the seed's. Not settings, and the same in every run:",
                      "the prompt (the seed's instructions in our words, item 10), the episode protocol (env.py),",
                      "the six rewards (rewards.py; items 5-8), the advantages and the PPO-clip loss (mt_grpo.py).",
                      f"Bookkeeping, not compared: {', '.join(sorted(config.BOOKKEEPING))}."])


def readme_table() -> str:
    """What the README shows: ``train.py --preset paper --print-recipe``."""
    return table(config.Config(**config.PRESETS["paper"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's table differs from the code's")
    ap.add_argument("--write", action="store_true", help="rewrite the README's table from the code")
    args = ap.parse_args(argv)
    text, want = README.read_text(), readme_table()
    m = BLOCK.search(text)
    if m is None:
        print("error: README.md has no <!-- BEGIN recipe --> ... <!-- END recipe --> block", file=sys.stderr)
        return 1
    have = m.group(2).removeprefix("```\n").removesuffix("```\n")
    if args.check:
        return 0 if have == want + "\n" else 1
    if args.write:
        README.write_text(text[:m.start(2)] + "```\n" + want + "\n```\n" + text[m.end(2):])
        return 0
    print(want)
    return 0


if __name__ == "__main__":
    sys.exit(main())
