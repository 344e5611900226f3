"""The search environment: multi-turn rollouts of a policy that may call ``wiki_search``.

One episode follows the seed's ``ToolEnv(max_steps=2)``. The prompt is the chat-templated system prompt
(the seed's instructions: one tool, five steps, "use the tool exactly once") and the user turn
``Question: {question}``, ending with the assistant header. Then, message by message:

  1. the model writes a message; it stops at ``</tool>`` or ``</answer>``, at its end-of-turn token
     (``<|im_end|>``, SmolLM2's EOS) or after ``max_turn_tokens``;
  2. the environment looks at that message (``rewards.parse``):
     - an ``<answer>``                                   -> the episode ends;
     - a ``<tool>`` call, ``max_tool_calls`` already run -> the episode ends, the call unexecuted (the seed
       counts the calls *before* it replies, so its max_steps 2 allows one search);
     - a ``<tool>`` call                                 -> it runs the search and replies, as a user
       message, ``<result>\\n...\\n</result>`` (failures read ``Error: ...`` and the episode goes on);
     - neither                                           -> it replies with a plain ``Error: ...`` format
       reminder, *not* wrapped in ``<result>``, and the episode goes on;
  3. if the reply plus one more model token would not fit in ``max_completion_tokens``, the episode
     ends with ``truncated=True`` and the reply is dropped (as it also does when the budget cuts a
     model message short): the seed's 1,024-token cut of the whole completion.

Messages and turns. MT-GRPO's *turn* k is everything the model writes after k-1 tool results (the seed
splits at the first ``<result>``): with one search an episode has at most two turns, turn 1 (every
message up to the call, format reminders included) and turn 2 (every message after the result). A
message answered by a format reminder keeps the turn it is in.

Token-exactness. ``completion_ids`` are the ids the policy sampled, with the environment's text
appended *as ids*, wrapped in the chat template's role markers; nothing is ever re-tokenised from
decoded text, because re-tokenising can change token boundaries and silently corrupt log-probs.
A model message is the decode of its ids (less a trailing end-of-turn token). When an episode
ends the environment appends the template's close (``<|im_end|>\\n``), so ``decode(completion_ids)``
is exactly the chat template's rendering of ``messages`` after the prompt, truncated or not.
``turn_idx`` marks every id: 0 = environment, k = the model's turn k.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

import rewards

STOP = ["</tool>", "</answer>"]
TOOL_NAME = "wiki_search"
NO_TOOL_REPLY = ("Error: no tool call and no answer found. Write either a JSON tool command in "
                 "<tool> tags or your final answer in <answer> tags.")  # the seed's rule, our wording


def tool_command(query: str) -> str:
    """The JSON a well-formed call of the search tool holds: ``{"name": ..., "args": {"query": ...}}``."""
    return json.dumps({"name": TOOL_NAME, "args": {"query": query}})


# The seed's system prompt (DEFAULT_TRIVIALQA_TOOL_PROMPT_TEMPLATE with its tool description), the same
# instructions in our own words: one tool described by name, purpose and argument, five steps, one call,
# and no worked example.
SYSTEM_PROMPT = f"""You have one tool:
{TOOL_NAME}: Searches Wikipedia and returns the best-matching passage.
Arguments: query, the words to search for.

Go through these steps once:
1. Reason inside <reasoning> tags.
2. Call the tool with a JSON command inside <tool> tags: "name" is the tool, "args" its arguments.
3. Its output comes back inside <result> tags.
4. Reason about the output inside <reasoning> tags.
5. Give your final answer inside <answer> tags.

Important:
- Use the tool exactly once. Never call it again, even if the search does not help.
- Use what you know and what the search returns; if it returns nothing useful, answer from what you know.
- Use only the tool and arguments listed, written as JSON.
- Reason about the result before you answer.
- Your answer should match the expected ground truth."""


def user_turn(question: str) -> str:
    """The user message of an episode, as the seed writes it."""
    return f"Question: {question}\n"


# One worked exchange shown as prior chat turns, off by default: small models copy a format far better than
# they follow it (DEVIATIONS.md, item 11).
FEW_SHOT = [
    {"role": "user", "content": user_turn("Who wrote the novel Dracula?")},
    {"role": "assistant", "content": "<reasoning>\nI need the author of the novel Dracula. I will search for it.\n"
                                     f"</reasoning>\n<tool>{tool_command('Dracula novel author')}</tool>"},
    {"role": "user", "content": "<result>\nDracula\nDracula is an 1897 Gothic horror novel by the Irish author Bram Stoker.\n</result>"},
    {"role": "assistant", "content": "<reasoning>\nThe passage says Dracula was written by Bram Stoker.\n</reasoning>\n"
                                     "<answer>Bram Stoker</answer>"},
]


@dataclass(frozen=True)
class Sampling:
    """How a policy draws each id: softmax(logits / temperature), kept to its ``top_k`` most likely ids
    (0 = all) and then to the smallest set whose probability reaches ``top_p``, renormalised; temperature
    0 = greedy. The seed sets none of these, so TRL's defaults of its pinned commit apply: 0.9, 50, 1.0.
    Every policy reports the log-prob of a drawn id under the *whole* tempered distribution,
    log softmax(logits / temperature), before the top-k and top-p cut: the number the trainer computes."""
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0


GREEDY = Sampling(temperature=0.0, top_k=0)


def _doc(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass
class EnvConfig:
    """One episode's settings: the one source of their defaults and docs (config.Config's episode fields and
    evaluate.py's flags read them; ``check`` holds their limits). The defaults are the CPU run's; the seed's
    values are beside them (DEVIATIONS.md, items 9-13)."""
    max_tool_calls: int = _doc(1, "searches an episode may run; a call past them ends it unexecuted (seed: "
                                  "ToolEnv(max_steps=2), one search)")
    max_turn_tokens: int = _doc(64, "new tokens per model message (seed: 1,024; DEVIATIONS.md, item 13)")
    max_completion_tokens: int = _doc(256, "model + environment tokens of one episode; the episode ends at the "
                                           "limit, cut there (seed: 1,024; DEVIATIONS.md, item 24)")
    passages: int = _doc(1, "passages a search returns (seed: the top-1 article; DEVIATIONS.md, item 9)")
    result_max_tokens: int = _doc(96, "token budget of the text inside <result>...</result>; 0 = no cut of its own "
                                      "(seed: none but the episode's)")
    temperature: float = _doc(Sampling.temperature, "sampling temperature; the trainer's log-probs use it too "
                                                    "(seed: 0.9, TRL's default)")
    top_k: int = _doc(Sampling.top_k, "sample among the k most likely ids; 0 = all (seed: 50, TRL's default)")
    top_p: float = _doc(Sampling.top_p, "nucleus sampling; 1 = off (seed: 1.0, TRL's default)")
    few_shot: bool = _doc(False, "one worked exchange as prior chat turns (seed: none; DEVIATIONS.md, item 11)")

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)


def check(cfg: EnvConfig, training: bool = False) -> str | None:
    """What is wrong with an episode's settings, as one message naming the flag, or None. ``training``: the
    temperature must be positive (RL samples; greedy episodes, temperature 0, are for evaluation)."""
    least = {"max_tool_calls": 0, "max_turn_tokens": 1, "max_completion_tokens": 8, "passages": 1,
             "result_max_tokens": 0, "top_k": 0}
    for name, lo in least.items():
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            return f"{name} = {v!r}: pass --{name.replace('_', '-')} N with N >= {lo}"
    t = cfg.temperature
    if not isinstance(t, (int, float)) or t < 0 or (training and t == 0):
        return f"temperature = {t!r}: pass --temperature T with T {'>' if training else '>='} 0"
    if not isinstance(cfg.top_p, (int, float)) or not 0 < cfg.top_p <= 1:
        return f"top_p = {cfg.top_p!r}: pass --top-p P with 0 < P <= 1"
    return None


@dataclass
class Trajectory:
    prompt_ids: list[int]
    completion_ids: list[int]          # model and environment tokens after the prompt
    turn_idx: list[int]                # per completion id: 0 = environment, k = model turn k
    messages: list[dict]               # {"role": "assistant"|"user", "content"} after the prompt
    tool_calls: list[str | None]       # per assistant turn: the raw <tool> content or None
    results: list[str]                 # the inner text of each <result> the environment returned, in order
                                       # (format reminders are not results: they are in messages only)
    truncated: bool = False
    # per completion id: the sampler's log-prob of it (the policy's ``last_logprobs``), NaN on environment
    # ids and where the policy reports none; train.py compares it with the trainer's (the mismatch meter)
    sampler_logprobs: list[float] = field(default_factory=list)

    @property
    def has_result(self) -> bool:
        """A ``<result>`` came back for a tool call (the seed's test for MT-GRPO's turn split)."""
        return bool(self.results)

    @property
    def model_tokens(self) -> int:
        """How many completion tokens the model wrote (turn_idx >= 1), not the environment."""
        return sum(k > 0 for k in self.turn_idx)


# ----------------------------------------------------------------------------- tokens
def _decode(tokenizer, ids) -> str:
    # Keep special tokens and spacing exactly: the decode must reproduce the conversation text.
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _encode(tokenizer, text: str, plain: bool = False) -> list[int]:
    # plain=True: "<|im_end|>" written inside a passage or an echoed tool name stays ordinary text,
    # so environment content can never inject a role marker or an EOS token.
    return tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"]


@dataclass(frozen=True)
class _Markers:
    close: tuple        # after a model message: "<|im_end|>\n"; close[0] is the end-of-turn token
    user_open: tuple    # "<|im_start|>user\n"
    model_open: tuple   # after the user content: "<|im_end|>\n<|im_start|>assistant\n"


@functools.lru_cache(maxsize=8)
def _markers(tokenizer) -> _Markers:
    """Role markers read off the tokenizer's own chat template (rendered around sentinel texts),
    so the environment's ids are exactly what the template would produce."""
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "@MODEL@"}]
    render = functools.partial(tokenizer.apply_chat_template, tokenize=False)
    close = render(conv).split("@MODEL@", 1)[1]
    between, after = render(conv + [{"role": "user", "content": "@ENV@"}],
                            add_generation_prompt=True).split("@MODEL@", 1)[1].split("@ENV@", 1)
    close_ids = _encode(tokenizer, close)
    if not between.startswith(close) or not close_ids:
        raise ValueError("unsupported chat template: a model message must close the same way before a user message and at the end")
    return _Markers(tuple(close_ids), tuple(_encode(tokenizer, between[len(close):])), tuple(_encode(tokenizer, after)))


def end_ids(tokenizer) -> set[int]:
    """Ids that end a model turn: the template's end-of-turn token and the tokenizer's EOS."""
    return {_markers(tokenizer).close[0], tokenizer.eos_token_id} - {None}


def cut_turn(ids, tokenizer, stop: list[str], max_new_tokens: int) -> list[int]:
    """A turn's ids, cut right after the first end-of-turn token or the token that completes a stop
    string (that token may overhang, e.g. '>.'), and to ``max_new_tokens``. Padding goes with the cut."""
    ids, ends = list(ids)[:max(max_new_tokens, 0)], end_ids(tokenizer)
    ids = next((ids[:i + 1] for i, t in enumerate(ids) if t in ends), ids)
    body = ids[:-1] if ids and ids[-1] in ends else ids
    if not any(s in _decode(tokenizer, body) for s in stop):
        return ids
    lo, hi = 1, len(body)  # smallest prefix that contains a stop string (containment only grows)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if any(s in _decode(tokenizer, body[:mid]) for s in stop) else (mid + 1, hi)
    return body[:lo]


# ----------------------------------------------------------------------------- prompt and tool
def build_prompt(tokenizer, question: str, cfg: EnvConfig) -> list[int]:
    text = tokenizer.apply_chat_template(prompt_messages(question, cfg), tokenize=False, add_generation_prompt=True)
    return _encode(tokenizer, text)


def prompt_messages(question: str, cfg: EnvConfig) -> list[dict]:
    """The chat messages before the model's first message: system prompt, optional worked exchange, question."""
    return ([{"role": "system", "content": SYSTEM_PROMPT}] + (FEW_SHOT if cfg.few_shot else [])
            + [{"role": "user", "content": user_turn(str(question))}])


def longest_prompt(tokenizer, questions: list[str], cfg: EnvConfig, candidates: int = 64) -> int:
    """Tokens in the longest prompt of a question set, over its ``candidates`` longest questions by
    characters (every prompt shares the system prompt, so the question decides)."""
    longest = sorted(questions, key=lambda q: len(str(q)), reverse=True)[:candidates]
    return max(len(build_prompt(tokenizer, q, cfg)) for q in longest)


def call_tool(tool_text: str | None, searcher, cfg: EnvConfig, tokenizer) -> str:
    """Run one JSON tool command; returns the text to put inside ``<result>``. Never raises:
    the command is model output, so every failure is an ``Error: ...`` text the model can read."""
    text = _run_tool(tool_text, searcher, cfg.passages)
    ids = _encode(tokenizer, text, plain=True)
    if 0 < cfg.result_max_tokens < len(ids):  # cut with the tokenizer; drop a half-cut character
        text = _decode(tokenizer, ids[:cfg.result_max_tokens]).rstrip("\ufffd")
    return text


def _run_tool(tool_text, searcher, k: int) -> str:
    if tool_text is None:
        return "Error: no tool command found between <tool> and </tool>."
    try:
        command = json.loads(tool_text)
    except (ValueError, RecursionError):  # bad JSON, 5,000-digit numbers, 100,000 nested brackets
        return "Error: the tool command is not valid JSON."
    if not isinstance(command, dict):
        return "Error: the tool command must be a JSON object."
    name = command.get("name")
    if name is None:
        return "Error: the tool command must give the tool's \"name\"."
    if name != TOOL_NAME:  # echo at most 40 characters of the model's text
        return f"Error: unknown tool {str(name)[:40]!r}; the only tool is {TOOL_NAME}."
    args = command.get("args", {})
    if not isinstance(args, dict) or not isinstance(args.get("query"), str) or not args["query"].strip():
        return f"Error: {TOOL_NAME} needs \"args\": {{\"query\": \"...\"}} with a non-empty text query."
    if set(args) != {"query"}:  # the seed called tool(**args): extra arguments were an error there too
        return f"Error: {TOOL_NAME} takes only the argument \"query\"."
    try:
        hits = searcher.search(args["query"], k)
    except Exception as e:  # a broken index must not kill a training run
        return f"Error: the search failed ({type(e).__name__})."
    if not hits:
        return "No relevant passage found."  # the seed's empty answer, not an error
    text = "\n\n".join(f"{h.get('title', '')}\n{h.get('text', '')}".strip() for h in hits)
    return text or "Error: the search returned empty passages."


# ----------------------------------------------------------------------------- rollout
class Sampler(Protocol):
    """What ``rollout`` needs of a policy: env.HFPolicy (the reference), env.ScriptedPolicy (tests),
    fast.CachedPolicy (the speed path), vllm_backend.VLLMPolicy. Subclass it for the no-op defaults."""
    last_logprobs: list[list[float]] | None = None  # per row of the last call: each returned id's log-prob
                                                    # (Sampling's contract); None = not reported

    def start_rollout(self) -> None:
        """Before a rollout's first ``generate`` (a sampler that keeps state per rollout starts it afresh)."""

    def generate(self, batch: list[list[int]], max_new_tokens: int, sampling: Sampling, stop: list[str]) -> list[list[int]]:
        """The ids each row of ``batch`` writes next, one message each: cut after a stop string or an
        end-of-turn id (kept), and to ``max_new_tokens``; drawn as ``sampling`` says."""
        ...

    def end_rollout(self) -> None:
        """After a rollout's last ``generate`` (free what only the rollout needed)."""


def _step(traj: Trajectory, new: list[int], new_logprobs: list[float], tokenizer, searcher, cfg: EnvConfig) -> bool:
    """Append one model message (its ids and the sampler's log-probs of them) and the environment's reaction;
    returns whether the episode goes on."""
    m = _markers(tokenizer)
    ends_turn = bool(new) and new[-1] == m.close[0]
    text = _decode(tokenizer, new[:-1] if ends_turn else new)
    calls_run = len(traj.results)  # tool calls executed so far (each got a <result>)
    # MT-GRPO's turn k is everything the model writes after k-1 tool results (the seed splits at the
    # first <result>); a message answered with a format reminder instead of a result does not start a new one.
    turn = calls_run + 1
    traj.completion_ids += new
    traj.turn_idx += [turn] * len(new)
    traj.sampler_logprobs += new_logprobs
    traj.messages.append({"role": "assistant", "content": text})
    parsed = rewards.parse(text)
    traj.tool_calls.append(parsed["tool"])
    close = list(m.close[1:] if ends_turn else m.close)  # the model's EOS already wrote "<|im_end|>"

    stopped = bool(new) and (new[-1] in end_ids(tokenizer) or any(s in text for s in STOP))
    out_of_room = len(traj.completion_ids) + len(m.close) >= cfg.max_completion_tokens
    reply = None
    if out_of_room and not stopped:
        traj.truncated = True  # the budget, not the model, ended this message
    elif parsed["answer"] is not None:
        pass  # answered
    elif parsed["tool"] is not None and calls_run >= cfg.max_tool_calls:
        pass  # a call past the budget ends the episode unexecuted (the seed: is_completed runs before env_response)
    elif parsed["tool"] is not None:
        reply = "<result>\n" + call_tool(parsed["tool"], searcher, cfg, tokenizer) + "\n</result>"
    else:
        reply = NO_TOOL_REPLY
    if reply is not None:
        reply_ids = _encode(tokenizer, reply, plain=True)
        # The message is what the ids say: a vocabulary without some byte tokens drops characters.
        reply = _decode(tokenizer, reply_ids)
        env = close + list(m.user_open) + reply_ids + list(m.model_open)
        # The reply must leave room for one more model token and the final close, else we stop here.
        if len(traj.completion_ids) + len(env) + 1 + len(m.close) <= cfg.max_completion_tokens:
            traj.completion_ids += env
            traj.turn_idx += [0] * len(env)
            traj.sampler_logprobs += [math.nan] * len(env)
            traj.messages.append({"role": "user", "content": reply})
            if reply.startswith("<result>"):
                traj.results.append(reply[len("<result>\n"):-len("\n</result>")])
            return True
        traj.truncated = True
    traj.completion_ids += close
    traj.turn_idx += [0] * len(close)
    traj.sampler_logprobs += [math.nan] * len(close)
    return False


def rollout(policy: Sampler, tokenizer, questions: list[str], G: int, searcher, cfg: EnvConfig) -> list[Trajectory]:
    """G episodes per question, run in lock-step: each round, one ``policy.generate`` call over the
    episodes still live (in episode order), then the environment's step for each. Returns
    ``len(questions) * G`` trajectories, question-major: ``[i*G:(i+1)*G]`` belong to ``questions[i]``
    (G = 1 with a list that already repeats each question: one episode per entry)."""
    close_len = len(_markers(tokenizer).close)
    if cfg.max_completion_tokens <= close_len + 1 or cfg.max_turn_tokens < 1 or G < 1:
        raise ValueError(f"need max_completion_tokens > {close_len + 1}, max_turn_tokens >= 1 and G >= 1")
    policy.start_rollout()
    trajs = [Trajectory(prompt, [], [], [], [], []) for prompt in
             (build_prompt(tokenizer, q, cfg) for q in questions) for _ in range(G)]
    live = list(trajs)
    while live:
        # Room for this turn: the budget minus what is used and the final close.
        limits = [min(cfg.max_turn_tokens, cfg.max_completion_tokens - len(t.completion_ids) - close_len) for t in live]
        outs = policy.generate([t.prompt_ids + t.completion_ids for t in live], max(limits), cfg.sampling(), STOP)
        if len(outs) != len(live):
            raise RuntimeError(f"policy returned {len(outs)} rows for {len(live)} live episodes")
        logprobs = policy.last_logprobs or [[] for _ in outs]
        # cut_turn again: the environment trusts no policy about stops and budgets. The cut keeps a prefix
        # of each row, so the row's first len(ids) log-probs are those of its ids.
        cuts = [cut_turn(out, tokenizer, STOP, limit) for out, limit in zip(outs, limits)]
        live = [t for t, ids, lp in zip(live, cuts, logprobs)
                if _step(t, ids, (list(lp) + [math.nan] * len(ids))[:len(ids)], tokenizer, searcher, cfg)]
    policy.end_rollout()
    return trajs


def episode_stats(trajectories: list[Trajectory], aliases: list[list[str]] | None = None) -> dict:
    """How a batch of episodes went, beyond the rewards: the share that called the tool, calls per
    episode, the share whose searches found an answer alias, the share cut by the budget, mean
    completion length, and the model's own tokens in all (train.py logs these, evaluate.py reports them)."""
    aliases = aliases if aliases is not None else [[] for _ in trajectories]
    found = [any(a.strip() and a.lower().strip() in r.lower() for a in al for r in t.results)
             for t, al in zip(trajectories, aliases)]
    n = max(len(trajectories), 1)
    return {"tool_call_rate": sum(any(c is not None for c in t.tool_calls) for t in trajectories) / n,
            "calls_per_episode": sum(len(t.results) for t in trajectories) / n, "answer_found": sum(found) / n,
            "truncated": sum(t.truncated for t in trajectories) / n,
            "completion_tokens": sum(len(t.completion_ids) for t in trajectories) / n,
            "model_tokens": sum(t.model_tokens for t in trajectories)}


# ----------------------------------------------------------------------------- policies
class SampledLogprobs:
    """A ``generate`` logits processor that keeps the log-prob of each sampled token under the whole tempered
    distribution, log softmax(logits / temperature) before top-k and top-p: the number the trainer computes
    for the same token (Sampling's contract). transformers runs user processors before its temperature,
    top-k and top-p warpers, so ``scores`` here are the raw logits. A call sees the token sampled by the
    previous step as ``input_ids[:, -1]``; ``finish`` adds the last one. Memory: one (rows x vocabulary)
    tensor, not one per step."""

    def __init__(self, temperature: float = 1.0):
        self.prev, self.steps, self.temperature = None, [], temperature if temperature > 0 else 1.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor, new_tokens: int) -> list[list[float]]:
        if self.prev is not None and len(self.steps) < new_tokens:
            self.steps.append(self.prev.gather(1, sequences[:, -1:]).squeeze(1))
        if not self.steps:
            return [[] for _ in range(sequences.shape[0])]
        return torch.stack(self.steps, dim=1).tolist()


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` left-padded into one batch: (ids, attention mask), each (B, longest), every row's last id in
    the last column (where a causal LM's next-token logits are read)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


class HFPolicy(Sampler):
    """Batched sampling with ``transformers`` ``generate`` (KV cache within a message; each message
    re-reads its context). Rows are left-padded; ``pad == eos`` for SmolLM2, so each row is cut by
    ``cut_turn`` afterwards. ``seed`` gives a private, reproducible random stream. After each call
    ``last_logprobs`` holds, per row, the sampler's log-prob of each returned id (Sampling's contract)."""

    def __init__(self, model, tokenizer, seed: int | None = None):
        self.model, self.tokenizer, self.seed, self.calls = model, tokenizer, seed, 0
        self.last_logprobs: list[list[float]] | None = None
        self.stopping: dict[tuple, object] = {}  # stop strings -> StoppingCriteriaList, built once

    def stop_criteria(self, stop):
        """``generate(stop_strings=...)`` rebuilds its StopStringCriteria, a pass over the whole
        vocabulary (~0.5 s for SmolLM2's 49k tokens), on every call; build it once per stop set."""
        from transformers import StoppingCriteriaList, StopStringCriteria
        if tuple(stop) not in self.stopping:
            self.stopping[tuple(stop)] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stop))])
        return self.stopping[tuple(stop)]

    @torch.no_grad()
    def generate(self, batch, max_new_tokens: int, sampling: Sampling, stop) -> list[list[int]]:
        device = self.model.device
        ends = sorted(end_ids(self.tokenizer))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else ends[0]
        ids, mask = left_pad(batch, pad)
        width = ids.shape[1]
        # Exactly the asked distribution: override what a checkpoint's generation_config may add
        # (Qwen2.5-Instruct: top_k 20, repetition_penalty 1.05), or the ids would be off-policy.
        greedy = sampling.temperature <= 0
        kw = (dict(do_sample=False, temperature=None, top_p=None, top_k=None) if greedy else
              dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k))
        kw.update(repetition_penalty=1.0, min_p=None)
        devices = [device] if device.type == "cuda" else []
        from transformers import LogitsProcessorList
        record = SampledLogprobs(sampling.temperature)
        with torch.random.fork_rng(devices=devices, enabled=self.seed is not None):
            if self.seed is not None:  # one derived seed per call: reproducible, never touches global RNG
                torch.manual_seed(self.seed * 100_003 + self.calls)
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=max_new_tokens,
                                      stopping_criteria=self.stop_criteria(stop) if stop else None,
                                      eos_token_id=ends, pad_token_id=pad, logits_processor=LogitsProcessorList([record]),
                                      use_cache=True, **kw)
        self.calls += 1
        rows = [cut_turn(row, self.tokenizer, stop, max_new_tokens) for row in out[:, width:].tolist()]
        self.last_logprobs = [lp[:len(row)] for lp, row in zip(record.finish(out, out.shape[1] - width), rows)]
        return rows


class ScriptedPolicy(Sampler):
    """Writes given texts instead of sampling (tests). ``turns[r]`` are the texts of episode ``r``,
    turn by turn, where episodes are numbered as ``rollout`` returns them (question-major:
    ``r = i*G + g``). Each text is tokenised and cut like a sampled turn (stop strings, end-of-turn
    token, ``max_new_tokens``); ``<|im_end|>`` in a text is the EOS token, and a script that has
    run out writes just that token.
    Rows are matched to episodes by their context (the ids an episode was last given plus what it
    wrote is a prefix of its next row), so finished episodes may drop out of the batch. Use one
    ScriptedPolicy per rollout."""

    def __init__(self, tokenizer, turns: list[list[str]]):
        self.tokenizer, self.turns = tokenizer, [list(t) for t in turns]
        self.context: list[list[int]] = [[] for _ in turns]
        self.done = [0] * len(turns)  # turns written per episode

    def generate(self, batch, max_new_tokens: int, sampling: Sampling, stop) -> list[list[int]]:
        outs, r = [], 0
        for row in batch:
            while r < len(self.context) and row[:len(self.context[r])] != self.context[r]:
                r += 1  # episode r has finished: its context is not a prefix of this row
            if r == len(self.context):
                raise ValueError("a batch row matches no scripted episode (one ScriptedPolicy per rollout)")
            script = self.turns[r]
            if self.done[r] < len(script):
                ids = _encode(self.tokenizer, script[self.done[r]])
            else:
                ids = [_markers(self.tokenizer).close[0]]
            ids = cut_turn(ids, self.tokenizer, stop, max_new_tokens)
            self.context[r], self.done[r] = list(row) + ids, self.done[r] + 1
            outs.append(ids)
            r += 1
        return outs
