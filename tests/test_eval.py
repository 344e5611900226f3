"""eval.py: the held-out split matches train.py's, the table has the paper's columns, scores come
from real rollouts, and bad input is one clear error."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import data
import env
import eval as evaluation
import train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def write_questions(path: Path, n: int) -> Path:
    data.write_jsonl_atomic(path, [{"question": f"Question number {i}?", "answer": f"a{i}", "aliases": [f"a{i}"]}
                                   for i in range(n)])
    return path


def test_holdout_is_exactly_what_training_left_out(tmp_path, passages):
    qs = write_questions(tmp_path / "q.jsonl", 50)
    corpus = tmp_path / "c.jsonl"
    data.write_jsonl_atomic(corpus, passages)
    trained, _ = train.load_task(train.Config(questions=str(qs), corpus=str(corpus), holdout=12))
    held = evaluation.load_questions(str(qs), holdout=12, n=0)
    assert len(held) == 12 and len(trained) == 38
    assert {q["question"] for q in held}.isdisjoint(q["question"] for q in trained)
    assert {q["question"] for q in held} | {q["question"] for q in trained} == {f"Question number {i}?" for i in range(50)}


def test_holdout_larger_than_the_file_is_a_config_error(tmp_path, passages):
    qs = write_questions(tmp_path / "q.jsonl", 5)
    corpus = tmp_path / "c.jsonl"
    data.write_jsonl_atomic(corpus, passages)
    with pytest.raises(train.ConfigError, match="leaves no training question"):
        train.load_task(train.Config(questions=str(qs), corpus=str(corpus), holdout=5))
    with pytest.raises(evaluation.EvalError, match="exceeds"):
        evaluation.load_questions(str(qs), holdout=6, n=0)


def test_scores_come_from_the_rollouts(tok, searcher):
    """A scripted 'model' that searches and answers right on question 0 and wrong on question 1:
    the averages are exactly the rewards of those two episodes."""
    questions = [{"question": "Who wrote the novel Dracula?", "aliases": ["Bram Stoker"]},
                 {"question": "What is the capital of France?", "aliases": ["Paris"]}]
    call = '<tool>{"name": "wiki_search", "args": {"query": "Dracula novel"}}</tool>'
    script = [[call, "<answer>Bram Stoker</answer>"], ["<answer>Lyon</answer>"]]

    r = evaluation.evaluate(env.ScriptedPolicy(tok, script), tok, questions, searcher,
                            env.EnvConfig(few_shot=False, temperature=0.0), batch=8)
    assert r["episodes"] == 2
    assert r["tool_call_rate"] == 0.5
    assert r["tool_execution"] == pytest.approx(0.1)      # 0.2 for the episode that searched, / 2
    assert r["search_answer"] == pytest.approx(0.25)      # the Dracula passage holds "Bram Stoker"
    assert r["exact_match"] == pytest.approx(0.5) and r["em_percent"] == pytest.approx(50.0)


def test_table_has_the_papers_columns():
    row = {k: 0.1 for k, _ in evaluation.COLUMNS}
    text = evaluation.table({"base": row, "runs/x": dict(row, exact_match=0.25, em_percent=25.0)})
    head = text.splitlines()[0]
    for h in ("Tool exec (0-.2)", "Search ans (0-.5)", "XML fmt (0-.2)", "Exact match (0-1)", "EM %"):
        assert h in head
    assert "0.250" in text.splitlines()[3] and "25.0" in text.splitlines()[3]


def test_command_line_on_the_demo_world(tmp_path, tiny_model_dir):
    """Two models side by side through the real command; JSON written; a real model folder works."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "eval.py", str(tiny_model_dir), str(tiny_model_dir) + "/",
                           "--n", "3", "--max-turn-tokens", "6", "--max-completion-tokens", "60", "--threads", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("| Model") and len(lines) == 4
    result = json.loads(out.read_text())
    assert set(result["results"]) == {str(tiny_model_dir), str(tiny_model_dir) + "/"}
    assert all(r["episodes"] == 3 for r in result["results"].values())


@pytest.mark.parametrize("argv, message", [
    (["/no/such/run"], "neither 'base'"),
    (["base", "--questions", "/no/q.jsonl", "--corpus", "/no/c.jsonl"], "file not found"),
    (["base", "--questions", "/no/q.jsonl"], "pass --questions and --corpus together"),
    (["base", "--samples", "4"], "needs --sampled"),
])
def test_bad_input_is_one_clear_error(argv, message, capsys, tmp_path):
    assert evaluation.main(argv + ["--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not (SHARED / "triviaqa" / "questions.jsonl").is_file(), reason="needs ../shared/data")
def test_holdout_on_the_shared_questions_is_stable():
    """The benchmark's held-out set: 400 of the 2,400 real questions, the same on every machine."""
    held = evaluation.load_questions(str(SHARED / "triviaqa" / "questions.jsonl"), holdout=400, n=0)
    assert len(held) == 400 and len({q["question"] for q in held}) == 400
