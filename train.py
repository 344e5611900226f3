"""MT-GRPO training, one straight loop (Zeng et al., arXiv 2505.11821).

    python train.py                                   # CPU default: SmolLM2-135M on the demo world
    python train.py --preset real                     # CPU demo on real TriviaQA + Wikipedia (../shared/data)
    python train.py --method grpo_mr --max-steps 50   # a baseline; every Config field is a flag
    python train.py --output-dir runs/x --resume      # continue a killed run exactly

One step: sample questions -> G rollouts each (env.py) -> rewards (rewards.py) -> per-turn
advantages (mt_grpo.py) -> mu passes of clipped policy-gradient updates -> log -> checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import env
import mt_grpo
import rewards
import search
import warmstart
from policy import load_policy, pack, token_logprobs


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


# ------------------------------------------------------------------------------------------ the math glue


def advantages(cfg: Config, scores: dict[str, list[float]], trajectories) -> tuple[torch.Tensor, dict]:
    R_T, R_O = (torch.tensor(r, dtype=torch.float32) for r in rewards.reward_levels(scores))
    has_result = torch.tensor([t.has_result for t in trajectories])
    A = mt_grpo.turn_advantages(R_T, R_O, cfg.G, cfg.method, lam=cfg.lam, convention=cfg.convention,
                                has_result=has_result)
    return A, {"reward_turn": R_T.mean().item(), "reward_outcome": R_O.mean().item(),
               **mt_grpo.collapse_stats(R_T, R_O, cfg.G)}


def update(cfg: Config, model, ref_model, optimizer, scheduler, ids, attn, turn, A) -> dict:
    """mu passes of the clipped objective over the batch, in micro-batches whose gradients add up to
    exactly the full-batch loss (each micro-batch loss is weighted by its share of model tokens)."""
    turn_t = turn[:, 1:]  # the turn of each predicted token, aligned with token_logprobs
    A_tok, mask = mt_grpo.token_advantages(A, turn_t)
    n_total = mask.sum().clamp(min=1)
    chunks = [slice(i, i + cfg.micro_batch) for i in range(0, ids.shape[0], cfg.micro_batch)]
    with torch.no_grad():
        logp_old = torch.cat([token_logprobs(model, ids[c], attn[c], turn[c], cfg.bf16) for c in chunks]) if cfg.mu > 1 else None
        logp_ref = torch.cat([token_logprobs(ref_model, ids[c], attn[c], turn[c], cfg.bf16) for c in chunks]) if cfg.beta > 0 else None
    stats = {}
    for _ in range(cfg.mu):
        agg = {}
        for c in chunks:
            logp = token_logprobs(model, ids[c], attn[c], turn[c], cfg.bf16)
            old = logp.detach() if logp_old is None else logp_old[c]
            ref = None if logp_ref is None else logp_ref[c]
            loss, s = mt_grpo.policy_loss(logp, old, ref, A_tok[c], turn_t[c], eps=cfg.eps, beta=cfg.beta,
                                          aggregation=cfg.aggregation)
            w = (mask[c].sum() / n_total) if cfg.aggregation == "token" else (ids[c].shape[0] / ids.shape[0])
            (loss * w).backward()
            agg["loss"] = agg.get("loss", 0.0) + (loss * w).item()
            for k in ("clip_frac", "kl"):
                if k in s:
                    agg[k] = agg.get(k, 0.0) + s[k] * float(w)
        agg["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = agg
    scheduler.step()
    return stats


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(out: Path, model, tokenizer, optimizer, scheduler, step: int, policy) -> None:
    """Model (save_pretrained: loadable by transformers and vLLM) + everything --resume needs,
    written to a temporary folder and renamed, so a kill mid-save leaves the last good checkpoint."""
    tmp = out / ".checkpoint-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                        "policy_calls": policy.calls}}, tmp / "state.pt")
    old = out / ".checkpoint-old"
    shutil.rmtree(old, ignore_errors=True)
    if (out / "checkpoint").exists():
        os.replace(out / "checkpoint", old)
    os.replace(tmp, out / "checkpoint")
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, optimizer, scheduler, policy) -> int:
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    policy.calls = state["rng"]["policy_calls"]  # HFPolicy seeds each generate call from (seed, calls)
    return state["step"]


def truncate_metrics(path: Path, done: int) -> None:
    """Keep the lines of the ``done`` steps the checkpoint holds (rows count steps from 1): the steps
    after it are redone and logged again, so each step appears exactly once."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= done]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)  # atomic: a kill here leaves the old file or the new one


class Logger:
    def __init__(self, cfg: Config, out: Path):
        self.path, self.backend = out / "metrics.jsonl", None
        if cfg.report_to == "wandb":
            import wandb

            self.backend = wandb.init(project="mt-grpo", config=dataclasses.asdict(cfg), dir=str(out))
        elif cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(str(out / "tensorboard"))

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if hasattr(self.backend, "log"):
            self.backend.log(row, step=row["step"])
        elif self.backend is not None:
            for k, v in row.items():
                self.backend.add_scalar(k, v, row["step"])


def format_line(row: dict) -> str:
    keys = ["tool_execution", "search_answer", "exact_match", "answer_presence", "format", "xml",
            "reward_turn", "reward_outcome", "tool_call_rate", "zero_var_share/outcome", "clip_frac", "step_seconds"]
    short = {"tool_execution": "tool", "search_answer": "srch", "exact_match": "em", "answer_presence": "pres",
             "reward_turn": "R_T", "reward_outcome": "R_O", "tool_call_rate": "calls",
             "zero_var_share/outcome": "flat_O", "clip_frac": "clip", "step_seconds": "s"}
    return f"step {row['step']:>3} " + " ".join(f"{short.get(k, k)}={row[k]:.3f}" for k in keys if k in row)


# ------------------------------------------------------------------------------------------ the loop


def train(cfg: Config) -> Path:
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    questions, index = load_task(cfg)
    out = Path(cfg.output_dir)
    # on --resume the policy comes straight from the checkpoint (loading the start model first would
    # read a 7B model twice); the reference model is always the starting policy
    model, tokenizer = load_policy(out / "checkpoint" if cfg.resume else cfg.model, cfg.gradient_checkpointing)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    ref_model = load_policy(cfg.model)[0].eval().requires_grad_(False) if cfg.beta > 0 else None
    policy = env.HFPolicy(model, tokenizer, seed=cfg.seed)
    env_cfg = env_config(cfg)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    start = 0
    if cfg.resume:
        start = load_checkpoint(out, optimizer, scheduler, policy)
        truncate_metrics(out / "metrics.jsonl", start)
        print(f"resumed from {out}/checkpoint at step {start}")
    elif cfg.warmstart_steps > 0:
        ws = warmstart.run(model, tokenizer, index, questions, env_cfg, steps=cfg.warmstart_steps,
                           lr=cfg.warmstart_lr, seed=cfg.seed, bf16=cfg.bf16, micro_batch=cfg.micro_batch)
        print(f"warm start: {cfg.warmstart_steps} supervised steps on {ws['demonstrations']} demonstrations, "
              f"loss {ws['first_loss']:.3f} -> {ws['last_loss']:.3f}, peak memory so far {peak_rss_gb():.2f} GB")
    logger = Logger(cfg, out)

    # the question stream: a seeded permutation, reshuffled every epoch; step s reads a fixed slice
    per_step = cfg.batch_size // cfg.G
    def batch_questions(step: int) -> list[dict]:
        epoch_len = len(questions) // per_step
        order = np.random.default_rng([cfg.seed, step // epoch_len]).permutation(len(questions))
        j = (step % epoch_len) * per_step
        return [questions[i] for i in order[j:j + per_step]]

    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="MT-GRPO", dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        batch = batch_questions(step)
        model.eval()
        with torch.no_grad():  # fp32 sampling: on CPU, bf16 autocast makes one-token decode steps slower
            trajectories = env.rollout(policy, tokenizer, [q["question"] for q in batch], cfg.G, index, env_cfg)
        t_roll = time.time() - t0
        aliases = [q["aliases"] for q in batch for _ in range(cfg.G)]
        scores = rewards.compute([t.messages for t in trajectories], aliases)
        A, level_stats = advantages(cfg, scores, trajectories)

        model.train()
        ids, attn, turn = pack(trajectories, tokenizer.pad_token_id)
        upd = update(cfg, model, ref_model, optimizer, scheduler, ids, attn, turn, A)

        row = {"step": step + 1, **rewards.means(scores), **level_stats, **upd,
               "tool_call_rate": float(np.mean([any(c is not None for c in t.tool_calls) for t in trajectories])),
               "truncated": float(np.mean([t.truncated for t in trajectories])),
               "completion_tokens": float(np.mean([len(t.completion_ids) for t in trajectories])),
               "rollout_seconds": t_roll, "step_seconds": time.time() - t0,
               "tokens_per_second": float(attn.sum() / (time.time() - t0)), "model_tokens": int((turn > 0).sum()),
               "lr": scheduler.get_last_lr()[0], "peak_rss_gb": peak_rss_gb()}
        logger.log(row)
        bar.write(format_line(row))
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            bar.write(sample_text(tokenizer, trajectories[0], A[0]))
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(out, model, tokenizer, optimizer, scheduler, step + 1, policy)
    return out


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sample_text(tokenizer, traj, A) -> str:
    return f"--- sample (A turn1={A[0]:+.2f}, turn2={A[1]:+.2f}) ---\n{tokenizer.decode(traj.completion_ids)}\n---"


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
    except (ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {out}/metrics.jsonl, model in {out}/checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
