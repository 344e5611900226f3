"""MT-GRPO through TRL's GRPOTrainer, on the CPU default's task: the embedded SmolLM2-135M on the demo world.

    python examples/trl_demo.py                      # warm start, then 4 TRL steps of 16 rollouts (CPU, minutes)
    python examples/trl_demo.py --method grpo_or     # the outcome-only baseline, the same way

The three lines that matter are the MTGRPOTrainer ones below; the rest builds what train.py builds (the questions,
the search index, a warm start so that the model calls the tool at all) and a GRPOConfig with train.py's
defaults. TRL prints its log every step: the six rewards and adv_mean/turn1, adv_mean/turn2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import config  # noqa: E402
import data  # noqa: E402
import mt_grpo  # noqa: E402
import search  # noqa: E402
from extensions import warmstart  # noqa: E402
from policy import load_policy  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--method", default="mt_grpo", choices=mt_grpo.PAPER_METHODS)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--warmstart-steps", type=int, default=config.Config.warmstart_steps)
    ap.add_argument("--output-dir", default="runs/trl-demo")
    args = ap.parse_args(argv)
    from datasets import Dataset
    from trl import GRPOConfig

    from extensions.trl_mt_grpo import MTGRPOTrainer, episode_config

    cfg = config.Config()  # train.py's defaults: the batch, the optimizer, the episode
    world = data.demo_world()
    questions, index = data.load_questions(world["train"]), search.load_index(world["corpus"])
    model, tok = load_policy(args.model)
    trl_args = GRPOConfig(
        output_dir=args.output_dir, use_cpu=True, bf16=cfg.bf16, seed=cfg.seed, max_steps=args.max_steps,
        report_to="none", save_strategy="no", logging_steps=1, per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch, num_generations=cfg.G, max_completion_length=cfg.max_completion_tokens, temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, learning_rate=cfg.lr, lr_scheduler_type="constant", beta=cfg.beta,
        loss_type="dapo", adam_beta1=cfg.adam_betas[0], adam_beta2=cfg.adam_betas[1], max_grad_norm=cfg.max_grad_norm)
    episode = episode_config(trl_args, max_turn_tokens=cfg.max_turn_tokens)
    if args.warmstart_steps:
        ws = warmstart.run(model, tok, index, questions, episode, steps=args.warmstart_steps, lr=cfg.warmstart_lr,
                           seed=cfg.seed, bf16=cfg.bf16)
        print(f"warm start: {ws}")
    dataset = Dataset.from_list([{"prompt": q["question"], "aliases": q["aliases"]} for q in questions])

    trainer = MTGRPOTrainer(model, trl_args, dataset, index, processing_class=tok, method=args.method,
                            env_cfg=episode)
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
