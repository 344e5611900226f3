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
A model message is the decode of its ids (less a trailing end-of-turn token), up to the end of its stop
string (``message_text``: the seed's text drops a token's overhang past it, the ids keep it). When an
episode ends the environment appends the template's close (``<|im_end|>\\n``), so ``decode(completion_ids)``
is the chat template's rendering of ``messages`` after the prompt, overhangs aside.
``turn_idx`` marks every id: 0 = environment, k = the model's turn k.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

import rewards
from config import EnvConfig

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


@dataclass
class Trajectory:
    prompt_ids: list[int]
    completion_ids: list[int]          # model and environment tokens after the prompt
    turn_idx: list[int]                # per completion id: 0 = environment, k = model turn k
    messages: list[dict]               # {"role": "assistant"|"user", "content"} after the prompt
    tool_calls: list[str | None]       # per assistant turn: the raw <tool> content or None
    results: list[str]                 # the text inside each <result> the environment returned (not the reminders)
    truncated: bool = False
    sampler_logprobs: list[float] = field(default_factory=list)  # per completion id (NaN: environment's)

    def add(self, ids: list[int], turn: int = 0, logprobs: list[float] | None = None) -> None:
        """Append completion ids: model turn ``turn``'s with the sampler's log-probs, or the environment's (0, NaN)."""
        self.completion_ids += ids
        self.turn_idx += [turn] * len(ids)
        self.sampler_logprobs += list(logprobs) if logprobs is not None else [math.nan] * len(ids)

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
    """Role markers read off the tokenizer's own chat template (rendered around sentinels): the ids it would write."""
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


def message_text(decoded: str) -> str:
    """A model message's text: its ids decoded, up to the end of the first stop string in them. The seed's text
    (vLLM's, which ends at the stop string) drops what the token that completed it overhangs (a "." after
    "</answer>"), which its format reward would read; the ids, which the loss trains on, keep that token."""
    ends = [decoded.find(s) + len(s) for s in STOP if s in decoded]
    return decoded[:min(ends)] if ends else decoded


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
    """Run one JSON tool command; returns the text to put inside ``<result>``: the passages found, cut to
    ``result_max_tokens``. Never raises: the command is model output, so every failure is an ``Error: ...`` text
    the model can read."""
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
    if not isinstance(args, dict) or "query" not in args:  # the seed's tool(**args) fails: an Error: reply
        return f"Error: {TOOL_NAME} needs \"args\": {{\"query\": \"...\"}}."
    if set(args) != {"query"}:  # the seed called tool(**args): extra arguments were an error there too
        return f"Error: {TOOL_NAME} takes only the argument \"query\"."
    if not isinstance(args["query"], str):  # the seed hands it to its search, which fails and replies this
        return "Error during search: the query is not text."  # (not "Error:": the seed's reward counts it as run)
    try:
        hits = searcher.search(args["query"], cfg.passages)  # an empty query finds nothing, as the seed's does
    except Exception as e:  # a broken index must not kill a training run
        return f"Error: the search failed ({type(e).__name__})."
    if not hits:
        return "No relevant passage found."  # the seed's empty answer, not an error
    text = "\n\n".join(f"{h.get('title', '')}\n{h.get('text', '')}".strip() for h in hits)
    ids = _encode(tokenizer, text, plain=True)
    if 0 < cfg.result_max_tokens < len(ids):  # cut with the tokenizer; drop a half-cut character
        text = _decode(tokenizer, ids[:cfg.result_max_tokens]).rstrip("\ufffd")
    return text or "Error: the search returned empty passages."


# ----------------------------------------------------------------------------- rollout
def _step(traj: Trajectory, new: list[int], new_logprobs: list[float], tokenizer, searcher, cfg: EnvConfig) -> bool:
    """Append one model message (its ids and the sampler's log-probs of them) and the environment's reaction;
    returns whether the episode goes on."""
    m = _markers(tokenizer)
    ends_turn = bool(new) and new[-1] == m.close[0]
    text = message_text(_decode(tokenizer, new[:-1] if ends_turn else new))
    # MT-GRPO's turn k is everything the model writes after k-1 tool results (the seed splits at the first
    # <result>); a message answered with a format reminder instead of a result does not start a new one.
    traj.add(new, len(traj.results) + 1, new_logprobs)
    traj.messages.append({"role": "assistant", "content": text})
    parsed = rewards.parse(text)
    traj.tool_calls.append(parsed["tool"])
    used = len(traj.completion_ids)
    stopped = bool(new) and (new[-1] in end_ids(tokenizer) or any(s in text for s in STOP))
    traj.truncated = (used > cfg.max_completion_tokens if cfg.budget == "seed"  # the seed's: a message went past it
                      else not stopped and used + len(m.close) >= cfg.max_completion_tokens)  # the budget cut it
    reply = None
    if traj.truncated or parsed["answer"] is not None:
        pass
    elif parsed["tool"] is None:
        reply = NO_TOOL_REPLY
    elif len(traj.results) < cfg.max_tool_calls:  # a call past it ends the episode (the seed's is_completed)
        reply = "<result>\n" + call_tool(parsed["tool"], searcher, cfg, tokenizer) + "\n</result>"
    close = list(m.close[1:] if ends_turn else m.close)  # the model's EOS already wrote "<|im_end|>"
    if reply is not None:
        reply_ids = _encode(tokenizer, reply, plain=True)
        reply = _decode(tokenizer, reply_ids)  # what the ids say: a vocabulary without some bytes drops them
        env = close + list(m.user_open) + reply_ids + list(m.model_open)
        # room for one more model token and the close (the seed's budget appends it whatever its length)
        if cfg.budget == "seed" or used + len(env) + 1 + len(m.close) <= cfg.max_completion_tokens:
            traj.add(env)
            traj.messages.append({"role": "user", "content": reply})
            if reply.startswith("<result>"):
                traj.results.append(reply[len("<result>\n"):-len("\n</result>")])
            return True
        traj.truncated = True
    traj.add(close)
    n = cfg.max_completion_tokens  # (the seed's budget) train on the ids within it
    traj.truncated |= len(traj.completion_ids) > n
    traj.completion_ids, traj.turn_idx, traj.sampler_logprobs = (traj.completion_ids[:n], traj.turn_idx[:n],
                                                                 traj.sampler_logprobs[:n])
    return False


def rollout(policy, tokenizer, questions: list[str], G: int, searcher, cfg: EnvConfig) -> list[Trajectory]:
    """G episodes per question in lock-step: a round is one ``policy.generate`` call over the live episodes, then
    each one's environment step. ``len(questions) * G`` trajectories: ``[i*G:(i+1)*G]`` are ``questions[i]``'s."""
    close_len = len(_markers(tokenizer).close)
    if cfg.max_completion_tokens <= close_len + 1 or cfg.max_turn_tokens < 1 or G < 1:
        raise ValueError(f"need max_completion_tokens > {close_len + 1}, max_turn_tokens >= 1 and G >= 1")
    policy.start_rollout()
    trajs = [Trajectory(prompt, [], [], [], [], []) for prompt in
             (build_prompt(tokenizer, q, cfg) for q in questions) for _ in range(G)]
    live = list(trajs)
    while live:
        # Room for this turn: the budget minus what is used and the final close (the seed's budget: a whole turn)
        limits = [cfg.max_turn_tokens if cfg.budget == "seed" else
                  min(cfg.max_turn_tokens, cfg.max_completion_tokens - len(t.completion_ids) - close_len) for t in live]
        outs = policy.generate([t.prompt_ids + t.completion_ids for t in live], max(limits), cfg.sampling(), STOP)
        if len(outs) != len(live):
            raise RuntimeError(f"policy returned {len(outs)} rows for {len(live)} live episodes")
        logprobs = policy.last_logprobs or [[] for _ in outs]
        # cut_turn again: the environment trusts no policy; a cut keeps a prefix, so the first len(ids) log-probs
        cuts = [cut_turn(out, tokenizer, STOP, limit) for out, limit in zip(outs, limits)]
        live = [t for t, ids, lp in zip(live, cuts, logprobs)
                if _step(t, ids, (list(lp) + [math.nan] * len(ids))[:len(ids)], tokenizer, searcher, cfg)]
    policy.end_rollout()
    return trajs


def episode_stats(trajectories: list[Trajectory], aliases: list[list[str]] | None = None) -> dict:
    """How a batch of episodes went beyond the rewards (train.py logs it, eval.py reports it): tool-call share, calls
    per episode, share whose searches found an alias, share cut, mean completion length, the model's tokens."""
    found = [any(a.strip() and a.lower().strip() in r.lower() for a in al for r in t.results)
             for t, al in zip(trajectories, aliases or [[]] * len(trajectories))]
    n = max(len(trajectories), 1)
    return {"tool_call_rate": sum(any(c is not None for c in t.tool_calls) for t in trajectories) / n,
            "calls_per_episode": sum(len(t.results) for t in trajectories) / n, "answer_found": sum(found) / n,
            "truncated": sum(t.truncated for t in trajectories) / n,
            "completion_tokens": sum(len(t.completion_ids) for t in trajectories) / n,
            "model_tokens": sum(t.model_tokens for t in trajectories)}
