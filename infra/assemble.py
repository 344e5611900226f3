"""Assembling a run: everything train.py's loop holds, built once by ``setup`` (the launch, the data and its index,
the policy and its sampler, the optimizer, the warm start, a resumed checkpoint, an estimator's own model).

SPEED (optional). This is also the one place that chooses the speed path: fast/ computes what the reference path
computes (policy.HFPolicy's rollouts, policy.token_logprobs's log-probs) faster on a CPU, to floating-point
rounding; tests/test_fast.py pins it to the reference. With --no-fast, or without the package, every step runs
on the reference path.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import get_constant_schedule_with_warmup

import data
import env
import search
from config import Config, ConfigError, EnvConfig, episode
from infra import lora
from infra.checkpoint import check_resume, load_checkpoint, truncate_metrics
from infra.launch import is_deepspeed, is_zero3, make_accelerator, process_rows, sample_seed, validate_launch
from infra.tracking import peak_rss_gb
from policy import HFPolicy, LogProbs, Sampler, load_policy, token_logprobs


@dataclass
class Run:
    """Everything one training run holds."""
    accelerator: Accelerator
    model: torch.nn.Module      # the plain policy: sampling, saving (under LoRA: with its LoRA layers)
    peft_model: object          # under LoRA the PeftModel around ``model`` (it saves the adapter); else None
    logprobs: torch.nn.Module   # the accelerate-prepared policy.LogProbs: the update's forward
    ref_model: torch.nn.Module | None
    tokenizer: object
    sampler: Sampler | None     # policy.HFPolicy, fast.CachedPolicy, vLLM's; None on a process without the engine
    optimizer: object
    scheduler: object
    questions: list[dict]
    index: object               # the search tool (search.Index)
    env_cfg: EnvConfig
    my_rows: slice              # this process's rows of the global batch
    shared_prefix: bool         # the update computes each prompt once (the speed path)
    sampler_temperature: float | None  # of the sampler's log-probs; None: the sampling temperature
    out: Path
    start: int                  # steps already done (--resume)
    turn_reward: object = None  # R^T from a model (extensions/turn_rewards.py), or None: rewards.py's
    critic: object = None       # an estimator's own model (MT-PPO's critic), or None


def setup(cfg: Config) -> Run:
    # before the model is loaded: under ZeRO-3 (zero3_init_flag) from_pretrained loads it already sharded
    accelerator = make_accelerator(cfg)
    rows = validate_launch(cfg, accelerator)
    check_resume(cfg)
    check_lora_targets(cfg)
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
    env_cfg = episode(cfg)
    sampler = make_sampler(cfg, accelerator, model, tokenizer, questions, env_cfg,
                           str(start_path or data.embedded_model_dir()))
    shared_prefix, warmstart_logprobs = fast_logprobs(cfg)
    if not cfg.resume and cfg.warmstart_steps > 0:
        from extensions import warmstart

        # every process runs the same warm start; DDP then starts from the main process's weights anyway.
        # Under LoRA it trains the adapter only, so start model + adapter is still the whole policy (--resume)
        ws = warmstart.run(model, tokenizer, index, questions, env_cfg, steps=cfg.warmstart_steps,
                           lr=cfg.warmstart_lr, seed=cfg.seed, bf16=cfg.bf16, micro_batch=cfg.micro_batch,
                           logprobs=warmstart_logprobs)
        if is_main:
            print(f"warm start: {cfg.warmstart_steps} supervised steps on {ws['demonstrations']} demonstrations, "
                  f"loss {ws['first_loss']:.3f} -> {ws['last_loss']:.3f}, peak memory so far {peak_rss_gb():.2f} GB")
    my_rows = process_rows(cfg.batch_size, accelerator.num_processes, accelerator.process_index)
    logprobs, optimizer, scheduler = prepare(cfg, accelerator, model, rows, shared_prefix)
    turn_reward, critic = extension_models(cfg, accelerator, model, tokenizer)
    start = 0
    if cfg.resume:
        start = load_checkpoint(accelerator, out, optimizer, scheduler, sampler, critic)
        if is_main:
            truncate_metrics(out / "metrics.jsonl", start)
            print(f"resumed from {out}/checkpoint at step {start}")
    return Run(accelerator, model, peft_model, logprobs, ref_model, tokenizer, sampler, optimizer, scheduler, questions,
               index, env_cfg, my_rows, shared_prefix is not None, sampler_logprob_temperature(cfg), out, start,
               turn_reward, critic)


def extension_models(cfg: Config, accelerator, model, tokenizer) -> tuple:
    """(turn_reward, critic): the models an extension brings (extensions/), or None for the paper's run. MT-PPO's
    critic starts as a copy of the start model (its weights and optimizer then come from a resumed checkpoint)."""
    turn_reward = critic = None
    if cfg.turn_reward != "verifiable":
        from extensions import turn_rewards

        turn_reward = turn_rewards.build(cfg, model, tokenizer, accelerator.device)
    if cfg.method == "mt_ppo":
        from extensions import estimators

        critic = estimators.Critic(cfg, accelerator, cfg.model, cfg.bf16)
    return turn_reward, critic


def check_lora_targets(cfg: Config) -> None:
    """Every LoRA target names a linear layer of the model (infra/lora.check_targets), before any weight is read."""
    if cfg.lora_r:
        problem = lora.check_targets(cfg.model or data.embedded_model_dir(), cfg.lora_target_modules)
        if problem:
            raise ConfigError(problem)


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
    index = search.load_index(cfg.corpus or world["corpus"], k1=cfg.bm25_k1, b=cfg.bm25_b, stemmer=cfg.stemmer)
    return questions, index


# ------------------------------------------------------------------------------------------ SPEED (optional)
def speed_path(cfg: Config):
    """The fast package, or None: the reference path."""
    if not cfg.fast or importlib.util.find_spec("fast") is None:
        return None
    import fast

    return fast


def hf_sampler(cfg: Config, model, tokenizer, device: torch.device, seed: int | None) -> Sampler:
    """The transformers-side sampler: the speed path's cached sampler on a CPU; else policy.HFPolicy,
    transformers' generate (under bf16 autocast on CUDA: what bench/gpu_check.py measures)."""
    fast = speed_path(cfg)
    if fast is not None and device.type == "cpu":
        return fast.CachedPolicy(model, tokenizer, seed=seed, dtype=getattr(torch, cfg.sampler_dtype))
    return HFPolicy(model, tokenizer, seed=seed)


def fast_logprobs(cfg: Config):
    """(the update's shared-prefix log-probs, the warm start's log-probs): the speed path's, or (None,
    policy.token_logprobs). The packed attention of the shared-prefix forward cannot be recomputed by
    gradient checkpointing, so that takes the reference path."""
    fast = speed_path(cfg)
    if fast is None or cfg.gradient_checkpointing:
        return None, token_logprobs
    return fast.shared_prefix_logprobs, fast.common_head_logprobs


# ------------------------------------------------------------------------------------------ the rest
def make_sampler(cfg: Config, accelerator, model, tokenizer, questions, env_cfg, model_dir: str):
    """The sampler: on every process the transformers-side one (hf_sampler), or one vLLM engine driven by the
    main process."""
    if cfg.rollout_backend != "vllm":
        return hf_sampler(cfg, model, tokenizer, accelerator.device, sample_seed(cfg.seed, accelerator.process_index))
    from infra import vllm_backend

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
    """The temperature of the log-probs the sampler reports (the update's mismatch meter): vLLM's raw ones are at
    infra.vllm_backend.LOGPROB_TEMPERATURE; ours at the sampling temperature (None)."""
    if cfg.rollout_backend == "vllm":
        from infra import vllm_backend

        return vllm_backend.LOGPROB_TEMPERATURE
    return None


def prepare(cfg: Config, accelerator, model, rows: int, shared_prefix=None):
    """(logprobs, optimizer, scheduler) for train.update on ``rows`` rollouts per process: the optimizer and the
    forward that accelerate wraps (policy.LogProbs: DDP and DeepSpeed hook into the forward of what they wrap);
    ``model`` stays the plain policy, sharing its parameters, for sampling and saving. ``shared_prefix``: the
    speed path's faster log-probs (LogProbs uses it when a batch gives prompt lengths)."""
    # under LoRA only the adapter's parameters require gradients: the optimizer holds state for those alone
    optimizer = torch.optim.AdamW(lora.trainable(model), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    # the seed's schedule (TRL's constant_with_warmup): lr * s / warmup_steps at optimizer step s < warmup_steps, so
    # the first step is at lr 0, then lr; stepped once per optimizer step (mu per rollout batch). Not prepared by
    # accelerate: its wrapper would step the schedule once per process
    scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    # one optimizer step per pass over the rows, in micro-batches: accelerate syncs gradients (DeepSpeed
    # steps) every gradient_accumulation_steps backward calls, so that is the micro-batch count
    accelerator.gradient_accumulation_steps = math.ceil(rows / cfg.micro_batch)
    if is_deepspeed(accelerator):  # values DeepSpeed's config leaves "auto" and cannot infer without a DataLoader
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch
        ds_config["gradient_clipping"] = cfg.max_grad_norm  # DeepSpeed clips inside its own step
    logprobs, optimizer = accelerator.prepare(LogProbs(model, cfg.bf16, cfg.temperature, shared_prefix), optimizer)
    return logprobs, optimizer, scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
