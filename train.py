"""MT-GRPO training, one straight loop (Zeng et al., arXiv 2505.11821).

    python train.py                                   # CPU default: SmolLM2-135M on the demo world
    python train.py --preset real                     # CPU demo on real TriviaQA + Wikipedia (../shared/data)
    python train.py --preset paper --print-recipe     # the seed's run, setting by setting
    python train.py --method grpo_mr --max-steps 50   # a baseline; every setting is a flag (config.py)
    python train.py --output-dir runs/x --resume      # continue a killed run exactly
    accelerate launch --config_file configs/cpu_2proc.yaml train.py ...   # several processes (configs/)

One step: sample questions -> G rollouts each (env.rollout) -> rewards (rewards.compute) -> per-turn
advantages (mt_grpo) -> mu passes of the clipped policy-gradient loss (mt_grpo.policy_loss) -> log ->
checkpoint. Read `train_step`, then `update`.

Several processes (accelerate: DDP, DeepSpeed). The global batch stays ``batch_size`` rollouts,
question-major; process p samples the contiguous rows [p*n, (p+1)*n), n = batch_size / processes,
so the G rollouts of one question may be split between processes. The trajectories are gathered,
every process scores the whole batch and normalises each group whole, then trains on its own rows with
every loss weight taken over the global batch: the update equals the 1-process one
(tests/test_distributed.py; ZeRO-3: tests/test_zero3.py). Only the main process logs and checkpoints.

Where this code differs from the paper and from the seed's code, and why: DEVIATIONS.md, one numbered list.
"""
from __future__ import annotations

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
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup

import data
import env
import estimators
import lora
import mt_grpo
import recipe
import rewards
import search
import turn_rewards
import warmstart
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint, truncate_metrics
from config import Config, ConfigError, env_config, is_deepspeed, is_zero3, parse_args, validate, validate_launch, \
    with_output_dir
from policy import LogProbs, load_policy, mismatch_sums, pack, pack_sampler_logprobs, token_logprobs
from tracking import Logger, ReportError, format_line, peak_rss_gb


# ------------------------------------------------------------------------------------------ SPEED (optional)
# The one place that chooses the speed path. fast/ computes what the reference path computes (env.HFPolicy's
# rollouts, policy.token_logprobs's log-probs) faster on a CPU, to floating-point rounding; tests/test_fast.py
# pins it to the reference. With --no-fast, or without the package, every step runs on the reference path.
def speed_path(cfg: Config):
    """The fast package, or None: the reference path."""
    if not cfg.fast or importlib.util.find_spec("fast") is None:
        return None
    import fast

    return fast


def hf_sampler(cfg: Config, model, tokenizer, device: torch.device, seed: int | None) -> env.Sampler:
    """The transformers-side sampler: the speed path's cached sampler on a CPU; else env.HFPolicy, transformers'
    generate (under bf16 autocast on CUDA: what bench/gpu_check.py measures)."""
    fast = speed_path(cfg)
    if fast is not None and device.type == "cpu":
        return fast.CachedPolicy(model, tokenizer, seed=seed, dtype=getattr(torch, cfg.sampler_dtype))
    return env.HFPolicy(model, tokenizer, seed=seed)


def fast_logprobs(cfg: Config):
    """(the update's shared-prefix log-probs, the warm start's log-probs): the speed path's, or (None,
    policy.token_logprobs). The packed attention of the shared-prefix forward cannot be recomputed by
    gradient checkpointing, so that takes the reference path."""
    fast = speed_path(cfg)
    if fast is None or cfg.gradient_checkpointing:
        return None, token_logprobs
    return fast.shared_prefix_logprobs, fast.common_head_logprobs


# ------------------------------------------------------------------------------------------ the step


def train_step(cfg: Config, run: Run, step: int) -> tuple[dict, list, torch.Tensor]:
    """One MT-GRPO step: sample, score, advantages, update. Returns the metrics row, the trajectories and A."""
    t0 = time.time()
    episodes = [q for q in batch_questions(cfg, run.questions, step) for _ in range(cfg.G)]  # a question per rollout
    run.model.eval()
    with torch.no_grad():
        trajectories = sample_batch(cfg, run, episodes)
    t_roll = time.time() - t0
    # every process scores the whole batch (cheap string checks) and normalises each group whole, so a
    # group whose rollouts were sampled by two processes is normalised exactly as in one process
    scores = rewards.compute([t.messages for t in trajectories], [q["aliases"] for q in episodes])
    levels = reward_levels(cfg, scores, trajectories, episodes)
    if cfg.turn_reward != "verifiable":  # R^T from a model instead of rewards.py (turn_rewards.py)
        levels.R_T = model_turn_rewards(cfg, run, trajectories, episodes)
    feats = None
    if cfg.method == "mt_ppo":  # MT-PPO's critic values each turn's start (estimators.ValueHead)
        feats = critic_features(cfg, run, trajectories)
        levels.values = run.critic(feats)
    A = advantages(cfg, levels)
    critic = fit_critic(cfg, run, levels, feats) if feats is not None else {}
    run.model.train()
    mine = trajectories[run.my_rows]  # ...and each trains on its own rows
    ids, attn, turn = pack(mine, run.tokenizer.pad_token_id)
    batch = Batch(ids, attn, turn, A[run.my_rows], sampler_logp=pack_sampler_logprobs(mine, ids.shape[1]),
                  prompt_lens=torch.tensor([len(t.prompt_ids) for t in mine]) if run.shared_prefix else None)
    update_start = time.time()
    upd = update(cfg, run.logprobs, run.optimizer, run.scheduler, run.accelerator, batch, run.ref_model,
                 sampler_logprob_temperature(cfg))
    seconds, t_update = time.time() - t0, time.time() - update_start
    stats = env.episode_stats(trajectories, [q["aliases"] for q in episodes])
    row = {"step": step + 1, **rewards.means(scores), **level_stats(cfg, levels), **upd, **critic,
           **stats, "rollout_seconds": t_roll, "update_seconds": t_update, "step_seconds": seconds,
           "rollout_tokens_per_second": stats["model_tokens"] / t_roll,  # the model's own sampled tokens
           "tokens_per_second": sum(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories) / seconds,
           "peak_rss_gb": peak_rss_gb()}
    return row, trajectories, A


def batch_questions(cfg: Config, questions: list[dict], step: int) -> list[dict]:
    """The question stream: a seeded permutation, reshuffled every epoch; step s reads a fixed slice."""
    per_step = cfg.batch_size // cfg.G
    epoch_len = len(questions) // per_step
    order = np.random.default_rng([cfg.seed, step // epoch_len]).permutation(len(questions))
    j = (step % epoch_len) * per_step
    return [questions[i] for i in order[j:j + per_step]]


def sample_batch(cfg: Config, run: Run, episodes: list[dict]):
    """The trajectories of the whole global batch (``episodes``: one question row per rollout, question-major),
    in row order, on every process."""
    questions = [q["question"] for q in episodes]
    if cfg.rollout_backend == "vllm":
        import vllm_backend

        # before every rollout, so the engine samples from the current policy (after --resume too); all
        # processes call it: under ZeRO-3 gathering each weight from its shards is a collective operation
        vllm_backend.sync_weights(run.sampler, run.model)
        trajectories = None
        if run.accelerator.is_main_process:
            trajectories = env.rollout(run.sampler, run.tokenizer, questions, 1, run.index, run.env_cfg)
            run.sampler.sleep()  # on a GPU in sleep mode: the engine's memory goes to the update until the next sync
        return broadcast_object_list([trajectories])[0]  # the main process's engine sampled all of them
    # hf: each process samples its own rows (one episode each: G = 1, the rows already repeat each question),
    # and gather_object concatenates the slices in process order
    with sampling_autocast(cfg, run.accelerator.device):
        trajectories = env.rollout(run.sampler, run.tokenizer, questions[run.my_rows], 1, run.index, run.env_cfg)
    return gather_object(trajectories)


# ------------------------------------------------------------------------------------------ rewards -> advantages


def reward_levels(cfg: Config, scores: dict[str, list[float]], trajectories, episodes: list[dict]) -> mt_grpo.Levels:
    """The batch's rewards by level (rewards.level_sums), as mt_grpo takes them. With --k-turn, R_T holds one
    turn-level reward per tool call (rewards.k_turn_levels: new evidence found) and ``turns`` each rollout's
    turns; it needs each rollout's question (``episodes``) for its aliases and support."""
    R_T, R_O = rewards.level_sums(scores)
    turns = None
    if cfg.k_turn:
        R_T, turns = rewards.k_turn_levels([t.messages for t in trajectories], [q["aliases"] for q in episodes],
                                           [q.get("support") for q in episodes], cfg.max_tool_calls)
    turn2 = None
    if cfg.method == "gigpo":  # its step groups before turn 2: the rollouts of a question that saw the same result
        turn2 = estimators.anchor_groups([t.results[0] if t.has_result else None for t in trajectories], cfg.G,
                                         cfg.gigpo_similarity)
    return mt_grpo.Levels(R_T=torch.tensor(R_T, dtype=torch.float32), R_O=torch.tensor(R_O, dtype=torch.float32),
                          has_result=torch.tensor([t.has_result for t in trajectories]),
                          turns=None if turns is None else torch.tensor(turns), turn2_groups=turn2)


def model_turn_rewards(cfg: Config, run: Run, trajectories, episodes: list[dict]) -> torch.Tensor:
    """R^T of turn 1 from a model: the policy's information gain on the gold answer (its first alias) or the
    judge's P(yes)."""
    if cfg.turn_reward == "info_gain":
        R = turn_rewards.info_gain(run.model, run.tokenizer, trajectories, [q["aliases"][0] for q in episodes],
                                   cfg.micro_batch)
    else:
        R = run.judge(trajectories, [q["question"] for q in episodes], cfg.micro_batch)
    return torch.tensor(R, dtype=torch.float32)


def critic_features(cfg: Config, run: Run, trajectories) -> torch.Tensor:
    """(N, 2, hidden): the policy's last hidden state at the start of each turn of every rollout (no grad)."""
    ids, attn, turn = pack(trajectories, run.tokenizer.pad_token_id)
    starts, dev, mb = estimators.turn_starts(turn), run.accelerator.device, cfg.micro_batch
    return torch.cat([run.critic.features(run.model, ids[i:i + mb].to(dev), attn[i:i + mb].to(dev), starts[i:i + mb])
                      for i in range(0, len(ids), mb)])


def fit_critic(cfg: Config, run: Run, levels: mt_grpo.Levels, feats: torch.Tensor) -> dict:
    """Refit MT-PPO's critic to this batch's GAE returns; logs its loss on the batch before the refit."""
    _, returns = estimators.mt_ppo_advantages(levels.R_T, levels.R_O, levels.values, levels.has_result,
                                              gamma=cfg.gamma, lam=cfg.gae_lam)
    present = torch.stack([torch.ones_like(levels.has_result), levels.has_result], 1).bool()
    return {"critic_loss": run.critic.fit(feats, returns, present)}


def advantages(cfg: Config, levels: mt_grpo.Levels) -> torch.Tensor:
    """Per-turn advantages of the batch, (N, 2): MT-GRPO's turn split (mt_grpo.turn_advantages), GiGPO's or
    MT-PPO's (estimators.py), or (N, max_tool_calls + 1) with --k-turn (mt_grpo.k_turn_advantages)."""
    if cfg.method == "gigpo":
        return estimators.gigpo_advantages(levels.R_T, levels.R_O, cfg.G, levels.turn2_groups, omega=cfg.omega,
                                           gamma=cfg.gamma)
    if cfg.method == "mt_ppo":
        return estimators.mt_ppo_advantages(levels.R_T, levels.R_O, levels.values, levels.has_result,
                                            gamma=cfg.gamma, lam=cfg.gae_lam)[0]
    if cfg.k_turn:
        return mt_grpo.k_turn_advantages(levels.R_T, levels.R_O, levels.turns, cfg.G, cfg.method, lam=cfg.lam,
                                         convention=cfg.convention, has_result=levels.has_result,
                                         normalise=cfg.k_turn_normalise)
    return mt_grpo.turn_advantages(levels.R_T, levels.R_O, cfg.G, cfg.method, lam=cfg.lam, convention=cfg.convention,
                                   has_result=levels.has_result)


def level_stats(cfg: Config, levels: mt_grpo.Levels) -> dict:
    """The logged means of R_T and R_O and the share of groups whose rewards do not vary (no signal)."""
    R_T = levels.R_T.sum(dim=1) if cfg.k_turn else levels.R_T
    return {"reward_turn": R_T.mean().item(), "reward_outcome": levels.R_O.mean().item(),
            **mt_grpo.collapse_stats(R_T, levels.R_O, cfg.G)}


# ------------------------------------------------------------------------------------------ the update


@dataclass
class Batch:
    """One process's rollouts as tensors (policy.pack): what ``update`` trains on."""
    ids: torch.Tensor                         # (N, L) prompt + completion ids, right-padded
    attn: torch.Tensor                        # (N, L) 1 on real ids
    turn: torch.Tensor                        # (N, L) 0 on prompt, environment and padding ids, k on model turn k
    A: torch.Tensor                           # (N, K) per-turn advantages
    sampler_logp: torch.Tensor | None = None  # (N, L-1) the sampler's log-prob of each id (the mismatch meter)
    prompt_lens: torch.Tensor | None = None   # (N,) each row's prompt length: the speed path computes each prompt once


def update(cfg: Config, logprobs, optimizer, scheduler, accelerator, batch: Batch, ref_model=None,
           sampler_temperature: float | None = None) -> dict:
    """mu passes of the clipped objective (mt_grpo.policy_loss) over this process's rollouts, one optimizer
    step per pass (and one step of the learning-rate schedule). ``logprobs``, ``optimizer``, ``scheduler``
    come from ``prepare``. Each micro-batch's loss is weighted by its share of the *global* batch's model
    tokens (or rollouts, for aggregation "sequence"; or 1 / the global number of micro-batches, for
    "micro_batch"), so the gradients of all micro-batches of all processes add up to exactly the loss of the
    whole batch.

    With mu 1 (the CPU default) there is no clipping: logp_old is logp itself, detached, so the ratio is 1 and
    the loss is the plain policy gradient; with mu > 1 the first pass's ratio is 1 and the later ones can clip.

    Logged: loss, clip fraction and KL averaged over the mu passes, each pass's gradient norm averaged, the
    learning rate of the last pass, the mean token advantage of each turn, and the mismatch meter: the
    trainer's log-probs against ``batch.sampler_logp``, the sampler's, which are taken at
    ``sampler_temperature`` (None: the sampling temperature, as the trainer's are)."""
    device = accelerator.device
    ids, attn, turn, A = (x.to(device) for x in (batch.ids, batch.attn, batch.turn, batch.A))
    turn_t = turn[:, 1:]  # the turn of each predicted token, aligned with token_logprobs
    A_tok, mask = mt_grpo.token_advantages(A, turn_t)
    groups = None
    if batch.prompt_lens is not None:  # the speed path computes each distinct prompt of a micro-batch once
        from fast import prompt_groups

        groups = prompt_groups(ids, batch.prompt_lens)
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
    with torch.no_grad():
        cut = [(ids[c, :n], attn[c, :n], turn[c, :n]) + (() if batch.prompt_lens is None else (batch.prompt_lens[c],))
               for c, n in chunks]  # model inputs, per micro-batch
        logp_old = [logprobs(*x) for x in cut] if cfg.mu > 1 else None
        logp_ref = [token_logprobs(ref_model, *x[:3], cfg.bf16, temperature=cfg.temperature)
                    for x in cut] if cfg.beta > 0 else None
    sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "grad_norm": 0.0}
    mismatch = torch.zeros(3, dtype=torch.float64, device=device)
    for p in range(cfg.mu):
        for j, (c, n) in enumerate(chunks):
            with accelerator.accumulate(logprobs):
                logp = logprobs(*cut[j])  # (rows, n-1), aligned with the first n-1 columns of turn_t and A_tok
                old = logp.detach() if logp_old is None else logp_old[j]
                loss, s = mt_grpo.policy_loss(logp, old, None if logp_ref is None else logp_ref[j], A_tok[c, :n - 1],
                                              turn_t[c, :n - 1], eps=cfg.eps, beta=cfg.beta, aggregation=cfg.aggregation)
                w = weight(c)
                accelerator.backward(loss * w * scale)
            sums["loss"] += float(loss.detach() * w) / cfg.mu
            sums["clip_frac"] += s["clip_frac"] * float(w) / cfg.mu
            sums["kl"] += s.get("kl", 0.0) * float(w) / cfg.mu
            if p == 0 and batch.sampler_logp is not None:  # the weights the batch was sampled with
                mismatch += mismatch_sums(meter_logprobs(logprobs, cut[j], old, cfg, sampler_temperature),
                                          batch.sampler_logp[c, :n - 1].to(device), mask[c, :n - 1])
        # the norm of the summed gradient (under DeepSpeed: the one its step clipped, from its config)
        norm = accelerator.clip_grad_norm_(logprobs.parameters(), cfg.max_grad_norm)
        sums["grad_norm"] += (float("nan") if norm is None else float(norm)) / cfg.mu
        lr = scheduler.get_last_lr()[0]  # the rate this optimizer step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {**global_stats(sums, accelerator, cfg.beta > 0), "lr": lr, **turn_advantage_means(A_tok, turn_t, accelerator),
            **mismatch_stats(mismatch, accelerator)}


def micro_batches(attn: torch.Tensor, size: int, groups: torch.Tensor | None = None,
                  keep_order: bool = False) -> list[tuple[torch.Tensor, int]]:
    """(row indices, columns) of each micro-batch of ``size`` rows, each cut to its own longest row.

    Under aggregation "token" or "sequence" the loss is a weighted sum over rows, so which rows share a
    micro-batch changes only the order of the additions: rows of similar length go together (a short row
    padded to the batch's longest is compute for nothing: -15% on a SmolLM2 update, bench/bench_padding.py),
    and with ``groups`` (the speed path's fast.prompt_groups) the rows of one prompt first, so that a
    micro-batch holds as few distinct prompts as possible to compute. ``keep_order``: consecutive rows, as
    the seed's micro-batches are (under aggregation "micro_batch" the grouping changes the loss). Rows are
    right-padded."""
    order = torch.arange(attn.shape[0], device=attn.device)
    if not keep_order:
        order = attn.sum(1).argsort(descending=True, stable=True)
        if groups is not None:  # by prompt, then longest first within it
            order = order[groups[order].argsort(stable=True)]
    chunks = [order[i:i + size] for i in range(0, attn.shape[0], size)]
    return [(c, int(attn[c].sum(1).max())) for c in chunks]


def meter_logprobs(logprobs, inputs: tuple, own: torch.Tensor, cfg: Config, sampler_temperature: float | None):
    """The trainer's log-probs to compare with the sampler's: ``own`` (at the sampling temperature), or for a
    sampler that reports them at another temperature (vLLM's raw ones) one more forward at that one."""
    if sampler_temperature is None or sampler_temperature == cfg.temperature:
        return own
    with torch.no_grad():
        return logprobs(*inputs, temperature=sampler_temperature)


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


def prepare(cfg: Config, accelerator, model, rows: int, shared_prefix=None):
    """(logprobs, optimizer, scheduler) for ``update`` on ``rows`` rollouts per process: the optimizer and the
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


# ------------------------------------------------------------------------------------------ setup


@dataclass
class Run:
    """Everything one training run holds, built once by ``setup``."""
    accelerator: Accelerator
    model: torch.nn.Module      # the plain policy: sampling, saving (under LoRA: with the LoRA layers injected)
    peft_model: object          # under LoRA the PeftModel around ``model`` (it saves the adapter); else None
    logprobs: torch.nn.Module   # the accelerate-prepared policy.LogProbs: the update's forward
    ref_model: torch.nn.Module | None
    tokenizer: object
    sampler: object             # env.Sampler: env.HFPolicy, fast.CachedPolicy, vllm_backend.VLLMPolicy, or None
                                # (vLLM, not the main process)
    optimizer: object
    scheduler: object
    questions: list[dict]
    index: object
    env_cfg: env.EnvConfig
    my_rows: slice              # this process's rows of the global batch
    shared_prefix: bool         # the update computes each prompt once (the speed path)
    out: Path
    start: int                  # steps already done (--resume)
    critic: estimators.ValueHead | None = None  # --method mt_ppo
    judge: turn_rewards.Judge | None = None     # --turn-reward judge


def setup(cfg: Config) -> Run:
    # before the model is loaded: under ZeRO-3 (zero3_init_flag) from_pretrained loads it already sharded
    accelerator = make_accelerator(cfg)
    validate_launch(cfg, accelerator)
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
    sampler = make_sampler(cfg, accelerator, model, tokenizer, questions, env_cfg,
                           str(start_path or data.embedded_model_dir()))
    shared_prefix, warmstart_logprobs = fast_logprobs(cfg)
    if not cfg.resume and cfg.warmstart_steps > 0:
        # every process runs the same warm start; DDP then starts from the main process's weights anyway.
        # Under LoRA it trains the adapter only, so start model + adapter is still the whole policy (--resume)
        ws = warmstart.run(model, tokenizer, index, questions, env_cfg, steps=cfg.warmstart_steps,
                           lr=cfg.warmstart_lr, seed=cfg.seed, bf16=cfg.bf16, micro_batch=cfg.micro_batch,
                           logprobs=warmstart_logprobs)
        if is_main:
            print(f"warm start: {cfg.warmstart_steps} supervised steps on {ws['demonstrations']} demonstrations, "
                  f"loss {ws['first_loss']:.3f} -> {ws['last_loss']:.3f}, peak memory so far {peak_rss_gb():.2f} GB")
    my_rows = process_rows(cfg.batch_size, accelerator.num_processes, accelerator.process_index)
    logprobs, optimizer, scheduler = prepare(cfg, accelerator, model, my_rows.stop - my_rows.start, shared_prefix)
    critic = (estimators.ValueHead(model.config.hidden_size, cfg.critic_ridge, cfg.critic_window)
              if cfg.method == "mt_ppo" else None)
    judge = turn_rewards.Judge(cfg.judge_model, accelerator.device) if cfg.turn_reward == "judge" else None
    start = 0
    if cfg.resume:
        start = load_checkpoint(accelerator, out, optimizer, scheduler, sampler, critic)
        if is_main:
            truncate_metrics(out / "metrics.jsonl", start)
            print(f"resumed from {out}/checkpoint at step {start}")
    return Run(accelerator, model, peft_model, logprobs, ref_model, tokenizer, sampler, optimizer, scheduler, questions,
               index, env_cfg, my_rows, shared_prefix is not None, out, start, critic, judge)


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


def make_sampler(cfg: Config, accelerator, model, tokenizer, questions, env_cfg, model_dir: str):
    """The sampler: on every process the transformers-side one (hf_sampler), or one vLLM engine driven by the
    main process."""
    if cfg.rollout_backend != "vllm":
        return hf_sampler(cfg, model, tokenizer, accelerator.device, sample_seed(cfg.seed, accelerator.process_index))
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
    """Each process's sampling stream (a sampler seeds each call from it). Process 0 keeps ``seed``, so a
    1-process run samples exactly as before; the others are a large prime apart, far beyond any call count."""
    return seed + 1_000_003 * process_index


# ------------------------------------------------------------------------------------------ the loop


def train(cfg: Config) -> Path:
    """Train; returns the run folder. ``train(Config())`` is the CPU default run."""
    cfg = with_output_dir(cfg)
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
            save_checkpoint(run.accelerator, run.out, run.logprobs, run.model, run.tokenizer, run.optimizer,
                            run.scheduler, step + 1, run.sampler, run.peft_model,
                            {"start_model": cfg.model, "lora": lora.describe(cfg)} if cfg.lora_r else None, run.critic)
    if logger is not None:
        logger.close()
    return run.out


def sample_text(tokenizer, traj, A) -> str:
    turns = ", ".join(f"turn{k + 1}={a:+.2f}" for k, a in enumerate(A.tolist()))
    return f"--- sample (A {turns}) ---\n{tokenizer.decode(traj.completion_ids)}\n---"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, print_recipe = parse_args(argv, __doc__)
        if print_recipe:
            print(recipe.table(cfg))
            return 0
        out = train(cfg)
    except (ConfigError, CheckpointError, ReportError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:  # once, not once per process
        print(f"done: {out}/metrics.jsonl, model in {out}/checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
