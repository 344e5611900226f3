"""viewer.py and walkthrough.py: the advantage picture renders for the three methods, environment
tokens are grey, and WALKTHROUGH.md's numbers are what the code produces today."""
from __future__ import annotations

import itertools
import re

import pytest
import torch

import advantages
import config
import data
import search
from tools import viewer, walkthrough


@pytest.fixture(scope="module")
def group(tok):
    index = search.load_index(data.demo_world()["corpus"])
    q, trajs = viewer.scripted_group(tok, index)
    import rewards

    scores = rewards.compute([t.messages for t in trajs], [q["aliases"]] * len(trajs))
    return q, trajs, scores, viewer.method_advantages(trajs, scores, len(trajs))


def test_token_pieces_cover_the_completion_and_grey_the_environment(tok, group):
    _, trajs, _, advs = group
    for m, A in advs.items():
        for i, t in enumerate(trajs):
            pieces = viewer.token_pieces(tok, t, A[i])
            assert len(pieces) == len(t.completion_ids)
            assert [a is None for _, a in pieces] == [k == 0 for k in t.turn_idx]
            assert {a for _, a in pieces if a is not None} <= {float(A[i, 0]), float(A[i, 1])}


def test_only_mt_grpo_splits_credit_between_turns(tok, group):
    """Rollout 1 (good search, wrong answer): one advantage for OR and MR, two for MT-GRPO, and
    MT-GRPO's search turn is judged better than its answer."""
    _, trajs, _, advs = group
    values = {m: {a for _, a in viewer.token_pieces(tok, trajs[1], A[1]) if a is not None} for m, A in advs.items()}
    assert len(values["grpo_or"]) == 1 and len(values["grpo_mr"]) == 1
    assert len(values["mt_grpo"]) == 2
    assert advs["mt_grpo"][1, 0] > advs["mt_grpo"][1, 1]


def test_terminal_and_html_render_all_three_methods(tok, group):
    q, trajs, scores, advs = group
    term = viewer.render_terminal(tok, q["question"], trajs, scores, advs)
    assert all(f"== {label} ==" in term for label in viewer.LABELS.values())
    assert "\x1b[48;2;200;200;200m" in term  # grey environment tokens
    page = viewer.render_html(tok, q["question"], trajs, scores, advs)
    assert all(f"<th>{label}</th>" in page for label in viewer.LABELS.values())
    assert page.count("<tr>") == len(trajs) + 1
    assert "rgb(200, 200, 200)" in page and "title='env'" in page


def test_viewer_command_writes_html(tmp_path):
    out = tmp_path / "v.html"
    assert viewer.main(["--scripted", "--html", str(out)]) == 0
    assert out.read_text().startswith("<!doctype html>")


def test_walkthrough_numbers_are_the_codes():
    """Fails when a code change moves a number in WALKTHROUGH.md: run python walkthrough.py."""
    doc = walkthrough.DOC.read_text()
    assert walkthrough.render(doc, walkthrough.blocks()) == doc


def test_walkthrough_check_catches_a_changed_number(tmp_path, monkeypatch):
    doc = walkthrough.DOC.read_text()
    changed = re.sub(r"\+0\.866", "+0.867", doc, count=1)
    assert changed != doc
    monkeypatch.setattr(walkthrough, "DOC", tmp_path / "W.md")
    (tmp_path / "W.md").write_text(changed)
    assert walkthrough.main(["--check"]) == 1


# ----------------------------------------------------------------------------- settings from the run
def test_advantages_are_train_py_s_under_the_runs_settings(tok, group):
    """The viewer's numbers are train.advantages' under a run's lam / k_turn: lam 0 leaves MT-GRPO's
    turn 1 of a rollout that searched with A_O alone (the seed convention), and --k-turn gives one
    column per turn (max_tool_calls + 1)."""
    q, trajs, scores, advs = group
    rows = [q] * len(trajs)
    half = viewer.method_advantages(trajs, scores, len(trajs), cfg=config.Config(lam=0.0), episodes=rows)
    for m in viewer.LABELS:
        c = config.Config(G=len(trajs), method=m, lam=0.0)
        expect = advantages.turn_advantages(c, advantages.reward_levels(c, scores, trajs, rows))
        assert torch.equal(half[m], expect)
    assert not torch.equal(half["mt_grpo"], advs["mt_grpo"])  # lam moved turn 1...
    searched = torch.tensor([t.has_result for t in trajs])  # (the others fall back to GRPO-MR's)
    assert searched.sum() == 3
    torch.testing.assert_close(half["mt_grpo"][searched, 0], half["grpo_or"][searched, 0])  # ...to A_O alone
    k = viewer.method_advantages(trajs, scores, len(trajs), cfg=config.Config(k_turn=True, max_tool_calls=2), episodes=rows)
    assert all(A.shape == (len(trajs), 3) for A in k.values())
    page = viewer.render_html(tok, q["question"], trajs, scores, k)
    assert page.count("<b>A = (") == 3 * len(trajs) and all(
        len(cell.split(")</b>")[0].split(", ")) == 3 for cell in page.split("<b>A = (")[1:])


def test_a_run_folder_is_sampled_with_its_own_settings(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import dataclasses
    import json

    import env

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint").symlink_to(tiny_model_dir)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(config.Config(max_turn_tokens=7,
                                                                                max_completion_tokens=50))))
    seen, real = [], env.rollout
    monkeypatch.setattr(env, "rollout", lambda *a, **k: seen.extend(real(*a, **k)) or seen)
    assert viewer.main(["--model", str(run), "--G", "2"]) == 0
    turns = [sum(1 for _ in g) for t in seen for k, g in itertools.groupby(t.turn_idx) if k]
    assert len(seen) == 2 and max(turns) == 7  # the random model writes to its budget: the run's 7
    seen.clear()
    assert viewer.main(["--model", str(run), "--G", "2", "--max-turn-tokens", "4"]) == 0
    assert max(sum(1 for _ in g) for t in seen for k, g in itertools.groupby(t.turn_idx) if k) == 4
    assert "MT-GRPO" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/run"], "neither 'base'"),
    (["--scripted", "--question-index", "100000"], "--question-index 100000"),
    (["--scripted", "--html", "/no/such/folder/v.html"], "no folder /no/such/folder"),
    (["--scripted", "--max-turn-tokens", "0"], "--max-turn-tokens N with N >= 1"),
])
def test_bad_input_is_one_clear_error(argv, message, capsys):
    assert viewer.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_a_group_of_one_is_refused(tiny_model_dir, capsys):
    assert viewer.main(["--model", str(tiny_model_dir), "--G", "1"]) == 2
    assert "at least 2 rollouts" in capsys.readouterr().err
