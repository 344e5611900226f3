"""--report-to tensorboard | wandb: a real 2-step run writes the same scalars as metrics.jsonl, read back
with each tool's own reader; a bad value or a missing package is one clear error before any work."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import config
import data
import train
from infra import assemble, tracking
from infra.checkpoint import truncate_metrics

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(tmp_path, model_dir, passages, *extra) -> list[str]:
    """A 2-step run of the tiny random model on a 4-question file (no warm start, so it takes seconds)."""
    qs, corpus = tmp_path / "q.jsonl", tmp_path / "c.jsonl"
    data.write_jsonl_atomic(qs, [{"question": f"Who wrote book {i}?", "answer": "Bram Stoker",
                                  "aliases": ["Bram Stoker"]} for i in range(4)])
    data.write_jsonl_atomic(corpus, passages)
    return ["--model", str(model_dir), "--questions", str(qs), "--corpus", str(corpus), "--output-dir",
            str(tmp_path / "run"), "--G", "2", "--batch-size", "4", "--micro-batch", "2", "--max-steps", "2",
            "--max-turn-tokens", "8", "--max-completion-tokens", "60", "--warmstart-steps", "0",
            "--sample-every", "0", "--threads", "1", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def same(a: float, b: float) -> bool:
    """Equal as the backends store them: TensorBoard keeps float32, so compare to float32 precision."""
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)


def test_tensorboard_event_files_hold_the_metrics(tmp_path, tiny_model_dir, passages):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train.main(tiny_run(tmp_path, tiny_model_dir, passages, "--report-to", "tensorboard")) == 0
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == set(rows[0]) - {"step"}  # every metric, nothing else
    for key in tags:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2], key
        assert all(same(e.value, r[key]) for e, r in zip(events, rows)), (key, [e.value for e in events])


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of the one offline run in run_dir, read from its .wandb file by wandb's own reader."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    proc = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(files[0])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return [r["history"] for r in records if r["type"] == "history"]


def test_wandb_offline_run_holds_the_metrics(tmp_path, tiny_model_dir, passages, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "unset")  # (so that monkeypatch restores its absence afterwards)
    monkeypatch.delenv("WANDB_MODE")  # the Logger must choose offline by itself
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train.main(tiny_run(tmp_path, tiny_model_dir, passages, "--report-to", "wandb")) == 0
    assert os.environ["WANDB_MODE"] == "offline"
    rows = metrics(tmp_path / "run")
    history = wandb_history(tmp_path / "run")
    assert [h["step"]["num"] for h in history] == [r["step"] for r in rows] == [1, 2]
    for h, r in zip(history, rows):
        logged = {k: v for k, v in h["item"].items() if not k.startswith("_")}  # wandb adds _runtime etc.
        assert set(logged) == set(r) - {"step"}
        for key, value in logged.items():
            # JSON has no NaN: wandb writes it as the string "NaN"
            assert same(float(value), r[key]), (key, value, r[key])


def test_report_to_values_and_missing_packages(monkeypatch):
    for ok in ("none", "tensorboard", "wandb"):
        config.check_report_to(ok)
    with pytest.raises(config.ConfigError, match="choose none, wandb or tensorboard"):
        config.check_report_to("mlflow")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    fix = "needs the wandb package: run `make setup` (or pip install -r requirements-extra.txt)"
    with pytest.raises(config.ConfigError, match=re.escape(fix)):
        config.check_report_to("wandb")
    config.check_report_to("tensorboard")
    assert issubclass(config.ConfigError, ValueError)


@pytest.mark.parametrize("value, message", [("mlflow", "none, wandb or tensorboard"),
                                            ("tensorboard", "needs the tensorboard package")])
def test_train_main_fails_cleanly_before_any_work(tmp_path, capsys, monkeypatch, value, message):
    """Through train.main: one line, exit 2, no run folder, before any heavy work: train.main is stopped at the
    model's loading, so a check that came later (the logger's own) would fail this test. The missing package is
    simulated."""
    def no_model(*args, **kwargs):
        raise AssertionError("the run got as far as loading the model")
    monkeypatch.setattr(assemble, "load_policy", no_model)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "run"
    assert train.main(["--output-dir", str(out), "--report-to", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_tensorboard_after_resume_holds_each_step_once(tmp_path):
    """--resume redoes the steps after the checkpoint: the new writer purges what the killed one logged
    for them, so TensorBoard, like metrics.jsonl, ends with every step once and the redone values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config.Config(report_to="tensorboard", max_steps=4)
    first = tracking.Logger(cfg, tmp_path)
    for s in (1, 2, 3):
        first.log({"step": s, "loss": float(s)})
    first.close()  # the killed run got to step 3; its checkpoint holds step 1
    truncate_metrics(tmp_path / "metrics.jsonl", 1)
    second = tracking.Logger(cfg, tmp_path)
    for s in (2, 3, 4):
        second.log({"step": s, "loss": 10.0 * s})
    assert second.backend is None  # closed by itself after the last step
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    assert [r["loss"] for r in metrics(tmp_path)] == [1.0, 20.0, 30.0, 40.0]
