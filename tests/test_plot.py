"""plot.py: one PNG per metric group, several runs overlaid and labelled, bad input one clear error."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from helpers import fake_run
from tools import plot


def legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_each_group_is_a_png_with_the_runs_labels(tmp_path):
    a, b = fake_run(tmp_path / "mt_grpo-seed0", 0.2), fake_run(tmp_path / "grpo_mr-seed0", 0.6, steps=3, mismatch=True)
    runs = {"MT-GRPO": plot.load_run(str(a)), "GRPO-MR": plot.load_run(str(b / "metrics.jsonl"))}
    plots = plot.plot_runs(runs, tmp_path / "out")
    assert set(plots) == set(plot.GROUPS)  # every group has a metric in one of the runs
    for name, p in plots.items():
        assert p.path == tmp_path / "out" / f"{name}.png" and p.path.stat().st_size > 5000
        assert legend_texts(p.figure) == ["MT-GRPO", "GRPO-MR"], name
        with Image.open(p.path) as im:
            assert im.format == "PNG" and im.size[0] >= 400
            assert im.text["Description"] == "runs: MT-GRPO, GRPO-MR"
    assert not list((tmp_path / "out").glob("*.tmp"))
    # the panels hold the runs' values: the rewards figure has one panel per reward key, two lines each
    panels = {ax.get_title(): ax for ax in plot.plot_group(runs, "r", plot.keys_of(plot.GROUPS["rewards"][1], runs)).axes
              if ax.get_visible()}
    assert set(panels) == set(plot.GROUPS["rewards"][1])
    ys = [list(line.get_ydata()) for line in panels["exact_match"].get_lines()]
    assert ys == [[0.2 + 0.01 * s for s in range(1, 5)], [0.6 + 0.01 * s for s in range(1, 4)]]
    # prefix groups: every zero_var_share/* and mismatch/* key, mismatch only from the run that logged it
    zero = {ax.get_title() for ax in plots["zero_variance"].figure.axes if ax.get_visible()}
    assert zero == {"zero_var_share/turn", "zero_var_share/outcome"}
    mism = [ax for ax in plots["mismatch"].figure.axes if ax.get_visible()]
    assert {ax.get_title() for ax in mism} == {"mismatch/abs_logp", "mismatch/kl"}
    assert all(len(ax.get_lines()) == 1 for ax in mism)
    for p in plots.values():
        plt.close(p.figure)


def test_a_group_no_run_logs_is_skipped_and_the_command_works(tmp_path, capsys):
    a, b = fake_run(tmp_path / "x" / "seed0", 0.1), fake_run(tmp_path / "y" / "seed1", 0.3)
    assert plot.main([str(a), str(b), "--out", str(tmp_path / "p")]) == 0
    written = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert "mismatch.png" not in written and "rewards.png" in written and len(written) == len(plot.GROUPS) - 1
    assert capsys.readouterr().out.count("wrote ") == len(written)
    with Image.open(tmp_path / "p" / "clip_frac.png") as im:
        assert im.text["Description"] == "runs: seed0, seed1"  # default labels: the folder names


def test_a_row_still_being_written_is_skipped(tmp_path):
    run = fake_run(tmp_path / "r", 0.1)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "exact_ma')
    rows = plot.load_run(str(run))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert math.isnan(plot.number(None)) and plot.number(3) == 3.0


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: d, [], "no metrics.jsonl"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text(""))[0], [], "no rows yet"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n'))[0], [],
     "metrics.jsonl:2: not a JSON row"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"loss": 1}\n'))[0], [], 'needs an integer "step"'),
    (lambda d: fake_run(d, 0.1), ["--label", "a", "--label", "b"], "2 --label for 1 runs"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, make, extra, message):
    make(tmp_path / "run")
    assert plot.main([str(tmp_path / "run"), *extra, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_two_runs_with_one_label_and_an_unwritable_out(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a" / "seed0", 0.1), fake_run(tmp_path / "b" / "seed0", 0.2)
    assert plot.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    assert "both labelled 'seed0'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert plot.main([str(a), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert plot.main([str(a), "--out", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the plots" in err and "Traceback" not in err


def test_seeds_are_one_mean_line_per_method_in_a_band(tmp_path):
    rows = lambda shift, steps: plot.load_run(str(fake_run(tmp_path / f"r{shift}-{steps}", shift, steps=steps)))
    seeds = {"MT-GRPO": [rows(0.2, 4), rows(0.4, 3)], "GRPO-MR": [rows(0.6, 4)]}
    plots = plot.plot_seeds(seeds, tmp_path / "out", {"curves": ("Training rollouts", ["exact_match", "clip_frac"])})
    (p,) = plots.values()
    assert p.path == tmp_path / "out" / "curves.png" and p.path.stat().st_size > 5000
    assert legend_texts(p.figure) == ["MT-GRPO", "GRPO-MR"]
    with Image.open(p.path) as im:
        assert im.format == "PNG" and im.text["Description"] == "runs: MT-GRPO, GRPO-MR"
    assert "band: lowest to highest run" in p.figure.texts[0].get_text()  # the title says what the band is
    ax = next(ax for ax in p.figure.axes if ax.get_title() == "exact_match")
    mt, mr = ax.get_lines()
    # the mean over seeds at the steps both reached (the second seed stopped at 3); one seed: its own values
    assert list(mt.get_xdata()) == [1, 2, 3] and mt.get_ydata() == pytest.approx([0.3 + 0.01 * s for s in (1, 2, 3)])
    assert list(mr.get_ydata()) == [0.6 + 0.01 * s for s in range(1, 5)]
    (band,) = ax.collections  # only the method with two seeds has a band, from its lower to its higher seed
    lo, hi = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert (lo, hi) == pytest.approx((0.21, 0.43))
    p.close()
    two_seeds = [[{"step": 1, "x": 1.0}, {"step": 2, "x": None}], [{"step": 1, "x": 3.0}, {"step": 2, "x": 0.5}]]
    steps, mean, low, high = plot.over_seeds(two_seeds, "x")
    assert steps == [1, 2] and (mean[0], low[0], high[0]) == (2.0, 1.0, 3.0)
    assert all(math.isnan(v) for v in (mean[1], low[1], high[1]))  # a NaN in one seed is a gap, not a narrower band
