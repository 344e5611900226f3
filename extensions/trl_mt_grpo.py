"""MT-GRPO inside TRL's GRPOTrainer: turn-level credit where users already train.

    from trl import GRPOConfig
    from extensions.trl_mt_grpo import MTGRPOTrainer
    trainer = MTGRPOTrainer(model, GRPOConfig(...), train_dataset=questions, searcher=index)
    trainer.train()

``questions`` is a datasets.Dataset (or a list) of rows with a ``prompt`` (the question) and its ``aliases``;
``index`` is a search tool (search.load_index). TRL's GRPOTrainer (1.16) runs multi-turn episodes through a
``rollout_func`` and can mask the environment's tokens out of the loss (``env_mask``), but gives every token
of a completion one advantage. MTGRPOTrainer changes two things, and nothing else:

  the rollouts     env.rollout's episodes, token-exact: the protocol, prompt and search tool train.py runs
                   (the seed's, but where DEVIATIONS.md says otherwise); the environment's tokens are masked
                   out of the loss
  the advantages   every completion token gets its turn's advantage: advantages.turn_advantages (mt_grpo.py's)
                   of rewards.py's two reward levels, spread over the tokens by mt_grpo.token_advantages,
                   through the same entry point as train.py

TRL does the rest: the loss and its ``loss_type``, the optimizer and schedule, accelerate and DeepSpeed,
logging. The six rewards are TRL reward functions too, so TRL logs each (``rewards/<name>/mean``); the one
advantage TRL derives from their sum is replaced, and the mean advantage of each turn's tokens is logged
(``adv_mean/turn<k>``). Loss types against train.py's ``--aggregation``: TRL's default "dapo" is ``token``
(one token mean over the whole batch, every process and accumulation step), "bnpo" is ``micro_batch`` (the
seed's: a token mean per micro-batch, averaged), "grpo" is ``sequence``. The seed's own trainer, TRL at
fc4dae2, used what is "bnpo" now, so TRL's default is not the seed's loss.

Several processes (accelerate: DDP, and DeepSpeed or FSDP with TRL's vLLM). Each process runs the episodes of
its own rows; the reward levels of every process's rollouts are gathered, so a group split between processes
is normalised whole and the step equals the 1-process step (tests/test_trl_distributed.py runs both over gloo). TRL's vLLM
generation in server mode, and in colocate mode with tensor parallelism, gathers the prompts of all processes
and hands each its slice by position: so every process makes the same engine calls with the same number of
prompts (TRLvLLMSampler pads the episodes that ended and keeps calling until every process's are done).
Refused with a clear error: the HF sampler under DeepSpeed ZeRO-3 or FSDP (sharded forwards are collectives,
and processes run different numbers of generate calls), and every TRL setting that the MT-GRPO advantage
would otherwise ignore: ``scale_rewards`` other than "group", ``multi_objective_aggregation`` other than
"sum_then_normalize", groups of fewer than 2 (``num_generations_eval`` 1). Honoured: ``reward_weights``
(each reward weighted inside its level) and ``num_generations_eval`` (the group size when evaluating).

What this relies on in TRL, and where a TRL release that changes it fails tests/test_trl.py:
``GRPOTrainer(rollout_func=...)`` with the ``env_mask`` field (experimental in TRL 1.16),
``_generate_and_score_completions`` returning its batch as a dict with ``advantages``, and the loss taking
advantages of shape (B, T) (TRL 1.16 unsqueezes only (B,)).
"""
from __future__ import annotations

import math

import torch
from trl import GRPOConfig, GRPOTrainer

import advantages
import env
import mt_grpo
import rewards
from config import METHODS, Config, EnvConfig, episode
from policy import HFPolicy, Sampler


def reward_function(name: str):
    """rewards.py's reward ``name`` as a TRL reward function of the episodes (their ``messages``)."""
    fn = rewards.REWARD_FUNCS[name]

    def score(prompts, completions, messages, aliases, **kwargs) -> list[float]:
        return [float(fn(m, a)) for m, a in zip(messages, aliases)]

    score.__name__ = name
    return score


def episode_config(args: GRPOConfig, **overrides) -> EnvConfig:
    """The episode under TRL's settings: its sampling (which its loss divides the logits by) and its completion
    budget, the rest config.Config's defaults; ``overrides`` change those (config.episode builds it)."""
    return episode(Config(**{"max_turn_tokens": args.max_completion_length, "max_completion_tokens":
                             args.max_completion_length, "temperature": args.temperature, "top_k": args.top_k or 0,
                             "top_p": args.top_p, **overrides}))


def ignored_setting(args: GRPOConfig) -> str | None:
    """What in TRL's settings the MT-GRPO advantage would ignore, as a message naming the setting, or None.
    MTGRPOTrainer replaces the advantage TRL computes from the rewards' sum: its group normalisation (std with
    Bessel's correction, + 1e-4) is mt_grpo.group_normalise, per reward level; reward_weights are honoured
    (each reward weighted inside its level), and so is num_generations_eval (the group when evaluating)."""
    if args.scale_rewards != "group":
        return (f"scale_rewards={args.scale_rewards!r}: MT-GRPO normalises each reward level within its group (the "
                "paper's and TRL's 'group'); leave scale_rewards at 'group'")
    if args.multi_objective_aggregation != "sum_then_normalize":
        return (f"multi_objective_aggregation={args.multi_objective_aggregation!r}: MT-GRPO sums the rewards of each "
                "level, then normalises the level's sum within its group; leave it at 'sum_then_normalize'")
    if args.num_generations_eval is not None and args.num_generations_eval < 2:
        return (f"num_generations_eval={args.num_generations_eval}: a group needs at least 2 rollouts to normalise "
                "(leave it None for num_generations)")
    return None


def shards_weights(trainer) -> bool:
    """Whether the trainer's weights are sharded over its processes: DeepSpeed ZeRO-3 or FSDP."""
    if trainer.is_fsdp_enabled:
        return True
    return bool(trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)


class TRLvLLMSampler(Sampler):
    """Sampler over TRL's own vLLM generation (``use_vllm``: its server or colocate mode): each call asks
    TRL for one completion per row and env.cut_turn cuts it where a message ends. TRL's vLLM generation takes
    neither stop strings nor a per-call length, so a message is sampled to TRL's max_completion_length and
    cut after; its log-probs are TRL's (vLLM's processed ones, of the truncated distribution; None, where vLLM
    gave NaN, becomes NaN: no log-prob reported).

    Lock-step. In server mode, and in colocate mode with tensor parallelism, TRL gathers the prompts of every
    process, generates them together and hands process p the rows [p*n, (p+1)*n), n its own count: every
    process must call at the same time with the same count. env.rollout asks only for the episodes still
    live, so after the first message the counts differ, and a process whose episodes all ended stops calling.
    So each call is padded to the rollout's first (largest) count, and after its own episodes end
    (``end_rollout``) a process keeps making padded calls, discarded, until every process's have ended; one
    all-reduce per call says whether any process still has a live episode."""

    def __init__(self, trainer):
        self.trainer, self.calls = trainer, 0
        engine = trainer.vllm_generation
        self.lockstep = trainer.accelerator.num_processes > 1 and (
            engine.mode == "server" or getattr(engine, "tensor_parallel_size", 1) > 1)
        self.width, self.filler = 0, None

    def start_rollout(self) -> None:
        self.width, self.filler = 0, None

    def any_process_live(self, live: bool) -> bool:
        accelerator = self.trainer.accelerator
        return bool(accelerator.reduce(torch.tensor([float(live)], device=accelerator.device), "sum").item() > 0)

    def engine_call(self, rows: list[list[int]]):
        _, completions, logprobs, _ = self.trainer.vllm_generation.generate(prompts=[list(r) for r in rows],
                                                                            images=None, num_generations=1)
        self.calls += 1
        return completions, logprobs

    def generate(self, batch, max_new_tokens, sampling, stop):
        rows = [list(r) for r in batch]
        if self.lockstep:
            self.any_process_live(True)  # every process takes part in every round's all-reduce
            if not self.width:  # the rollout's first call: every episode is live
                accelerator = self.trainer.accelerator
                self.width = int(accelerator.gather(torch.tensor([len(rows)], device=accelerator.device)).max())
                self.filler = rows[0]
            rows = rows + [self.filler] * (self.width - len(rows))
        completions, logprobs = self.engine_call(rows)
        tok = self.trainer.processing_class
        cut = [env.cut_turn(c, tok, stop, max_new_tokens) for c in completions[:len(batch)]]
        self.last_logprobs = [[math.nan if lp[0] is None else lp[0] for lp in seq[:len(row)]]
                              for seq, row in zip(logprobs, cut)]
        return cut

    def end_rollout(self) -> None:
        if not self.lockstep or not self.width:
            return
        while self.any_process_live(False):  # another process still samples: call with it, discard
            self.engine_call([self.filler] * self.width)


class MTGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with this project's episodes and MT-GRPO's per-token advantages (see the module's doc).

    ``method``: mt_grpo | grpo_or | grpo_mr (mt_grpo.PAPER_METHODS); ``lam``, ``convention``: as train.py's;
    ``k_turn``: one turn-level reward per tool call and K = max_tool_calls + 1 turns (mt_grpo.k_turn_advantages);
    ``env_cfg``: the episode (default: ``episode_config(args)``; its sampling must be TRL's); ``sampler``: a
    callable ``trainer -> policy.Sampler`` (default: TRL's vLLM where ``use_vllm``, else policy.HFPolicy on the
    trained model). Everything else goes to GRPOTrainer."""

    def __init__(self, model, args: GRPOConfig, train_dataset, searcher, processing_class=None, *, method="mt_grpo",
                 lam: float = 1.0, convention: str = "seed", k_turn: bool = False, env_cfg: EnvConfig | None = None,
                 sampler=None, **kwargs):
        if method not in mt_grpo.PAPER_METHODS:
            raise ValueError(f"method={method!r}: MTGRPOTrainer trains the paper's methods, "
                             f"{', '.join(mt_grpo.PAPER_METHODS)}; the field's other estimators "
                             f"({', '.join(m for m in METHODS if m not in mt_grpo.PAPER_METHODS)}) train with train.py")
        self.env_cfg = env_cfg or episode_config(args)
        trl_sampling = (args.temperature, args.top_k or 0, args.top_p)
        if (self.env_cfg.temperature, self.env_cfg.top_k, self.env_cfg.top_p) != trl_sampling:
            raise ValueError(f"env_cfg samples at {self.env_cfg.sampling()}, TRL's loss assumes temperature, top_k, "
                             f"top_p = {trl_sampling}: give both the same (episode_config(args) does)")
        if args.mask_truncated_completions:
            raise ValueError("mask_truncated_completions would drop every episode (each ends with the chat template's "
                             "close, not an end-of-turn id; the environment cuts them to the budget): leave it False")
        problem = ignored_setting(args)
        if problem:
            raise ValueError(problem)
        self.searcher, self.method, self.lam, self.convention, self.k_turn = searcher, method, lam, convention, k_turn
        self.make_sampler, self.trajectories = sampler, []
        super().__init__(model, reward_funcs=[reward_function(n) for n in rewards.REWARD_FUNCS], args=args,
                         train_dataset=train_dataset, processing_class=processing_class, rollout_func=self.rollout,
                         **kwargs)
        if sampler is None and not self.use_vllm and shards_weights(self):
            raise ValueError("DeepSpeed ZeRO-3 and FSDP shard the weights: sampling with HF generate would gather "
                             "every layer for every token, and the processes' generate calls (one per round of live "
                             "episodes) would not match, so their collective gathers hang. Pass use_vllm=True "
                             "(TRL's vLLM), or train with DDP or ZeRO-1/2")

    # ------------------------------------------------------------------ the rollouts
    def sampler(self) -> Sampler:
        if self.make_sampler is not None:
            return self.make_sampler(self)
        if self.use_vllm:
            return TRLvLLMSampler(self)
        # a stream of its own per process and per call (HFPolicy seeds each call from its seed and count)
        seed = self.args.seed + 1_000_003 * self.accelerator.process_index + 7919 * self.state.global_step
        return HFPolicy(self.accelerator.unwrap_model(self.model), self.processing_class, seed=seed)

    def rollout(self, prompts: list, trainer=None) -> dict:
        """TRL's rollout_func: one episode per prompt (TRL's sampler already repeats each num_generations times)."""
        questions = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.trajectories = env.rollout(self.sampler(), self.processing_class, questions, 1, self.searcher,
                                            self.env_cfg)
        model.train(was_training)
        trajs = self.trajectories
        return {"prompt_ids": [t.prompt_ids for t in trajs], "completion_ids": [t.completion_ids for t in trajs],
                "logprobs": [[0.0 if x is None or math.isnan(x) else x for x in t.sampler_logprobs] for t in trajs],
                "env_mask": [[int(k > 0) for k in t.turn_idx] for t in trajs],  # the environment's ids: no loss
                "messages": [t.messages for t in trajs]}  # for the reward functions

    # ------------------------------------------------------------------ the advantages
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        A = self.turn_advantages(self.trajectories, [x["aliases"] for x in inputs], [x.get("support") for x in inputs])
        width = output["completion_ids"].shape[1]
        turn = torch.tensor([t.turn_idx + [0] * (width - len(t.turn_idx)) for t in self.trajectories],
                            device=output["completion_ids"].device)
        output["advantages"], _ = mt_grpo.token_advantages(A.to(turn.device), turn)
        mode = "train" if self.model.training else "eval"
        for k in range(1, A.shape[1] + 1):  # over the whole batch, every process's tokens
            sums = self.accelerator.gather(torch.stack([output["advantages"][turn == k].sum(),
                                                        (turn == k).sum().float()])[None]).sum(0)
            if sums[1] > 0:
                self._metrics[mode][f"adv_mean/turn{k}"].append((sums[0] / sums[1]).item())
        return output

    def turn_advantages(self, trajectories, aliases, supports) -> torch.Tensor:
        """Per-turn advantages (B, K) of this process's rollouts, each group normalised whole: the reward levels
        of every process's rollouts are gathered (TRL's batch is question-major across processes, as train.py's),
        then advantages.turn_advantages computes them, as for train.py."""
        G = self.num_generations if self.model.training else self.num_generations_eval  # TRL's groups, by mode
        cfg = Config(method=self.method, lam=self.lam, convention=self.convention, k_turn=self.k_turn, G=G,
                     max_tool_calls=self.env_cfg.max_tool_calls)
        scores = rewards.compute([t.messages for t in trajectories], aliases)
        weights = dict(zip(rewards.REWARD_FUNCS, self.reward_weights.tolist()))  # TRL's reward_weights, in order
        episodes = [{"aliases": a, "support": s} for a, s in zip(aliases, supports)]
        mine = advantages.reward_levels(cfg, {k: [weights[k] * x for x in v] for k, v in scores.items()},
                                        trajectories, episodes)
        n, device = len(trajectories), self.accelerator.device
        turns = mine.turns if mine.turns is not None else torch.zeros(n)
        rows = torch.cat([mine.R_T.reshape(n, -1), torch.stack([mine.R_O, mine.has_result.float(), turns.float()], 1)], 1)
        every = self.accelerator.gather(rows.to(device)).cpu()
        K1 = rows.shape[1] - 3  # R_T's columns: 1, or one per tool call
        levels = mt_grpo.Levels(R_T=every[:, :K1] if self.k_turn else every[:, 0], R_O=every[:, K1],
                                has_result=every[:, K1 + 1].bool(), turns=every[:, K1 + 2].long() if self.k_turn else None)
        first = self.accelerator.process_index * n
        return advantages.turn_advantages(cfg, levels)[first:first + n]
