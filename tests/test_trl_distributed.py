"""MTGRPOTrainer on several processes (accelerate over gloo), against one process.

tests/trl_worker.py is the program; each launch is a real TRL GRPOTrainer run:
  - scripted, 1 plain process and 2 processes (configs/cpu_2proc.yaml): the same episodes by construction
    (each chosen by its global row), so the comparison isolates what several processes change: the second
    question's group is split between the processes and must be normalised whole, and the step must equal
    the 1-process step;
  - engine, 2 processes: TRLvLLMSampler over a fake engine that enforces the contract of TRL's vLLM server mode
    (every process sends the same number of prompts to every call, or the run fails);
  - sharded, 2 processes under DeepSpeed ZeRO-3 (configs/zero3_cpu_2proc.yaml): the HF sampler is refused.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")  # an extra: `make test` installs it

from trl_worker import QUESTIONS, G  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "trl_worker.py"


def launch(folder: Path, mode: str, name: str, config: str | None, model_dir) -> Path:
    prefix = [sys.executable] if config is None else \
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / config)]
    p = subprocess.run([*prefix, str(WORKER), mode, str(folder / name), str(model_dir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{name}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return folder / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("trl-dist")
    return {"one": launch(folder, "scripted", "one", None, tiny_model_dir),
            "two": launch(folder, "scripted", "two", "cpu_2proc.yaml", tiny_model_dir),
            "engine": launch(folder, "engine", "engine", "cpu_2proc.yaml", tiny_model_dir),
            "sharded": launch(folder, "sharded", "sharded", "zero3_cpu_2proc.yaml", tiny_model_dir),
            "start": Path(tiny_model_dir)}


def records(run: Path, processes: int) -> list[dict]:
    return [json.loads((run / f"record-{p}.json").read_text()) for p in range(processes)]


def per_row(record: dict) -> list[list[float]]:
    """Each row's advantages on the model's own tokens (turn index > 0), in order."""
    return [[a for a, k in zip(adv, turn) if k] for adv, turn in zip(record["advantages"], record["turn"])]


def test_a_group_split_between_processes_is_normalised_whole(runs):
    (one,), two = records(runs["one"], 1), records(runs["two"], 2)
    assert one["questions"] == [q["prompt"] for q in QUESTIONS for _ in range(G)]
    split = QUESTIONS[1]["prompt"]  # rows 4-7: two on each process
    assert two[0]["questions"][-2:] == [split] * 2 and two[1]["questions"][:2] == [split] * 2
    assert per_row(two[0]) + per_row(two[1]) == per_row(one)  # bit for bit: the levels were gathered
    assert len({tuple(r) for r in per_row(one)}) > 4  # and they vary: a half-group would get other numbers


def test_the_two_process_step_equals_the_one_process_step(runs):
    """The same weights, episodes and advantages: one TRL step on 2 processes (DDP over gloo) moves the weights
    as on 1. AdamW's first step moves every coordinate by about lr whatever its gradient's size, so where a
    gradient is ~0 the two sums' different order shows: the moves agree to 1e-3 of their norm (measured:
    3e-5)."""
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(runs["start"]).state_dict()
    one, two = torch.load(runs["one"] / "weights.pt"), torch.load(runs["two"] / "weights.pt")
    move_one = torch.cat([(one[k] - start[k]).flatten() for k in sorted(one)])
    move_two = torch.cat([(two[k] - start[k]).flatten() for k in sorted(one)])
    assert move_one.abs().max() > 5e-4
    assert (move_one - move_two).norm() / move_one.norm() < 1e-3


def test_every_process_makes_the_same_engine_calls_with_the_same_counts(runs):
    """Process 0's episodes answer at once, process 1's search first: process 1 needs a second round that
    process 0 has nothing for. Both still call the engine twice with 4 prompts each (the fake engine fails the
    run on unequal counts), and each process's episodes got the completions of their own prompts."""
    rec = records(runs["engine"], 2)
    for p, r in enumerate(rec):
        assert r["engine_calls"] == [[G, G], [G, G]], p
        question = QUESTIONS[p]
        assert r["questions"] == [question["prompt"]] * G
        assert all(a.endswith(f"<answer>{question['aliases'][0]}</answer>") for a in r["answers"]), p
    assert rec[0]["tool_calls"] == [[]] * G  # answered at once
    assert all(json.loads(c[0])["args"]["query"] == QUESTIONS[1]["prompt"] for c in rec[1]["tool_calls"])


def test_a_log_prob_vllm_reports_as_none_is_nan(runs):
    """TRL returns None where vLLM's log-prob was NaN (the fake engine does so for each message's second id):
    the sampler records NaN, not a crash."""
    for r in records(runs["engine"], 2):
        first = r["sampler_logprobs"][0]
        assert first[0] == -0.5 and math.isnan(first[1])


def test_zero3_with_the_hf_sampler_is_refused(runs):
    for r in records(runs["sharded"], 2):
        assert (r["distributed_type"], r["num_processes"], r["zero_stage"]) == ("DEEPSPEED", 2, 3)
        assert r["refused"] and "ZeRO-3" in r["refused"] and "use_vllm=True" in r["refused"]
