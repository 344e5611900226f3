"""Seconds per training step, our loop vs TRL's GRPOTrainer, and our update's share of matmul peak.

    python bench/bench_step.py                      # both parts: ~2.5 minutes on an idle 2-core CPU
    python bench/bench_step.py --steps 5 --no-bf16  # longer; everything in fp32
    python bench/bench_step.py --skip-135m --profile

(The micro-batch layout A/B that train.micro_batches came from is bench/bench_padding.py.)

Part 1: seconds per step, ours vs TRL
-------------------------------------
Both sides load the *same folder*: a random-initialised Llama (SmolLM2's shape in small: GQA,
tied embeddings, the 49,152-token SmolLM2 vocabulary; ~28M parameters by default) saved with
``save_pretrained`` next to the SmolLM2 tokenizer. Both run in this one process, on the same torch
threads, on the same questions of the demo world in the same order, with the same prompt ids (the
system prompt + question through the chat template; the script checks that TRL's tokenisation
gives identical ids), batch (``--batch-size`` rollouts per optimizer step, ``--G`` per question,
``--micro-batch`` rows per forward/backward), mu = num_iterations = 1, beta = 0 (no reference
model), eps 0.2, token-level loss aggregation (ours: ``token``; TRL: ``dapo``), AdamW
(betas 0.9/0.99, weight decay 0, same lr), gradient clipping at 0.1, no gradient checkpointing,
sampling at temperature 1 with no top-k/top-p, and the same dtype policy switch (``--bf16``,
default on, as in ``config.Config``): our update runs under bf16 autocast, TRL gets ``bf16=True``
(accelerate's CPU autocast). The weights stay fp32 on both sides. Sampling: ours is train.py's default
sampler (fast.CachedPolicy: a bf16 copy of the weights, each prompt's KV cache computed once for its
G rollouts, turn 2 continuing turn 1's cache); the script reports whether TRL's ``generate`` ran under
autocast (it probes the first decoder layer).

Matched lengths. A random model never writes a tool call or an answer, so the episode never
reaches the search tool. We size our ``EnvConfig`` so that every episode is exactly two model
turns of ``--turn-tokens`` sampled tokens with the environment's reply (the format reminder, ~40
tokens of chat markers and text) in between: ``max_completion_tokens = 2T + reply + close``. TRL
generates one completion of ``max_completion_length = 2T`` tokens, forced to full length with
``generation_kwargs={"min_new_tokens": 2T}`` (a random model almost never samples an end token
anyway; ours cannot be forced without editing env.py, so the script prints the sampled-token count
of each side). So both sides sample the same number of model tokens per rollout from the same
prompt length. What is *not* matched, on purpose, because it is what a multi-turn loop costs: our
rollout makes two sampler calls (the second forwards the environment's reply before it samples),
our packed rows are longer by the reply and the closing markers, and we check stop
strings while sampling; TRL's single-turn completion has none of that. Rewards: ours are the six
MT-GRPO rewards through ``advantages.py``; TRL's reward function calls the same six on its
completion text and returns R^T + R^O.

Our step calls the real pieces of train.py: ``env.rollout`` (CachedPolicy) -> ``rewards.compute`` ->
``advantages.py`` -> ``policy.pack_batch`` -> ``train.update`` (its one-process path, with the prompt
lengths, so its forward computes each question's prompt once: fast.shared_prefix_logprobs). TRL's step is
one optimizer step of ``trainer.train()`` (generation + scoring + ``batch/micro`` forward/backward
passes + AdamW), timed from the end of the previous step by a callback; its generation+scoring
share is timed by wrapping ``_generate_and_score_completions``. The two sides take turns step by
step: TRL's ``on_step_end`` callback runs our step with the same questions, off TRL's clock; so
both meet the same background load, which on a shared machine moves more between minutes than
between two adjacent steps. Each side's first ``--warmup`` steps are dropped; the figures are the
means of the next ``--steps``. Ratio TRL/ours >= 1 means ours is not slower.

Part 2: our update's FLOP/s as a share of this machine's matmul peak
--------------------------------------------------------------------
Peak: the best FLOP/s of ``torch.matmul`` on square matrices (1024, 2048, 3072) in bf16 (what the
update's Linear layers run under CPU autocast; fp32 with ``--no-bf16``), 2 n^3 FLOPs per product,
best of several short runs, measured before and after the updates (a busy machine only slows a
run down, so the best short run is the closest to the machine's own figure). fp32 is printed for
reference.

FLOPs of one ``train.update`` (mu = 1, beta = 0: one forward and one backward per micro-batch;
the backward costs twice the forward), summed over its micro-batches (``train.micro_batches``:
rows grouped by length, each micro-batch of N rows cut to its longest row, L), with
P = the parameters of the decoder layers (all but the embedding), n_layer layers, d_attn = heads x
head_dim, V the vocabulary, d the hidden size and S the number of positions whose log-prob is
computed (the model's own tokens: ``policy.token_logprobs`` runs the vocabulary projection on
those rows alone):

    FLOPs = sum over micro-batches of
            6 P N L                         dense matmuls, every position of every padded row
          + 12 n_layer d_attn L^2 N         attention scores and values, the full L x L square
                                            (PaLM's convention; with padded rows transformers
                                            passes a mask, and the kernel computes the square)
          + 6 V d S                         the vocabulary projection, forward and backward
                                            (S summed over the whole batch)

tests/test_bench_step.py checks this count against torch's FlopCounterMode (within 1%).
Achieved FLOP/s = FLOPs / measured seconds of ``train.update`` (optimizer step and clipping
included). Reported for this benchmark's tiny model (from part 1's batches) and for the real
SmolLM2-135M on a batch like the CPU default's (16 rows of ~170 prompt + up to 256 completion
tokens: two 64-token turns and an environment reply; ids are random, which does not change the
work), micro-batch 4. "useful" recounts the dense term on real tokens only (padding excluded).
``--profile`` prints where one SmolLM2 update spends its time (torch.profiler, self CPU time).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from common import (NullSearcher, demo_questions, mean, model_tokens, quiet_transformers,  # first: the repo root
                   save_random_llama, set_threads, synthetic_batch)
import advantages
import config
import env
import rewards
import train
from config import EnvConfig
from infra import assemble
from policy import Batch, load_policy, pack_batch

# ------------------------------------------------------------------------------------------ the work both sides do


def episode_config(tok, turn_tokens: int) -> EnvConfig:
    """Exactly two model turns of ``turn_tokens`` with the environment's reply between them: after
    turn 2 the budget is used up (the episode ends truncated and closed)."""
    m = env._markers(tok)  # the chat template's role markers, as env.py appends them
    reply = len(m.close) + len(m.user_open) + len(env._encode(tok, env.NO_TOOL_REPLY, plain=True)) + len(m.model_open)
    return EnvConfig(max_turn_tokens=turn_tokens, max_completion_tokens=2 * turn_tokens + reply + len(m.close),
                         few_shot=False, temperature=1.0, top_k=0)


def step_batches(n_steps: int, per_step: int) -> list[list[dict]]:
    """The questions of each step (demo world, eval split), the same for both sides."""
    rows = demo_questions(n_steps * per_step)
    return [rows[i * per_step:(i + 1) * per_step] for i in range(n_steps)]


def train_config(args) -> config.Config:
    return config.Config(G=args.G, batch_size=args.batch_size, micro_batch=args.micro_batch, bf16=args.bf16,
                        mu=1, beta=0.0, warmstart_steps=0, temperature=1.0, top_k=0)


# ------------------------------------------------------------------------------------------ our side


class OurLoop:
    """train.py's loop, one step per call, timed in three parts: env.rollout -> rewards.compute ->
    advantages.py -> policy.pack_batch -> train.update."""

    def __init__(self, folder: Path, args, env_cfg):
        self.cfg, self.env_cfg = train_config(args), env_cfg
        self.model, self.tok = load_policy(str(folder))
        # the sampler and the update train.py makes by default on a CPU (its speed path): prefix-shared KV caches on
        # a bf16 copy, and each prompt computed once in the update
        self.policy = assemble.hf_sampler(self.cfg, self.model, self.tok, torch.device("cpu"), seed=0)
        self.accelerator = Accelerator(cpu=True)
        self.trainer, self.optimizer, self.scheduler = assemble.prepare(self.cfg, self.accelerator, self.model,
                                                                     self.cfg.batch_size, assemble.fast_logprobs(self.cfg)[0])

    def step(self, batch: list[dict]) -> dict:
        cfg, model, tok = self.cfg, self.model, self.tok
        t0, calls = time.perf_counter(), self.policy.calls
        model.eval()
        with torch.no_grad():
            trajs = env.rollout(self.policy, tok, [q["question"] for q in batch], cfg.G, NullSearcher(), self.env_cfg)
        t1 = time.perf_counter()
        scores = rewards.compute([t.messages for t in trajs], [q["aliases"] for q in batch for _ in range(cfg.G)])
        levels = advantages.reward_levels(cfg, scores, trajs, [q for q in batch for _ in range(cfg.G)])
        model.train()
        step_batch = pack_batch(trajs, tok.pad_token_id, prompt_lens=True)
        step_batch.A = advantages.token_advantages(cfg, levels, trajs, step_batch, slice(None))
        t2 = time.perf_counter()
        train.update(cfg, self.trainer, self.optimizer, self.scheduler, self.accelerator, step_batch)  # shared-prefix
        t3 = time.perf_counter()
        n = len(trajs)
        return {"rollout": t1 - t0, "score": t2 - t1, "update": t3 - t2, "step": t3 - t0,
                "calls": self.policy.calls - calls, "sampled": model_tokens(trajs) / n,
                "prompt": sum(len(t.prompt_ids) for t in trajs) / n, "shape": tuple(step_batch.ids.shape),
                "flops": update_flops(model, step_batch.attn, step_batch.turn, cfg.micro_batch)}


# ------------------------------------------------------------------------------------------ TRL's side


def trl_dataset(tok, batches):
    from datasets import Dataset

    prompts = []
    for q in (q for b in batches for q in b):
        chat = env.prompt_messages(q["question"], EnvConfig(few_shot=False))
        prompts.append({"prompt": tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                        "aliases": q["aliases"]})
        ours = env.build_prompt(tok, q["question"], EnvConfig(few_shot=False))
        if tok(prompts[-1]["prompt"])["input_ids"] != ours:
            raise SystemExit("TRL would tokenise the prompt differently from env.build_prompt")
    return Dataset.from_list(prompts)


def trl_reward(completions, aliases, **_):
    """The same six rewards as ours, on TRL's one-message completion: R^T + R^O per completion."""
    scores = rewards.compute([[{"role": "assistant", "content": c}] for c in completions], aliases)
    return [t + o for t, o in zip(*rewards.level_sums(scores))]


def trl_config(args, out_dir: str, n_steps: int):
    from trl import GRPOConfig

    cfg, n = train_config(args), 2 * args.turn_tokens
    return GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=args.bf16, seed=0, max_steps=n_steps, report_to="none",
        save_strategy="no", logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=cfg.micro_batch, gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch,
        num_generations=cfg.G, max_completion_length=n, generation_kwargs={"min_new_tokens": n},
        temperature=cfg.temperature, top_p=1.0, top_k=0, repetition_penalty=1.0,
        use_vllm=False, shuffle_dataset=False, gradient_checkpointing=False, model_init_kwargs={"dtype": "float32"},
        beta=cfg.beta, num_iterations=cfg.mu, epsilon=cfg.eps, loss_type="dapo", scale_rewards="group",
        learning_rate=cfg.lr, optim="adamw_torch", adam_beta1=cfg.adam_betas[0], adam_beta2=cfg.adam_betas[1],
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, lr_scheduler_type="constant")


def run_trl(folder: Path, args, batches, between) -> list[dict]:
    """TRL's steps, with ``between(i)`` called after its step i and kept out of its clock."""
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.spans, self.start = [], None

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, *a, **k):
            self.spans.append(time.perf_counter() - self.start)
            between(state.global_step - 1)
            self.start = time.perf_counter()

    tok = AutoTokenizer.from_pretrained(folder)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(model=str(folder), reward_funcs=trl_reward, args=trl_config(args, out, len(batches)),
                              train_dataset=trl_dataset(tok, batches), callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # its end-of-training summary
        gens, autocast_seen = [], set()
        generate_and_score = trainer._generate_and_score_completions

        def timed(inputs):
            t = time.perf_counter()
            batch = generate_and_score(inputs)
            gens.append({"rollout": time.perf_counter() - t,
                         "sampled": batch["completion_mask"].sum().item() / len(inputs),
                         "prompt": batch["prompt_mask"].sum().item() / len(inputs)})
            return batch

        trainer._generate_and_score_completions = timed
        probe = trainer.model.model.layers[0].register_forward_pre_hook(
            lambda *_: autocast_seen.add((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))))
        trainer.train()
        probe.remove()
    steps = clock.spans
    if len(steps) != len(batches) or len(gens) != len(batches):
        raise RuntimeError(f"TRL ran {len(steps)} steps and {len(gens)} generations for {len(batches)} batches")
    generate_autocast = any(ac for grad, ac in autocast_seen if not grad)
    rows = [dict(g, step=s, update=s - g["rollout"], generate_autocast=generate_autocast) for g, s in zip(gens, steps)]
    return rows[args.warmup:]


# ------------------------------------------------------------------------------------------ FLOPs


def matmul_peak(dtype, sizes=(1024, 2048, 3072), trials: int = 5, trial_seconds: float = 0.25) -> float:
    """Best FLOP/s of square torch.matmul: for each size, ``trials`` short timed runs, keeping the
    fastest. A busy machine only ever slows a run down, so the best short run is the least disturbed."""
    best = 0.0
    for n in sizes:
        a, b, c = (torch.randn(n, n).to(dtype) for _ in range(3))
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)  # warm-up, and a first guess of the time per product
        reps = max(1, int(trial_seconds / (time.perf_counter() - t0)))
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b, out=c)
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def update_flops(model, attn: torch.Tensor, turn: torch.Tensor, micro_batch: int) -> dict[str, float]:
    """The docstring's formula for one forward+backward over a packed batch, micro-batch by micro-batch
    as ``train.update`` cuts it."""
    c = model.config
    P = sum(p.numel() for p in model.base_model.layers.parameters())
    d_attn = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    S = int((turn[:, 1:] > 0).sum())
    shapes = [(len(rows), L) for rows, L in train.micro_batches(attn, micro_batch)]
    NL = sum(N * L for N, L in shapes)  # positions computed
    NLL = sum(N * L * L for N, L in shapes)
    out = {"dense": 6 * P * NL, "attention": 12 * c.num_hidden_layers * d_attn * NLL,
           "head": 6 * c.vocab_size * c.hidden_size * S}
    out["total"] = out["dense"] + out["attention"] + out["head"]
    out["useful"] = out["total"] - 6 * P * (NL - int(attn.sum()))
    return out


def time_updates(model, cfg, batch, n: int, warmup: int = 1) -> float:
    """Mean seconds of train.update on one fixed batch (advantages random: the work does not care)."""
    ids, attn, turn = batch
    accelerator = Accelerator(cpu=True)
    trainer, optimizer, scheduler = assemble.prepare(cfg, accelerator, model, ids.shape[0])
    A = torch.randn(ids.shape[0], ids.shape[1] - 1)  # per predicted id
    model.train()
    times = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        train.update(cfg, trainer, optimizer, scheduler, accelerator, Batch(ids, attn, turn, A))
        times.append(time.perf_counter() - t0)
    return sum(times[warmup:]) / n


def profile_update(model, cfg, batch, warm: bool, top: int = 14) -> None:
    """Where one update's time goes: self CPU time per op, grouped into kinds of work, and the
    FLOP/s of the matmuls and of the attention kernel on their own."""
    from torch.profiler import ProfilerActivity, profile

    ids, attn, turn = batch
    accelerator = Accelerator(cpu=True)
    trainer, optimizer, scheduler = assemble.prepare(cfg, accelerator, model, ids.shape[0])
    if not warm:
        train.update(cfg, trainer, optimizer, scheduler, accelerator, Batch(ids, attn, turn, torch.randn(ids.shape[0], ids.shape[1] - 1)))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train.update(cfg, trainer, optimizer, scheduler, accelerator, Batch(ids, attn, turn, torch.randn(ids.shape[0], ids.shape[1] - 1)))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    kinds = {"matmul (mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
             "attention kernel": ("scaled_dot_product", "flash_attention"),
             "dtype casts / copies": ("aten::copy_", "aten::_to_copy", "aten::to"),
             "softmax / log_softmax": ("softmax",)}
    print(f"profile of one update (self CPU time, total {total / 1e6:.2f} s):")
    flops = update_flops(model, attn, turn, cfg.micro_batch)
    work = {"matmul (mm/addmm/bmm)": flops["dense"] + flops["head"], "attention kernel": flops["attention"]}
    for kind, names in kinds.items():
        t = sum(e.self_cpu_time_total for e in events if any(n in e.key for n in names))
        rate = f"  {work[kind] / t * 1e6 / 1e9:.1f} GFLOP/s" if kind in work else ""
        print(f"  {kind:<28}{t / 1e6:>7.2f} s  {100 * t / total:>5.1f}%{rate}")
    adam = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
    print(f"  {'(AdamW step, all its ops)':<28}{adam / 1e6:>7.2f} s  {100 * adam / total:>5.1f}%")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))


# ------------------------------------------------------------------------------------------ report


def report_steps(ours: list[dict], trl: list[dict]) -> None:
    print(f"\n{'':<6}{'s/step':>8}{'rollout':>9}{'update':>8}{'sampled tok/rollout':>21}{'prompt tok':>11}")
    print(f"{'ours':<6}{mean(ours, 'step'):>8.2f}{mean(ours, 'rollout') + mean(ours, 'score'):>9.2f}"
          f"{mean(ours, 'update'):>8.2f}{mean(ours, 'sampled'):>21.1f}{mean(ours, 'prompt'):>11.1f}")
    print(f"{'TRL':<6}{mean(trl, 'step'):>8.2f}{mean(trl, 'rollout'):>9.2f}{mean(trl, 'update'):>8.2f}"
          f"{mean(trl, 'sampled'):>21.1f}{mean(trl, 'prompt'):>11.1f}")
    print(f"(ours: rollout = env.rollout {mean(ours, 'rollout'):.2f} s + rewards/advantages/pack "
          f"{mean(ours, 'score'):.3f} s; packed rows {ours[0]['shape']}; {mean(ours, 'calls'):.0f} generate calls. "
          f"TRL: rollout = _generate_and_score_completions; its generate ran under autocast: "
          f"{trl[0]['generate_autocast']})")
    pairs = " ".join(f"{t['step'] / o['step']:.2f}" for t, o in zip(trl, ours))
    print(f"ratio TRL/ours, s/step: {mean(trl, 'step') / mean(ours, 'step'):.2f} (step by step: {pairs})  "
          f"(rollout {mean(trl, 'rollout') / (mean(ours, 'rollout') + mean(ours, 'score')):.2f}, "
          f"update {mean(trl, 'update') / mean(ours, 'update'):.2f})  target >= 1.0")


def report_share(name: str, flops: dict, seconds: float, peak: float) -> None:
    rate = flops["total"] / seconds
    print(f"{name}: {flops['total'] / 1e9:.1f} GFLOP (dense {flops['dense'] / 1e9:.1f}, attention "
          f"{flops['attention'] / 1e9:.1f}, vocab head {flops['head'] / 1e9:.1f}) in {seconds:.2f} s = "
          f"{rate / 1e9:.1f} GFLOP/s = {100 * rate / peak:.1f}% of peak "
          f"(useful, padding excluded: {100 * flops['useful'] / seconds / peak:.1f}%)  target >= 40%")


# ------------------------------------------------------------------------------------------ CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--batch-size", type=int, default=16, help="rollouts per optimizer step")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--turn-tokens", type=int, default=32, help="sampled tokens per model turn (2 turns)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--threads", type=int, default=2, help="torch threads for everything (0: torch's default)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--flop-updates", type=int, default=1, help="timed SmolLM2-135M updates (after 1 warm-up)")
    p.add_argument("--flop-rows", type=int, default=16)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-135m", action="store_true")
    p.add_argument("--profile", action="store_true", help="profile one SmolLM2-135M update")
    p.add_argument("--peak-sizes", type=int, nargs="+", default=[1024, 2048, 3072],
                   help="square matmul sizes of the peak measurement")
    args = p.parse_args(argv)
    if args.batch_size % args.G or args.batch_size % args.micro_batch:
        p.error("--batch-size must be a multiple of --G and of --micro-batch")
    if args.hidden % 64:
        p.error("--hidden must be a multiple of 64 (the head size)")
    return args


def part_one(args, folder: Path) -> list[dict]:
    """Ours and TRL step by step in turn (TRL step i, then our step i, ...), so that both meet the
    same background load; each side drops its first ``--warmup`` steps."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    batches = step_batches(args.warmup + args.steps, args.batch_size // args.G)
    loop, ours = OurLoop(folder, args, episode_config(tok, args.turn_tokens)), []

    def our_step(i: int) -> None:
        ours.append(loop.step(batches[i]))
        print(f"step {i + 1}: ours {ours[-1]['step']:.1f} s", flush=True)

    if args.skip_trl:
        for i in range(len(batches)):
            our_step(i)
        return ours[args.warmup:], loop.model
    trl = run_trl(folder, args, batches, our_step)
    report_steps(ours[args.warmup:], trl)
    return ours[args.warmup:], loop.model


def part_two(args, ours: list[dict]) -> None:
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_peak(dtype, args.peak_sizes)
    tiny = ({k: mean([r["flops"] for r in ours], k) for k in ours[0]["flops"]}, mean(ours, "update"))
    big = None
    if not args.skip_135m or args.profile:
        cfg = train_config(args)
        model, tok = load_policy(None)
        batch = synthetic_batch(tok, args.flop_rows)
        if not args.skip_135m:
            big = (update_flops(model, batch[1], batch[2], cfg.micro_batch), time_updates(model, cfg, batch, args.flop_updates))
    peak = max(peak, matmul_peak(dtype, args.peak_sizes))  # measured before and after the updates: the less disturbed
    fp32 = matmul_peak(torch.float32, args.peak_sizes) if args.bf16 else peak
    print(f"\nmatmul peak: {'bf16' if args.bf16 else 'fp32'} {peak / 1e9:.1f} GFLOP/s (fp32 for reference: "
          f"{fp32 / 1e9:.1f}); shares below are of the {'bf16' if args.bf16 else 'fp32'} peak")
    report_share(f"tiny model, batch {ours[-1]['shape']}, micro-batch {args.micro_batch}", *tiny, peak)
    if big:
        report_share(f"SmolLM2-135M, batch {tuple(batch[0].shape)}, micro-batch {args.micro_batch}", *big, peak)
    if args.profile:
        profile_update(model, cfg, batch, warm=big is not None)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    set_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 autocast {args.bf16}; "
          f"{args.batch_size} rollouts/step (G={args.G}, micro-batch {args.micro_batch}), 2 x {args.turn_tokens} "
          f"sampled tokens/rollout, {args.warmup} warm-up + {args.steps} timed steps a side")
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_llama(Path(tmp) / "tiny-llama", args.hidden, args.layers)
        n = sum(t.numel() for t in load_policy(str(folder))[0].parameters()) / 1e6
        print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {n:.1f}M parameters, in {folder}")
        ours, _ = part_one(args, folder)
    part_two(args, ours)
    return 0


if __name__ == "__main__":
    sys.exit(main())
