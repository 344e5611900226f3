"""viewer.py and walkthrough.py: the advantage picture renders for the three methods, environment
tokens are grey, and WALKTHROUGH.md's numbers are what the code produces today."""
from __future__ import annotations

import re

import pytest

import data
import search
import viewer
import walkthrough


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
