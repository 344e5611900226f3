"""Rewards of MT-GRPO on TriviaQA with a search tool (values of the seed code, arXiv 2505.11821).

A *conversation* is the list of ``{"role", "content"}`` messages after the prompt: the model's turns
(role "assistant") and the environment's replies (role "user", content ``<result>\\n...\\n</result>``).
Each reward is a pure function ``f(conversation, aliases) -> float``.

| key             | level   | range    | meaning                                                          |
|-----------------|---------|----------|------------------------------------------------------------------|
| tool_execution  | turn    | 0 .. 0.2 | 0.2 x share of tool calls whose result is not an ``Error:``      |
| search_answer   | turn    | 0 .. 0.5 | 0.5 if an alias appears in the first tool result                 |
| answer_presence | outcome | 0 .. 0.5 | 0.5 if an alias is a substring of the final answer               |
| exact_match     | outcome | 0 .. 1.0 | 1.0 if the final answer equals an alias (lower-cased, stripped)  |
| format          | outcome | 0 .. 0.2 | layout of every model message (tags present, start, end)         |
| xml             | outcome | 0 .. 0.2 | every tag the model uses is opened once and closed once          |

R^T (turn level) = tool_execution + search_answer <= 0.7; R^O (outcome) = the other four <= 1.9.

Reward hacking. As in the seed, a ``<result>`` block the model writes itself earns nothing (only the
environment's first reply to a tool call counts) and listing many candidates earns no exact match
(equality, not containment). Guarded here beyond the seed (see DEVIATIONS.md, item 5): a reply that is an
``Error:`` earns no search_answer (the seed's error texts echo model text), and blank aliases are
ignored. Allowed, as in the paper (see DEVIATIONS.md, item 8): an answer that lists many candidates
("Paris, London, Rome") earns answer_presence 0.5; a search that returns long or many passages earns
search_answer more easily (so more passages or a larger result budget make it easier), whether or not
the model uses the result.

Never raises on model output: malformed output is the normal case early in RL training.
"""
from __future__ import annotations

FIELDS = ("reasoning", "tool", "answer")          # what a model message may contain
FIELD_SETS = (("reasoning",), ("tool", "answer"))  # seed: reasoning, then one of tool / answer
REWARD_MAX = {"tool_execution": 0.2, "search_answer": 0.5, "answer_presence": 0.5,
              "exact_match": 1.0, "format": 0.2, "xml": 0.2}
TURN_REWARDS = ("tool_execution", "search_answer")
OUTCOME_REWARDS = ("answer_presence", "exact_match", "format", "xml")
MAX_TURN_REWARD = 0.7     # max R^T = 0.2 + 0.5
MAX_OUTCOME_REWARD = 1.9  # max R^O = 0.5 + 1.0 + 0.2 + 0.2

# ----------------------------------------------------------------------------- parsing
def find_tag(text: str, tag: str) -> str | None:
    """Content of the first ``<tag>...</tag>`` in ``text``, whitespace-stripped; None if there is none. The seed's
    ``re.search(r"<tag>\\s*(.*?)\\s*</tag>", text, re.DOTALL)``: the first opening tag up to the first closing tag
    after it, found with ``str.find``, as that regex backtracks catastrophically on an unclosed tag (DEVIATIONS.md,
    item 7)."""
    if not isinstance(text, str):
        return None
    start = text.find(f"<{tag}>")
    if start < 0:
        return None
    start += len(tag) + 2
    end = text.find(f"</{tag}>", start)
    return None if end < 0 else text[start:end].strip()


def parse(text: str) -> dict[str, str | None]:
    """A model message as ``{"reasoning", "tool", "answer"}`` (each ``str`` or ``None``): each field looked up on its
    own (``find_tag``), so a message may hold a tool call and an answer; with duplicate tags the *first* wins."""
    return {field: find_tag(text, field) for field in FIELDS}


def _messages(conversation) -> list[tuple[str, str]]:
    """(role, text) pairs; tolerates None content, non-string content and non-dict messages."""
    pairs = []
    for m in conversation or []:
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, "")
        pairs.append((role, "" if content is None else str(content)))
    return pairs


def _aliases(aliases) -> list[str]:
    """Aliases lower-cased and stripped. A bare string counts as one alias (iterating it would give
    letters, and "a" is in most answers); blank aliases are dropped ("" is in every string).
    Stripping here makes exact match imply presence (see DEVIATIONS.md, item 6)."""
    if isinstance(aliases, str):
        aliases = [aliases]
    return [str(a).lower().strip() for a in (aliases or []) if str(a).strip()]


def _tool_replies(msgs: list[tuple[str, str]]) -> list[str]:
    """Environment replies to tool calls: for each model message with a parsed ``<tool>``
    that is followed by a "user" message, that message's text (the seed's pairing)."""
    return [msgs[i + 1][1] for i, (role, text) in enumerate(msgs[:-1])
            if role == "assistant" and find_tag(text, "tool") is not None
            and msgs[i + 1][0] == "user"]


def tool_results(conversation) -> list[str | None]:
    """Per tool call, in order: the text inside the ``<result>`` the environment replied with, or None
    (no result came back). Every turn-level reward reads its evidence from here, and only from here."""
    return [find_tag(reply, "result") for reply in _tool_replies(_messages(conversation))]


def last_answer(conversation) -> str | None:
    """The answer of the last model message that has one (seed: ``get_last_answer``)."""
    for role, text in reversed(_messages(conversation)):
        answer = find_tag(text, "answer") if role == "assistant" else None
        if answer is not None:
            return answer
    return None


# ----------------------------------------------------------------------------- turn level
def tool_execution(conversation, aliases=None) -> float:
    """0.2 x (tool calls whose reply is a ``<result>`` not starting with ``Error:``) / tool calls."""
    results = tool_results(conversation)
    if not results:
        return 0.0
    ok = sum(r is not None and not r.startswith("Error:") for r in results)
    return 0.2 * (ok / len(results))


def search_answer(conversation, aliases) -> float:
    """0.5 if an alias (case-insensitive substring) is in the first tool result, else 0. Only the environment's
    reply to a tool call is read, so a model writing ``<result>Paris</result>`` itself gets nothing. Like the seed
    we take the first reply holding a ``<result>``; unlike it, an ``Error:`` result scores 0 (DEVIATIONS.md, item 5)."""
    first = next((r for r in tool_results(conversation) if r is not None), None)
    if first is None or first.startswith("Error:"):
        return 0.0
    return 0.5 if any(a in first.lower() for a in _aliases(aliases)) else 0.0


# ----------------------------------------------------------------------------- outcome level
def answer_presence(conversation, aliases) -> float:
    """0.5 if an alias, lower-cased, is a substring of the lower-cased final answer."""
    answer = last_answer(conversation)
    if answer is None:
        return 0.0
    return 0.5 if any(a in answer.lower() for a in _aliases(aliases)) else 0.0


def exact_match(conversation, aliases) -> float:
    """1.0 if the final answer equals an alias after lower() and strip(), else 0."""
    answer = last_answer(conversation)
    if answer is None:
        return 0.0
    return 1.0 if answer.lower().strip() in _aliases(aliases) else 0.0


def _format_score(text: str) -> float:
    """Seed's per-message layout score in [0, 1], counted in points of 0.2 (exact in floats)."""
    # Field sets whose tags appear at all (even unclosed): seed's 0.4 x share of the 2 sets.
    present = sum(any(f"<{t}>" in text or f"</{t}>" in text for t in field_set)
                  for field_set in FIELD_SETS)
    fully_parsed = any(v is not None for v in parse(text).values())
    points = present if fully_parsed else 0   # seed: only once some field parses completely
    # The seed's "spacing" point, given to every message, even one with no tags (DEVIATIONS.md, item 8)
    points += 1
    body = text.strip()
    points += any(body.startswith(f"<{t}>") for t in FIELD_SETS[0])   # starts with <reasoning>
    points += any(body.endswith(f"</{t}>") for t in FIELD_SETS[-1])   # ends with </tool|answer>
    return points / 5


def _xml_score(text: str) -> float:
    """Seed's per-message tag-count score: 1 when each used tag opens once and closes once.
    Goes negative with repeated tags (3 x <tool> costs 2 points)."""
    score, checks = 0, 0
    for tag in FIELDS:
        opened, closed = text.count(f"<{tag}>"), text.count(f"</{tag}>")
        if opened or closed:
            score += (1 - abs(opened - 1)) + (1 - abs(closed - 1))
            checks += 2
    return score / checks if checks else 0.0


def _mean_over_model_messages(conversation, per_message) -> float:
    scores = [per_message(text) for role, text in _messages(conversation) if role == "assistant"]
    return sum(scores) / len(scores) if scores else 0.0


def format_reward(conversation, aliases=None) -> float:
    """0.2 x mean over model messages of the layout score."""
    return 0.2 * _mean_over_model_messages(conversation, _format_score)


def xml_reward(conversation, aliases=None) -> float:
    """0.2 x mean over model messages of the tag-count score, floored at 0. The floor is applied
    to the mean, so a message with duplicated tags can cancel a clean one (clean 1.0 and one at
    -1.0 average to 0; see DEVIATIONS.md, item 8)."""
    return max(0.0, 0.2 * _mean_over_model_messages(conversation, _xml_score))


REWARD_FUNCS = {"tool_execution": tool_execution, "search_answer": search_answer,
                "answer_presence": answer_presence, "exact_match": exact_match,
                "format": format_reward, "xml": xml_reward}


# ----------------------------------------------------------------------------- batch API
def compute(conversations: list, aliases: list) -> dict[str, list[float]]:
    """All six rewards for a batch: ``{name: [reward of conversation i]}``, keys as REWARD_MAX."""
    if len(conversations) != len(aliases):
        raise ValueError(f"{len(conversations)} conversations but {len(aliases)} alias lists")
    return {name: [float(fn(c, a)) for c, a in zip(conversations, aliases)]
            for name, fn in REWARD_FUNCS.items()}


def level_sums(scores: dict[str, list[float]]) -> tuple[list[float], list[float]]:
    """(R^T, R^O): per conversation, the sum of the turn-level and of the outcome-level rewards."""
    n = len(next(iter(scores.values()), []))
    r_t = [sum(scores[k][i] for k in TURN_REWARDS) for i in range(n)]
    r_o = [sum(scores[k][i] for k in OUTCOME_REWARDS) for i in range(n)]
    return r_t, r_o


def means(scores: dict[str, list[float]]) -> dict[str, float]:
    """Batch mean of each reward, for logging (0.0 for an empty batch)."""
    return {k: sum(v) / len(v) if v else 0.0 for k, v in scores.items()}


# ----------------------------------------------------------------------------- K turns
def call_rewards(conversation, aliases, support=(), max_calls: int | None = None) -> list[float]:
    """The turn-level reward of each tool call k, in order (K-turn MT-GRPO, see DEVIATIONS.md,
    item 17): 0.2 if call k executed (its reply is a ``<result>`` not starting with ``Error:``) plus
    0.5 if result k holds *new* evidence: an alias of an evidence item that no earlier result held.
    Evidence items are each alias list in ``support`` (a two-hop question's bridge entity) and the
    answer's ``aliases``. "New" keeps a model from earning the 0.5 twice by repeating a search.

    With one call and no support this is exactly the two-turn R^T, tool_execution + search_answer.
    ``max_calls`` pads (with 0, "no call") or cuts the list to that length.
    """
    items = [_aliases(a) for a in support] + [_aliases(aliases)]
    found, out = set(), []
    for result in tool_results(conversation):
        ok = result is not None and not result.startswith("Error:")
        new = {j for j, item in enumerate(items)
               if ok and j not in found and any(a in result.lower() for a in item)}
        found |= new
        out.append(0.2 * ok + 0.5 * bool(new))
    if max_calls is not None:
        out = (out + [0.0] * max_calls)[:max_calls]
    return out


def k_turn_levels(conversations: list, aliases: list, supports: list, max_calls: int) -> tuple[list, list]:
    """(R_T, turns) for K-turn MT-GRPO (mt_grpo.k_turn_advantages), K = max_calls + 1: R_T[i] =
    call_rewards padded to max_calls; turns[i] = 1 + the tool results rollout i received (a result
    starts a new turn, as in env.py)."""
    R_T, turns = [], []
    for conv, a, s in zip(conversations, aliases, supports):
        calls = call_rewards(conv, a, s or ())
        R_T.append((calls + [0.0] * max_calls)[:max_calls])
        turns.append(1 + min(len(calls), max_calls))
    return R_T, turns
