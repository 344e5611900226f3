"""DeepSpeed ZeRO-3 for real: train.main under ``accelerate launch --config_file configs/zero3_cpu_2proc.yaml``,
2 processes sharding a tiny Llama over gloo, against the same run in one plain process.

What is real: accelerate's DeepSpeed launch and engine, ZeRO-3's sharded parameters, gradients and optimizer
state, train.py's loop (gather, rewards, advantages, mu = 2 passes of micro-batches, the LambdaLR driving
DeepSpeed's optimizer), checkpoints (DeepSpeed's sharded state + the gathered save_pretrained model),
SIGKILL and --resume, and vllm_backend.sync_weights gathering every module's shards. What stands in: the
sampling (scripted turns, tests/distributed_worker.py says why) and the vLLM engine, which records the
weights sync_weights hands it (vLLM needs its own venv; tests/test_vllm.py runs the real engine).

Checked to fail when its fix is undone: with the ZeRO-3 save reading ``get_state_dict(...).items()`` on
every process, every launch dies at its first checkpoint (rank 1: 'NoneType' has no attribute 'items');
with ``Accelerator(cpu=True)`` on CPU the run is MULTI_CPU, not DEEPSPEED
(test_the_launch_really_ran_zero3); without ``main_process_first`` around the index both processes build
it (test_the_search_index_is_built_once); with sync_weights skipped the engine's weights stay the start
model's (test_sync_weights_delivers_the_trained_weights); without the barrier after ``save_state`` in
checkpoint.save_checkpoint the fixture's held-back process 1 finds its checkpoint folder moved and the launch
dies (test_every_process_writes_its_checkpoint_files_before_the_folder_moves).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_worker import QUESTIONS
from helpers import FAKE_PASSAGES

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
CONFIG = ROOT / "configs" / "zero3_cpu_2proc.yaml"
G, BATCH, STEPS = 4, 12, 3

# Tolerances. Both runs do the same float32 arithmetic in another order: ZeRO-3 reduce-scatters the two
# processes' gradients into shards, each process pads only its own rows. Measured here over 3 steps: losses
# agree to 4e-7 relative, clip fractions to 2e-8, gradient norms to 5e-6 at step 1 and 2e-5 by step 3 (the
# parameters they are taken at already differ by ~1e-6), parameters to 2e-6 after 6 AdamW steps (lr 1e-3).
# The bugs these catch are O(1): a group normalised per process, a local token count, a missing 1/processes.
RTOL = 1e-5        # losses, clip fractions (relative)
GRAD_RTOL = 1e-4   # gradient norms (relative)
PARAM_ATOL = 3e-5  # parameters (absolute)
BF16_RTOL = 5e-2   # DeepSpeed bf16 (bf16 weights, fp32 master) against the fp32 run: 3 significant digits


def flags(folder: Path, tiny_model_dir, steps: int) -> list[str]:
    return ["--model", str(tiny_model_dir), "--questions", str(folder / "questions.jsonl"),
            "--corpus", str(folder / "corpus.jsonl"), "--G", str(G), "--batch-size", str(BATCH),
            "--micro-batch", "2", "--mu", "2", "--max-steps", str(steps), "--lr", "1e-3", "--max-grad-norm", "10",
            "--max-turn-tokens", "64", "--max-completion-tokens", "256", "--warmstart-steps", "0",
            "--sample-every", "0", "--threads", "1", "--rollout-backend", "vllm", "--save-every", "1",
            "--dist-timeout-minutes", "45"]


def launch(folder: Path, name: str, args: list[str], processes: int, env: dict | None = None,
           mixed_precision: str | None = None, wait: bool = True):
    """Run the worker (1 plain process, or accelerate launch of the ZeRO-3 config) with its own index cache."""
    prefix = [sys.executable]
    if processes > 1:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG)]
        if mixed_precision:
            prefix += ["--mixed_precision", mixed_precision]
    env = {**os.environ, "MT_GRPO_CACHE": str(folder / f"cache-{name}"), **(env or {})}
    cmd = [*prefix, str(WORKER), *args, "--output-dir", str(folder / name)]
    log = open(folder / f"{name}.log", "w")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    if not wait:
        return p
    code = p.wait(timeout=420)
    assert code == 0, f"{name}:\n{(folder / f'{name}.log').read_text()[-4000:]}"
    return folder / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("zero3")
    (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "corpus.jsonl").write_text("".join(json.dumps(p) + "\n" for p in FAKE_PASSAGES))
    out = {"one": launch(folder, "one", flags(folder, tiny_model_dir, STEPS) + ["--no-bf16"], 1),
           # process 1 holds its last checkpoint write back until the main process moved the folder or waits
           # for it (distributed_worker.slow_rank_in_save_state): the checkpoint race, deterministic
           "zero3": launch(folder, "zero3", flags(folder, tiny_model_dir, STEPS) + ["--no-bf16"], 2,
                           env={"SLOW_RANK_SAVE": "1"})}

    # the same run, SIGKILLed (the whole job: launcher and both processes) right after its step-2 checkpoint
    # was written, then resumed to step 3
    p = launch(folder, "killed", flags(folder, tiny_model_dir, STEPS) + ["--no-bf16"], 2,
               env={"HANG_AFTER_STEP": "2"}, wait=False)
    deadline = time.time() + 420
    while not (folder / "killed" / "hanging").exists():
        assert p.poll() is None, (folder / "killed.log").read_text()[-4000:]
        assert time.time() < deadline, "the run never reached its step-2 checkpoint"
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    out["killed_metrics"] = (folder / "killed" / "metrics.jsonl").read_text()
    out["resumed"] = launch(folder, "killed", flags(folder, tiny_model_dir, STEPS) + ["--no-bf16", "--resume"], 2)

    # DeepSpeed's bf16 (weights and gradients in bf16, an fp32 master copy), 2 steps
    out["bf16"] = launch(folder, "bf16", flags(folder, tiny_model_dir, 2) + ["--bf16"], 2, mixed_precision="bf16")
    return out


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def test_the_launch_really_ran_zero3(runs):
    for p in range(2):
        rec = json.loads((runs["zero3"] / f"record-{p}.json").read_text())
        assert {(r["distributed_type"], r["backend"], r["num_processes"], r["rows"]) for r in rec} == \
               {("DEEPSPEED", "gloo", 2, BATCH // 2)}, f"process {p}"
        assert len(rec) == STEPS
        assert all(r["zero3_partitioned"] for r in rec)  # each process held its shards, not the model
        assert {r["timeout_s"] for r in rec} == {45 * 60}  # --dist-timeout-minutes reached the process group


def test_zero3_equals_one_process(runs):
    one, z3 = metrics(runs["one"]), metrics(runs["zero3"])
    assert [r["step"] for r in z3] == list(range(1, STEPS + 1))
    for a, b in zip(one, z3):
        for key in ("reward_turn", "reward_outcome", "exact_match", "tool_call_rate", "model_tokens"):
            assert a[key] == b[key], (a["step"], key)  # identical rollouts
        for key in ("loss", "clip_frac"):
            assert b[key] == pytest.approx(a[key], rel=RTOL), (a["step"], key)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=GRAD_RTOL), a["step"]
    start = load_file(Path(tiny_model_dir_of(runs["one"])) / "model.safetensors")
    a, b = weights(runs["one"] / "checkpoint"), weights(runs["zero3"] / "checkpoint")
    assert a.keys() == b.keys()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 10 * PARAM_ATOL  # it did train
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=PARAM_ATOL, msg=k)


def tiny_model_dir_of(run: Path) -> str:
    return json.loads((run / "config.json").read_text())["model"]


def test_the_checkpoint_loads_with_from_pretrained_and_equals_the_gathered_weights(runs):
    """checkpoint-k (the gathered 16-bit save_pretrained model) is exactly what sync_weights gathered
    before step k + 1, and it loads as a plain transformers model."""
    from transformers import AutoModelForCausalLM

    for k in range(1, STEPS):
        model = AutoModelForCausalLM.from_pretrained(runs["zero3"] / f"checkpoint-{k}")
        loaded = dict(model.named_parameters())
        synced = load_file(runs["zero3"] / f"synced-{k + 1}.safetensors")
        assert set(synced) == set(loaded), k
        for name, t in synced.items():
            assert torch.equal(loaded[name].detach(), t), (k, name)


def test_sync_weights_delivers_the_trained_weights(runs):
    """Before step k the engine receives the weights after step k - 1: the start model first, then the
    1-process run's trained weights (to the ZeRO-3 tolerance), never stale ones."""
    start = load_file(Path(tiny_model_dir_of(runs["one"])) / "model.safetensors")
    first = load_file(runs["zero3"] / "synced-1.safetensors")
    assert all(torch.equal(first[k], start[k]) for k in first)
    for k in range(1, STEPS):
        synced = load_file(runs["zero3"] / f"synced-{k + 1}.safetensors")
        trained = weights(runs["one"] / f"checkpoint-{k}")
        assert any(not torch.equal(synced[n], start[n]) for n in synced), f"sync {k + 1} sent the start model"
        for n in synced:
            torch.testing.assert_close(synced[n], trained[n], rtol=0, atol=PARAM_ATOL, msg=f"{k} {n}")


def test_sigkill_then_resume_equals_the_uninterrupted_run(runs):
    killed = [json.loads(line) for line in runs["killed_metrics"].splitlines()]
    assert [r["step"] for r in killed] == [1, 2]  # killed after its step-2 checkpoint, before step 3
    resumed, whole = metrics(runs["resumed"]), metrics(runs["zero3"])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    skip = {"step_seconds", "rollout_seconds", "update_seconds", "tokens_per_second", "rollout_tokens_per_second", "peak_rss_gb"}
    for a, b in zip(whole, resumed):
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}, a["step"]
    a, b = weights(runs["zero3"] / "checkpoint"), weights(runs["resumed"] / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def test_every_process_writes_its_checkpoint_files_before_the_folder_moves(runs):
    """The checkpoint race, made deterministic: process 1 writes its last save_state file (its random states)
    only once the main process, back from its own save_state, has either moved the folder away or is waiting
    at a barrier (distributed_worker.slow_rank_in_save_state). Without the barrier after save_state in
    checkpoint.save_checkpoint the main process moves the folder first, process 1's write fails ("Parent
    directory ... does not exist") and the launch dies at its first checkpoint: the fixture fails."""
    seen = [json.loads(line) for line in (runs["zero3"] / "race" / "rank1.jsonl").read_text().splitlines()]
    assert [s["save"] for s in seen] == list(range(1, STEPS + 1))  # one held-back write per checkpoint
    assert all(s["folder_still_there"] for s in seen)
    for k in range(1, STEPS + 1):  # and every checkpoint holds both processes' states
        assert {p.name for p in (runs["zero3"] / f"checkpoint-{k}" / "deepspeed").glob("random_states_*.pkl")} == \
               {"random_states_0.pkl", "random_states_1.pkl"}, k


def test_the_search_index_is_built_once(runs):
    built = sorted(p.name for p in runs["zero3"].glob("index-built-*"))
    assert built == ["index-built-0"] and (runs["zero3"] / "index-built-0").read_text() == "1\n"


def test_bf16_zero3_trains(runs):
    """DeepSpeed's bf16 keeps bf16 weights (checkpoints and synced weights are bf16) and trains like the
    fp32 run to bf16's precision: same rollouts, so the same rewards, and gradient norms within 5%."""
    bf, fp = metrics(runs["bf16"]), metrics(runs["zero3"])
    assert [r["step"] for r in bf] == [1, 2]
    assert bf[0]["reward_outcome"] == fp[0]["reward_outcome"]
    assert bf[0]["grad_norm"] == pytest.approx(fp[0]["grad_norm"], rel=BF16_RTOL)
    saved, synced = weights(runs["bf16"] / "checkpoint-1"), load_file(runs["bf16"] / "synced-2.safetensors")
    assert {t.dtype for t in saved.values()} == {t.dtype for t in synced.values()} == {torch.bfloat16}
    assert all(torch.equal(saved[k], synced[k]) for k in synced)
    start = load_file(Path(tiny_model_dir_of(runs["one"])) / "model.safetensors")
    assert max((saved[k].float() - start[k]).abs().max().item() for k in saved) > 1e-4  # it trained
