"""MT-GRPO training, one straight loop (Zeng et al., arXiv 2505.11821).

    python train.py                                   # CPU default: SmolLM2-135M on the demo world
    python train.py --preset real                     # CPU demo on real TriviaQA + Wikipedia (../shared/data)
    python train.py --preset paper --print-recipe     # the seed's run, setting by setting
    python train.py --method grpo_mr --max-steps 50   # a baseline; every setting is a flag (config.py)
    python train.py --output-dir runs/x --resume      # continue a killed run exactly
    accelerate launch --config_file configs/cpu_2proc.yaml train.py ...   # several processes (configs/)

One step (``train_step``): G rollouts of each question (env.rollout) -> the six rewards (rewards.py) -> the
advantage of every token (advantages.py over mt_grpo.py) -> mu passes of the clipped loss (``update``) -> log.
Everything a run holds is built once by infra/assemble.py (``setup``).

Several processes (accelerate: DDP, DeepSpeed): process p samples and trains on its own rows of the global,
question-major batch (infra/launch.py), so a question's G rollouts may be split between processes. The
trajectories are gathered, every process scores the whole batch and normalises each group whole, then trains
on its own rows with every loss weight taken over the global batch: the update equals the 1-process one
(tests/test_distributed.py; ZeRO-3: tests/test_zero3.py). Only the main process logs and checkpoints.

Where this code differs from the paper and from the seed's code, and why: DEVIATIONS.md, one numbered list.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm import tqdm

import advantages
import data
import env
import mt_grpo
import rewards
from config import Config, ConfigError, parse_args, validate, with_output_dir
from infra.assemble import Run, setup
from infra.checkpoint import CheckpointError, save_checkpoint
from infra.tracking import Logger, format_line, peak_rss_gb
from policy import Batch, mismatch_sums, pack_batch, token_logprobs


# ------------------------------------------------------------------------------------------ the step
def train_step(cfg: Config, run: Run, step: int) -> tuple[dict, list, Batch]:
    """One MT-GRPO step: sample, score, advantages, update, log. Returns the metrics row, the trajectories and
    this process's rows as trained on (with the advantage of every token)."""
    t0 = time.time()
    episodes = [q for q in batch_questions(cfg, run.questions, step) for _ in range(cfg.G)]  # a question a rollout
    run.model.eval()
    with torch.no_grad():
        trajectories = sample_batch(cfg, run, episodes)                                         # 1. sample
    t_roll = time.time() - t0
    # every process scores the whole batch (cheap string checks) and normalises each group whole, so a group
    # whose rollouts were sampled by two processes is normalised exactly as in one process
    scores = rewards.compute([t.messages for t in trajectories], [q["aliases"] for q in episodes])   # 2. score
    levels = advantages.reward_levels(cfg, scores, trajectories, episodes, run.turn_reward)
    batch = pack_batch(trajectories[run.my_rows], run.tokenizer.pad_token_id, run.shared_prefix)  # my rows
    batch.A = advantages.token_advantages(cfg, levels, trajectories, batch, run.my_rows, run.critic)  # 3. credit
    run.model.train()
    t_update = time.time()
    row = update(cfg, run.logprobs, run.optimizer, run.scheduler, run.accelerator, batch, run.ref_model,  # 4. update
                 run.sampler_temperature)
    if run.critic is not None:  # HOOK: an estimator that brings a model of its own trains it here (MT-PPO's critic)
        row.update(run.critic.learn())
    seconds, t_update = time.time() - t0, time.time() - t_update
    stats = env.episode_stats(trajectories, [q["aliases"] for q in episodes])                       # 5. log
    return {"step": step + 1, **rewards.means(scores), **advantages.level_stats(cfg, levels), **row, **stats,
            "rollout_seconds": t_roll, "update_seconds": t_update, "step_seconds": seconds,
            "rollout_tokens_per_second": stats["model_tokens"] / t_roll,  # the model's own sampled tokens
            "tokens_per_second": sum(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories) / seconds,
            "peak_rss_gb": peak_rss_gb()}, trajectories, batch


def batch_questions(cfg: Config, questions: list[dict], step: int) -> list[dict]:
    """The question stream: a seeded permutation, reshuffled every epoch; step s reads a fixed slice."""
    per_step = cfg.batch_size // cfg.G
    epoch_len = len(questions) // per_step
    order = np.random.default_rng([cfg.seed, step // epoch_len]).permutation(len(questions))
    j = (step % epoch_len) * per_step
    return [questions[i] for i in order[j:j + per_step]]


def sample_batch(cfg: Config, run: Run, episodes: list[dict]):
    """The whole global batch's trajectories (``episodes``: a question row per rollout), in row order, on every
    process: each samples its own rows and gather_object joins them; with vLLM, the main process's engine does."""
    questions = [q["question"] for q in episodes]
    if cfg.rollout_backend == "vllm":
        from infra import vllm_backend
        return vllm_backend.sample_on_main(run, questions)
    with sampling_autocast(cfg, run.accelerator.device):
        return gather_object(env.rollout(run.sampler, run.tokenizer, questions[run.my_rows], 1, run.index, run.env_cfg))


def sampling_autocast(cfg: Config, device: torch.device):
    """The autocast HF sampling runs under: on CUDA the update's bf16 (flash-attn has no float32 kernel); on CPU
    none (the speed path's sampler has its own bf16 copy, and autocast would re-cast every weight every token)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


# ------------------------------------------------------------------------------------------ the update
def update(cfg: Config, logprobs, optimizer, scheduler, accelerator, batch: Batch, ref_model=None,
           sampler_temperature: float | None = None) -> dict:
    """mu passes of the clipped objective (mt_grpo.policy_loss) over this process's rows, an optimizer step a pass.
    A micro-batch's loss is weighted by its share of the *global* batch's model tokens (rollouts for "sequence", 1 /
    the global count of micro-batches for "micro_batch"): all processes' gradients add up to the whole batch's.
    Logs loss, clip fraction, KL, gradient norm, lr, each turn's mean advantage and the mismatch meter (the
    trainer's log-probs against ``batch.sampler_logp``, at ``sampler_temperature``; None: the sampling one)."""
    device = accelerator.device
    ids, attn, turn, A_tok = (x.to(device) for x in (batch.ids, batch.attn, batch.turn, batch.A))
    turn_t = turn[:, 1:]  # the turn of each predicted token, aligned with token_logprobs and A_tok
    mask = mt_grpo.loss_mask(turn_t)
    groups = None
    if batch.prompt_lens is not None:  # the speed path computes each distinct prompt of a micro-batch once
        from fast import prompt_groups
        groups = prompt_groups(ids, batch.prompt_lens)
    chunks = micro_batches(attn, cfg.micro_batch, groups, keep_order=cfg.aggregation == "micro_batch")
    assert len(chunks) % accelerator.gradient_accumulation_steps == 0, "prepare() was given another row count"
    # the weights' denominators count the whole global batch, over all processes
    counts = accelerator.reduce(torch.stack([mask.sum(), *torch.tensor([ids.shape[0], len(chunks)], device=device)]), "sum")
    n_tokens, n_rows, n_chunks = counts[0].clamp(min=1), int(counts[1]), int(counts[2])
    weight = {"token": lambda c: mask[c].sum() / n_tokens, "sequence": lambda c: len(c) / n_rows,
              "micro_batch": lambda c: 1 / n_chunks}[cfg.aggregation]
    # Distributed, in one line: DDP and DeepSpeed *average* the processes' gradients and accelerator.backward divides
    # by the accumulation steps; our weighted losses already *sum* to the global loss, so undo both.
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
            if p == 0 and batch.sampler_logp is not None:  # the meter: the weights the batch was sampled with
                T = sampler_temperature  # vLLM reports raw log-probs (T 1): one more forward at that temperature
                with torch.no_grad():
                    mine = old if T in (None, cfg.temperature) else logprobs(*cut[j], temperature=T)
                mismatch += mismatch_sums(mine, batch.sampler_logp[c, :n - 1].to(device), mask[c, :n - 1])
        norm = accelerator.clip_grad_norm_(logprobs.parameters(), cfg.max_grad_norm)  # DeepSpeed: its step's clip
        sums["grad_norm"] += (float("nan") if norm is None else float(norm)) / cfg.mu
        lr = scheduler.get_last_lr()[0]  # the rate this optimizer step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    stats, meter = global_stats(sums, mismatch, accelerator, cfg.beta > 0)
    return {**stats, "lr": lr, **turn_advantage_means(A_tok, turn_t, accelerator), **meter}


def micro_batches(attn: torch.Tensor, size: int, groups: torch.Tensor | None = None,
                  keep_order: bool = False) -> list[tuple[torch.Tensor, int]]:
    """(row indices, columns) of each micro-batch of ``size`` rows, cut to its longest row. The loss is a weighted
    sum over rows, so the grouping only orders the additions: longest first (padding is wasted compute), with the
    speed path's ``groups`` one prompt's rows first. ``keep_order``: the seed's consecutive rows ("micro_batch")."""
    order = (torch.arange(len(attn), device=attn.device) if keep_order
             else attn.sum(1).argsort(descending=True, stable=True))
    if groups is not None and not keep_order:  # by prompt, then longest first within it
        order = order[groups[order].argsort(stable=True)]
    return [(c, int(attn[c].sum(1).max())) for c in order.split(size)]


def global_stats(sums: dict, mismatch: torch.Tensor, accelerator, with_kl: bool) -> tuple[dict, dict]:
    """The processes' parts of the globally weighted loss, clip fraction, KL and mismatch sums, added up (the
    gradient norm is already global): the loss's stats and the meter's (none without sampler log-probs)."""
    keys = ["loss", "clip_frac"] + (["kl"] if with_kl else [])
    totals = accelerator.reduce(torch.cat([torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                                        device=accelerator.device), mismatch]), "sum").tolist()
    abs_sum, k3_sum, count = totals[-3:]
    meter = {"mismatch/abs_logp": abs_sum / count, "mismatch/kl": k3_sum / count} if count else {}
    return {**dict(zip(keys, totals)), "grad_norm": sums["grad_norm"]}, meter


def turn_advantage_means(A_tok: torch.Tensor, turn_t: torch.Tensor, accelerator) -> dict:
    """adv_mean/turn{k}: the mean advantage of turn k's tokens over the global batch (MT-GRPO's turn credit)."""
    K = int(accelerator.gather(turn_t.max().reshape(1)).max())  # the most turns any process's rows have
    sums = A_tok.new_zeros(K, 2)
    for k in range(1, K + 1):
        sums[k - 1] = torch.stack([A_tok[turn_t == k].sum(), (turn_t == k).sum().to(A_tok.dtype)])
    sums = accelerator.reduce(sums.double(), "sum")
    return {f"adv_mean/turn{k + 1}": (s / n).item() for k, (s, n) in enumerate(sums) if n > 0}


# ------------------------------------------------------------------------------------------ the loop
def train(cfg: Config):
    """Train; returns the run folder. ``train(Config())`` is the CPU default run."""
    cfg = with_output_dir(cfg)
    validate(cfg)
    run = setup(cfg)
    is_main = run.accelerator.is_main_process
    logger = Logger(cfg, run.out) if is_main else None  # only the main process logs
    bar = tqdm(range(run.start, cfg.max_steps), initial=run.start, total=cfg.max_steps, desc="MT-GRPO",
               dynamic_ncols=True, disable=not is_main)
    for step in bar:
        row, trajectories, batch = train_step(cfg, run, step)
        if is_main:
            logger.log(row)
            bar.write(format_line(row))
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                bar.write(sample_text(run.tokenizer, trajectories[0], batch.A[0], batch.turn[0, 1:]))
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:  # every process: saving is collective
            save_checkpoint(run.accelerator, run.out, run.logprobs, run.model, run.tokenizer, run.optimizer,
                            run.scheduler, step + 1, run.sampler, run.peft_model, cfg, run.critic)
    if logger is not None:
        logger.close()
    return run.out


def sample_text(tokenizer, traj, A_tok: torch.Tensor, turn: torch.Tensor) -> str:
    """The first rollout of the step, with the advantage its tokens of each turn got."""
    turns = ", ".join(f"turn{k}={A_tok[turn == k].mean():+.2f}" for k in sorted(set(turn.tolist()) - {0}))
    return f"--- sample (A {turns}) ---\n{tokenizer.decode(traj.completion_ids)}\n---"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, print_recipe = parse_args(argv, __doc__)
        if print_recipe:
            from tools import recipe

            print(recipe.table(cfg))
            return 0
        out = train(cfg)
    except (ConfigError, CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:  # once, not once per process
        print(f"done: {out}/metrics.jsonl, model in {out}/checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
