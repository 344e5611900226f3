"""The GPU check: one script, one GPU, a few minutes, one table. Needs torch, transformers and accelerate
(deepspeed, if installed, adds the ZeRO-3 row); no model download: every model is random weights built
from a Qwen2.5 config.

    python bench/gpu_check.py --tokenizer DIR      # on a GPU machine (<= 8 min on one H100/H200)
    python bench/gpu_check.py --dry-run            # the same code at tiny sizes on CPU (the test suite runs it)

Rows:
  1. matmul peak: the GPU's measured bf16 matmul rate (the denominator of the shares below);
  2. update: train.update itself (bf16 autocast over fp32 weights, AdamW, gradient checkpointing, a few
     micro-batches) on the largest Qwen2.5 shape whose fp32 weights, gradients and AdamW moments
     (16 bytes a parameter) leave --reserve-gb of the GPU free for activations. Its share of the peak
     counts model FLOPs (forward + backward, 3 x 2 x parameters x tokens, plus attention and the
     vocabulary projection of the model's own tokens; the checkpointing recompute is not counted);
  3. ZeRO-3: train.main under `accelerate launch --use_deepspeed --zero_stage 3` with 1 process, the
     tests' scripted rollouts and stand-in engine (tests/distributed_worker.py), 2 steps, mu 2;
  4. HF rollouts: the sampler assemble.make_sampler builds for --rollout-backend hf on this device (on CUDA
     policy.HFPolicy, under the bf16 autocast of train.sample_batch), at the seed's sampling.
--tokenizer: any chat tokenizer folder (the embedded SmolLM2's is the default where it can be built).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import env  # noqa: E402
import train  # noqa: E402
from config import Config, episode  # noqa: E402
from infra import assemble  # noqa: E402
from policy import Batch  # noqa: E402

# Qwen2.5 base models' shapes (their config.json): name -> hidden, intermediate, layers, heads, KV heads, tied
QWEN25 = {"0.5B": (896, 4864, 24, 14, 2, True), "1.5B": (1536, 8960, 28, 12, 2, True),
          "3B": (2048, 11008, 36, 16, 2, True), "7B": (3584, 18944, 28, 28, 4, False)}
QWEN_VOCAB = 151936


def qwen_config(name: str, vocab: int = QWEN_VOCAB, layers: int | None = None):
    from transformers import Qwen2Config

    hidden, inter, n_layers, heads, kv, tied = QWEN25[name]
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or n_layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                       max_position_embeddings=4096)


def tiny_config(vocab: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)


def n_params(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- 1. the peak
def matmul_peak(device, n: int, iters: int) -> float:
    """bf16 matmul FLOP/s at n x n x n, the best of ``iters`` timed runs."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- 2. the update
def pick_shape(free_bytes: int, reserve: int) -> str:
    """The largest Qwen2.5 shape whose weights, gradients and AdamW moments (fp32: 16 B/param) fit."""
    fits = [name for name in QWEN25 if 16 * n_params(qwen_config(name)) + reserve <= free_bytes]
    if not fits:
        raise SystemExit(f"error: not even Qwen2.5-0.5B's training state fits in {free_bytes / 2**30:.0f} GiB free "
                         f"with --reserve-gb {reserve / 2**30:.0f}")
    return fits[-1]


def update_flops(config, rows: int, length: int, model_tokens: int) -> float:
    """Model FLOPs of one pass (forward + backward = 3 forwards) over ``rows`` x ``length`` tokens."""
    body = n_params(config) - config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    attention = 2 * 2 * config.num_hidden_layers * config.hidden_size * length / 2  # QK^T and AV, causal half
    forward = rows * length * (2 * body + attention) + model_tokens * 2 * config.hidden_size * config.vocab_size
    return 3 * forward


def time_update(config, device, rows: int, length: int, micro_batch: int, steps: int) -> dict:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    model.gradient_checkpointing_enable()
    model.train()
    cfg = Config(micro_batch=micro_batch, mu=1, bf16=True, max_grad_norm=0.1, batch_size=rows, G=rows, lr=1e-6)
    accelerator = Accelerator(cpu=device.type == "cpu")
    trainer, optimizer, scheduler = assemble.prepare(cfg, accelerator, model, rows)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (rows, length), generator=gen)
    attn = torch.ones_like(ids)
    turn = torch.zeros_like(ids)
    turn[:, length // 2:] = 1  # half prompt, half the model's turn (about what a CPU-default row is)
    A = torch.randn(rows, length - 1, generator=gen)  # the advantage of each predicted id
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):  # the first one warms up (allocator, kernels)
        sync(device)
        t = time.perf_counter()
        train.update(cfg, trainer, optimizer, scheduler, accelerator, Batch(ids, attn, turn, A))
        sync(device)
        times.append(time.perf_counter() - t)
    seconds = min(times[1:])
    flops = update_flops(config, rows, length, int((turn[:, 1:] > 0).sum()))
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model, trainer, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": seconds, "flops_per_s": flops / seconds, "peak_gib": peak_mem}


# ----------------------------------------------------------------------------- 3. ZeRO-3, 1 process
def zero3_step(tokenizer, folder: Path, config, bf16: bool) -> dict:
    """train.main under a real 1-process DeepSpeed ZeRO-3 launch (the worker scripts sampling)."""
    from transformers import AutoModelForCausalLM

    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001  (any failure: the row says so, the others still run)
        return {"ok": None, "note": f"deepspeed not importable ({type(e).__name__})"}
    sys.path.insert(0, str(ROOT / "tests"))
    from distributed_worker import QUESTIONS

    model_dir = folder / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (folder / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "c.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "title": q["answer"], "text": q["question"]}) + "\n"
                                            for i, q in enumerate(QUESTIONS)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--use_deepspeed",
           "--zero_stage", "3", "--zero3_init_flag", "true", "--zero3_save_16bit_model", "true",
           "--mixed_precision", "bf16" if bf16 else "no", str(ROOT / "tests" / "distributed_worker.py"),
           "--model", str(model_dir), "--questions", str(folder / "q.jsonl"), "--corpus", str(folder / "c.jsonl"),
           "--G", "4", "--batch-size", "8", "--micro-batch", "2", "--mu", "2", "--max-steps", "2",
           "--warmstart-steps", "0", "--rollout-backend", "vllm", "--sample-every", "0", "--save-every", "1",
           "--max-turn-tokens", "64", "--max-completion-tokens", "256", "--output-dir", str(folder / "run"),
           "--bf16" if bf16 else "--no-bf16"]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MT_GRPO_CACHE": str(folder / "cache")})
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        return {"ok": False, "note": (p.stdout + p.stderr).strip().splitlines()[-1][:120], "seconds": seconds}
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    record = json.loads((folder / "run" / "record-0.json").read_text())
    ok = len(rows) == 2 and record[0]["distributed_type"] == "DEEPSPEED" and all(r["zero3_params"] for r in record)
    return {"ok": ok, "seconds": seconds, "note": f"2 steps, grad_norm {rows[-1]['grad_norm']:.3g}, "
                                                  f"{record[0]['distributed_type']}"}


# ----------------------------------------------------------------------------- 4. rollouts
def hf_rollout(tokenizer, config, device, rows: int, new_tokens: int) -> dict:
    """The sampler train.py builds for --rollout-backend hf on this device (assemble.make_sampler), under the
    autocast train.sample_batch runs it in, at the seed's sampling (T 0.9, top-k 50)."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    cfg = Config(rollout_backend="hf")
    accelerator = Accelerator(cpu=device.type == "cpu")
    env_cfg = episode(cfg)
    policy = assemble.make_sampler(cfg, accelerator, model, tokenizer, [], env_cfg, "unused")
    prompt = env.build_prompt(tokenizer, "Who wrote the novel Dracula?", env_cfg)
    with train.sampling_autocast(cfg, device):
        policy.start_rollout()
        policy.generate([prompt] * 2, 4, env_cfg.sampling(), [])  # warm-up
        sync(device)
        t = time.perf_counter()
        out = policy.generate([prompt] * rows, new_tokens, env_cfg.sampling(), [])  # no stop strings: every row runs full
        sync(device)
    seconds = time.perf_counter() - t
    return {"tokens_per_s": sum(len(r) for r in out) / seconds, "seconds": seconds, "sampler": type(policy).__name__}


# ----------------------------------------------------------------------------- the table
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (seconds): checks the script, not a GPU")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the embedded SmolLM2-135M's)")
    ap.add_argument("--reserve-gb", type=float, default=24.0, help="GPU memory left for activations and the rest")
    ap.add_argument("--rows", type=int, default=16, help="rollouts per update")
    ap.add_argument("--length", type=int, default=1024, help="tokens per rollout in the update")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    import data

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("error: no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or data.embedded_model_dir())
    rows = []
    peak = matmul_peak(device, 8192 if cuda else 256, 10 if cuda else 3)
    rows.append(("matmul peak (bf16)", f"{peak / 1e12:.1f} TFLOP/s" if cuda else f"{peak / 1e9:.1f} GFLOP/s", ""))

    if cuda:
        free = torch.cuda.mem_get_info()[0]
        name = pick_shape(free, int(args.reserve_gb * 2**30))
        config, shape = qwen_config(name), f"Qwen2.5-{name} shape"
        rows_, length, mb = args.rows, args.length, args.micro_batch
    else:
        config, shape, rows_, length, mb = tiny_config(len(tokenizer)), "tiny Qwen2 (dry run)", 4, 64, 2
    u = time_update(config, device, rows_, length, mb, steps=2)
    rows.append((f"update: {shape}, {n_params(config) / 1e9:.2f}B params", f"{u['seconds']:.2f} s/step",
                 f"{u['flops_per_s'] / peak:.1%} of peak, {rows_}x{length} tokens, peak mem {u['peak_gib']:.1f} GiB"))

    small = qwen_config("0.5B", vocab=len(tokenizer), layers=4) if cuda else tiny_config(len(tokenizer))
    with tempfile.TemporaryDirectory() as folder:
        z = zero3_step(tokenizer, Path(folder), small, bf16=cuda)
    status = {True: "ok", False: "FAILED", None: "skipped"}[z["ok"]]
    rows.append(("ZeRO-3, 1 process, train.main", status + (f" in {z['seconds']:.0f} s" if "seconds" in z else ""), z["note"]))

    r = hf_rollout(tokenizer, qwen_config("0.5B", vocab=len(tokenizer)) if cuda else small, device,
                   64 if cuda else 4, 128 if cuda else 8)
    rows.append((f"HF rollouts ({r['sampler']}, assemble.make_sampler)", f"{r['tokens_per_s']:.0f} tok/s",
                 "Qwen2.5-0.5B shape" if cuda else "tiny"))

    device_name = torch.cuda.get_device_name() if cuda else "CPU (dry run)"
    print(f"\nGPU check on {device_name}, torch {torch.__version__}")
    width = max(len(a) for a, _, _ in rows)
    for a, b, c in rows:
        print(f"  {a:<{width}}  {b:>16}  {c}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "rows": rows}, indent=1))
    return 0 if z["ok"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
