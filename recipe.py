"""The seed's recipe, setting by setting: what ``python train.py --print-recipe`` compares a run with.

"The seed" is the code released with the paper (SiliangZeng/Multi-Turn-RL-Agent, run through TRL at the
commit it pins, fc4dae2). Each row names a config.Config field, the seed's value and the file that sets it,
whether a resolved run agrees, and the DEVIATIONS.md item that says why a run may differ. Fields that do
not change what is learned (output folders, logging, threads, engine sizes) are bookkeeping, not recipe.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

SEED = "SiliangZeng/Multi-Turn-RL-Agent"
TRL = "TRL fc4dae2"


@dataclass(frozen=True)
class Row:
    field: str                   # a config.Config field
    seed: str                    # the seed's value, as the table prints it
    source: str                  # where the seed sets it
    agrees: Callable             # cfg -> bool: the run does what the seed does
    item: int | None = None      # the DEVIATIONS.md item that explains a difference


def equals(value) -> Callable:
    return lambda cfg, field: getattr(cfg, field) == value


ROWS = [
    # the task
    Row("model", "Qwen/Qwen2.5-7B (base)", "scripts/run_mt_grpo.sh", equals("Qwen/Qwen2.5-7B"), 13),
    Row("questions", "TriviaQA rc, train split", "verifiers/utils/data_utils.py", equals("triviaqa"), 13),
    Row("corpus", "KILT Wikipedia, whole articles (pyserini BM25)", "verifiers/tools/local_wiki_search.py",
        lambda cfg, f: False, 9),
    Row("holdout", "0 (trains on the train split)", "verifiers/envs/tool_env.py", equals(0), 14),
    # the algorithm
    Row("method", "mt_grpo; grpo for GRPO-OR and GRPO-MR", "scripts/run_*.sh --trainer",
        lambda cfg, f: cfg.method in ("mt_grpo", "grpo_or", "grpo_mr")),
    Row("turn_reward", "verifiable: tool execution, answer in the search result",
        "verifiers/examples/triviaqa_search.py", equals("verifiable")),
    Row("lam", "1.0", "scripts/run_mt_grpo.sh --turn_advantage_coef", equals(1.0), 1),
    Row("convention", "seed: A_O + lam * A_T", "verifiers/trainers/mt_grpo_env_trainer.py", equals("seed"), 1),
    Row("k_turn", "False (two turns)", "verifiers/trainers/mt_grpo_env_trainer.py", equals(False), 16),
    Row("G", "21", "scripts/run_mt_grpo.sh", equals(21), 13),
    Row("batch_size", "336 rollouts (12 x 7 GPUs x 4)", "scripts/run_mt_grpo.sh", equals(336), 13),
    Row("eps", "0.2", f"{TRL} GRPOConfig.epsilon", equals(0.2)),
    Row("beta", "0.0", "scripts/run_mt_grpo.sh --beta", equals(0.0)),
    Row("mu", "2", "scripts/run_mt_grpo.sh --num_iterations", equals(2), 13),
    Row("aggregation", "micro_batch", "mt_grpo_env_trainer.py compute_loss", equals("micro_batch"), 4),
    # the optimisation
    Row("max_steps", "300 optimizer steps = 150 rollout batches at mu 2", "scripts/run_mt_grpo.sh --max_steps",
        lambda cfg, f: cfg.max_steps * cfg.mu == 300, 22),
    Row("lr", "1e-06", "scripts/run_mt_grpo.sh", equals(1e-6), 13),
    Row("warmup_steps", "20 optimizer steps, from lr 0", "verifiers/utils/config_utils.py", equals(20), 13),
    Row("adam_betas", "(0.9, 0.99)", "verifiers/utils/config_utils.py", lambda cfg, f: tuple(cfg.adam_betas) == (0.9, 0.99)),
    Row("weight_decay", "0.0", "transformers TrainingArguments default", equals(0.0)),
    Row("max_grad_norm", "0.1", "verifiers/utils/config_utils.py", equals(0.1)),
    Row("micro_batch", "12 rollouts a GPU", "scripts/run_mt_grpo.sh", equals(12), 13),
    Row("bf16", "True", "verifiers/utils/config_utils.py", equals(True)),
    Row("gradient_checkpointing", "True", "verifiers/utils/config_utils.py", equals(True), 13),
    Row("lora_r", "0 (every weight)", "verifiers/examples/triviaqa_search.py", equals(0), 18),
    # the episode
    Row("max_tool_calls", "1 (ToolEnv max_steps=2)", "verifiers/envs/tool_env.py", equals(1)),
    Row("max_turn_tokens", "1024", f"{TRL} max_tokens = max_completion_length", equals(1024), 13),
    Row("max_completion_tokens", "1024", "verifiers/envs/multiturn_env.py", equals(1024), 13),
    Row("passages", "1 (the top-1 article)", "verifiers/tools/local_wiki_search.py", equals(1), 9),
    Row("result_max_tokens", "0 (no cut but the episode's)", "verifiers/tools/local_wiki_search.py", equals(0), 9),
    Row("temperature", "0.9", f"{TRL} GRPOConfig default", equals(0.9)),
    Row("top_k", "50", f"{TRL} GRPOConfig default", equals(50)),
    Row("top_p", "1.0", f"{TRL} GRPOConfig default", equals(1.0)),
    Row("few_shot", "False", "verifiers/envs/tool_env.py", equals(False), 11),
    Row("warmstart_steps", "0 (RL from the base model)", "verifiers/examples/triviaqa_search.py", equals(0), 12),
    # the rollouts
    Row("rollout_backend", "vllm", "verifiers/utils/config_utils.py use_vllm", equals("vllm"), 20),
    Row("vllm_device", "cuda:7, the GPU no training process uses", "verifiers/utils/config_utils.py",
        lambda cfg, f: cfg.vllm_device in ("auto", "7"), 15),
    Row("vllm_gpu_memory", "0.7 on its own GPU", "verifiers/utils/config_utils.py",
        lambda cfg, f: cfg.vllm_gpu_memory in (0.0, 0.7), 15),
]
BOOKKEEPING = {"output_dir", "save_every", "sample_every", "report_to", "resume", "threads", "seed", "fast",
               "k_turn_normalise", "lora_alpha", "lora_target_modules", "lora_dropout", "warmstart_lr",
               "sampler_dtype", "vllm_max_model_len", "vllm_max_batched_tokens", "vllm_sleep", "dist_timeout_minutes",
               # the other estimators' and turn rewards' own settings (estimators.py, turn_rewards.py)
               "judge_model", "omega", "gigpo_similarity", "gamma", "gae_lam", "critic_ridge", "critic_window"}


def compare(cfg) -> list[tuple[str, str, str, str, str, str]]:
    """(setting, this run's value, the seed's value, agrees: yes | no, why it may differ, where the seed sets
    it) per recipe row."""
    out = []
    for row in ROWS:
        ok = row.agrees(cfg, row.field)
        why = "" if ok or row.item is None else f"DEVIATIONS.md, item {row.item}"
        out.append((row.field, str(getattr(cfg, row.field)), row.seed, "yes" if ok else "no", why, row.source))
    return out


def unlisted(config_class) -> list[str]:
    """Config fields neither compared nor bookkeeping (a new field must be placed in one or the other)."""
    listed = {row.field for row in ROWS} | BOOKKEEPING
    return [f.name for f in dataclasses.fields(config_class) if f.name not in listed]


def table(cfg) -> str:
    """The comparison as a Markdown table, with the not-a-setting parts of the recipe after it."""
    rows = compare(cfg)
    head = ("setting", "this run", "seed", "agrees", "why it may differ", "where the seed sets it")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    agree = sum(r[3] == "yes" for r in rows)
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows), "",
                      f"{agree} of {len(rows)} settings agree with the seed's. Not settings, and the same in every run:",
                      "the prompt (the seed's instructions in our words, item 10), the episode protocol (env.py),",
                      "the six rewards (rewards.py; items 5-8), the advantages and the PPO-clip loss (mt_grpo.py).",
                      f"Bookkeeping, not compared: {', '.join(sorted(BOOKKEEPING))}."])
