"""The episode budget's two semantics on the CPU default run: what the CPU default's --budget is chosen by.

    python bench/bench_budget.py                 # 8 batches of 16 rollouts a semantics, the CPU default's episode
    python bench/bench_budget.py --batches 2     # quicker

The two (env.py, DEVIATIONS.md item 24): "seed", the seed's run (a message runs to its full budget, a reply is
appended whatever its length, the episode ends after a message that passed the budget, and only then are the
ids cut, the rewards reading the whole conversation) and "cut" (no message passes the budget left, and a reply
that does not fit ends the episode, so the rewards read exactly the text whose ids are trained on).

THE DECISION, written before it ran: the CPU default takes the seed's semantics unless they hurt at its small
budget (256 tokens an episode against the seed's 1,024). They hurt where an episode's rewards read text whose
ids the update never sees, credit with no gradient to carry it: if more than 5% of the "seed" episodes pass
the budget, the CPU default is "cut"; otherwise "seed", where the two coincide on at least 95% of episodes.

What runs: train.py's own set-up of the CPU default (SmolLM2-135M-Instruct, its warm start, the demo world,
the speed path's sampler), then for each semantics the same questions, sampled from the same seed (the
sampler's call counter reset), --batches batches of the default batch. Reported per semantics: the share of
episodes that reached the budget (seed: passed it, ids cut; cut: ended at it), the share whose answer the
rewards read but the ids lost, rewards by level, EM, tool-call rate, model tokens an episode and rollout
seconds. Written
to bench/results/budget.md with the decision it implies.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time

from common import ROOT, write_result  # first: puts the repo root on sys.path

THRESHOLD = 0.05  # the share of "seed" episodes past the budget above which the CPU default is "cut"


def sample(run, cfg, budget: str, batches: int) -> dict:
    """``batches`` of the default batch under ``budget``, the sampler restarted at the same random stream."""
    import env
    import rewards
    import train

    env_cfg = dataclasses.replace(run.env_cfg, budget=budget)
    run.sampler.calls = 0
    trajs, aliases, seconds = [], [], 0.0
    for step in range(batches):
        episodes = [q for q in train.batch_questions(cfg, run.questions, step) for _ in range(cfg.G)]
        t0 = time.perf_counter()
        trajs += env.rollout(run.sampler, run.tokenizer, [q["question"] for q in episodes], 1, run.index, env_cfg)
        seconds += time.perf_counter() - t0
        aliases += [q["aliases"] for q in episodes]
    scores = rewards.compute([t.messages for t in trajs], aliases)
    R_T, R_O = rewards.level_sums(scores)
    n = len(trajs)
    # an answer the rewards read whose ids were cut away: no "</answer>" left in the trained ids
    lost = [t.truncated and rewards.last_answer(t.messages) is not None and
            "</answer>" not in run.tokenizer.decode(t.completion_ids) for t in trajs]
    return {"n": n, "truncated": sum(t.truncated for t in trajs) / n,
            "answer_lost": sum(lost) / n, "R_T": statistics.mean(R_T), "R_O": statistics.mean(R_O),
            "em": statistics.mean(scores["exact_match"]),
            "tool_call_rate": env.episode_stats(trajs)["tool_call_rate"],
            "model_tokens": statistics.mean(t.model_tokens for t in trajs), "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=8, help="batches of the CPU default's 16 rollouts a semantics")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="another checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--warmstart-steps", type=int, help="default: the CPU default's")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "budget.md"), help="where the result is written")
    args = p.parse_args(argv)
    import config
    from infra import assemble

    with tempfile.TemporaryDirectory() as out:
        cfg = config.Config(threads=args.threads, output_dir=out, model=args.model,
                            **({} if args.warmstart_steps is None else {"warmstart_steps": args.warmstart_steps}))
        config.validate(cfg)
        run = assemble.setup(cfg)  # the CPU default run's model after its warm start, sampler, data and search
        run.model.eval()
        import torch

        with torch.no_grad():
            results = {b: sample(run, cfg, b, args.batches) for b in ("seed", "cut")}
    chosen = "cut" if results["seed"]["truncated"] > THRESHOLD else "seed"
    rows = [("episodes that reached the budget (seed: passed it, ids cut there; cut: ended at it)", "truncated"),
            ("an answer the rewards read whose ids were cut", "answer_lost"),
            ("R^T (turn level)", "R_T"), ("R^O (outcome level)", "R_O"), ("exact match", "em"),
            ("tool-call rate", "tool_call_rate"), ("model tokens an episode", "model_tokens"),
            ("rollout seconds, all batches", "seconds")]
    command = "python bench/bench_budget.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# The episode budget on the CPU default run\n\n`{command}`\n",
             f"CPU default episode: {cfg.max_completion_tokens} tokens an episode, {cfg.max_turn_tokens} a message, "
             f"{cfg.result_max_tokens} a result; {args.model or 'SmolLM2-135M-Instruct'} after its "
             f"{cfg.warmstart_steps}-step warm start, "
             f"the demo world, {args.batches} batches of {cfg.batch_size} rollouts per semantics (the same questions, "
             f"the sampler's stream restarted), {args.threads} threads.\n",
             "| | seed | cut |", "|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(f"{results[b][key]:.3f}" if key != "model_tokens" else
                                                  f"{results[b][key]:.1f}" for b in ("seed", "cut")) + " |")
    lines += ["", f"The decision rule (written before the run): the seed's semantics unless more than "
                  f"{THRESHOLD:.0%} of its episodes pass the budget. Measured: {results['seed']['truncated']:.1%} of the "
                  f"\"seed\" episodes passed it, so the CPU default is **{chosen}**"
                  + (" (config.EnvConfig.budget)." if chosen == config.EnvConfig.budget else
                     f", which config.EnvConfig.budget ({config.EnvConfig.budget}) does not yet follow.")]
    write_result(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
