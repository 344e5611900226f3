"""eval.py: the held-out split matches train.py's, the table has the paper's columns, scores come
from real rollouts, a run is evaluated with its own episode settings unless a flag says otherwise,
progress is shown, and bad input is one clear error."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import config
import data
import env
import eval as evaluation
from config import EnvConfig
from infra import assemble
from policy import ScriptedPolicy

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
    trained, _ = assemble.load_task(config.Config(questions=str(qs), corpus=str(corpus), holdout=12))
    held = evaluation.load_questions(str(qs), holdout=12, n=0)
    assert len(held) == 12 and len(trained) == 38
    assert {q["question"] for q in held}.isdisjoint(q["question"] for q in trained)
    assert {q["question"] for q in held} | {q["question"] for q in trained} == {f"Question number {i}?" for i in range(50)}


def test_holdout_larger_than_the_file_is_a_config_error(tmp_path, passages):
    qs = write_questions(tmp_path / "q.jsonl", 5)
    corpus = tmp_path / "c.jsonl"
    data.write_jsonl_atomic(corpus, passages)
    with pytest.raises(config.ConfigError, match="leaves no training question"):
        assemble.load_task(config.Config(questions=str(qs), corpus=str(corpus), holdout=5))
    with pytest.raises(evaluation.EvalError, match="exceeds"):
        evaluation.load_questions(str(qs), holdout=6, n=0)


def test_scores_come_from_the_rollouts(tok, searcher):
    """A scripted 'model' that searches and answers right on question 0 and wrong on question 1:
    the averages are exactly the rewards of those two episodes."""
    questions = [{"question": "Who wrote the novel Dracula?", "aliases": ["Bram Stoker"]},
                 {"question": "What is the capital of France?", "aliases": ["Paris"]}]
    call = '<tool>{"name": "wiki_search", "args": {"query": "Dracula novel"}}</tool>'
    script = [[call, "<answer>Bram Stoker</answer>"], ["<answer>Lyon</answer>"]]

    r = evaluation.evaluate(ScriptedPolicy(tok, script), tok, questions, searcher,
                            EnvConfig(few_shot=False, temperature=0.0), batch=8)
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
    for name in (str(tiny_model_dir), str(tiny_model_dir) + "/"):  # one progress bar per model, run to the end
        assert f"{name}: 100%" in proc.stderr and "3/3" in proc.stderr
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
    (["base", "--temperature", "0.7"], "--temperature needs --sampled"),
    (["base", "--max-turn-tokens", "0"], "--max-turn-tokens N with N >= 1"),
    (["base", "--passages", "0"], "--passages N with N >= 1"),
    (["base", "--sampled", "--top-p", "0"], "--top-p P with 0 < P <= 1"),
    (["base", "--n", "-1"], "--n -1"),
    (["base", "--json", "/no/such/folder/r.json"], "no folder /no/such/folder"),
])
def test_bad_input_is_one_clear_error(argv, message, capsys, tmp_path):
    assert evaluation.main(argv + ([] if "--json" in argv else ["--json", str(tmp_path / "r.json")])) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not (SHARED / "triviaqa" / "questions.jsonl").is_file(), reason="needs ../shared/data")
def test_holdout_on_the_shared_questions_is_stable():
    """The benchmark's held-out set: 400 of the 2,400 real questions, the same on every machine."""
    held = evaluation.load_questions(str(SHARED / "triviaqa" / "questions.jsonl"), holdout=400, n=0)
    assert len(held) == 400 and len({q["question"] for q in held}) == 400


# ----------------------------------------------------------------------------- episode settings
def make_run(folder: Path, model_dir: Path, **settings) -> Path:
    """A run folder as train.py leaves it: config.json (every Config field) and checkpoint/."""
    folder.mkdir()
    (folder / "checkpoint").symlink_to(model_dir)
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(config.Config(**settings))))
    return folder


def model_turns(traj) -> list[int]:
    """Token count of each model turn: the runs of turn_idx > 0 between environment tokens."""
    runs, prev = [], 0
    for k in traj.turn_idx:
        if k and k == prev:
            runs[-1] += 1
        elif k:
            runs.append(1)
        prev = k
    return runs


def evaluate_recording(monkeypatch, argv) -> tuple[dict, list]:
    """eval.main in-process, keeping every trajectory it rolled out."""
    seen, real = [], env.rollout
    monkeypatch.setattr(env, "rollout", lambda *a, **k: seen.extend(real(*a, **k)) or seen[len(seen) - len(a[2]) * a[3]:])
    out = Path(argv[argv.index("--json") + 1])
    assert evaluation.main(argv) == 0
    return json.loads(out.read_text()), seen


def test_a_run_is_evaluated_with_its_own_settings(tmp_path, tiny_model_dir, monkeypatch):
    """The tiny random model never stops by itself, so every turn runs to its budget: a run trained with
    max_turn_tokens 8 gets turns of exactly 8, a plain model folder config.Config's default."""
    run = make_run(tmp_path / "run", tiny_model_dir, max_turn_tokens=8, max_completion_tokens=40, max_tool_calls=1,
                   top_k=2)
    result, trajs = evaluate_recording(monkeypatch, [str(run), "--n", "2", "--threads", "1",
                                                     "--json", str(tmp_path / "r.json")])
    turns = [n for t in trajs for n in model_turns(t)]
    assert len(trajs) == 2 and max(turns) == 8 and turns.count(8) >= 2
    assert all(len(t.completion_ids) <= 40 for t in trajs)
    assert result["settings"][str(run)] == dict(dataclasses.asdict(config.episode(config.Config(
        max_turn_tokens=8, max_completion_tokens=40, max_tool_calls=1, top_k=2))), temperature=0.0)

    # runs/x/checkpoint is the same run; a model folder has no run settings: config.Config's defaults
    result, _ = evaluate_recording(monkeypatch, [str(run / "checkpoint"), "--n", "0", "--questions",
                                                 str(write_questions(tmp_path / "q.jsonl", 1)), "--corpus",
                                                 str(write_corpus(tmp_path / "c.jsonl")), "--threads", "1",
                                                 "--json", str(tmp_path / "r2.json")])
    assert result["settings"][str(run / "checkpoint")]["max_turn_tokens"] == 8
    defaults = config.Config()
    result, trajs = evaluate_recording(monkeypatch, [str(tiny_model_dir), "--n", "1", "--threads", "1",
                                                     "--json", str(tmp_path / "r3.json")])
    assert max(n for t in trajs for n in model_turns(t)) == defaults.max_turn_tokens
    assert result["settings"][str(tiny_model_dir)]["max_completion_tokens"] == defaults.max_completion_tokens


def write_corpus(path: Path) -> Path:
    data.write_jsonl_atomic(path, [{"id": "p0", "title": "A", "text": "Answer a0 is here."}])
    return path


def test_flags_override_the_runs_settings(tmp_path, tiny_model_dir, monkeypatch):
    run = make_run(tmp_path / "run", tiny_model_dir, max_turn_tokens=8, max_completion_tokens=40, temperature=0.7)
    result, trajs = evaluate_recording(monkeypatch, [str(run), "--n", "2", "--max-turn-tokens", "5", "--sampled",
                                                     "--threads", "1", "--json", str(tmp_path / "r.json")])
    turns = [n for t in trajs for n in model_turns(t)]
    assert max(turns) == 5 and all(len(t.completion_ids) <= 40 for t in trajs)  # the flag; the run's budget
    settings = result["settings"][str(run)]
    assert settings["max_turn_tokens"] == 5 and settings["temperature"] == 0.7  # sampled at the run's temperature
    result, _ = evaluate_recording(monkeypatch, [str(run), "--n", "1", "--sampled", "--temperature", "0.3",
                                                 "--no-few-shot", "--threads", "1", "--json", str(tmp_path / "r2.json")])
    assert result["settings"][str(run)]["temperature"] == 0.3 and result["settings"][str(run)]["few_shot"] is False


def test_bad_run_config_is_one_clear_error(tmp_path, tiny_model_dir, capsys):
    run = make_run(tmp_path / "run", tiny_model_dir)
    (run / "config.json").write_text("{not json")
    assert evaluation.main([str(run), "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "config.json: not valid JSON" in err and "Traceback" not in err and not (tmp_path / "r.json").exists()
    (run / "config.json").write_text(json.dumps({"max_turn_tokens": 0, "from_a_newer_train_py": 1}))
    assert evaluation.main([str(run), "--json", str(tmp_path / "r.json")]) == 2
    assert "--max-turn-tokens N with N >= 1" in capsys.readouterr().err
