"""Turn-level rewards for turn 1 (the search) beyond the seed's verifiable ones: ``--turn-reward``.

    verifiable  rewards.py's R^T: did the tool run, did its result hold an answer alias (the seed's)
    info_gain   how much the search turn raised the policy's probability of the gold answer, IGPO's turn
                reward (Wang et al. 2025, arXiv 2510.14967): pi(a | context) = exp(mean per-token log-prob of the
                answer appended after the context), the geometric mean of its tokens' probabilities; the reward is
                pi after turn 1 and its result minus pi before it (the prompt alone), so it lies in [-1, 1]
    info_gain_log  the same difference taken in log space, mean log-prob after minus before: unbounded, so where
                R^T is added to R^O before normalising (GRPO-MR, the A^MR fallback, GiGPO) it can swamp R^O
                (DEVIATIONS.md, item 25)
    judge       a causal LM asked whether the search result helps answer the question: P(yes) / (P(yes) +
                P(no)) from its next-token distribution (a generative reward model, as in the MT-GRPO paper's
                v2 and DeepSeek's GRM, at the smallest scale: any checkpoint, by default the embedded SmolLM2)

A rollout whose turn 1 brought no result (no search ran) gets 0 from the model-based ones: MT-GRPO gives it
the merged advantage anyway (mt_grpo.turn_advantages). Every process scores the whole batch, as rewards.py's.
``build`` makes the one the run asks for; advantages.reward_levels calls it in place of rewards.py's R^T.
"""
from __future__ import annotations

import math

import torch

import env
from data import DataError
from policy import left_pad, load_policy, pack, token_logprobs

ANSWER_OPEN = "<answer>"  # written before the gold answer, as the model writes its own (env.SYSTEM_PROMPT)
JUDGE_QUESTION = ("A search agent must answer the question: {question}\n"
                  "It searched for: {query}\n"
                  "The search returned:\n{result}\n\n"
                  "Does this search result help answer the question? Answer yes or no.")
RESULT_CHARS = 1500  # of a result shown to the judge
YES, NO = ("yes", "Yes", " yes", " Yes"), ("no", "No", " no", " No")  # the spellings of the judge's verdict


def single_token_ids(tokenizer, words) -> list[int]:
    """The ids of those ``words`` that the tokenizer writes as exactly one token, sorted."""
    pieces = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    return sorted({ids[0] for ids in pieces if len(ids) == 1})


def build(cfg, model, tokenizer, device):
    """--turn-reward info_gain | judge as one function, ``(trajectories, episodes) -> R^T``, one reward a rollout:
    the policy's information gain on the gold answer (the episode's first alias), or the judge's P(yes)."""
    if cfg.turn_reward in ("info_gain", "info_gain_log"):
        space = "log" if cfg.turn_reward == "info_gain_log" else "probability"
        return lambda trajectories, episodes: info_gain(model, tokenizer, trajectories,
                                                        [q["aliases"][0] for q in episodes], cfg.micro_batch, space)
    judge = Judge(cfg.judge_model, device)
    return lambda trajectories, episodes: judge(trajectories, [q["question"] for q in episodes], cfg.micro_batch)


def before_and_after(t: env.Trajectory) -> tuple[list[int], list[int]] | None:
    """The ids before turn 1 (the prompt) and after turn 1 and its result (up to turn 2's first id), or None
    where no result came back."""
    if not t.has_result:
        return None
    end = t.turn_idx.index(2) if 2 in t.turn_idx else len(t.turn_idx)
    return list(t.prompt_ids), list(t.prompt_ids) + list(t.completion_ids[:end])


@torch.no_grad()
def answer_logprob(model, tokenizer, contexts: list[list[int]], answer: list[str], micro_batch: int = 8) -> list[float]:
    """Mean per-token log pi(answer | context + "<answer>") of each context, at temperature 1, in float32."""
    head = env._encode(tokenizer, ANSWER_OPEN)
    rows = []
    for ctx, ans in zip(contexts, answer):
        scored = env._encode(tokenizer, ans)
        rows.append(env.Trajectory(ctx + head, scored, [1] * len(scored), [], [], []))
    out = []
    for i in range(0, len(rows), micro_batch):
        ids, attn, turn = pack(rows[i:i + micro_batch], tokenizer.pad_token_id)
        ids, attn, turn = (x.to(model.device) for x in (ids, attn, turn))
        logp = token_logprobs(model, ids, attn, turn, bf16=False)
        counts = (turn[:, 1:] > 0).sum(1)
        out += (logp.sum(1) / counts.clamp(min=1)).tolist()
    return out


def info_gain(model, tokenizer, trajectories, answers: list[str], micro_batch: int = 8,
              space: str = "probability") -> list[float]:
    """Per rollout, with m = the mean per-token log pi(answer | context): exp(m after turn 1) - exp(m before it)
    (IGPO's, ``space`` "probability"), or m after - m before (``space`` "log"); 0 without a result.
    ``answers``: each rollout's gold answer (its first alias)."""
    if space not in ("probability", "log"):
        raise ValueError(f"unknown space {space!r}: probability or log")
    pairs = [before_and_after(t) for t in trajectories]
    have = [i for i, p in enumerate(pairs) if p is not None]
    if not have:
        return [0.0] * len(trajectories)
    before = answer_logprob(model, tokenizer, [pairs[i][0] for i in have], [answers[i] for i in have], micro_batch)
    after = answer_logprob(model, tokenizer, [pairs[i][1] for i in have], [answers[i] for i in have], micro_batch)
    gains = [0.0] * len(trajectories)
    for i, b, a in zip(have, before, after):
        gains[i] = math.exp(a) - math.exp(b) if space == "probability" else a - b
    return gains


class Judge:
    """A causal LM that scores a search turn: P(yes) / (P(yes) + P(no)) of its next token after JUDGE_QUESTION
    in its chat template, "yes" summed over the spellings of it that are one token of the judge's vocabulary
    (yes, Yes, and with a leading space), "no" likewise. A spelling that its tokenizer splits into pieces is
    left out: its first piece ("Y") would also count every other word that starts with it."""

    def __init__(self, model_path: str | None, device: torch.device | str = "cpu"):
        self.model, self.tokenizer = load_policy(model_path)
        self.model.to(device).eval()
        name = model_path or "the embedded model"
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"{name}: its tokenizer has no chat template, and the judge asks its question as a chat "
                            "turn: pass --judge-model with an instruction-tuned checkpoint")
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if self.pad is None:
            raise DataError(f"{name}: its tokenizer has neither a pad nor an EOS token to pad a batch with")
        self.yes, self.no = single_token_ids(self.tokenizer, YES), single_token_ids(self.tokenizer, NO)
        if not self.yes or not self.no or set(self.yes) & set(self.no):
            raise DataError(f"{name}: its tokenizer writes neither {' nor '.join(YES)} or neither {' nor '.join(NO)} "
                            "as one token, so the judge cannot read P(yes) off one next-token distribution")

    def prompt_ids(self, question: str, query: str, result: str) -> list[int]:
        text = JUDGE_QUESTION.format(question=question, query=query, result=result[:RESULT_CHARS])
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)

    @torch.no_grad()
    def score(self, questions: list[str], queries: list[str], results: list[str], micro_batch: int = 8) -> list[float]:
        out = []
        for i in range(0, len(questions), micro_batch):
            part = slice(i, i + micro_batch)
            prompts = [self.prompt_ids(q, c, r) for q, c, r in zip(questions[part], queries[part], results[part])]
            ids, attn = (x.to(self.model.device) for x in left_pad(prompts, self.pad))
            positions = (attn.cumsum(1) - 1).clamp(min=0)  # each prompt from position 0, padding or not
            logits = self.model(input_ids=ids, attention_mask=attn, position_ids=positions).logits[:, -1]
            logp = torch.log_softmax(logits.float(), -1)
            p_yes, p_no = logp[:, self.yes].exp().sum(1), logp[:, self.no].exp().sum(1)
            out += (p_yes / (p_yes + p_no)).tolist()
        return out

    def __call__(self, trajectories, questions: list[str], micro_batch: int = 8) -> list[float]:
        """Per rollout: the judge's score of its first search and result; 0 without a result."""
        have = [i for i, t in enumerate(trajectories) if t.has_result]
        scores = [0.0] * len(trajectories)
        if have:
            got = self.score([questions[i] for i in have],
                             [next(c for c in trajectories[i].tool_calls if c is not None) for i in have],
                             [trajectories[i].results[0] for i in have], micro_batch)
            for i, s in zip(have, got):
                scores[i] = s
        return scores
