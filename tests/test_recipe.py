"""The seed's recipe (config.SEED, tools/recipe.py) and `train.py --print-recipe`: `--preset paper` is the seed's run,
setting by setting; every difference any preset keeps is a numbered DEVIATIONS.md item; each seed value is
written once (config.SEED), and --help, the paper preset and the README's table derive from it."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import config
from tools import recipe

ROOT = Path(__file__).resolve().parents[1]


def deviation_items() -> set[int]:
    text = (ROOT / "DEVIATIONS.md").read_text()
    return {int(n) for n in re.findall(r"^(\d+)\. \*\*", text, flags=re.M)}


def test_every_config_field_is_compared_or_bookkeeping():
    assert recipe.unlisted() == []
    assert not set(config.SEED) & config.BOOKKEEPING


def test_every_paper_preset_setting_is_the_seeds_but_the_corpus():
    cfg = config.Config(**config.PRESETS["paper"])
    differ = [(name, why) for name, _, _, agrees, why, _ in recipe.compare(cfg) if agrees == "no"]
    assert differ == [("corpus", "DEVIATIONS.md, item 9")]  # no KILT index ships with the repository


def test_every_difference_of_every_preset_names_a_deviation_that_exists():
    items = deviation_items()
    for name, overrides in config.PRESETS.items():
        for field, _, _, agrees, why, _ in recipe.compare(config.Config(**overrides)):
            if agrees == "no":
                assert why, (name, field)
                assert int(why.rsplit(" ", 1)[1]) in items, (name, field, why)
    for seed in config.SEED.values():
        assert seed.item is None or seed.item in items


def test_a_change_to_a_seed_setting_shows():
    """The comparison reads the resolved run: a flag that leaves the seed's value is a "no" with its reason."""
    paper = config.Config(**config.PRESETS["paper"])
    rows = {r[0]: r for r in recipe.compare(config.Config(**{**config.PRESETS["paper"], "mu": 1, "temperature": 1.0}))}
    assert rows["mu"][3] == "no" and rows["max_steps"][3] == "no"  # 150 batches at mu 1 are 150 optimizer steps
    assert rows["temperature"][3] == "no" and rows["temperature"][1] == "1.0"
    assert {r[0]: r[3] for r in recipe.compare(paper)}["temperature"] == "yes"


def test_print_recipe_prints_the_table_and_trains_nothing(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--preset", "paper", "--print-recipe", "--output-dir",
                        str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("| setting") and "| temperature            | 0.9" in p.stdout
    assert f"{len(config.SEED) - 1} of {len(config.SEED)} settings agree" in p.stdout
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- one source for each seed value
def test_the_readmes_recipe_table_is_the_codes():
    """The README shows `train.py --preset paper --print-recipe` between its recipe markers; `python
    tools/recipe.py --write` regenerates it. A changed seed value, default or row fails here until it does."""
    block = recipe.BLOCK.search((ROOT / "README.md").read_text())
    assert block is not None
    assert block.group(2) == "```\n" + recipe.readme_table() + "\n```\n"
    assert recipe.main(["--check"]) == 0


def test_the_paper_preset_and_help_derive_from_the_seed_table():
    """Each seed value is written once, in config.SEED: the paper preset is every value it has, and --help
    shows it beside the default; no field doc writes a seed value of its own."""
    assert config.PRESETS["paper"] == {k: s.value for k, s in config.SEED.items() if s.value is not None}
    for f in dataclasses.fields(config.Config):
        assert "(seed:" not in f.metadata["doc"], f.name
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    help_text = " ".join(p.stdout.split())  # argparse wraps the docs
    assert p.returncode == 0 and "the group (seed: 21) (default: 8)" in help_text
    assert "(seed: 336 rollouts (12 x 7 GPUs x 4))" in help_text
